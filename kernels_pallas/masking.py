"""Which keys a query sees (causal, sliding window, same segment, existing keys), and the finite mask value.

The one home of the attention mask: the model's dense attention and ring attention, the Pallas kernels and the
plain-JAX references all build their masks from `visible`, and the kernels and ring attention skip key blocks
with the same rule turned into ranges (`key_range`, `query_range`).

Rule, for query position q and key position k: causal: k <= q. sliding_window w: q - k < w (and k - q < w when
not causal). Segment ids: equal ids only. kv_valid: keys that exist at all (padding, paged caches).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Finite, so exp(MASK_VALUE - MASK_VALUE) is 1, never NaN, in a row that sees no key yet.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def visible(q_pos, k_pos, *, causal: bool, sliding_window: int | None, q_segment_ids=None, kv_segment_ids=None,
            kv_valid=None) -> jax.Array | None:
  """Elementwise visibility of key `k_pos` from query `q_pos` (arrays already broadcast against each other).

  Segment ids and kv_valid must be laid out to broadcast the same way. None when no condition applies (all
  visible), so kernels can skip the select.
  """
  conds = []
  if causal:
    conds.append(q_pos >= k_pos)
  if sliding_window is not None:
    conds.append(q_pos - k_pos < sliding_window)
    if not causal:
      conds.append(k_pos - q_pos < sliding_window)
  if q_segment_ids is not None:
    conds.append(q_segment_ids == kv_segment_ids)
  if kv_valid is not None:
    conds.append(kv_valid)
  return functools.reduce(jnp.logical_and, conds) if conds else None


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, *, causal: bool, sliding_window: int | None,
                   q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                   kv_valid: jax.Array | None = None) -> jax.Array:
  """Boolean [batch|1, q, k] visibility of key positions `k_pos` [k] from query positions `q_pos` [batch|1, q].

  q_segment_ids [batch, q] and kv_segment_ids [batch, k]: equal ids only. kv_valid [batch|1, k]: existing keys.
  """
  if q_pos.shape[0] == 1:  # positions shared by every row: the position part as one [q, k] plane (as XLA likes it)
    pos = visible(q_pos[0][:, None], k_pos[None, :], causal=causal, sliding_window=sliding_window)
    pos = None if pos is None else pos[None]
  else:
    pos = visible(q_pos[:, :, None], k_pos[None, None, :], causal=causal, sliding_window=sliding_window)
  rows = visible(None, None, causal=False, sliding_window=None,
                 q_segment_ids=None if q_segment_ids is None else q_segment_ids[:, :, None],
                 kv_segment_ids=None if kv_segment_ids is None else kv_segment_ids[:, None, :],
                 kv_valid=None if kv_valid is None else kv_valid[:, None, :])
  shape = (q_pos.shape[0], q_pos.shape[-1], k_pos.shape[-1])
  masks = [m for m in (pos, rows) if m is not None]
  if not masks:
    return jnp.ones(shape, bool)
  mask = functools.reduce(jnp.logical_and, masks)
  return jnp.broadcast_to(mask, jnp.broadcast_shapes(shape, mask.shape))


def key_range(q_first, q_last, *, causal: bool, sliding_window: int | None, num_keys: int):
  """Inclusive [lo, hi] of the keys (of 0..num_keys-1) that `visible` lets queries q_first..q_last see.

  Segments and kv_valid only remove keys from inside it. Traced positions (program ids) are fine.
  """
  lo = 0 if sliding_window is None else jnp.maximum(q_first - sliding_window + 1, 0)
  hi = num_keys - 1
  if causal:
    hi = jnp.minimum(q_last, hi)
  elif sliding_window is not None:
    hi = jnp.minimum(q_last + sliding_window - 1, hi)
  return lo, hi


def query_range(k_first, k_last, *, causal: bool, sliding_window: int | None, num_queries: int):
  """Inclusive [lo, hi] of the queries (of 0..num_queries-1) that see any key of k_first..k_last."""
  lo = k_first if causal else 0 if sliding_window is None else jnp.maximum(k_first - sliding_window + 1, 0)
  hi = num_queries - 1
  if sliding_window is not None:
    hi = jnp.minimum(k_last + sliding_window - 1, hi)
  return lo, hi
