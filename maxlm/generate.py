"""Plain sampling from a trained model by repeated full forward passes (the KV-cache engine is maxlm.serve)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_tokens(graphdef: nnx.GraphDef, params, prompt_ids: list[int], num_tokens: int, *, max_len: int,
                  temperature: float = 0.7, seed: int = 0, eos_id: int | None = None,
                  vocab_limit: int | None = None) -> list[int]:
  """Extends `prompt_ids` by up to `num_tokens` tokens (stops at eos); one compiled shape for all steps.

  vocab_limit: only ids below it are sampled (the tokenizer's size when the model's vocabulary is padded larger).
  """
  length = min(max_len, len(prompt_ids) + num_tokens)
  if len(prompt_ids) >= length:
    raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room under max_len={max_len}")

  @jax.jit
  def next_token(params, tokens, index, key):
    logits = nnx.merge(graphdef, params)(tokens)[0, index - 1].astype(jnp.float32)
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
      logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    if temperature == 0:
      return jnp.argmax(logits)
    return jax.random.categorical(key, logits / temperature)

  buf = np.zeros((1, length), np.int32)
  buf[0, :len(prompt_ids)] = prompt_ids
  key = jax.random.key(seed)
  out = []
  for index in range(len(prompt_ids), length):
    key, sub = jax.random.split(key)
    tok = int(next_token(params, jnp.asarray(buf), index, sub))
    if eos_id is not None and tok == eos_id:
      break
    buf[0, index] = tok
    out.append(tok)
  return out
