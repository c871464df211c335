"""GPTQ's sequential procedure over a Transformer: layer by layer, each calibrated on the outputs of the layers
before it as already compressed.

For layer i: one forward pass of the calibration hidden states through the block records the input of every matmul
(q, k and v share theirs, as gate and up do) into float32 Hessians 2/N XᵀX (`hessian`); each of the seven weights
is then compressed (`compress_weight`); a second pass through the block with the compressed weights (quantized
ones multiply through their packed codes, as serving does) gives layer i + 1's inputs. Memory: the calibration
hidden states plus one layer's Hessians. The hidden states stay sharded as the model's activations are (batch over
the mesh's data axes), so a model that trains on a mesh is compressed on it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxlm import sharding
from maxlm.compress import gptq, pruning_scores, sparsegpt
from maxlm.models.layers import dense
from maxlm.models.transformer import Transformer
from maxlm.quant.affine import AffineWeight, affine_weight, stack_layers

# The block's matmul weights: (module, name) -> (per-layer rank, contracted leading axes, the input they share).
LAYER_MATMULS = {("attn", "q"): (3, 1, "attn.qkv"), ("attn", "k"): (3, 1, "attn.qkv"),
                 ("attn", "v"): (3, 1, "attn.qkv"), ("attn", "o"): (3, 2, "attn.o"),
                 ("mlp", "gate"): (2, 1, "mlp.gate_up"), ("mlp", "up"): (2, 1, "mlp.gate_up"),
                 ("mlp", "down"): (2, 1, "mlp.down")}
QUANT_METHODS = ("rtn", "gptq")
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What to do to every matmul weight: quantize (rtn / gptq) or prune (magnitude / wanda / sparsegpt)."""

  method: str
  bits: int = 4
  group: int = 128
  sym: bool = False
  act_order: bool = False
  static_groups: bool = False
  sparsity: float | None = None
  pattern: tuple[int, int] | None = None
  damp: float = 0.01
  block: int = 128

  @property
  def quantizes(self) -> bool:
    return self.method in QUANT_METHODS


class _Recorder:
  """A MatmulWeight that multiplies by `w` and records the input it was given (under its input's name)."""

  def __init__(self, w, key: str, seen: dict):
    self.w, self.key, self.seen = w, key, seen

  def __getitem__(self, key) -> _Recorder:
    return self

  def astype(self, dtype) -> _Recorder:
    return _Recorder(self.w.astype(dtype), self.key, self.seen)

  def matmul(self, x: jax.Array, contract: int = 1) -> jax.Array:
    self.seen.setdefault(self.key, x)
    return dense(x, self.w, contract)


def _weight_var(block: nnx.Module, module: str, name: str) -> nnx.Variable:
  return getattr(getattr(block, module), name)


def _check_model(model: Transformer) -> None:
  if model.num_experts:
    raise ValueError("compressing a mixture-of-experts model is not supported (its experts are not `dense` weights)")


def _blocks(model: Transformer) -> tuple[Callable[[int], nnx.Module], int]:
  """(block(i) -> layer i as a Block module, number of layers) for scanned or listed layers."""
  if model.scan_layers:
    graphdef, stacked = nnx.split(model.layers)
    count = jax.tree.leaves(stacked)[0].shape[0]
    return (lambda i: nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))), count
  return (lambda i: model.layers[i]), len(model.layers)


def _forward(block_graphdef, block_state, x, *, record: bool, replace: dict | None = None):
  """The block's output for x [b, s, d]; with record, also {input key: (sum xᵀx float32 [k, k], tokens)}."""
  block = nnx.merge(block_graphdef, block_state)
  seen: dict[str, jax.Array] = {}
  for (module, name), (_, _, key) in LAYER_MATMULS.items():
    var = _weight_var(block, module, name)
    if replace is not None and (module, name) in replace:
      var.value = replace[(module, name)]
    if record:
      var.value = _Recorder(var.value, key, seen)
  positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
  y, _ = block(x, positions, None)
  if not record:
    return y, {}
  stats = {}
  for key, inp in seen.items():
    flat = inp.reshape(-1, int(np.prod(inp.shape[2:]))).astype(jnp.float32)
    stats[key] = (jnp.matmul(flat.T, flat, precision=jax.lax.Precision.HIGHEST), flat.shape[0])
  return y, stats


