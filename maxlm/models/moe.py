"""Mixture of Experts (Mixtral): a softmax router picks top-k SwiGLU experts per token; dropless."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maxlm.models.layers import dense, param
from maxlm.sharding import constrain


def route(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(weights [tokens, k] float32, expert ids [tokens, k]): softmax over all experts, top-k, renormalised.

  This is Mixtral's routing (and Hugging Face's): renormalising the k chosen probabilities to sum to 1.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, k)
  return weights / weights.sum(-1, keepdims=True), experts


class MoE(nnx.Module):
  """num_experts SwiGLU experts of width mlp_dim; each token runs through num_experts_per_tok of them.

  Tokens are sorted by expert and each expert's contiguous group is multiplied with `jax.lax.ragged_dot`
  (a grouped matmul), so compute is k/num_experts of running every expert and no token is dropped.
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

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = x.dtype
    b, s, d = x.shape
    tokens = x.reshape(b * s, d)
    weights, experts = route(dense(tokens, self.router[...].astype(dt)), self.k)  # [t, k]
    flat = experts.reshape(-1)  # assignment a = token * k + slot
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    group_sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
    xs = tokens[order // self.k]  # [t*k, d]
    h = (jax.nn.silu(jax.lax.ragged_dot(xs, self.gate[...].astype(dt), group_sizes))
         * jax.lax.ragged_dot(xs, self.up[...].astype(dt), group_sizes))
    ys = jax.lax.ragged_dot(h, self.down[...].astype(dt), group_sizes)  # [t*k, d], sorted order
    y = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True).reshape(b * s, self.k, d)
    out = jnp.einsum("tkd,tk->td", y, weights.astype(dt))
    return constrain(out.reshape(b, s, d), ("activation_batch", "activation_length", "activation_embed"))
