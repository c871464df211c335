"""Checkpoint conversion between maxlm and other formats (Hugging Face safetensors)."""
