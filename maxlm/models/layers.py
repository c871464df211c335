"""Shared decoder layers: parameter helper, RMSNorm, rotary embeddings (with Llama-3 scaling), SwiGLU."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxlm.quant.weights import MatmulWeight
from maxlm.sharding import constrain, is_split


def param(rngs: nnx.Rngs, shape: Sequence[int], names: Sequence[str], *, std: float | None,
          dtype=jnp.float32) -> nnx.Param:
  """A parameter carrying logical axis `names`; std=None initialises to ones (norm scales)."""
  init = nnx.initializers.ones if std is None else nnx.initializers.normal(std)
  return nnx.Param(nnx.with_partitioning(init, tuple(names))(rngs.params(), tuple(shape), dtype))


def dense(x: jax.Array, w: jax.Array | MatmulWeight, contract: int = 1) -> jax.Array:
  """x [..., *w.shape[:contract]] times w, contracting w's leading `contract` axes, as one 2-D matmul.

  Same math as the einsum; flattening the leading (batch, length) axes means the weight gradient
  contracts a single axis, which XLA:CPU runs without transposing the [tokens, out] cotangent first. When the
  sequence is split over devices (sequence parallelism) the flattened [batch * length] axis could not keep
  both splits, and SPMD would all-gather the activations at every matmul, so the axes stay separate then.
  Any other weight type (`maxlm.quant.weights.MatmulWeight`: quantized, packed, LoRA) does its own matmul.
  """
  if isinstance(w, MatmulWeight):
    return w.matmul(x, contract)
  if is_split("activation_length"):
    return jnp.tensordot(x, w, axes=contract)
  k = math.prod(w.shape[:contract])
  lead = x.shape[:x.ndim - contract]
  y = x.reshape(math.prod(lead), k) @ w.reshape(k, -1)
  return y.reshape(*lead, *w.shape[contract:])


class RMSNorm(nnx.Module):
  """Root-mean-square norm, computed in float32 whatever the activation dtype."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.scale = param(rngs, (dim,), ("norm",), std=None, dtype=param_dtype)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: str = "", factor: float = 8.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_len: int = 8192) -> np.ndarray:
  """Inverse RoPE frequencies [head_dim/2]; scaling="llama3" applies Llama-3.1's wavelength-banded scaling."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if scaling == "":
    return inv_freq.astype(np.float32)
  if scaling != "llama3":
    raise ValueError(f"model.rope_scaling={scaling!r}: expected '' or 'llama3'")
  low_wavelen = original_max_len / low_freq_factor
  high_wavelen = original_max_len / high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
  smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  out = np.where(wavelen > low_wavelen, inv_freq / factor, np.where(wavelen < high_wavelen, inv_freq, mid))
  return out.astype(np.float32)


def model_inv_freq(cfg) -> tuple[float, ...]:
  """The RoPE inverse frequencies of a `model` config section (hashable, for module attributes)."""
  return tuple(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor,
                             cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len).tolist())


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates x [batch, seq, heads, head_dim] by positions [batch, seq] (half-split layout, as in HF Llama)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, s, d/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class SwiGLU(nnx.Module):
  """Gated MLP: down(silu(x @ gate) * (x @ up))."""

  def __init__(self, d_model: int, mlp_dim: int, *, std: float, out_std: float, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    self.gate = param(rngs, (d_model, mlp_dim), ("embed", "mlp"), std=std, dtype=param_dtype)
    self.up = param(rngs, (d_model, mlp_dim), ("embed", "mlp"), std=std, dtype=param_dtype)
    self.down = param(rngs, (mlp_dim, d_model), ("mlp", "embed"), std=out_std, dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = x.dtype
    h = jax.nn.silu(dense(x, self.gate[...].astype(dt))) * dense(x, self.up[...].astype(dt))
    h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
    return dense(h, self.down[...].astype(dt))
