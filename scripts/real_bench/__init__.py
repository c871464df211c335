"""The sections of scripts/bench_real.py (real GGUF weights: perplexity, decode, speculative, quantization, memory)."""
