"""Post-training compression of dense layers from calibration statistics (issue 22), one layer at a time.

Modules: `hessian` (the layer's H = 2/N Σ x xᵀ and the inverse-Hessian factor), `gptq` (GPTQ and round-to-nearest
quantization), `sparsegpt` (SparseGPT pruning, unstructured or n:m) and `pruning_scores` (magnitude and Wanda masks).
"""
