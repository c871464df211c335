"""`AffineWeight`: weights calibrated by `maxlm quantize` (GPTQ, AWQ, round to nearest) as unsigned codes with a
scale and a zero point per group, dequantized inside the matmul like `QuantizedWeight`.

The format is GPTQ's, so an export is a repacking (`maxlm.convert.gptq_format`): w[r, c] = scale[g(r), c] *
(code[r, c] - zero[g(r), c]), codes in [0, 2**bits). Groups are `group` consecutive input rows in the order the
rows were quantized; with act-order that is a permutation of the input rows (GPTQ's g_idx), stored as `perm`
(perm[j] = the input row at position j), so the matmul gathers x's columns once and every group stays contiguous
(the layout exllama kernels use), instead of gathering a scale per row.

Storage: 2, 3 and 4 bits as two codes per uint8 (3 bits therefore take 4 here; the GPTQ export packs them
densely), 8 bits one per uint8; codes are stored shifted to signed (code - 8, or code - 128 at 8 bits) so int4's
packing applies, and the zero points the same way (int8). Scales are float32 [*lead, groups, n].

Matmul: x [..., k] -> gathered by perm -> [..., groups, group] contracted per group with the codes, then
y = sum_g scale_g * (part_g - zero_g * sum(x_g)): the zero point costs one reduction of x per group.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from maxlm.quant.int4 import pack_int4, unpack_int4
from maxlm.quant.weights import StandIn

BITS = (2, 3, 4, 8)


@functools.partial(jax.tree_util.register_dataclass, data_fields=("values", "scale", "zero", "perm"),
                   meta_fields=("bits", "group", "contract", "layer_shape", "compute_dtype"))
@dataclasses.dataclass(frozen=True)
class AffineWeight(StandIn):
  """A weight stored as group-wise affine codes; stands in for the float weight at `dense` call sites.

  values: uint8 [*lead, groups, group/2, n] (bits <= 4) or int8 [*lead, groups, group, n] (8 bits), rows in
  processing order; scale: float32, zero: int8 (zero point - offset), both [*lead, groups, n]; perm: int32
  [*lead, k] or None (rows in order).
  """

  values: jax.Array
  scale: jax.Array
  zero: jax.Array
  perm: jax.Array | None
  bits: int
  group: int
  contract: int
  layer_shape: tuple[int, ...]
  compute_dtype: jnp.dtype

  @property
  def lead_shape(self) -> tuple[int, ...]:
    """The leading (stacked) axes beyond one layer's layout."""
    return tuple(self.values.shape[:self.values.ndim - 3])

  @property
  def nbytes(self) -> int:
    """Bytes stored (codes, scales, zero points, permutation)."""
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(self))

  def _codes(self) -> jax.Array:
    """The stored codes minus the offset, [*lead, groups, group, n] float32."""
    return (unpack_int4(self.values) if self.bits <= 4 else self.values).astype(jnp.float32)

  def _zero(self) -> jax.Array:
    return self.zero.astype(jnp.float32)

  def dequantize(self) -> jax.Array:
    """The float weight [*lead, *layer_shape] in the compute dtype, rows in the original order."""
    lead, k = self.lead_shape, math.prod(self.layer_shape[:self.contract])
    w = (self._codes() - self._zero()[..., :, None, :]) * self.scale[..., :, None, :]
    w = w.reshape(*lead, -1, w.shape[-1])[..., :k, :]  # a short last group's padding rows dropped
    if self.perm is not None:
      inv = jnp.argsort(self.perm, axis=-1)
      w = jnp.take_along_axis(w, inv[..., None], axis=-2)
    return w.reshape(*lead, *self.layer_shape).astype(self.compute_dtype)

  def matmul(self, x: jax.Array, contract: int = 1) -> jax.Array:
    """x [..., *layer_shape[:contract]] times this weight -> [..., *layer_shape[contract:]] in the compute dtype."""
    if contract != self.contract:
      raise ValueError(f"AffineWeight quantized for contract={self.contract}, used with contract={contract}")
    if self.lead_shape:
      raise ValueError(f"AffineWeight with leading axes {self.lead_shape} used in a matmul: slice it per layer")
    in_shape, out_shape = self.layer_shape[:contract], self.layer_shape[contract:]
    k = math.prod(in_shape)
    dt = self.compute_dtype
    lead = x.shape[:x.ndim - contract]
    x = x.astype(dt).reshape(*lead, k)
    if self.perm is not None:
      x = jnp.take(x, self.perm, axis=-1)
    groups = self.scale.shape[-2]
    if groups * self.group != k:  # a short last group, stored padded: zero inputs there
      x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, groups * self.group - k)])
    xg = x.reshape(*lead, groups, self.group)
    codes = (unpack_int4(self.values) if self.bits <= 4 else self.values).astype(dt)
    # In the compute dtype, as `dense` multiplies (XLA:CPU has no bf16 x bf16 -> f32 batched dot); summed in f32.
    part = jnp.einsum("...gk,gkn->...gn", xg, codes).astype(jnp.float32)
    xsum = jnp.sum(xg.astype(jnp.float32), axis=-1)  # [..., groups]
    y = jnp.einsum("...gn,gn->...n", part, self.scale) - jnp.einsum("...g,gn->...n", xsum, self.scale * self._zero())
    return y.astype(dt).reshape(*lead, *out_shape)