def compress_weight(w: jax.Array, h: jax.Array, recipe: Recipe, layer_shape: tuple[int, ...], contract: int
                    ) -> tuple[jax.Array | AffineWeight, dict[str, Any]]:
  """One weight [*layer_shape] compressed given its input's Hessian h [k, k]: (new weight, report)."""
  k = int(np.prod(layer_shape[:contract]))
  w2 = w.reshape(k, -1).astype(jnp.float32)
  if recipe.quantizes:
    if recipe.method == "gptq":
      res = gptq.gptq_quantize(w2, h, bits=recipe.bits, group=recipe.group, sym=recipe.sym,
                               act_order=recipe.act_order, damp=recipe.damp, block=recipe.block,
                               static_groups=recipe.static_groups)
    else:
      res = gptq.rtn_quantize(w2, bits=recipe.bits, group=recipe.group, sym=recipe.sym)
    new = affine_weight(res.codes, res.scales, res.zeros, res.g_idx, bits=recipe.bits, group=res.group,
                        layer_shape=layer_shape, contract=contract, compute_dtype=w.dtype)
    approx = res.dequantize()
  else:
    if recipe.method == "sparsegpt":
      approx, keep = sparsegpt.sparsegpt_prune(w2, h, sparsity=recipe.sparsity, pattern=recipe.pattern,
                                               damp=recipe.damp, block=recipe.block)
    else:
      if recipe.method == "wanda":
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(h), 0))  # ∝ ||X_j||: h = 2/N XᵀX
        keep = pruning_scores.wanda_mask(w2, norms, sparsity=recipe.sparsity, pattern=recipe.pattern)
      else:
        keep = pruning_scores.magnitude_mask(w2, sparsity=recipe.sparsity, pattern=recipe.pattern)
      approx = jnp.where(keep, w2, 0)
    new = approx.reshape(layer_shape).astype(w.dtype)
  err = float(gptq.layer_error(w2, approx, h))
  base = float(jnp.sum(w2 * jnp.matmul(h, w2, precision=jax.lax.Precision.HIGHEST)))
  report = {"error": err, "relative_error": err / base if base > 0 else 0.0}
  if not recipe.quantizes:
    report["sparsity"] = float(1 - jnp.mean(keep.astype(jnp.float32)))
  return new, report


def compress_model(model: Transformer, tokens: np.ndarray, recipe: Recipe, mesh: jax.sharding.Mesh, rules,
                   *, batch_size: int = 8, progress: Callable[[int, int, dict], None] | None = None
                   ) -> dict[str, Any]:
  """Compresses `model`'s matmul weights in place, layer by layer on calibration `tokens` [samples, seq];
  returns the per-layer report. Quantized weights become AffineWeights; pruned ones stay float with exact zeros."""
  _check_model(model)
  get_block, count = _blocks(model)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  report: dict[str, Any] = {"layers": []}
  new_weights: dict[tuple[str, str], list] = {key: [] for key in LAYER_MATMULS}
  with sharding.use_mesh(mesh, rules):
    table = model.embed[...].astype(model.dtype)
    embed = jax.jit(lambda t: table[t])
    xs = [embed(jax.device_put(tokens[i:i + batch_size], batch_sharding))
          for i in range(0, len(tokens), batch_size)]
    graphdef = nnx.split(get_block(0))[0]  # every layer has the same structure: compiled once
    record_fn = jax.jit(lambda st, x: _forward(graphdef, st, x, record=True)[1])
    run_fn = jax.jit(lambda st, x, rep: _forward(graphdef, st, x, record=False, replace=rep)[0])
    for i in range(count):
      t0 = time.perf_counter()
      block = get_block(i)
      state = nnx.split(block)[1]
      sums: dict[str, tuple] = {}
      for x in xs:
        for key, (s, n) in record_fn(state, x).items():
          sums[key] = (s, n) if key not in sums else (sums[key][0] + s, sums[key][1] + n)
      hessians = {key: 2 * s / n for key, (s, n) in sums.items()}
      layer_report, replace = {}, {}
      for (module, name), (rank, contract, key) in LAYER_MATMULS.items():
        w = _weight_var(block, module, name).get_value()
        new, rep = compress_weight(w, hessians[key], recipe, tuple(w.shape[-rank:]), contract)
        replace[(module, name)] = new
        new_weights[(module, name)].append(new)
        layer_report[f"{module}.{name}"] = rep
      del hessians, sums
      xs = [run_fn(state, x, replace) for x in xs]
      layer_report["seconds"] = time.perf_counter() - t0
      report["layers"].append(layer_report)
      if progress is not None:
        progress(i + 1, count, layer_report)
  _install(model, new_weights)
  return report


def _install(model: Transformer, new_weights: dict[tuple[str, str], list]) -> None:
  """Puts the compressed weights into the model (stacked along the layers axis when the layers are scanned)."""
  for (module, name), per_layer in new_weights.items():
    if model.scan_layers:
      if isinstance(per_layer[0], AffineWeight):
        value = stack_layers(per_layer)
      else:
        value = jnp.stack(per_layer)
      _weight_var(model.layers, module, name).value = value
    else:
      for block, value in zip(model.layers, per_layer):
        _weight_var(block, module, name).value = value
