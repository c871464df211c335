"""Serving's weight conversion (`serve.weights`): a model's matmul weights as int8, int4 or bf16.

`quantize_params` replaces the matmul weights of attention (q, k, v, o), of the dense SwiGLU MLP (gate, up,
down) and an untied lm_head with `QuantizedWeight`s (formats in `maxlm.quant.weights`; `maxlm.models.layers.dense`
dispatches to their own matmul). Left as they are: the embedding table (gathered by token, and used transposed as
the head when tied), norms, biases, the MoE router, and MoE expert weights (they go through einsum / ragged_dot,
not `dense`).

Stacked parameters (scan_layers: a leading layers axis) are quantized per layer (see `quantize_weight`). nnx
Variables hold a QuantizedWeight as their value (`variable[...]` returns it), so
`nnx.merge(graphdef, quantize_params(state, "int8"))` is a working model, as is
`nnx.merge(graphdef, quantize_params(nnx.to_pure_dict(state), "int8"))`. The Variables keep the float weight's
metadata (e.g. its sharding names), which does not describe a QuantizedWeight's leaves: the leaves keep the
sharding that the quantizing jit propagated from the float weight.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from maxlm.quant.int4 import int4_group_size
from maxlm.quant.weights import MatmulWeight, quantize_weight

MODES = ("none", "bf16", "int8", "int4")

# Per-layer (unstacked) rank and number of leading contracted axes of each quantized weight, by parent/name.
_ATTN = {"q": (3, 1), "k": (3, 1), "v": (3, 1), "o": (3, 2)}
_MLP = {"gate": (2, 1), "up": (2, 1), "down": (2, 1)}


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
    if isinstance(w, MatmulWeight) or not jnp.issubdtype(w.dtype, jnp.floating):  # quantized already
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
