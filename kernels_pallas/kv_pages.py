"""The paged KV cache's int8 page format, shared by the paged kernel's callers, its reference and serving.

An int8 page holds value = int8 * scale[page, kv_head] (one float32 scale per page and kv head); float pages hold
the values themselves. The paged kernel dequantises the same way inside its loop, page by page.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dequantize_pages(pages: jax.Array, scales: jax.Array | None) -> jax.Array:
  """int8 pages [P, page_size, kv, d] times per-page-per-head scales [P, kv] -> float32 (identity if no scales)."""
  if scales is None:
    return pages.astype(jnp.float32)
  return pages.astype(jnp.float32) * scales.astype(jnp.float32)[:, None, :, None]
