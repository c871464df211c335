"""Ring attention (sequence parallelism): each device keeps its query chunk while K/V chunks rotate around a ring.

The sequence is split over the mesh axes that "activation_length" maps to (normally `sequence`). Inside
`jax.shard_map` every device attends its query chunk to one K/V chunk per step, passes that chunk to its ring
neighbour with `jax.lax.ppermute`, and merges the partial results with an online (flash-style) softmax kept in
float32. Nothing is all-gathered: a device holds one K/V chunk at a time and [chunk, chunk] scores.

Design notes:
- Masking uses GLOBAL token indices (chunk index from `jax.lax.axis_index` times the chunk length), never the
  model's `positions`, which restart at every packed document.
- Blocks entirely in the causal future or entirely outside the sliding window are skipped with `jax.lax.cond`.
  Under SPMD each device executes only its own branch of the conditional (an HLO conditional, not a select,
  as long as nothing vmaps over it), so a skipped block really costs that device no FLOPs, forward or backward.
  But every step ends at the ppermute, which waits for the slowest device: with a plain contiguous split and
  full causal attention the last chunk attends to every block, so skipping saves energy, not wall-clock time
  (that needs a load-balanced zig-zag layout, permuting the tokens outside attention). With a sliding window
  every device computes at most ceil(window / chunk) + 1 blocks, and then the skip does shorten the steps.
- Gradients come from autodiff through the scan and ppermute (the transpose of a ppermute is the inverse
  ppermute). The per-step block compute is wrapped in `jax.checkpoint`: without it the backward pass saves the
  [chunk, chunk] scores and probabilities of every step, O(seq * chunk * heads) per device; with it each step
  saves only its inputs (the K/V block and the running state), O(seq * head_dim * heads) in total, and the
  scores are recomputed one block at a time (seq 2048 on a ring of 8, 4 heads: 26 -> 7 MiB of temporaries
  per device for the gradient). Truly O(chunk) activation memory would need a hand-written
  backward ring (custom_vjp re-rotating K/V and dK/dV), which this module does not do.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kernels_pallas import masking
from maxlm import sharding

_Q_NAMES = ("activation_batch", "activation_length", "activation_heads", None)
_KV_NAMES = ("activation_batch", "activation_length", "activation_kv_heads", None)
_SEG_NAMES = ("activation_batch", "activation_length")

# Online-softmax state: running max m [b, kv, g, c], running denominator l [b, kv, g, c] and the unnormalised
# output acc [b, kv, g, c, d], all float32.
_State = tuple[jax.Array, jax.Array, jax.Array]


def _block_mask(q_start: jax.Array | int, k_start: jax.Array | int, chunk: int, q_seg: jax.Array | None,
                k_seg: jax.Array | None, sliding_window: int | None) -> jax.Array:
  """Boolean mask [b|1, c, c] of one block by global indices: causal, same segment, within the window."""
  return masking.attention_mask(q_start + jnp.arange(chunk)[None], k_start + jnp.arange(chunk), causal=True,
                                sliding_window=sliding_window, q_segment_ids=q_seg, kv_segment_ids=k_seg)


def _block_state(qh: jax.Array, kh: jax.Array, vh: jax.Array, mask: jax.Array, scale: float) -> _State:
  """Softmax statistics of one block: qh [b, kv, g, c, d], kh/vh [b, kv, c, d], mask [b|1, c, c]."""
  scores = jnp.einsum("bkgsd,bktd->bkgst", qh, kh, preferred_element_type=jnp.float32) * scale
  mask = mask[:, None, None]
  scores = jnp.where(mask, scores, masking.MASK_VALUE)
  # The output does not depend on the max (it cancels), so no gradient flows through it.
  m = jax.lax.stop_gradient(jnp.max(scores, axis=-1))
  # A row with no visible key has m = MASK_VALUE; the where() zeroes its probabilities (l = 0, acc = 0).
  p = jnp.where(mask, jnp.exp(scores - m[..., None]), 0.0)
  acc = jnp.einsum("bkgst,bktd->bkgsd", p.astype(vh.dtype), vh, preferred_element_type=jnp.float32)
  return m, jnp.sum(p, axis=-1), acc


def _merge(a: _State, b: _State) -> _State:
  """Combines the softmax statistics of two disjoint key sets."""
  m = jnp.maximum(a[0], b[0])
  sa, sb = jnp.exp(a[0] - m), jnp.exp(b[0] - m)
  return m, sa * a[1] + sb * b[1], sa[..., None] * a[2] + sb[..., None] * b[2]


def _finish(state: _State, dtype, shape: tuple[int, ...]) -> jax.Array:
  """Normalised output [b, c, heads, d] from the state (head-major [b, kv, g, c, d] inside)."""
  _, denom, acc = state
  # The diagonal is always visible, so denom > 0; the guard only keeps a NaN out if that ever changes.
  out = acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]
  return out.astype(dtype).transpose(0, 3, 1, 2, 4).reshape(shape)


def _head_major(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q [b, c, h, d] -> [b, kv, g, c, d]; k, v [b, c, kv, d] -> [b, kv, c, d] (GQA by grouping queries)."""
  b, c, h, d = q.shape
  kv = k.shape[2]
  if h % kv:
    raise ValueError(f"ring attention: {h} query heads are not a multiple of {kv} key/value heads")
  qh = q.reshape(b, c, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
  return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _ring(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None, k_seg: jax.Array | None, *,
          axes: tuple[str, ...], ring_size: int, scale: float, sliding_window: int | None) -> jax.Array:
  """Per-device body of the shard_map: local chunks in, this device's output chunk out."""
  chunk = q.shape[1]
  qh, kh, vh = _head_major(q, k, v)
  me = jax.lax.axis_index(axes)  # this device's chunk index along the ring (axes major to minor)
  perm = [(i, (i + 1) % ring_size) for i in range(ring_size)]  # after t steps device i holds chunk i - t

  # The keys any of my queries sees; chunk j is skipped when it lies entirely outside them.
  k_lo, k_hi = masking.key_range(me * chunk, me * chunk + chunk - 1, causal=True, sliding_window=sliding_window,
                                 num_keys=ring_size * chunk)

  def visible(j: jax.Array) -> jax.Array:
    """Whether any (query, key) pair of K/V chunk j is visible from this device's queries."""
    return (j * chunk <= k_hi) & (j * chunk + chunk - 1 >= k_lo)

  def attend(state: _State, kh: jax.Array, vh: jax.Array, k_seg: jax.Array | None, j: jax.Array) -> _State:
    mask = _block_mask(me * chunk, j * chunk, chunk, q_seg, k_seg, sliding_window)
    return _merge(state, _block_state(qh, kh, vh, mask, scale))

  attend = jax.checkpoint(attend, prevent_cse=False)  # prevent_cse is unnecessary inside scan

  # Step 0: the local (diagonal) block, always visible; its state already varies over every manual axis that
  # q/k do, so the scan carry needs no pcast of constants.
  state = _block_state(qh, kh, vh, _block_mask(me * chunk, me * chunk, chunk, q_seg, k_seg, sliding_window),
                       scale)

  def step(carry, t):
    state, kh, vh, k_seg = carry
    # Send on first, so the transfer of the next block can overlap this block's compute.
    kh, vh = jax.lax.ppermute(kh, axes, perm), jax.lax.ppermute(vh, axes, perm)
    k_seg = None if k_seg is None else jax.lax.ppermute(k_seg, axes, perm)
    j = (me - t) % ring_size
    state = jax.lax.cond(visible(j), attend, lambda s, *_: s, state, kh, vh, k_seg, j)
    return (state, kh, vh, k_seg), None

  (state, _, _, _), _ = jax.lax.scan(step, (state, kh, vh, k_seg), jnp.arange(1, ring_size))
  return _finish(state, q.dtype, q.shape)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *, scale: float,
                   sliding_window: int | None = None) -> jax.Array:
  """Causal attention with the sequence split over the current mesh's ring; no device holds all of K/V.

  q [b, s, heads, d]; k, v [b, s, kv_heads, d]; segment_ids [b, s] (equal ids attend) or None -> like q.
  The ring is the mesh axes "activation_length" maps to under the current logical rules; outside a mesh,
  or on a ring of one device, the same math runs as a single block.
  """
  mesh = jax.sharding.get_abstract_mesh()
  axes = () if mesh.empty else tuple(a for a in sharding.mesh_axes_of("activation_length") if a in mesh.shape)
  ring_size = math.prod(mesh.shape[a] for a in axes)
  seq = q.shape[1]
  if seq % ring_size:
    raise ValueError(f"ring attention: sequence length {seq} is not divisible by the ring size {ring_size} "
                     f"(mesh axes {'+'.join(axes)})")
  if ring_size == 1:
    qh, kh, vh = _head_major(q, k, v)
    mask = _block_mask(0, 0, seq, segment_ids, segment_ids, sliding_window)
    return _finish(_block_state(qh, kh, vh, mask, scale), q.dtype, q.shape)

  q_spec, kv_spec = sharding.logical_spec(_Q_NAMES), sharding.logical_spec(_KV_NAMES)
  body = lambda *args: _ring(*args, axes=axes, ring_size=ring_size, scale=scale,  # noqa: E731
                             sliding_window=sliding_window)
  if segment_ids is None:
    fn = jax.shard_map(lambda q, k, v: body(q, k, v, None, None), in_specs=(q_spec, kv_spec, kv_spec),
                       out_specs=q_spec)
    return fn(q, k, v)
  seg_spec = sharding.logical_spec(_SEG_NAMES)
  fn = jax.shard_map(lambda q, k, v, seg: body(q, k, v, seg, seg), in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                     out_specs=q_spec)
  return fn(q, k, v, segment_ids)
