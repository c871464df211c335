"""Mixture of Experts (Mixtral): a softmax router picks top-k SwiGLU experts per token.

Two execution paths, chosen by `model.moe_capacity_factor`:
  * 0 (dropless): tokens sorted by expert, grouped matmuls with `jax.lax.ragged_dot`; nothing is dropped.
  * c > 0 (capacity, GShard): each sequence row gives every expert at most C = ceil(c * seq_len * k / E)
    assignments; dispatch/combine einsums move tokens into an expert-major buffer [E, b, C, d] that is
    sharded over the mesh's `expert` axis (GSPMD inserts the all-to-alls), and overflow is dropped.
Both report the load-balancing loss E * sum_e f_e * P_e and the dropped fraction (see `load_balancing_loss`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from maxlm.models.layers import dense, param
from maxlm.sharding import constrain

_EXPERT_BUF = ("activation_experts", "activation_batch_no_exp", None, "activation_embed")
_EXPERT_HIDDEN = ("activation_experts", "activation_batch_no_exp", None, "activation_mlp")
_ACT = ("activation_batch", "activation_length", "activation_embed")
_ROUTING = ("activation_batch", "activation_length", None, None)  # [b, s, E, C] dispatch / combine maps


def top_k_renormalised(probs: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(weights [..., k], expert ids [..., k]): the k largest router probabilities, renormalised to sum to 1.

  Mixtral's (and Hugging Face's) routing applies this to the softmax over all experts.
  """
  # k rounds of argmax (ties -> the lower index, as lax.top_k) instead of lax.top_k, which GSPMD does not
  # partition: it all-gathers the batch-sharded probabilities onto every device.
  weights, experts, rest = [], [], probs
  for _ in range(k):
    best = jnp.argmax(rest, axis=-1)
    weights.append(jnp.take_along_axis(probs, best[..., None], axis=-1)[..., 0])
    experts.append(best.astype(jnp.int32))
    rest = jnp.where(jnp.arange(probs.shape[-1]) == best[..., None], -jnp.inf, rest)
  weights, experts = jnp.stack(weights, axis=-1), jnp.stack(experts, axis=-1)
  return weights / weights.sum(-1, keepdims=True), experts


def load_balancing_loss(probs: jax.Array, experts: jax.Array, mask: jax.Array) -> jax.Array:
  """Switch/GShard auxiliary loss E * sum_e f_e * P_e over the tokens where `mask` is true (float32 scalar).

  probs [..., E]: router softmax; experts [..., k]: the chosen experts; mask [...]: non-padding tokens.
  f_e = share of the (token, slot) assignments that chose e, P_e = mean router probability of e. It is 1.0
  when both are uniform and grows as the router concentrates; the gradient flows through P_e only (f_e is a
  count), pushing probability away from over-used experts. Leading axes are kept (not flattened), so a
  batch sharded over devices only all-reduces two [E] vectors.
  """
  num_experts, k = probs.shape[-1], experts.shape[-1]
  m = mask.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  counts = jnp.einsum("...ke,...->e", jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), m)
  f = counts / (n * k)
  p = jnp.einsum("...e,...->e", probs.astype(jnp.float32), m) / n
  return num_experts * jnp.sum(f * p)


def capacity(capacity_factor: float, seq_len: int, k: int, num_experts: int) -> int:
  """Assignments an expert accepts per sequence row: ceil(c * seq_len * k / E), at most seq_len."""
  return max(1, min(seq_len, math.ceil(capacity_factor * seq_len * k / num_experts)))


