"""A compressed workdir: what `maxlm quantize` / `maxlm prune` write and `maxlm.workdir.load_model` reads back.

DST holds the source's config.json, tokenizer and import record, and:
  * compression.json (COMPRESSION_RECORD): the method and settings, the calibration, per-layer errors, timings,
    and for a quantized model every quantized weight's path, bits, group and layout;
  * checkpoints/0: the model as float weights (quantized weights dequantized: exactly what the codes stand for,
    so float consumers such as `--to-hf` and `maxlm eval --data` read a plain checkpoint);
  * quantized/model.safetensors: the packed codes, scales, zero points and act-order permutations that the loaded
    model multiplies with (`AffineWeight`); loading replaces the float weights with them;
  * pruned/model.safetensors: a pruned model's keep-masks, one bit per weight (np.packbits of w != 0 along the
    flattened weight), next to the exact zeros in the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxlm.compress.layerwise import LAYER_MATMULS
from maxlm.quant.affine import AffineWeight

COMPRESSION_RECORD = "compression.json"
QUANTIZED_DIR = "quantized"
MASKS_DIR = "pruned"


def compression_record(workdir: str | Path) -> dict[str, Any] | None:
  """The workdir's compression record, or None if it is not a compressed workdir."""
  path = Path(workdir) / COMPRESSION_RECORD
  return json.loads(path.read_text()) if path.is_file() else None


def matmul_variables(model: nnx.Module) -> list[tuple[str, nnx.Variable]]:
  """(dotted path, Variable) of every matmul weight `maxlm.compress` handles, scanned or listed layers."""
  out = []
  layers = [("layers", model.layers)] if model.scan_layers else [(f"layers.{i}", b) for i, b in
                                                                   enumerate(model.layers)]
  for prefix, block in layers:
    for module, name in LAYER_MATMULS:
      out.append((f"{prefix}.{module}.{name}", getattr(getattr(block, module), name)))
  return out


def float_params(model: nnx.Module) -> dict:
  """The model's parameters as a pure dict with every AffineWeight dequantized: the workdir's float checkpoint."""
  params = nnx.to_pure_dict(nnx.state(model))
  return jax.tree.map(lambda x: x.dequantize() if isinstance(x, AffineWeight) else x, params,
                      is_leaf=lambda x: isinstance(x, AffineWeight))


def write_compressed(dst: Path, model: nnx.Module, record: dict[str, Any]) -> None:
  """Writes DST's packed weights or masks and compression.json (`record` plus the quantized weights' layout); the
  config and float checkpoint (`float_params`) are written by the caller (maxlm.convert.hf.write_workdir)."""
  from maxlm.convert.safetensors_io import write_safetensors

  quantized, tensors, masks = [], [], []
  for path, var in matmul_variables(model):
    w = var.get_value()
    if isinstance(w, AffineWeight):
      quantized.append({"path": path, "bits": w.bits, "group": w.group, "contract": w.contract,
                        "layer_shape": list(w.layer_shape), "act_order": w.perm is not None,
                        "dtype": str(jnp.dtype(w.compute_dtype))})
      for field in ("values", "scale", "zero", "perm"):
        if getattr(w, field) is not None:
          tensors.append((f"{path}.{field}", np.asarray(getattr(w, field))))
    elif record["method"] in ("magnitude", "wanda", "sparsegpt"):
      masks.append((path, np.packbits(np.asarray(w).reshape(-1) != 0)))
  if tensors:
    write_safetensors(tensors, dst / QUANTIZED_DIR)
  if masks:
    write_safetensors(masks, dst / MASKS_DIR)
  (dst / COMPRESSION_RECORD).write_text(json.dumps({**record, "quantized": quantized}, indent=2))


def install_quantized(workdir: str | Path, model: nnx.Module, mesh: jax.sharding.Mesh) -> None:
  """Replaces a quantized workdir's float weights in `model` by its packed AffineWeights (replicated on mesh)."""
  from maxlm.convert.safetensors_io import SafetensorsReader

  record = compression_record(workdir)
  if not record or not record.get("quantized"):
    return
  reader = SafetensorsReader(Path(workdir) / QUANTIZED_DIR)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variables = dict(matmul_variables(model))
  for entry in record["quantized"]:
    path = entry["path"]
    if path not in variables:
      raise ValueError(f"{workdir}: {COMPRESSION_RECORD} names {path}, which this model does not have")
    arrays = {field: jax.device_put(np.asarray(reader.get(f"{path}.{field}")), replicated)
              for field in ("values", "scale", "zero")}
    perm = jax.device_put(np.asarray(reader.get(f"{path}.perm")), replicated) if entry["act_order"] else None
    variables[path].set_value(AffineWeight(arrays["values"], arrays["scale"], arrays["zero"], perm, entry["bits"],
                                           entry["group"], entry["contract"], tuple(entry["layer_shape"]),
                                           jnp.dtype(entry["dtype"])))


def read_masks(workdir: str | Path) -> dict[str, np.ndarray]:
  """A pruned workdir's keep-masks: {dotted weight path: packed bits of the flattened weight}."""
  from maxlm.convert.safetensors_io import SafetensorsReader

  reader = SafetensorsReader(Path(workdir) / MASKS_DIR)
  return {name: np.asarray(reader.get(name)) for name in reader.keys()}
