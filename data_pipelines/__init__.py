"""Data pipelines: corpus sources, tokenizer, and grain streaming (packing, batching, resumable state)."""
