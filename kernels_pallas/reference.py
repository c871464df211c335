"""Plain-JAX attention references the Pallas kernels are tested against: dense, O(seq^2), obviously correct.

Both compute in float32 at `Precision.HIGHEST` whatever the input dtype and return the input dtype, so a test
compares a kernel with the exact answer rather than with another rounding of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, *, causal: bool, sliding_window: int | None,
                   q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                   kv_valid: jax.Array | None = None) -> jax.Array:
  """Boolean [batch|1, q, k] visibility of key positions `k_pos` [k] from query positions `q_pos` [batch|1, q].

  causal: k <= q. sliding_window w: q - k < w (and k - q < w when not causal). Segment ids: equal ids only.
  kv_valid [batch|1, k]: keys that exist at all (paged caches, padding).
  """
  q = q_pos[..., :, None]
  k = k_pos[None, None, :]
  mask = jnp.ones(jnp.broadcast_shapes(q.shape, k.shape), bool)
  if causal:
    mask &= k <= q
  if sliding_window is not None:
    mask &= q - k < sliding_window
    if not causal:
      mask &= k - q < sliding_window
  if q_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  if kv_valid is not None:
    mask &= kv_valid[:, None, :]
  return mask


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, sm_scale: float) -> jax.Array:
  """Dense GQA attention: q [b, s, h, d], k/v [b, t, kv, d], mask [b|1, s, t] -> [b, s, h, d] in q's dtype.

  A query row that sees no key outputs zeros (the kernels' convention), not the mean of the values.
  """
  b, s, h, d = q.shape
  kv = k.shape[2]
  if h % kv:
    raise ValueError(f"{h} query heads are not a multiple of {kv} key/value heads")
  qg = q.astype(jnp.float32).reshape(b, s, kv, h // kv, d)
  scores = jnp.einsum("bskgd,btkd->bkgst", qg, k.astype(jnp.float32), precision=_HIGHEST) * sm_scale
  visible = mask[:, None, None]
  scores = jnp.where(visible, scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  p = jnp.where(visible, jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum("bkgst,btkd->bskgd", p, v.astype(jnp.float32), precision=_HIGHEST)
  return out.reshape(b, s, h, d).astype(q.dtype)


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                        segment_ids: jax.Array | None = None, sliding_window: int | None = None,
                        sm_scale: float | None = None) -> jax.Array:
  """Dense causal/non-causal GQA attention with packed-sequence segment ids [b, s] and a sliding window."""
  s, t = q.shape[1], k.shape[1]
  if s != t:
    raise ValueError(f"query length {s} != key length {t}")
  pos = jnp.arange(s)
  mask = attention_mask(pos[None], pos, causal=causal, sliding_window=sliding_window,
                        q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
  return masked_attention(q, k, v, mask, q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)


def dequantize_pages(pages: jax.Array, scales: jax.Array | None) -> jax.Array:
  """int8 pages [P, page_size, kv, d] times per-page-per-head scales [P, kv] -> float32 (identity if no scales)."""
  if scales is None:
    return pages.astype(jnp.float32)
  return pages.astype(jnp.float32) * scales.astype(jnp.float32)[:, None, :, None]


def paged_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                              lengths: jax.Array, *, k_scales: jax.Array | None = None,
                              v_scales: jax.Array | None = None, sm_scale: float | None = None) -> jax.Array:
  """Dense attention over each sequence's gathered pages.

  q [b, q_len, h, d]; pages [P, page_size, kv, d]; page_table [b, max_pages]; lengths [b] count every token
  including the q_len new ones, so query i sits at position lengths - q_len + i and sees keys 0..that position.
  """
  b, q_len = q.shape[:2]
  page_size = k_pages.shape[1]
  max_pages = page_table.shape[1]

  def gather(pages, scales):
    dense = dequantize_pages(pages, scales)[page_table]  # [b, max_pages, page_size, kv, d]
    return dense.reshape(b, max_pages * page_size, *dense.shape[3:])

  k, v = gather(k_pages, k_scales), gather(v_pages, v_scales)
  q_pos = lengths[:, None] - q_len + jnp.arange(q_len)[None]
  k_pos = jnp.arange(max_pages * page_size)
  mask = attention_mask(q_pos, k_pos, causal=True, sliding_window=None,
                        kv_valid=k_pos[None] < lengths[:, None])
  return masked_attention(q, k, v, mask, q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
