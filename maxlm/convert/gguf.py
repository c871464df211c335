"""llama.cpp GGUF <-> maxlm for llama, mistral and qwen2: the import and export entry points.

Import maps the metadata to a Hugging Face-style config (gguf_config.py) and reads the tensors under HF names
(gguf_tensors.py), so hf_config.maxlm_config and hf_tensors.load_params do the rest exactly as for --from-hf:
each device shard is dequantized from the memory-mapped file, one parameter at a time. The tokenizer is
gguf_tokenizer.py's. Export streams the tensors into the file one at a time.

    from maxlm.convert.gguf import from_gguf
    model, config = from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")     # logits = model(tokens)
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import gguf
import jax
import numpy as np
from ml_collections import config_dict

from maxlm import sharding
from maxlm.convert import gguf_tensors
from maxlm.convert.gguf_config import (
  ROPE_FREQS,
  add_model_metadata,
  architecture,
  field,
  gguf_architecture,
  hf_config_from_gguf,
)
from maxlm.convert.hf import IMPORT_RECORD, check_new_workdir, write_workdir
from maxlm.convert.hf_config import UnsupportedModelError, maxlm_config
from maxlm.convert.hf_tensors import load_params
from maxlm.models.transformer import Transformer
from maxlm.train.state import build_model

__all__ = ["DTYPES", "UnsupportedModelError", "convert_from_gguf", "convert_to_gguf", "from_gguf", "open_gguf"]

log = logging.getLogger(__name__)

DTYPES = tuple(gguf_tensors.WRITE_TYPES)  # --to-gguf --dtype choices
# The dtype that holds a GGUF file's values exactly, by the type of its matrices (quantized: float32).
_VALUE_DTYPES = {"F16": "float16", "BF16": "bfloat16"}
_GGUF_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}  # an imported model's dtype -> --dtype


def open_gguf(path: str | Path) -> gguf.GGUFReader:
  """The memory-mapped GGUF file at `path` (a clear error if it is missing or not a GGUF file)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file")
  try:
    return gguf.GGUFReader(path)
  except (ValueError, KeyError, IndexError) as e:
    raise ValueError(f"{path}: not a readable GGUF file ({e})") from None


def _read(reader: gguf.GGUFReader, path: Path, overrides: Sequence[str], tokenizer: str = ""):
  """(HF-style config, maxlm config, tensor reader) of a GGUF file, validated; no tensor is read yet."""
  hf = hf_config_from_gguf(reader)
  cfg = maxlm_config(hf, overrides, tokenizer=tokenizer)
  consumed = (ROPE_FREQS,) if hf["rope_parameters"]["rope_type"] == "llama3" else ()
  tensors = gguf_tensors.GGUFTensorReader(reader, path, architecture(reader), hf["num_attention_heads"],
                                          hf["num_key_value_heads"], consumed)
  return hf, cfg, tensors


def from_gguf(path: str | Path, overrides: Sequence[str] = (), *,
              mesh: jax.sharding.Mesh | None = None) -> tuple[Transformer, config_dict.ConfigDict]:
  """(model, config) of a GGUF file, with the dequantized weights; `model(tokens)` gives logits [batch, seq, vocab].

  overrides are maxlm config overrides; parameters are placed on `mesh` (default: every device, on the config's
  mesh axes). The tokenizer is not written (see convert_from_gguf).
  """
  hf, cfg, tensors = _read(open_gguf(path), Path(path), overrides)
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  return build_model(cfg, load_params(tensors, cfg, mesh, hf["model_type"]), mesh), cfg


