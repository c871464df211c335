"""The multi-step decode loop's K/V handling on the XLA path: the span before the call, read once, and a per-step
buffer for the call's own K/V, written to the pages once when the loop ends.

Every step of a decode call attends to (a) the tokens cached before the call, gathered from the pages into a
head-major [b, kv_heads, kv_len, d] copy that the loop never writes, and (b) the K/V of the call's own steps,
kept in a [b, kv_heads, max_steps, d] buffer whose step-i column every row writes at once (one in-place
dynamic-update-slice per layer). Writing each step's K/V into the pages and into a dense copy instead costs two
scatters per layer per step plus the copies XLA inserts to keep the loop-carried copy alive; here the pages get
one scatter per layer per call. One softmax spans both parts, so the result equals attention over the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas import masking
from maxlm.models.transformer import Block
from maxlm.serve import kv_cache
from maxlm.serve.forward import Decoder, decoder_pass

Layer = dict[str, jax.Array]


def split_attention(q: jax.Array, k_old: jax.Array, v_old: jax.Array, k_new: jax.Array, v_new: jax.Array,
                    old_len: jax.Array, step: jax.Array, scale: float, sliding_window: int | None) -> jax.Array:
  """Attention of one query per row (position old_len + step) over the old span and the call's steps 0..step.

  q [b, 1, h, d]; k_old, v_old [b, kv, L, d] hold positions 0..L-1 (those < old_len [b] are real); k_new, v_new
  [b, kv, S, d] hold positions old_len + j at column j (those <= step are real). Returns [b, 1, h, d].
  """
  b, s, h, d = q.shape
  kv = k_old.shape[1]
  qh = q.reshape(b, s, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # [b, kv, g, 1, d]
  old = jnp.einsum("bkgsd,bktd->bkgst", qh, k_old.astype(q.dtype), preferred_element_type=jnp.float32) * scale
  new = jnp.einsum("bkgsd,bktd->bkgst", qh, k_new.astype(q.dtype), preferred_element_type=jnp.float32) * scale
  t_old, t_new = jnp.arange(k_old.shape[2]), jnp.arange(k_new.shape[2])
  see_old = t_old[None] < old_len[:, None]  # [b, L]: causal, since every old position precedes the query
  see_new = jnp.broadcast_to(t_new <= step, (b, t_new.shape[0]))  # [b, S]
  if sliding_window is not None:
    query = old_len + step
    see_old &= t_old[None] > (query - sliding_window)[:, None]
    see_new &= (step - t_new)[None] < sliding_window
  old = jnp.where(see_old[:, None, None, None], old, masking.MASK_VALUE)
  new = jnp.where(see_new[:, None, None, None], new, masking.MASK_VALUE)
  probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1)
  p_old, p_new = probs[..., :old.shape[-1]], probs[..., old.shape[-1]:]
  out = (jnp.einsum("bkgst,bktd->bkgsd", p_old.astype(q.dtype), v_old.astype(q.dtype),
                   preferred_element_type=jnp.float32)
         + jnp.einsum("bkgst,bktd->bkgsd", p_new.astype(q.dtype), v_new.astype(q.dtype),
                      preferred_element_type=jnp.float32))
  return out.astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


def old_span(cache: list[Layer], page_table: jax.Array, kv_len: int, dtype) -> list[tuple[jax.Array, jax.Array]]:
  """Each layer's first kv_len cached positions, head-major [b, kv, kv_len, d], in the attention dtype."""
  out = []
  for layer in cache:
    k, v = kv_cache.gather_kv(layer, page_table, kv_len)
    out.append((k.transpose(0, 2, 1, 3).astype(dtype), v.transpose(0, 2, 1, 3).astype(dtype)))
  return out


def new_buffers(cache: list[Layer], batch: int, max_steps: int) -> list[tuple[jax.Array, jax.Array]]:
  """Zeroed per-layer [b, kv, max_steps, d] K/V buffers in the cache's dtype (the values attention reads back)."""
  _, _, kv, d = cache[0]["k"].shape
  z = jnp.zeros((batch, kv, max_steps, d), cache[0]["k"].dtype)
  return [(z, z) for _ in cache]


def step_logits(model: Decoder, old: list[tuple[jax.Array, jax.Array]], new: list[tuple[jax.Array, jax.Array]],
                tok: jax.Array, pos: jax.Array, step: jax.Array, active: jax.Array
                ) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
  """One decode step of every row (token tok [b] at position pos + step): (logits [b, vocab], updated buffers)."""
  updated = []

  def attend(index: int, block: Block, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    k_new, v_new = new[index]
    zero = jnp.int32(0)
    k_new = jax.lax.dynamic_update_slice(k_new, k.transpose(0, 2, 1, 3).astype(k_new.dtype), (zero, zero, step, zero))
    v_new = jax.lax.dynamic_update_slice(v_new, v.transpose(0, 2, 1, 3).astype(v_new.dtype), (zero, zero, step, zero))
    updated.append((k_new, v_new))
    k_old, v_old = old[index]
    return split_attention(q, k_old, v_old, k_new, v_new, pos, step, block.attn.scale, block.attn.sliding_window)

  positions = (pos + step)[:, None]
  logits = decoder_pass(model, tok[:, None], positions, active[:, None], attend, jnp.zeros_like(pos))
  return logits, updated


def write_back(cache: list[Layer], new: list[tuple[jax.Array, jax.Array]], pos: jax.Array, count: jax.Array,
               page_table: jax.Array) -> list[Layer]:
  """The cache with each row's first count[i] buffered K/V written at positions pos[i], pos[i] + 1, ..."""
  steps = new[0][0].shape[2]
  positions = pos[:, None] + jnp.arange(steps)[None]
  valid = jnp.arange(steps)[None] < count[:, None]
  return [kv_cache.write_kv(layer, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions, valid, page_table,
                            pos + count)
          for layer, (k, v) in zip(cache, new, strict=True)]
