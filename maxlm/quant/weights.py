"""Weight types `dense` dispatches to: the `MatmulWeight` protocol, and `QuantizedWeight` (int8 / int4, weight-only).

A float weight is a plain array and `maxlm.models.layers.dense` multiplies by it itself; anything else at a `dense`
call site is a `MatmulWeight` that does its own product (quantized here; packed formats and LoRA plug in the same
way). Formats of `QuantizedWeight`, whose activations stay in the compute dtype, the weight dequantized inside the
matmul:
  * int8: symmetric, one float32 scale per output channel (absmax over the input axes / 127), so
    y = (x @ q) * scale exactly factors the scale out of the sum.
  * int4: symmetric (values -7..7), one float32 scale per `group` consecutive input channels (of the flattened
    input dimension) per output channel; two values are packed per uint8 (memory is half of int8 on every
    backend, see `maxlm.quant.int4`) and unpacked with shifts inside the matmul: x is reshaped to
    [..., groups, group], contracted per group with the unpacked [groups, group, out] values, scaled by
    [groups, out] and summed over groups. `group` is a maximum: the group used is the largest even divisor of
    the input dimension <= group (e.g. input 576 with group 128 -> 96), so any even input dimension works; an odd
    one raises ValueError.

  * nf4 (QLoRA's NormalFloat4): per `group` consecutive input channels per output channel, the weights divided by
    their absmax are rounded to the nearest of 16 values spaced as normal quantiles (NF4_CODE, bitsandbytes'
    table); the code indices are packed two per uint8 as int4's values are. Double quantization: the float32
    block absmaxes are stored as int8 around their per-layer mean, with one float32 scale per output channel
    (scales = {"q", "scale", "offset"}; bitsandbytes instead quantizes them in blocks of 256 with a dynamic 8-bit
    code); ~4.13 bits per weight at group 64.

Stacked weights (a leading layers axis) are quantized per layer: every leaf carries the leading axes and the
static metadata describes one layer, so `jax.lax.scan` slicing the leaves yields per-layer QuantizedWeights.

Fusion: in plain JAX the int -> float convert feeds the dot directly, which XLA:TPU/GPU can fuse into the matmul;
XLA:CPU (checked) runs it as a separate loop fusion: a transient float copy of one weight inside the compiled step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from maxlm.quant.int4 import INT4_MAX, int4_group_size, pack_int4, unpack_int4

INT8_MAX = 127
# NF4: the 16 levels of QLoRA's NormalFloat4 (Dettmers et al. 2023; bitsandbytes' table), ascending, 0 exact.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
            1.0)


@runtime_checkable
class MatmulWeight(Protocol):
  """What a `dense` call site needs of a non-array weight: `w[...]`, `w.astype(dt)`, then `w.matmul(x, contract)`."""

  def __getitem__(self, key) -> MatmulWeight: ...

  def astype(self, dtype) -> MatmulWeight: ...

  def matmul(self, x: jax.Array, contract: int = 1) -> jax.Array:
    """x [..., *in] times this weight (its leading `contract` axes are the input axes) -> [..., *out]."""
    ...


class StandIn:
  """What a packed weight dataclass shares (it has lead_shape, layer_shape and compute_dtype): the shape, rank and
  dtype of the float weight it stands for, `w[...]` and `w.astype(dt)` as the `dense` call sites use them."""

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the float weight this stands for (leading axes included)."""
    return self.lead_shape + self.layer_shape

  @property
  def ndim(self) -> int:
    """Rank of the float weight this stands for."""
    return len(self.shape)

  @property
  def dtype(self) -> jnp.dtype:
    """The compute dtype (what the float weight would have been cast to), not the storage dtype."""
    return self.compute_dtype

  def __getitem__(self, key):
    """Only `w[...]` (what nnx's `variable[...]` does): the weight itself."""
    if key is not Ellipsis:
      raise TypeError(f"{type(self).__name__} supports only [...] indexing, got {key!r}")
    return self

  def astype(self, dtype):
    """The same weight computing in `dtype` (as `w.astype(dt)` does for a float weight at the call sites)."""
    return dataclasses.replace(self, compute_dtype=jnp.dtype(dtype))


