"""Serving: KV caches, sampling, the continuous-batching engine, quantization, speculative decoding, HTTP."""
