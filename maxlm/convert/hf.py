"""Hugging Face <-> maxlm for Llama, Mistral, Qwen2 and Mixtral: the import and export entry points.

The config mapping is hf_config.py, the tensor mapping hf_tensors.py (import streams each device shard from
the memory-mapped safetensors; export writes one layer's tensors at a time into size-capped safetensors
shards); this module adds the tokenizer and the workdir, and re-exports both modules' public names.

    from maxlm.convert.hf import from_hf
    model, config = from_hf("path/to/hf_model")     # logits = model(tokens)
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from ml_collections import config_dict

from maxlm import sharding
from maxlm.config import to_json
from maxlm.convert.hf_config import (
  ARCHITECTURES,
  SUPPORTED,
  UnsupportedModelError,
  hf_config,
  maxlm_config,
  model_fields,
  read_hf_config,
)
from maxlm.convert.hf_tensors import Spec, hf_tensors, load_params, specs
from maxlm.convert.safetensors_io import SafetensorsReader, write_safetensors
from maxlm.models.transformer import Transformer
from maxlm.train.state import build_model

__all__ = ["ARCHITECTURES", "IMPORT_RECORD", "SUPPORTED", "TOKENIZER_FILES", "Spec", "UnsupportedModelError",
           "check_new_workdir", "convert_from_hf", "convert_to_hf", "copy_tokenizer", "from_hf", "hf_config",
           "hf_tensors", "load_params", "maxlm_config", "model_fields", "read_hf_config", "specs", "write_workdir"]

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
IMPORT_RECORD = "hf_import.json"  # in a converted workdir: the source's model_type, dtype and config
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
           "float16": np.dtype(np.float16)}


def _tokenizer_file(hf_dir: Path) -> str | None:
  """The name of the model's tokenizer file (tokenizer.json preferred), or None."""
  return next((n for n in ("tokenizer.json", "tokenizer.model") if (hf_dir / n).is_file()), None)


def from_hf(path: str | Path, overrides: Sequence[str] = (), *,
            mesh: jax.sharding.Mesh | None = None) -> tuple[Transformer, config_dict.ConfigDict]:
  """(model, config) of a Hugging Face model directory; `model(tokens)` gives logits [batch, seq, vocab].

  overrides are maxlm config overrides (e.g. "model.param_dtype=bfloat16"); parameters are placed on `mesh`
  (default: every device, on the config's mesh axes).
  """
  hf_dir = Path(path)
  hf = read_hf_config(hf_dir)
  name = _tokenizer_file(hf_dir)
  cfg = maxlm_config(hf, overrides, tokenizer=str((hf_dir / name).absolute()) if name else "")
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  return build_model(cfg, load_params(hf_dir, cfg, mesh, hf["model_type"]), mesh), cfg


def copy_tokenizer(hf_dir: Path, out_dir: Path, hf: dict) -> None:
  """Copies the model's tokenizer files and its special-token ids (config.json subset) into out_dir."""
  names = [n for n in TOKENIZER_FILES if (hf_dir / n).is_file()]
  if not names:
    return
  out_dir.mkdir(parents=True, exist_ok=True)
  for name in names:
    shutil.copy2(hf_dir / name, out_dir / name)
  ids = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
  (out_dir / "config.json").write_text(json.dumps(ids, indent=2))


def check_new_workdir(workdir: Path) -> None:
  """Refuses a workdir that already holds checkpoints (an import must not mix with a run's)."""
  ckpt_dir = workdir / "checkpoints"
  if ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    raise FileExistsError(f"{ckpt_dir} already holds checkpoints; convert into a new --workdir")


def write_workdir(workdir: Path, cfg: config_dict.ConfigDict, params: dict, record: dict) -> None:
  """Writes an imported model's config.json, import record (IMPORT_RECORD) and step-0 checkpoint into workdir."""
  from maxlm.train.checkpoint import Checkpointer  # orbax is only needed here

  config_json = to_json(cfg)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config_json)
  (workdir / IMPORT_RECORD).write_text(json.dumps(record, indent=2))
  ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
  ckpt.save_params(0, params, json.loads(config_json))
  ckpt.close()