@functools.partial(jax.tree_util.register_dataclass, data_fields=("values", "scales"),
                   meta_fields=("mode", "contract", "group", "layer_shape", "compute_dtype"))
@dataclasses.dataclass(frozen=True)
class QuantizedWeight(StandIn):
  """A weight stored as integers + float32 scales that stands in for the float weight at `dense` call sites.

  int8: values int8 [*lead, *layer_shape], scales [*lead, *out_shape]. int4: values uint8 [*lead, groups,
  group/2, out] (row j of a group in the low nibble, row j + group/2 in the high one), scales [*lead, groups,
  out]. `lead` is any leading (e.g. stacked layers) axes; the metadata describes one layer only.
  """

  values: jax.Array
  scales: jax.Array
  mode: str
  contract: int
  group: int  # int4: input channels per scale (0 for int8)
  layer_shape: tuple[int, ...]
  compute_dtype: jnp.dtype

  @property
  def lead_shape(self) -> tuple[int, ...]:
    """The leading (stacked) axes the leaves carry beyond one layer's layout."""
    per_layer = len(self.layer_shape) if self.mode == "int8" else 3
    return tuple(self.values.shape[:self.values.ndim - per_layer])


  def dequantize(self) -> jax.Array:
    """The float weight [*lead, *layer_shape] in the compute dtype (for tests and debugging, not the matmul)."""
    lead = self.lead_shape
    if self.mode == "int8":
      out_shape = self.layer_shape[self.contract:]
      w = self.values.astype(jnp.float32) * self.scales.reshape(*lead, *(1,) * self.contract, *out_shape)
    elif self.mode == "nf4":
      w = _nf4_levels(self.values) * self.block_scales()[..., :, None, :]
    else:
      w = unpack_int4(self.values).astype(jnp.float32) * self.scales[..., :, None, :]
    return w.reshape(*lead, *self.layer_shape).astype(self.compute_dtype)

  def block_scales(self) -> jax.Array:
    """float32 [*lead, groups, n]: the per-block scales (nf4: undoing the double quantization; int4: as stored)."""
    if self.mode != "nf4":
      return self.scales
    s = self.scales
    return s["q"].astype(jnp.float32) * s["scale"][..., None, :] + s["offset"][..., None, None]

  def matmul(self, x: jax.Array, contract: int = 1) -> jax.Array:
    """x [..., *layer_shape[:contract]] times this weight -> [..., *layer_shape[contract:]] in the compute dtype.

    Dequantization is fused into the product: the int8 scale multiplies the matmul's output; int4 is contracted
    per group and the per-group partial sums are scaled and added. Accumulation is in float32.
    """
    if contract != self.contract:
      raise ValueError(f"QuantizedWeight quantized for contract={self.contract}, used with contract={contract}")
    if self.lead_shape:
      raise ValueError(f"QuantizedWeight with leading axes {self.lead_shape} used in a matmul: slice it per layer")
    in_shape, out_shape = self.layer_shape[:contract], self.layer_shape[contract:]
    k, n = math.prod(in_shape), math.prod(out_shape)
    dt = self.compute_dtype
    lead = x.shape[:x.ndim - contract]
    x = x.astype(dt).reshape(*lead, k)
    if self.mode == "int8":
      y = jnp.einsum("...k,kn->...n", x, self.values.reshape(k, n).astype(dt),
                     preferred_element_type=jnp.float32)
      y = y * self.scales.reshape(n)
    else:
      groups = k // self.group
      # [groups, group, n]: int4 values, or nf4 levels (scaled per block below, as int4's are)
      w = (_nf4_levels(self.values) if self.mode == "nf4" else unpack_int4(self.values)).astype(dt)
      part = jnp.einsum("...gk,gkn->...gn", x.reshape(*lead, groups, self.group), w,
                        preferred_element_type=jnp.float32)
      y = jnp.einsum("...gn,gn->...n", part, self.block_scales())
    return y.astype(dt).reshape(*lead, *out_shape)


