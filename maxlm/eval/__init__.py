"""Evaluation: held-out loss during training, perplexity and bits per byte of a workdir's model (`maxlm eval`).

heldout.py        the training loop's held-out loss (mean token NLL of the eval split's fixed batches)
windows.py        rolling windows: every token after a document's first scored once, with the most left context
loglikelihood.py  per-row log-likelihoods of right-padded windows, jitted on the model's mesh; documents' NLL
perplexity.py     `maxlm eval`: reading text / JSONL / tokenized splits, the report table and JSON
"""
