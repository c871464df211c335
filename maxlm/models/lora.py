"""LoRA adapters on a Transformer's projections: W x becomes W x + scale * B(A x), W frozen, A and B trained.

An adapted weight is a `LoRA` module in the place of the `nnx.Param` it wraps. The call sites are unchanged:
`module.q[...]` returns a `LoRAMatmul`, one of the weight types `maxlm.models.layers.dense` dispatches to
(`maxlm.quant.weights.MatmulWeight`), which multiplies by the base weight (a float array or a QuantizedWeight) and
adds the low-rank path without ever forming the product BA. The base sits in a `LoRABase` variable, not an
`nnx.Param`, so anything that selects `nnx.Param` (gradients, optimizer state) sees only the adapters (`LoRAParam`).

Conventions as PEFT's: A [*in, r] is uniform in +-1/sqrt(fan_in) (kaiming-uniform with a=sqrt(5)), B [r, *out] is
zero, so an adapted model computes exactly what its base does until B moves; scale = alpha / r, or alpha / sqrt(r)
with rslora. Stacked (scanned) layers carry a leading layers axis on base, A and B alike.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from maxlm.models.layers import dense
from maxlm.quant.weights import QuantizedWeight, quantize_weight

# (owner class name, attribute, input axes of the weight, axes of one layer's weight)
TARGETS = {("Attention", "q"): (1, 3), ("Attention", "k"): (1, 3), ("Attention", "v"): (1, 3),
           ("Attention", "o"): (2, 3), ("SwiGLU", "gate"): (1, 2), ("SwiGLU", "up"): (1, 2),
           ("SwiGLU", "down"): (1, 2)}
DEFAULT_TARGETS = r".*\.(attn\.(q|k|v|o)|mlp\.(gate|up|down))"


class LoRABase(nnx.Variable):
  """The frozen weight under an adapter (not an nnx.Param: no gradient, no optimizer state)."""


class LoRAParam(nnx.Param):
  """An adapter factor (A or B): the only trained parameters of an adapted projection."""


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
  """alpha / rank, or alpha / sqrt(rank) for rank-stabilized LoRA (rsLoRA)."""
  return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoRAKey(nnx.Variable):
  """A projection's dropout key (raw uint32 [*lead, 2]): all zero (as created) switches dropout off; the train step
  puts a fresh one per step into its frozen part (`dropout_keys`)."""


@functools.partial(jax.tree_util.register_dataclass, data_fields=("base", "a", "b", "key"),
                   meta_fields=("scale", "contract", "dropout"))
@dataclasses.dataclass(frozen=True)
class LoRAMatmul:
  """One layer's adapted weight at a `dense` call site: x -> x W + scale * (dropout(x) A) B."""

  base: jax.Array | QuantizedWeight
  a: jax.Array  # [*in, r]
  b: jax.Array  # [r, *out]
  scale: float
  contract: int
  key: jax.Array | None = None  # uint32 [2]: this layer's dropout key; all zero = no dropout
  dropout: float = 0.0

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the weight this stands for."""
    return tuple(self.base.shape)

  @property
  def dtype(self) -> jnp.dtype:
    """The base weight's (compute) dtype."""
    return self.base.dtype

  def __getitem__(self, key) -> LoRAMatmul:
    """Only `w[...]`: the weight itself."""
    if key is not Ellipsis:
      raise TypeError(f"LoRAMatmul supports only [...] indexing, got {key!r}")
    return self

  def astype(self, dtype) -> LoRAMatmul:
    """The same adapted weight computing in `dtype`."""
    return dataclasses.replace(self, base=self.base.astype(dtype), a=self.a.astype(dtype), b=self.b.astype(dtype))

  def matmul(self, x: jax.Array, contract: int = 1) -> jax.Array:
    """x [..., *in] -> [..., *out]: the base product plus the scaled low-rank path."""
    if contract != self.contract:
      raise ValueError(f"LoRA weight with {self.contract} input axes used with contract={contract}")
    xa = x
    if self.dropout and self.key is not None:  # PEFT's lora_dropout: on the adapter's input only, inverted scaling
      keep = jax.random.bernoulli(self.key, 1.0 - self.dropout, x.shape)
      dropped = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
      xa = jnp.where(jnp.any(self.key != 0), dropped, x)
    low = dense(dense(xa, self.a, contract), self.b, 1)
    return dense(x, self.base, contract) + (self.scale * low).astype(x.dtype)

  def merged(self) -> jax.Array:
    """The dense weight W + scale * A B (leading stacked axes kept), in float32 (a QuantizedWeight dequantized)."""
    base = self.base.dequantize() if isinstance(self.base, QuantizedWeight) else self.base
    lead = self.a.ndim - 1 - self.contract
    a = self.a.astype(jnp.float32).reshape(*self.a.shape[:lead], -1, self.a.shape[-1])
    b = self.b.astype(jnp.float32).reshape(*self.b.shape[:lead + 1], -1)
    return base.astype(jnp.float32) + self.scale * (a @ b).reshape(base.shape)


