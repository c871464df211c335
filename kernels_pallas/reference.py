"""Plain-JAX attention references the Pallas kernels are tested against: dense, O(seq^2), obviously correct.

Both compute in float32 at `Precision.HIGHEST` whatever the input dtype and return the input dtype, so a test
compares a kernel with the exact answer rather than with another rounding of it. The mask is
`masking.attention_mask`, built from the rule the kernels use for their blocks; tests/kernels/test_masking.py
checks that rule against a brute-force enumeration.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.kv_pages import dequantize_pages
from kernels_pallas.masking import attention_mask

_HIGHEST = jax.lax.Precision.HIGHEST


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
