"""Weight-only quantization for serving (`serve.weights`): int8 per output channel, int4 group-wise, or bf16.

`quantize_params` replaces the matmul weights of attention (q, k, v, o), of the dense SwiGLU MLP (gate, up,
down) and an untied lm_head with `QuantizedWeight`s; activations stay in the compute dtype and the weight is
dequantized inside the matmul (`maxlm.models.layers.dense` dispatches to `QuantizedWeight.matmul`):
  * int8: symmetric, one float32 scale per output channel (absmax over the input axes / 127), so
    y = (x @ q) * scale exactly factors the scale out of the sum.
  * int4: symmetric (values -7..7), one float32 scale per `group` consecutive input channels (of the flattened
    input dimension) per output channel; two values are packed per uint8 (memory is half of int8 on every
    backend) and unpacked with shifts inside the matmul: x is reshaped to [..., groups, group], contracted per
    group with the unpacked [groups, group, out] values, scaled by [groups, out] and summed over groups.
    `group` is a maximum: the group used is the largest even divisor of the input dimension <= group (e.g.
    input 576 with group 128 -> 96), so any even input dimension works; an odd one raises ValueError.
Left as they are: the embedding table (gathered by token, and used transposed as the head when tied), norms,
biases, the MoE router, and MoE expert weights (they go through einsum / ragged_dot, not `dense`).

Stacked parameters (scan_layers: a leading layers axis) are quantized per layer: every leaf of the
QuantizedWeight carries the leading axes and the static metadata describes one layer, so `jax.lax.scan`
slicing the leaves yields per-layer QuantizedWeights. nnx Variables hold a QuantizedWeight as their value
(`variable[...]` returns it), so `nnx.merge(graphdef, quantize_params(state, "int8"))` is a working model, as
is `nnx.merge(graphdef, quantize_params(nnx.to_pure_dict(state), "int8"))`. The Variables keep the float
weight's metadata (e.g. its sharding names), which does not describe a QuantizedWeight's leaves: the leaves keep
the sharding that the quantizing jit propagated from the float weight.

Fusion: in plain JAX the int -> float convert feeds the dot directly, which XLA:TPU/GPU can fuse into the matmul;
XLA:CPU (checked) runs it as a separate loop fusion: a transient float copy of one weight inside the compiled step.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MODES = ("none", "bf16", "int8", "int4")
INT8_MAX = 127
INT4_MAX = 7  # symmetric: -8 is representable by the packing but never produced

# Per-layer (unstacked) rank and number of leading contracted axes of each quantized weight, by parent/name.
_ATTN = {"q": (3, 1), "k": (3, 1), "v": (3, 1), "o": (3, 2)}
_MLP = {"gate": (2, 1), "up": (2, 1), "down": (2, 1)}


@functools.partial(jax.tree_util.register_dataclass, data_fields=("values", "scales"),
                   meta_fields=("mode", "contract", "group", "layer_shape", "compute_dtype"))
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
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
      raise TypeError(f"QuantizedWeight supports only [...] indexing, got {key!r}")
    return self

  def astype(self, dtype) -> QuantizedWeight:
    """The same weight computing in `dtype` (as `w.astype(dt)` does for a float weight at the call sites)."""
    return dataclasses.replace(self, compute_dtype=jnp.dtype(dtype))

  def dequantize(self) -> jax.Array:
    """The float weight [*lead, *layer_shape] in the compute dtype (for tests and debugging, not the matmul)."""
    lead = self.lead_shape
    if self.mode == "int8":
      out_shape = self.layer_shape[self.contract:]
      w = self.values.astype(jnp.float32) * self.scales.reshape(*lead, *(1,) * self.contract, *out_shape)
    else:
      w = unpack_int4(self.values).astype(jnp.float32) * self.scales[..., :, None, :]
    return w.reshape(*lead, *self.layer_shape).astype(self.compute_dtype)

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
      w = unpack_int4(self.values).astype(dt)  # [groups, group, n]
      part = jnp.einsum("...gk,gkn->...gn", x.reshape(*lead, groups, self.group), w,
                        preferred_element_type=jnp.float32)
      y = jnp.einsum("...gn,gn->...n", part, self.scales)
    return y.astype(dt).reshape(*lead, *out_shape)


def pack_int4(q: jax.Array) -> jax.Array:
  """int values in [-8, 7] [..., 2m, n] -> uint8 [..., m, n]: row j in the low nibble, row j + m in the high."""
  m = q.shape[-2] // 2
  u = jax.lax.bitcast_convert_type(jnp.asarray(q, jnp.int8), jnp.uint8)  # two's complement nibbles
  return (u[..., :m, :] & jnp.uint8(0xF)) | (u[..., m:, :] << jnp.uint8(4))


def unpack_int4(p: jax.Array) -> jax.Array:
  """Inverse of `pack_int4`: uint8 [..., m, n] -> int8 [..., 2m, n], sign-extended with arithmetic shifts."""
  s = jax.lax.bitcast_convert_type(p, jnp.int8)
  lo = jax.lax.shift_right_arithmetic(jax.lax.shift_left(s, jnp.int8(4)), jnp.int8(4))
  hi = jax.lax.shift_right_arithmetic(s, jnp.int8(4))
  return jnp.concatenate([lo, hi], axis=-2)


def int4_group_size(k: int, group: int) -> int:
  """The group used for input dimension k: the largest even divisor of k that is <= group."""
  if not isinstance(group, (int, np.integer)) or isinstance(group, bool) or group < 2:
    raise ValueError(f"int4 group={group!r}: expected an integer >= 2 (input channels per scale)")
  for g in range(min(group, k) - (min(group, k) % 2), 1, -2):
    if k % g == 0:
      return g
  raise ValueError(f"int4 quantization needs an even input dimension (two values per byte), got {k}")


def quantize_weight(w: jax.Array, mode: str, *, contract: int = 1, group: int = 128,
                    layer_ndim: int | None = None) -> QuantizedWeight:
  """Quantizes float w [*lead, *in (contract axes), *out] ("int8" or "int4") per layer.

  layer_ndim = rank of one layer's weight (default w.ndim): axes before those are leading (stacked) axes.
  """
  if mode not in ("int8", "int4"):
    raise ValueError(f"quantize_weight mode={mode!r}: expected 'int8' or 'int4'")
  layer_ndim = w.ndim if layer_ndim is None else layer_ndim
  layer_shape = tuple(w.shape[w.ndim - layer_ndim:])
  g = int4_group_size(math.prod(layer_shape[:contract]), group) if mode == "int4" else 0
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
  scale = jnp.where(amax > 0, amax / INT4_MAX, 1.0)
  q = jnp.clip(jnp.round(w3 / scale[..., None, :]), -INT4_MAX, INT4_MAX).astype(jnp.int8)
  return pack_int4(q), scale


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _paths(state) -> list[tuple]:
  """Paths (tuples of plain keys) of the leaves of `state`, nnx Variables taken whole."""
  return [tuple(_key(k) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_var)[0]]


def _key(k) -> str | int:
  """The plain key of a jax tree path entry (DictKey, SequenceKey, GetAttrKey)."""
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def _role(path: tuple, paths: set[tuple]) -> tuple[int, int] | None:
  """(per-layer rank, contract) of the matmul weight at `path`, or None when it is left as it is."""
  if path and path[-1] == "lm_head":
    return 2, 1
  if len(path) >= 2 and path[-2] == "attn" and path[-1] in _ATTN:
    return _ATTN[path[-1]]
  if len(path) >= 2 and path[-2] == "mlp" and path[-1] in _MLP and path[:-1] + ("router",) not in paths:
    return _MLP[path[-1]]  # a dense SwiGLU (a MoE's mlp has a router; its experts are left as they are)
  return None


def quantize_params(state, mode: str, *, group: int = 128):
  """`state` (an nnx.State from nnx.split(model), or a params pytree) with its matmul weights in `mode`.

  none: unchanged; bf16: the float matmul weights cast to bfloat16; int8 / int4: QuantizedWeights (see the
  module docstring for which weights, and the formats). Works on the unstacked and scan-stacked layouts.
  """
  if mode not in MODES:
    raise ValueError(f"serve.weights={mode!r}: expected one of {MODES}")
  if mode == "int4":
    int4_group_size(2, group)  # validates group up front
  if mode == "none":
    return state
  paths = set(_paths(state))

  def convert(path, leaf):
    path = tuple(_key(k) for k in path)
    role = _role(path, paths)
    if role is None:
      return leaf
    w = leaf.get_value() if _is_var(leaf) else leaf
    if isinstance(w, QuantizedWeight) or not jnp.issubdtype(w.dtype, jnp.floating):
      return leaf
    ndim, contract = role
    if w.ndim < ndim:
      raise ValueError(f"{'/'.join(map(str, path))}: rank {w.ndim} weight, expected >= {ndim}")
    if mode == "bf16":
      new = w.astype(jnp.bfloat16)
    else:
      new = quantize_weight(w, mode, contract=contract, group=group, layer_ndim=ndim)
    return leaf.copy(new) if _is_var(leaf) else new

  return jax.tree_util.tree_map_with_path(convert, state, is_leaf=_is_var)


def quantize_model(model: nnx.Module, mode: str, *, group: int = 128) -> nnx.Module:
  """A new model whose matmul weights are in `mode` (quantize_params on its state); "none" returns `model`."""
  if mode == "none":
    return model
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, quantize_params(state, mode, group=group))


def weight_bytes(state) -> int:
  """Bytes of all parameter arrays as stored (QuantizedWeight values and scales included)."""
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)
                 if hasattr(x, "shape") and hasattr(x, "dtype")))


def matmul_weight_paths(state) -> list[str]:
  """'/'-joined paths of the weights quantize_params converts (for reports and tests)."""
  paths = _paths(state)
  pset = set(paths)
  return ["/".join(map(str, p)) for p in paths if _role(p, pset) is not None]