def convert_from_hf(hf_dir: str | Path, workdir: str | Path, overrides: Sequence[str] = ()) -> config_dict.ConfigDict:
  """Writes a maxlm workdir (step-0 checkpoint, config.json, tokenizer/) from a Hugging Face model directory."""
  hf_dir, workdir = Path(hf_dir), Path(workdir)
  hf = read_hf_config(hf_dir)
  check_new_workdir(workdir)
  tok_dir = workdir / "tokenizer"
  name = _tokenizer_file(hf_dir)
  if name is None:
    log.warning("%s has no tokenizer.json or tokenizer.model: training will need --config.data.tokenizer", hf_dir)
  # The config is mapped (and validated) before anything is written into the workdir.
  cfg = maxlm_config(hf, overrides, tokenizer=str((tok_dir / name).absolute()) if name else "")
  reader = SafetensorsReader(hf_dir)
  params = load_params(hf_dir, cfg, sharding.make_mesh(cfg.mesh), hf["model_type"])
  copy_tokenizer(hf_dir, tok_dir, hf)
  dtypes = sorted({str(reader.dtype(n)) for n in reader.keys()})
  write_workdir(workdir, cfg, params,
                {"source": str(hf_dir.absolute()), "model_type": hf["model_type"],
                 "dtype": hf.get("dtype", hf.get("torch_dtype")), "tensor_dtypes": dtypes, "config": hf})
  return cfg


def convert_to_hf(workdir: str | Path, output: str | Path, *, dtype: str | None = None,
                  model_type: str | None = None, step: int | None = None,
                  max_shard_bytes: int = 5 << 30, fmt: str | None = None) -> Path:
  """Writes a Hugging Face model directory (config, safetensors, tokenizer) from a maxlm workdir; fmt="gptq" writes
  a `maxlm quantize` workdir's projections as GPTQ tensors (else every weight is a float tensor: a quantized
  workdir's dequantized)."""
  from maxlm.workdir import load_workdir_config, restore_params  # orbax is only needed here

  workdir, output = Path(workdir), Path(output)
  cfg = load_workdir_config(workdir)
  record = json.loads((workdir / IMPORT_RECORD).read_text()) if (workdir / IMPORT_RECORD).is_file() else {}
  model_type = model_type or record.get("model_type")
  try:
    hf_config(cfg, model_type)
  except UnsupportedModelError:
    if model_type != record.get("model_type"):
      raise
    model_type = None  # the imported family no longer fits (e.g. trained with a window): pick one that does
  if fmt not in (None, "gptq"):
    raise ValueError(f"--format {fmt}: expected gptq (or no --format: float tensors)")
  quant = None
  if fmt == "gptq":
    from maxlm.compress.store import compression_record
    from maxlm.convert.gptq_export import gptq_plan, gptq_tensors

    quant, replaced = gptq_plan(compression_record(workdir), cfg.model.num_layers)
    dtype = dtype or "float16"  # GPTQ kernels compute in float16 (its scales are stored so)
  dtype = dtype or record.get("dtype") or "float32"
  if dtype not in _DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
  step, params = restore_params(workdir, cfg, step)
  special = {k: record.get("config", {}).get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
  tok_dir = workdir / "tokenizer"
  if (tok_dir / "config.json").is_file():
    special.update(json.loads((tok_dir / "config.json").read_text()))
  config = hf_config(cfg, model_type, dtype, special)
  tensors = hf_tensors(cfg, params, config["model_type"], _DTYPES[dtype])
  if quant is not None:
    from maxlm.workdir import load_model

    model, _, _ = load_model(workdir, step=step)  # its AffineWeights: the codes, scales and zero points
    config["quantization_config"] = quant
    tensors = itertools.chain(((n, a) for n, a in tensors if n not in replaced),
                              gptq_tensors(model, compression_record(workdir)))
  output.mkdir(parents=True, exist_ok=True)
  write_safetensors(tensors, output, max_shard_bytes=max_shard_bytes)
  (output / "config.json").write_text(json.dumps(config, indent=2))
  gen = {k: v for k, v in special.items() if k != "pad_token_id" and v is not None}
  (output / "generation_config.json").write_text(json.dumps(gen, indent=2))
  if tok_dir.is_dir():
    for name in TOKENIZER_FILES:
      if (tok_dir / name).is_file():
        shutil.copy2(tok_dir / name, output / name)
  log.info("exported step %d of %s as %s (%s) to %s", step, workdir, config["model_type"], dtype, output)
  return output