class LoRA(nnx.Module):
  """An adapted projection in place of its nnx.Param: `[...]` gives the LoRAMatmul that `dense` multiplies by."""

  def __init__(self, base: nnx.Param, *, contract: int, layer_ndim: int, rank: int, alpha: float, rslora: bool,
               rngs: nnx.Rngs, base_quant: str = "none", group: int = 128, dropout: float = 0.0):
    w = base[...]
    names = tuple(base.get_metadata().get("out_sharding") or (None,) * w.ndim)
    lead = w.ndim - layer_ndim
    in_shape, out_shape = w.shape[lead:lead + contract], w.shape[lead + contract:]
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(rngs.params(), (*w.shape[:lead], *in_shape, rank), jnp.float32, -bound, bound)
    b = jnp.zeros((*w.shape[:lead], rank, *out_shape), jnp.float32)
    # QLoRA: the frozen base stored quantized, dequantized inside its matmul (its leaves keep the sharding the
    # quantizing computation propagates; the metadata names the float weight's axes).
    frozen = w if base_quant == "none" else quantize_weight(w, base_quant, contract=contract, group=group,
                                                            layer_ndim=layer_ndim)
    # A quantized base's leaves (values, scales) do not have the float weight's axes: they take the sharding the
    # quantizing computation propagates instead of a logical annotation.
    self.base = LoRABase(frozen, out_sharding=names) if base_quant == "none" else LoRABase(frozen)
    self.a = LoRAParam(a.astype(w.dtype), out_sharding=(*names[:lead + contract], None))
    self.b = LoRAParam(b.astype(w.dtype), out_sharding=(*names[:lead], None, *names[lead + contract:]))
    self.scale = lora_scale(alpha, rank, rslora)
    self.contract = contract
    self.dropout = dropout
    self.dropout_key = LoRAKey(jnp.zeros((*w.shape[:lead], 2), jnp.uint32)) if dropout else None

  def __getitem__(self, key) -> LoRAMatmul:
    if key is not Ellipsis:
      raise TypeError(f"LoRA supports only [...] indexing, got {key!r}")
    key = None if self.dropout_key is None else self.dropout_key[...]
    return LoRAMatmul(self.base[...], self.a[...], self.b[...], self.scale, self.contract, key, self.dropout)


def _path(path: tuple) -> str:
  return ".".join(str(p) for p in path)


BASE_QUANT = ("none", "int8", "int4", "nf4")


def apply_lora(model: nnx.Module, *, rank: int, alpha: float, targets: str = DEFAULT_TARGETS, rslora: bool = False,
               rngs: nnx.Rngs, base_quant: str = "none", group: int = 128, dropout: float = 0.0) -> list[str]:
  """Replaces every attention / MLP projection whose dotted path (e.g. `layers.3.attn.q`, `layers.mlp.down` when
  layers are scanned) fully matches `targets` with a LoRA adapter, in place; returns the adapted paths.
  base_quant int8 / int4 / nf4 stores the adapted bases quantized (QLoRA; `group` for int4 and nf4). ValueError
  for a rank below 1, a non-positive alpha, an unknown base_quant, a dropout outside [0, 1), a bad expression, or
  one that matches no projection. With dropout, each adapter gets a LoRAKey (zero: off until a train step sets it)."""
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"lora.dropout must be in [0, 1), got {dropout}")
  if base_quant not in BASE_QUANT:
    raise ValueError(f"lora.base_quant={base_quant!r}: expected one of {list(BASE_QUANT)}")
  if rank < 1:
    raise ValueError(f"lora.rank must be >= 1, got {rank}")
  if alpha <= 0:
    raise ValueError(f"lora.alpha must be > 0, got {alpha}")
  try:
    pattern = re.compile(targets)
  except re.error as e:
    raise ValueError(f"lora.targets={targets!r} is not a regular expression: {e}") from None
  found, adapted = [], []
  for path, module in list(nnx.iter_modules(model)):
    for (owner, name), (contract, layer_ndim) in TARGETS.items():
      if type(module).__name__ != owner or not isinstance(getattr(module, name, None), nnx.Param):
        continue
      full = _path((*path, name))
      found.append(full)
      if pattern.fullmatch(full):
        setattr(module, name, LoRA(getattr(module, name), contract=contract, layer_ndim=layer_ndim, rank=rank,
                                   alpha=alpha, rslora=rslora, rngs=rngs, base_quant=base_quant, group=group,
                                   dropout=dropout))
        adapted.append(full)
  if not adapted:
    raise ValueError(f"lora.targets={targets!r} matches none of the model's projections (e.g. "
                     f"{', '.join(found[:4])})")
  return adapted


def dropout_keys(frozen: dict, step: jax.Array) -> dict:
  """`frozen` (a LoRA model's frozen part, a pure dict) with every adapter's dropout key drawn for `step`: one key
  per projection (folded by its path) and per stacked layer, never zero."""

  def fresh(path, leaf):
    if getattr(path[-1], "key", None) != "dropout_key":
      return leaf
    name = "/".join(str(getattr(k, "key", k)) for k in path[:-1])
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), step), zlib.crc32(name.encode()) & 0x7FFFFFFF)
    keys = jax.random.split(key, math.prod(leaf.shape[:-1])).reshape(leaf.shape)
    return jnp.where(jnp.all(keys == 0, axis=-1, keepdims=True), jnp.uint32(1), keys)

  return jax.tree_util.tree_map_with_path(fresh, frozen)


def merge_lora(model: nnx.Module) -> list[str]:
  """Replaces every LoRA adapter by a plain nnx.Param holding W + scale * A B (in the base's dtype; a quantized base
  is dequantized first), in place; returns the merged paths."""
  merged = []
  for path, module in list(nnx.iter_modules(model)):
    for name, value in list(vars(module).items()):
      if isinstance(value, LoRA):
        w = value[...].merged()
        base_dtype = value.base[...].dtype if not isinstance(value.base[...], QuantizedWeight) else jnp.float32
        setattr(module, name, nnx.Param(w.astype(base_dtype), **value.base.get_metadata()))
        merged.append(_path((*path, name)))
  return merged