def capacity_dispatch(experts: jax.Array, mask: jax.Array, num_experts: int,
                      cap: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(expert one-hot [b, s, k, E], buffer-slot one-hot [b, s, k, C] (all zero if dropped), kept [b, s, k]).

  Slot-major priority within each row: every token's 1st choice is placed before any token's 2nd choice,
  and within a slot earlier positions first; an assignment's place in its expert is a running count
  (cumsum), and places >= `cap` are dropped. Masked (padding) tokens are never dispatched.
  """
  b, s, k = experts.shape
  onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32) * mask[:, :, None, None].astype(jnp.int32)
  slot_major = onehot.transpose(0, 2, 1, 3).reshape(b, k * s, num_experts)  # [b, k*s, E]: slot 0 first
  place = (jnp.cumsum(slot_major, axis=1) - 1).reshape(b, k, s, num_experts).transpose(0, 2, 1, 3)
  place = jnp.sum(place * onehot, axis=-1)  # [b, s, k]: place of each assignment in its expert
  kept = mask[:, :, None] & (place < cap)
  return onehot, jax.nn.one_hot(jnp.where(kept, place, cap), cap, dtype=jnp.int32), kept


class MoE(nnx.Module):
  """num_experts SwiGLU experts of width mlp_dim; each token runs through num_experts_per_tok of them.

  Dropless (capacity_factor 0): tokens are sorted by expert and each expert's contiguous group is multiplied
  with `jax.lax.ragged_dot` (a grouped matmul), so compute is k/num_experts of running every expert. With
  mesh.expert > 1 it stays correct and the expert weights stay sharded, but the sort is global: GSPMD gathers
  every assignment of the whole batch onto every device, each device runs its own experts' groups and the
  outputs are all-reduced (activation traffic and memory grow with the global batch). Expert parallelism at
  scale is the capacity path: two all-to-alls of the [E, b, C, d] buffer per layer.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    e, d, f = cfg.num_experts, cfg.d_model, cfg.mlp_dim
    std, pdt = cfg.init_std, jnp.dtype(cfg.param_dtype)
    out_std = std / (2 * cfg.num_layers) ** 0.5
    self.router = param(rngs, (d, e), ("embed", None), std=std, dtype=pdt)
    self.gate = param(rngs, (e, d, f), ("experts", "embed", "mlp"), std=std, dtype=pdt)
    self.up = param(rngs, (e, d, f), ("experts", "embed", "mlp"), std=std, dtype=pdt)
    self.down = param(rngs, (e, f, d), ("experts", "mlp", "embed"), std=out_std, dtype=pdt)
    self.num_experts = e
    self.k = cfg.num_experts_per_tok
    self.capacity_factor = float(cfg.moe_capacity_factor)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x [b, s, d] -> [b, s, d] (the weighted sum of each token's experts)."""
    return self.forward(x, mask)[0]

  def forward(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(output [b, s, d], {"moe_aux_loss", "moe_dropped"} float32 scalars); mask [b, s] = non-padding tokens.

    moe_dropped is the fraction of non-padding (token, slot) assignments over capacity (0 when dropless).
    """
    b, s, _ = x.shape
    mask = jnp.ones((b, s), bool) if mask is None else mask.astype(bool)
    logits = dense(x, self.router[...].astype(x.dtype))  # [b, s, E]
    probs = constrain(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), _ACT[:2] + (None,))
    weights, experts = top_k_renormalised(probs, self.k)  # [b, s, k]
    aux = {"moe_aux_loss": load_balancing_loss(probs, experts, mask)}
    if self.capacity_factor > 0:
      out, kept = self._capacity(x, weights, experts, mask)
      assigned = jnp.maximum(mask.sum().astype(jnp.float32) * self.k, 1.0)
      aux["moe_dropped"] = jnp.sum(mask[..., None] & ~kept).astype(jnp.float32) / assigned
    else:
      out = self._dropless(x, weights, experts)
      aux["moe_dropped"] = jnp.zeros((), jnp.float32)
    return constrain(out, _ACT), aux

  def _experts(self, xe: jax.Array) -> jax.Array:
    """SwiGLU of every expert on its buffer: [E, b, C, d] -> [E, b, C, d]."""
    dt = xe.dtype
    h = (jax.nn.silu(jnp.einsum("ebcd,edf->ebcf", xe, self.gate[...].astype(dt)))
         * jnp.einsum("ebcd,edf->ebcf", xe, self.up[...].astype(dt)))
    h = constrain(h, _EXPERT_HIDDEN)
    return constrain(jnp.einsum("ebcf,efd->ebcd", h, self.down[...].astype(dt)), _EXPERT_BUF)

  def _capacity(self, x: jax.Array, weights: jax.Array, experts: jax.Array,
                mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """GShard dispatch per sequence row; a dropped assignment contributes zero (the kept slots' weights are
    not renormalised, so a token that lost a slot gets a smaller MoE update and mostly its residual)."""
    dt = x.dtype
    cap = capacity(self.capacity_factor, x.shape[1], self.k, self.num_experts)
    expert_hot, slot_hot, kept = capacity_dispatch(experts, mask, self.num_experts, cap)
    # A token's k experts are distinct, so summing over the slot leaves a 0/1 map token -> (expert, place).
    # Broadcast-and-sum (fused by XLA) rather than an einsum: a dot over k=2 with b*s batch dims is slow.
    routed = (expert_hot[..., :, None] * slot_hot[..., None, :]).astype(dt)  # [b, s, k, E, C]
    # Both stay batch-sharded like x, so the einsums below are where the batch -> experts all-to-alls happen.
    dispatch = constrain(jnp.sum(routed, axis=2), _ROUTING)
    combine = constrain(jnp.sum(routed * weights.astype(dt)[..., None, None], axis=2), _ROUTING)
    xe = constrain(jnp.einsum("bsec,bsd->ebcd", dispatch, x), _EXPERT_BUF)  # all-to-all: batch -> experts
    ye = self._experts(xe)
    return jnp.einsum("bsec,ebcd->bsd", combine, ye), kept  # all-to-all back

  def _dropless(self, x: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
    """Sorted grouped matmuls over every assignment (padding tokens included: they cost a little, drop nothing)."""
    dt = x.dtype
    b, s, d = x.shape
    tokens = x.reshape(b * s, d)
    flat = experts.reshape(-1)  # assignment a = token * k + slot
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    group_sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
    xs = tokens[order // self.k]  # [t*k, d]
    h = (jax.nn.silu(jax.lax.ragged_dot(xs, self.gate[...].astype(dt), group_sizes))
         * jax.lax.ragged_dot(xs, self.up[...].astype(dt), group_sizes))
    ys = jax.lax.ragged_dot(h, self.down[...].astype(dt), group_sizes)  # [t*k, d], sorted order
    y = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True).reshape(b * s, self.k, d)
    return jnp.einsum("tkd,tk->td", y, weights.reshape(b * s, self.k).astype(dt)).reshape(b, s, d)
