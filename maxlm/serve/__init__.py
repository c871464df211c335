"""Serving: KV caches, sampling, the continuous-batching engine, quantization, speculative decoding, HTTP.

engine.py runs requests (scheduler.py: slots and pages; programs.py: jitted steps; detokenize.py: text;
layout.py: the serving mesh; loading.py: a workdir's model and draft); server.py serves an engine over HTTP
(bridge.py: the engine thread; app.py: the OpenAI-style API; api.py: bodies and schemas).
"""