def convert_from_gguf(path: str | Path, workdir: str | Path, overrides: Sequence[str] = ()) -> config_dict.ConfigDict:
  """Writes a maxlm workdir (step-0 checkpoint, config.json, import record, tokenizer/) from a GGUF file.

  Everything is validated (architecture, metadata, tensor types and shapes, tokenizer) before the workdir is
  written. Staging memory: one parameter's dequantized float32 tensors at a time, on top of the model's own device
  arrays (on a CPU backend those are host memory too: bench_real measured 1.88x the float32 model for Qwen-1.5B,
  with the checkpoint write's buffers).
  """
  path, workdir = Path(path), Path(workdir)
  check_new_workdir(workdir)
  tok_dir = workdir / "tokenizer"
  reader = open_gguf(path)
  has_tokenizer = field(reader, "tokenizer.ggml.model") is not None
  if not has_tokenizer:
    log.warning("%s has no tokenizer (tokenizer.ggml.model): training will need --config.data.tokenizer", path)
  tokenizer = str((tok_dir / "tokenizer.json").absolute()) if has_tokenizer else ""
  hf, cfg, tensors = _read(reader, path, overrides, tokenizer)
  with tempfile.TemporaryDirectory(prefix="maxlm-gguf-tokenizer-") as tmp:
    if has_tokenizer:  # first: an unsupported tokenizer fails before the weights are read
      from maxlm.convert.gguf_tokenizer import write_tokenizer
      write_tokenizer(reader, Path(tmp))
    params = load_params(tensors, cfg, sharding.make_mesh(cfg.mesh), hf["model_type"])
    types = collections.Counter(tensors.ggml_type(n) for n in tensors.keys())
    matrices = {tensors.ggml_type(n) for n in tensors.keys() if len(tensors.shape(n)) > 1}
    record = {
      "source": str(path.absolute()), "format": "gguf", "model_type": hf["model_type"],
      "gguf_architecture": architecture(reader), "file_type": _file_type(field(reader, "general.file_type")),
      "tensor_types": dict(sorted(types.items())),
      "dtype": _VALUE_DTYPES.get(matrices.pop(), "float32") if len(matrices) == 1 else "float32",
      "weights": "the GGUF tensors dequantized to float32 (Q/K rows restored to Hugging Face order for llama)",
      "config": hf,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    if has_tokenizer:
      shutil.copytree(tmp, tok_dir, dirs_exist_ok=True)
  write_workdir(workdir, cfg, params, record)
  return cfg


def _file_type(value: int | None) -> str | None:
  """general.file_type's name (e.g. MOSTLY_Q4_K_M), or the number when unknown."""
  if value is None:
    return None
  try:
    return gguf.LlamaFileType(value).name
  except ValueError:
    return str(value)


def convert_to_gguf(workdir: str | Path, output: str | Path, *, dtype: str | None = None,
                    step: int | None = None) -> Path:
  """Writes a maxlm workdir's model (and tokenizer) as a GGUF file llama.cpp and transformers can load.

  dtype: f32, f16, bf16 or q8_0 for the matrices (1-D tensors stay f32); default the imported model's dtype when
  it is f32/f16/bf16 (a quantized GGUF import: f32, which holds its dequantized values exactly), else f32.
  Tensors are written one at a time: host memory holds one tensor (float32 plus its encoding), never the model.
  """
  from maxlm.workdir import load_workdir_config, local_tokenizer_dir, restore_params  # orbax is only needed here

  workdir, output = Path(workdir), Path(output)
  cfg = load_workdir_config(workdir)
  record = json.loads((workdir / IMPORT_RECORD).read_text()) if (workdir / IMPORT_RECORD).is_file() else {}
  dtype = dtype or _GGUF_DTYPES.get(record.get("dtype"), "f32")
  dtype = _GGUF_DTYPES.get(dtype, dtype)
  if dtype not in gguf_tensors.WRITE_TYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
  arch = gguf_architecture(cfg)
  tok_dir = local_tokenizer_dir(workdir)
  if tok_dir is None:
    log.warning("%s has no tokenizer/: the GGUF file gets no vocabulary (llama.cpp will not load it)", workdir)
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = output.with_name(f".{output.name}.tmp")
  writer = gguf.GGUFWriter(tmp, arch)  # opens the file only at write_header_to_file
  add_model_metadata(writer, cfg, name=workdir.absolute().name, file_type=int(gguf_tensors.WRITE_TYPES[dtype][1]))
  if tok_dir is not None:  # before the weights are read: an unsupported tokenizer fails fast
    from maxlm.convert.gguf_tokenizer_export import add_tokenizer_metadata
    add_tokenizer_metadata(writer, tok_dir)
  step, params = restore_params(workdir, cfg, step)
  try:
    model_type = "qwen2" if arch == "qwen2" else "llama"
    plan = [(name, shape, gguf_tensors.tensor_type(shape, dtype))
            for name, shape in gguf_tensors.plan(cfg, params, model_type)]
    for name, shape, t in plan:
      writer.add_tensor_info(name, shape, np.dtype(np.float32), gguf_tensors.encoded_bytes(shape, t), raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for (name, array), (planned, shape, t) in zip(gguf_tensors.tensors(cfg, params, model_type, arch), plan,
                                                  strict=True):
      assert name == planned and array.shape == shape, (name, planned, array.shape, shape)
      writer.write_tensor_data(gguf_tensors.encode(array, t))
    writer.close()
    os.replace(tmp, output)
  except BaseException:
    writer.close()
    tmp.unlink(missing_ok=True)
    raise
  log.info("exported step %d of %s as GGUF %s (%s) to %s", step, workdir, arch, dtype, output)
  return output

