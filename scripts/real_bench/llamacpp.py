"""llama.cpp (through llama-cpp-python's C bindings) as a greedy decoder over a GGUF file, batch 1 or more.

It runs the file's own quantized blocks (Q4_1, Q4_K, ...; llama.cpp quantizes the activations to 8 bits for those
dot products). The batch's sequences decode together: one llama_decode call per step carries one token of each
(seq ids 0..b-1), so batch 8 is the same batched work as maxlm's and transformers'. Greedy = argmax of the logits.
Optional: the section says how to install it when `import llama_cpp` fails.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np

INSTALL = "pip install llama-cpp-python --no-binary llama-cpp-python"
_QUIET = None  # the log callback that drops llama.cpp's load-time chatter (kept alive for the C side)


def available() -> tuple[bool, str]:
  """(importable, version or the reason it is not)."""
  try:
    import llama_cpp
  except ImportError as e:
    return False, f"not installed ({INSTALL}): {e}"
  return True, llama_cpp.__version__


def system_info() -> str:
  """llama.cpp's build features (SIMD extensions, OpenMP, ...)."""
  import llama_cpp

  return llama_cpp.llama_print_system_info().decode().strip()


class LlamaCppDecoder:
  """A GGUF model and a context holding `max_batch` sequences of up to `max_len` tokens each."""

  def __init__(self, gguf: Path, *, max_len: int, max_batch: int, threads: int):
    import llama_cpp as lc

    global _QUIET
    self.lc = lc
    if _QUIET is None:
      _QUIET = lc.llama_log_callback(lambda level, text, user_data: None)
      lc.llama_log_set(_QUIET, ctypes.c_void_p(0))
    lc.llama_backend_init()
    mp = lc.llama_model_default_params()
    mp.n_gpu_layers = 0
    self.model = lc.llama_model_load_from_file(str(gguf).encode(), mp)
    if not self.model:
      raise RuntimeError(f"llama.cpp could not load {gguf}")
    cp = lc.llama_context_default_params()
    cp.n_ctx = max_len * max_batch
    cp.n_seq_max = max_batch
    cp.kv_unified = True  # one KV buffer for all sequences (sized n_ctx), not n_ctx / n_seq_max each
    cp.n_batch = cp.n_ubatch = max(max_len * max_batch, 32)
    cp.n_threads = cp.n_threads_batch = threads
    cp.no_perf = True
    self.ctx = lc.llama_init_from_model(self.model, cp)
    if not self.ctx:
      raise RuntimeError(f"llama.cpp could not create a context of {max_batch} x {max_len} tokens")
    self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
    self.max_len, self.max_batch, self.threads = max_len, max_batch, threads
    self.batch = lc.llama_batch_init(cp.n_batch, 0, max_batch)

  def close(self) -> None:
    """Frees the batch, the context and the model."""
    lc = self.lc
    if self.ctx:
      lc.llama_batch_free(self.batch)
      lc.llama_free(self.ctx)
      lc.llama_model_free(self.model)
      self.ctx = self.model = None

  def set_threads(self, threads: int) -> None:
    """Threads of the following decode calls."""
    self.lc.llama_set_n_threads(self.ctx, threads, threads)
    self.threads = threads

  def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
    """One llama_decode of (token, position, sequence, wants logits) entries."""
    b = self.batch
    b.n_tokens = len(entries)
    for i, (tok, pos, seq, logits) in enumerate(entries):
      b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
      b.seq_id[i][0] = seq
    rc = self.lc.llama_decode(self.ctx, b)
    if rc != 0:
      raise RuntimeError(f"llama_decode returned {rc}")

  def _argmax(self, i: int) -> int:
    """Greedy token from the logits of the batch's i-th output."""
    ptr = self.lc.llama_get_logits_ith(self.ctx, i)
    return int(np.argmax(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                                shape=(self.n_vocab,))))

  def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations of exactly new_tokens tokens (eos ignored), all prompts decoded together."""
    if len(prompts) > self.max_batch or any(len(p) + new_tokens > self.max_len for p in prompts):
      raise ValueError(f"{len(prompts)} prompts x {max(map(len, prompts))} + {new_tokens} tokens do not fit the "
                       f"context of {self.max_batch} x {self.max_len}")
    self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
    entries, last_index = [], []
    for s, p in enumerate(prompts):
      entries += [(t, j, s, j == len(p) - 1) for j, t in enumerate(p)]
      last_index.append(len(entries) - 1)
    self._decode(entries)
    out = [[self._argmax(i)] for i in last_index]
    pos = [len(p) for p in prompts]
    for _ in range(new_tokens - 1):
      self._decode([(o[-1], pos[s], s, True) for s, o in enumerate(out)])
      for s, o in enumerate(out):
        o.append(self._argmax(s))
        pos[s] += 1
    return out


def timed(decoder: LlamaCppDecoder, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
  """(wall seconds, outputs) of one generate call."""
  t0 = time.perf_counter()
  out = decoder.generate(prompts, new_tokens)
  return time.perf_counter() - t0, out
