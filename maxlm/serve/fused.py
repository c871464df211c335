"""Decode-time fused projections: q|k|v as one matmul and SwiGLU's gate|up as another.

A decode step multiplies a few rows by every weight, so on small batches each matmul costs mostly its fixed launch
and packing overhead (measured on XLA:CPU with YNNPACK: 43 dots per position at batch 8 for a 4-layer model); one
[d, (heads + 2 kv_heads) * head_dim] product instead of three, and one [d, 2 mlp] instead of two, removes three of
a block's seven weight matmuls with the same arithmetic. The concatenated weights replace the originals in the
decoder's copy of a block (no second copy of those weights is kept). Fusion applies to float weights only, and
not when the mesh splits heads or the MLP axis (concatenation would interleave the shards): quantized weights and
tensor-parallel layouts keep the blocks' own projections.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maxlm import sharding
from maxlm.models.layers import SwiGLU, apply_rope, dense
from maxlm.models.moe import MoE
from maxlm.models.transformer import Block

_SPLIT_AXES = ("heads", "kv_heads", "mlp")


def _plain(*params: nnx.Param) -> bool:
  return all(isinstance(p[...], jax.Array) for p in params)


def fusable(block: Block) -> bool:
  """Whether block's projections can be concatenated: float weights, no split head or MLP axis."""
  if any(sharding.is_split(name) for name in _SPLIT_AXES):
    return False
  return _plain(block.attn.q, block.attn.k, block.attn.v)


def fuse(block: Block) -> Block:
  """A copy of block (sharing its other arrays) with `qkv` [d, (h + 2kv) * hd] (and `qkv_bias`) and, for a
  SwiGLU MLP, `gate_up` [d, 2 * mlp] in place of the separate weights; block itself is unchanged."""
  if not fusable(block):
    return block
  block = nnx.merge(*nnx.split(block))  # new module objects over the same arrays
  attn = block.attn
  d = attn.q.shape[0]
  parts = [attn.q[...].reshape(d, -1), attn.k[...].reshape(d, -1), attn.v[...].reshape(d, -1)]
  block.qkv = nnx.Param(jnp.concatenate(parts, axis=1))
  if attn.bias:
    block.qkv_bias = nnx.Param(jnp.concatenate([attn.q_bias[...].reshape(-1), attn.k_bias[...].reshape(-1),
                                                attn.v_bias[...].reshape(-1)]))
    attn.q_bias = attn.k_bias = attn.v_bias = None
  block.q_width = parts[0].shape[1]
  attn.q = attn.k = attn.v = None
  if isinstance(block.mlp, SwiGLU) and _plain(block.mlp.gate, block.mlp.up):
    block.gate_up = nnx.Param(jnp.concatenate([block.mlp.gate[...], block.mlp.up[...]], axis=1))
    block.mlp.gate = block.mlp.up = None
  return block


def project_qkv(block: Block, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Attention.project_qkv of block (fused when `fuse` gave it a qkv weight): q, k with RoPE, and v."""
  attn = block.attn
  if getattr(block, "qkv", None) is None:
    return attn.project_qkv(x, positions)
  dt = x.dtype
  qkv = dense(x, block.qkv[...].astype(dt))
  if attn.bias:
    qkv = qkv + block.qkv_bias[...].astype(dt)
  b, s = x.shape[:2]
  kv_width = (qkv.shape[-1] - block.q_width) // 2
  q = qkv[..., :block.q_width].reshape(b, s, -1, attn.head_dim)
  k = qkv[..., block.q_width:block.q_width + kv_width].reshape(b, s, attn.kv_heads, attn.head_dim)
  v = qkv[..., block.q_width + kv_width:].reshape(b, s, attn.kv_heads, attn.head_dim)
  return apply_rope(q, positions, attn.inv_freq), apply_rope(k, positions, attn.inv_freq), v


def mlp(block: Block, x: jax.Array, valid: jax.Array) -> jax.Array:
  """The block's MLP on x (the MoE with `valid` as its token mask; SwiGLU fused when `fuse` gave it gate_up)."""
  if isinstance(block.mlp, MoE):
    return block.mlp.forward(x, valid)[0]
  if getattr(block, "gate_up", None) is None:
    return block.mlp(x)
  dt = x.dtype
  gate, up = jnp.split(dense(x, block.gate_up[...].astype(dt)), 2, axis=-1)
  return dense(jax.nn.silu(gate) * up, block.mlp.down[...].astype(dt))
