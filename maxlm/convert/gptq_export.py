"""`maxlm convert --to-hf --format gptq`: a `maxlm quantize` workdir's packed projections as GPTQ tensors.

Every quantized projection of layer i becomes model.layers.{i}.{self_attn|mlp}.{q|k|v|o|gate|up|down}_proj.{qweight,
qzeros,scales,g_idx} (`gptq_format`, the layout transformers + GPTQModel and vLLM read) in place of its .weight;
maxlm's [in, out] codes are already in GPTQ's row (input) order, and the flattened input / output axes of q/k/v
([d, heads, head_dim]) and o ([heads, head_dim, d]) are the Hugging Face in / out features in order. Embeddings,
norms and an untied head stay float tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from maxlm.convert.gptq_format import pack_gptq, quantization_config

HF_MODULE = {"attn": "self_attn", "mlp": "mlp"}


def _hf_prefix(layer: int, module: str, name: str) -> str:
  return f"model.layers.{layer}.{HF_MODULE[module]}.{name}_proj"


def _parse(path: str) -> tuple[int | None, str, str]:
  """(layer or None for stacked layers, module, name) of a dotted weight path: layers[.i].module.name."""
  parts = path.split(".")
  return (int(parts[1]) if len(parts) == 4 else None), parts[-2], parts[-1]


def gptq_plan(record: dict[str, Any] | None, num_layers: int) -> tuple[dict[str, Any], set[str]]:
  """(config.json's quantization_config, the HF .weight names the GPTQ tensors replace) of a compression record."""
  if not record or not record.get("quantized"):
    raise ValueError("--format gptq needs a workdir written by `maxlm quantize` (its compression.json lists the "
                     "quantized weights); this one holds float weights: export it without --format")
  entries = record["quantized"]
  if len({(e["bits"], e["group"]) for e in entries}) != 1:
    raise ValueError("--format gptq: the quantized weights differ in bits or group size")
  replaced = set()
  for e in entries:
    layer, module, name = _parse(e["path"])
    replaced |= {f"{_hf_prefix(i, module, name)}.weight" for i in (range(num_layers) if layer is None else [layer])}
  # desc_act: a permuted row order stored (static groups keep consecutive groups even with act-order)
  config = quantization_config(record["bits"], record["group"], any(e["act_order"] for e in entries),
                               bool(record.get("sym")), damp_percent=record.get("damp") or 0.01)
  return config, replaced


def gptq_tensors(model, record: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) of every quantized projection of `model` (loaded from the workdir: AffineWeights)."""
  from maxlm.compress.store import matmul_variables
  from maxlm.quant.affine import AffineWeight, gptq_arrays

  for path, var in matmul_variables(model):
    w = var.get_value()
    if not isinstance(w, AffineWeight):
      continue
    layer, module, name = _parse(path)
    layers = [(i, jax.tree.map(lambda a, i=i: a[i], w)) for i in range(w.lead_shape[0])] if layer is None else \
      [(layer, w)]
    for i, one in layers:
      codes, scale, zero, g_idx = gptq_arrays(one)
      try:
        tensors = pack_gptq(codes, scale, zero, g_idx, one.bits)
      except ValueError as e:
        raise ValueError(f"--format gptq: layer {i} {module}.{name}: {e}") from None
      for field, array in tensors.items():
        yield f"{_hf_prefix(i, module, name)}.{field}", array
