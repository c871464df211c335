"""Evaluation: held-out loss during training, perplexity and bits per byte of a workdir's model (`maxlm eval`)."""
