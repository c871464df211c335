"""Grouped-query attention: projections, RoPE, and the backends chosen by `model.attention`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas import masking
from kernels_pallas.flash_attention import BlockSizes, flash_attention
from maxlm import sharding
from maxlm.models.layers import apply_rope, dense, param
from maxlm.models.ring_attention import ring_attention
from maxlm.sharding import constrain

BACKENDS = ("xla", "dot_product", "ring", "pallas_flash")


def attention_mask(q_len: int, kv_len: int, segment_ids: jax.Array | None,
                   sliding_window: int | None) -> jax.Array:
  """Boolean mask [batch or 1, q_len, kv_len]: causal, same segment, and within the window.

  Queries are the last q_len of kv_len positions. The diagonal is always allowed, so no row is empty
  (padding, segment 0, attends to padding and is dropped from the loss).
  """
  q_pos = jnp.arange(kv_len - q_len, kv_len)[None]
  q_seg = None if segment_ids is None else segment_ids[:, -q_len:]
  return masking.attention_mask(q_pos, jnp.arange(kv_len), causal=True, sliding_window=sliding_window,
                                q_segment_ids=q_seg, kv_segment_ids=segment_ids)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
  """Reference einsum attention; GQA by grouping query heads, never repeating K/V.

  q [b, s, heads, d]; k, v [b, t, kv_heads, d]; mask [b|1, s, t] -> [b, s, heads, d]. The operands are
  transposed to head-major [b, kv, (group,) len, d] first: the two einsums are then plain batched matmuls
  (XLA:CPU otherwise fuses the transposes into slow strided copies, ~2x the attention time).
  """
  return head_major_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, scale)


def head_major_attention(q: jax.Array, kh: jax.Array, vh: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
  """xla_attention with K/V already head-major: kh, vh [b, kv_heads, t, d] (no copy of K/V is made)."""
  b, s, h, d = q.shape
  kv = kh.shape[1]
  qh = q.reshape(b, s, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # [b, kv, g, s, d]
  scores = jnp.einsum("bkgsd,bktd->bkgst", qh, kh, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask[:, None, None], scores, masking.MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(vh.dtype)
  out = jnp.einsum("bkgst,bktd->bkgsd", probs, vh)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                          sliding_window: int | None, scale: float) -> jax.Array:
  """`jax.nn.dot_product_attention` (lets XLA/cuDNN pick the fused kernel where one exists)."""
  mask = None
  if segment_ids is not None:  # causality and the window are the kernel's own arguments
    pos = jnp.arange(q.shape[1])
    mask = masking.attention_mask(pos[None], pos, causal=False, sliding_window=None, q_segment_ids=segment_ids,
                                  kv_segment_ids=segment_ids)[:, None]
  window = None if sliding_window is None else (sliding_window - 1, 0)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                      local_window_size=window)


def pallas_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *,
                           scale: float, sliding_window: int | None, backend: str | None,
                           block_sizes: BlockSizes | None) -> jax.Array:
  """The Pallas flash kernel, per device: shard_map over the batch and head axes of the current mesh.

  A Pallas kernel is an opaque custom call to the SPMD partitioner (it would gather its operands), so each
  device runs it on its own batch rows and heads. The sequence must not be split: that is ring attention.
  """
  kernel = lambda q, k, v, seg: flash_attention(  # noqa: E731
    q, k, v, causal=True, segment_ids=seg, sliding_window=sliding_window, sm_scale=scale,
    block_sizes=block_sizes, backend=backend)  # interpreted exactly when the formulation is "cpu"
  if jax.sharding.get_abstract_mesh().empty:
    return kernel(q, k, v, segment_ids)
  if sharding.is_split("activation_length"):
    raise ValueError("model.attention=pallas_flash needs whole sequences per device, but activation_length is "
                     "split over the mesh (mesh.sequence > 1): use model.attention=ring for sequence parallelism")
  q_spec = sharding.logical_spec(("activation_batch", None, "activation_heads", None))
  kv_spec = sharding.logical_spec(("activation_batch", None, "activation_kv_heads", None))
  seg_spec = sharding.logical_spec(("activation_batch", None))
  # check_vma=False: pallas_call's outputs carry no varying-axes annotation (each device's output is its own).
  if segment_ids is None:
    return jax.shard_map(lambda q, k, v: kernel(q, k, v, None), in_specs=(q_spec, kv_spec, kv_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v)
  return jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                       check_vma=False)(q, k, v, segment_ids)


class Attention(nnx.Module):
  """Multi-head attention with num_kv_heads <= num_heads key/value heads (MQA, GQA or MHA)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, inv_freq):
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    std, pdt = cfg.init_std, jnp.dtype(cfg.param_dtype)
    self.q = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std=std, dtype=pdt)
    self.k = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std=std, dtype=pdt)
    self.v = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std=std, dtype=pdt)
    self.o = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"),
                   std=std / (2 * cfg.num_layers) ** 0.5, dtype=pdt)
    if cfg.attention_bias:
      self.q_bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, ("heads", "head_dim"))(
          rngs.params(), (h, hd), pdt))
      self.k_bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, ("kv_heads", "head_dim"))(
          rngs.params(), (kv, hd), pdt))
      self.v_bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, ("kv_heads", "head_dim"))(
          rngs.params(), (kv, hd), pdt))
    self.bias = cfg.attention_bias
    self.kv_heads, self.head_dim = kv, hd
    self.backend = cfg.attention
    self.sliding_window = cfg.sliding_window
    self.inv_freq = inv_freq
    self.scale = hd ** -0.5
    self.pallas_backend = None if cfg.pallas_backend == "auto" else cfg.pallas_backend
    self.flash_blocks = (BlockSizes(*map(int, cfg.flash_block_sizes.split(","))) if cfg.flash_block_sizes
                         else None)

  def project_qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q [b, s, heads, hd], k, v [b, s, kv_heads, hd]): projections with RoPE applied to q and k."""
    dt = x.dtype
    q = dense(x, self.q[...].astype(dt))
    k = dense(x, self.k[...].astype(dt))
    v = dense(x, self.v[...].astype(dt))
    if self.bias:
      q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
    q = apply_rope(q, positions, self.inv_freq)
    k = apply_rope(k, positions, self.inv_freq)
    q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
    k = constrain(k, ("activation_batch", "activation_length", "activation_kv_heads", None))
    return q, k, v

  def project_out(self, out: jax.Array) -> jax.Array:
    """Attention output [b, s, heads, hd] -> [b, s, d_model]."""
    out = constrain(out, ("activation_batch", "activation_length", "activation_heads", None))
    return dense(out, self.o[...].astype(out.dtype), contract=2)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               mask: jax.Array | None = None) -> jax.Array:
    """mask [b|1, s, s] (True = visible) replaces causality, segments and the window, whatever the backend: the
    einsum attention runs with it (scoring packed trees of requests; see Transformer.hidden)."""
    q, k, v = self.project_qkv(x, positions)
    if mask is not None:
      out = xla_attention(q, k, v, mask, self.scale)
    elif self.backend == "xla":
      mask = attention_mask(x.shape[1], x.shape[1], segment_ids, self.sliding_window)
      out = xla_attention(q, k, v, mask, self.scale)
    elif self.backend == "dot_product":
      out = dot_product_attention(q, k, v, segment_ids, self.sliding_window, self.scale)
    elif self.backend == "ring":
      out = ring_attention(q, k, v, segment_ids, scale=self.scale, sliding_window=self.sliding_window)
    elif self.backend == "pallas_flash":
      out = pallas_flash_attention(q, k, v, segment_ids, scale=self.scale, sliding_window=self.sliding_window,
                                   backend=self.pallas_backend, block_sizes=self.flash_blocks)
    else:
      raise ValueError(f"model.attention={self.backend!r}: expected one of {BACKENDS}")
    return self.project_out(out.astype(x.dtype))