def _offset(bits: int) -> int:
  return 8 if bits <= 4 else 128


def affine_weight(codes, scale, zero, g_idx, *, bits: int, group: int, layer_shape: tuple[int, ...],
                  contract: int = 1, compute_dtype=jnp.float32) -> AffineWeight:
  """The AffineWeight of one layer from GPTQ's arrays: codes [k, n] (original row order, 0 <= code < 2**bits),
  scale / zero [groups, n] (zero as integers), g_idx [k] (each row's group; act-order when not ascending), `group`
  rows per group (the last may have fewer; it is stored padded)."""
  codes, scale, zero, g_idx = (np.asarray(a) for a in (codes, scale, zero, g_idx))
  if bits not in BITS:
    raise ValueError(f"bits={bits}: expected one of {BITS}")
  k, n = math.prod(layer_shape[:contract]), math.prod(layer_shape[contract:])
  groups = scale.shape[0]
  if codes.shape != (k, n) or scale.shape != (groups, n) or zero.shape != (groups, n) or g_idx.shape != (k,):
    raise ValueError(f"affine_weight: codes {codes.shape}, scale {scale.shape}, zero {zero.shape}, g_idx "
                     f"{g_idx.shape} do not describe a [{k}, {n}] weight")
  if group % 2 or groups != -(-k // group):
    raise ValueError(f"affine_weight: {groups} groups of {group} rows for a {k}-row weight (the group must be even "
                     f"and the groups ceil(k / group))")
  if codes.min() < 0 or codes.max() >= 2**bits or zero.min() < 0 or zero.max() >= 2**bits:
    raise ValueError(f"affine_weight: codes or zero points outside [0, {2**bits}) for bits={bits}")
  want = [group] * (groups - 1) + [k - group * (groups - 1)]
  if g_idx.min() < 0 or g_idx.max() >= groups or np.bincount(g_idx, minlength=groups).tolist() != want:
    raise ValueError(f"affine_weight: every group must hold {group} rows, the last {want[-1]} (g_idx counts differ)")
  perm = np.argsort(g_idx, kind="stable").astype(np.int32)
  in_order = np.array_equal(perm, np.arange(k))
  off = _offset(bits)
  signed = np.zeros((groups * group, n), np.int16)  # padding rows of a short last group: code = zero offset
  signed[:k] = codes[perm].astype(np.int16) - off
  signed = signed.reshape(groups, group, n)
  values = pack_int4(jnp.asarray(signed, jnp.int8)) if bits <= 4 else jnp.asarray(signed, jnp.int8)
  return AffineWeight(values, jnp.asarray(scale, jnp.float32), jnp.asarray(zero.astype(np.int16) - off, jnp.int8),
                      None if in_order else jnp.asarray(perm), bits, group, contract, tuple(layer_shape),
                      jnp.dtype(compute_dtype))


def gptq_arrays(w: AffineWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(codes [k, n] original order, scale [groups, n], zero [groups, n] int32, g_idx [k]) of a one-layer weight:
  the inverse of `affine_weight`, what the GPTQ export packs."""
  if w.lead_shape:
    raise ValueError(f"gptq_arrays needs one layer's weight, got leading axes {w.lead_shape}")
  off = _offset(w.bits)
  signed = np.asarray(unpack_int4(w.values) if w.bits <= 4 else w.values).astype(np.int32)
  k = math.prod(w.layer_shape[:w.contract])
  codes_p = (signed + off).reshape(-1, signed.shape[-1])[:k]
  perm = np.arange(k) if w.perm is None else np.asarray(w.perm)
  codes = np.empty_like(codes_p)
  codes[perm] = codes_p
  g_idx = np.empty(k, np.int32)
  g_idx[perm] = np.arange(k) // w.group
  zero = np.asarray(w.zero).astype(np.int32) + off
  return codes.astype(np.uint8), np.asarray(w.scale, np.float32), zero, g_idx


def stack_layers(weights: list[AffineWeight]) -> AffineWeight:
  """Per-layer AffineWeights (same shape, bits and group) as one with a leading layers axis (scan_layers)."""
  first = weights[0]
  if any((w.bits, w.group, w.layer_shape, w.contract) != (first.bits, first.group, first.layer_shape, first.contract)
         for w in weights):
    raise ValueError("stack_layers: the layers differ in bits, group or shape")
  perm = None
  if any(w.perm is not None for w in weights):
    k = math.prod(first.layer_shape[:first.contract])
    perm = jnp.stack([jnp.arange(k, dtype=jnp.int32) if w.perm is None else w.perm for w in weights])
  stack = lambda name: jnp.stack([getattr(w, name) for w in weights])  # noqa: E731
  return dataclasses.replace(first, values=stack("values"), scale=stack("scale"), zero=stack("zero"), perm=perm)