def quantize_weight(w: jax.Array, mode: str, *, contract: int = 1, group: int = 128,
                    layer_ndim: int | None = None) -> QuantizedWeight:
  """Quantizes float w [*lead, *in (contract axes), *out] ("int8" or "int4") per layer.

  layer_ndim = rank of one layer's weight (default w.ndim): axes before those are leading (stacked) axes.
  """
  if mode not in ("int8", "int4", "nf4"):
    raise ValueError(f"quantize_weight mode={mode!r}: expected 'int8', 'int4' or 'nf4'")
  layer_ndim = w.ndim if layer_ndim is None else layer_ndim
  layer_shape = tuple(w.shape[w.ndim - layer_ndim:])
  g = int4_group_size(math.prod(layer_shape[:contract]), group) if mode in ("int4", "nf4") else 0
  values, scales = _quantize_arrays(w, mode, contract, g, layer_ndim)
  return QuantizedWeight(values, scales, mode, contract, g, layer_shape, jnp.dtype(w.dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize_arrays(w: jax.Array, mode: str, contract: int, group: int, layer_ndim: int
                     ) -> tuple[jax.Array, jax.Array]:
  """(values, scales) of `quantize_weight`, one compiled computation per weight shape."""
  lead, layer_shape = w.shape[:w.ndim - layer_ndim], w.shape[w.ndim - layer_ndim:]
  out_shape = layer_shape[contract:]
  k, n = math.prod(layer_shape[:contract]), math.prod(out_shape)
  wf = w.astype(jnp.float32)
  if mode == "int8":
    w2 = wf.reshape(*lead, k, n)
    amax = jnp.max(jnp.abs(w2), axis=-2)  # [*lead, n]
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    q = jnp.clip(jnp.round(w2 / scale[..., None, :]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q.reshape(w.shape), scale.reshape(*lead, *out_shape)
  w3 = wf.reshape(*lead, k // group, group, n)
  amax = jnp.max(jnp.abs(w3), axis=-2)  # [*lead, groups, n]
  if mode == "nf4":
    return _quantize_nf4(w3, amax)
  scale = jnp.where(amax > 0, amax / INT4_MAX, 1.0)
  q = jnp.clip(jnp.round(w3 / scale[..., None, :]), -INT4_MAX, INT4_MAX).astype(jnp.int8)
  return pack_int4(q), scale


def _nf4_levels(values: jax.Array) -> jax.Array:
  """Packed nf4 code indices [..., group/2, n] -> their float32 levels [..., group, n]."""
  return jnp.asarray(NF4_CODE, jnp.float32)[unpack_int4(values).astype(jnp.int32) + 8]


def _quantize_nf4(w3: jax.Array, amax: jax.Array) -> tuple[jax.Array, dict]:
  """(packed code indices, double-quantized block scales) of w3 [*lead, groups, group, n] with block absmax amax."""
  absmax = jnp.where(amax > 0, amax, 1.0)
  code = jnp.asarray(NF4_CODE, jnp.float32)
  idx = jnp.digitize(w3 / absmax[..., None, :], (code[1:] + code[:-1]) / 2)  # the nearest level (ties: the upper)
  offset = jnp.mean(absmax, axis=(-2, -1))  # [*lead]
  centered = absmax - offset[..., None, None]
  scale = jnp.max(jnp.abs(centered), axis=-2) / INT8_MAX  # [*lead, n]
  scale = jnp.where(scale > 0, scale, 1.0)
  q = jnp.clip(jnp.round(centered / scale[..., None, :]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return pack_int4((idx - 8).astype(jnp.int8)), {"q": q, "scale": scale, "offset": offset}
