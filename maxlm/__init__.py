"""maxlm: a JAX-first codebase for training and serving Llama-family language models."""

__version__ = "0.1.0"
