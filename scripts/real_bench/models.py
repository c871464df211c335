"""The real models: each GGUF file, its transformers import (dequantized to float32) and its maxlm workdir.

The GGUF comes from scripts/fetch_models.py (`fetch_gguf(key)`) unless --gguf KEY=PATH names it. The transformers
side is `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` (transformers' own dequantization; needs
accelerate), saved once as a float32 safetensors directory under the cache so later runs load it in seconds. The
maxlm side is `maxlm convert --from-gguf` of the same file (`fetch_workdir(key, overrides)` for a fetched one) with
model.scan_layers=false: the same parameters and math, stored per layer, so the serving engines (which run layers
unrolled) share them instead of each slicing a stacked copy; a 1.5B target and its draft fit in memory twice over.
Both sides hold the float32 dequantized blocks of one file, each dequantized by its own code.

Conversions run in child processes: their peak memory (several GB) is returned to the system when they exit,
instead of staying in this process's heap (bench_host.tune_malloc keeps freed memory mapped).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from decode_bench.common import progress

SCRIPTS = Path(__file__).resolve().parent.parent
REPO = SCRIPTS.parent

# key: (display name, quantization of the published file)
MODELS = {
  "smollm2-135m": ("SmolLM2-135M-Instruct", "Q4_1"),
  "qwen2.5-coder-0.5b": ("Qwen2.5-Coder-0.5B-Instruct", "Q4_K_M"),
  "qwen2.5-coder-1.5b": ("Qwen2.5-Coder-1.5B-Instruct", "Q4_K_M"),
}

CONVERT_OVERRIDES = ("--config.model.scan_layers=false",)  # per-layer parameters (see the module docstring)


@dataclasses.dataclass
class RealModel:
  """Where one model's forms are: the GGUF file and the maxlm workdir; the transformers directory on first use."""

  key: str
  gguf: Path
  workdir: Path
  workdir_source: str  # how the workdir was made
  cache: Path

  @property
  def name(self) -> str:
    """The model's display name."""
    return MODELS[self.key][0]

  @functools.cached_property
  def hf_dir(self) -> Path:
    """transformers' float32 import of the GGUF, made (in a child process) the first time it is asked for."""
    return _in_child("hf_dir_here", self.key, str(self.gguf), str(self.cache))


def parse_gguf_flags(values: list[str]) -> dict[str, Path]:
  """--gguf KEY=PATH values as {key: path}; an unknown key or a missing file is a ValueError naming it."""
  out = {}
  for item in values:
    key, sep, path = item.partition("=")
    if not sep or key not in MODELS:
      raise ValueError(f"--gguf {item!r}: expected KEY=PATH with KEY one of {', '.join(MODELS)}")
    if not Path(path).is_file():
      raise ValueError(f"--gguf {item!r}: no such file")
    out[key] = Path(path)
  return out


def _fetch_module():
  """scripts/fetch_models.py as a module."""
  return importlib.import_module("fetch_models")


def gguf_path(key: str, given: dict[str, Path]) -> Path:
  """The model's GGUF file: --gguf's, else scripts/fetch_models.py's (downloaded and verified once)."""
  return given[key] if key in given else Path(_fetch_module().fetch_gguf(key))


def _in_child(function: str, *args: str) -> Path:
  """Runs this module's `function(*args)` in a child Python process; returns the path it prints last."""
  code = ("import sys; sys.path[:0] = sys.argv[1:3]; from real_bench import models; "
          "print(getattr(models, sys.argv[3])(*sys.argv[4:]))")
  done = subprocess.run([sys.executable, "-c", code, str(SCRIPTS), str(REPO), function, *args],
                        stdout=subprocess.PIPE, text=True, check=False)
  if done.returncode != 0:
    raise SystemExit(f"{function}{args} failed in a child process (exit {done.returncode}); its errors are above")
  return Path(done.stdout.strip().splitlines()[-1])


def hf_dir_here(key: str, gguf: str, cache: str) -> Path:
  """A float32 transformers directory of the GGUF (transformers' own GGUF loader), made once under the cache."""
  gguf, out = Path(gguf), Path(cache) / "hf" / key
  stamp = out / "source.json"
  source = {"gguf": str(gguf.resolve()), "size": gguf.stat().st_size, "mtime": gguf.stat().st_mtime}
  if stamp.is_file() and json.loads(stamp.read_text()) == source:
    return out
  import torch
  from safetensors.torch import save_model
  from transformers import AutoModelForCausalLM, AutoTokenizer

  progress(f"[models] {key}: transformers dequantizes {gguf.name} -> {out}")
  shutil.rmtree(out, ignore_errors=True)
  model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
  # save_pretrained refuses a model loaded through the GGUF "quantizer" (it holds plain float32 tensors, though)
  out.mkdir(parents=True)
  save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})  # tied weights stored once
  if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
  model.config.save_pretrained(out)
  AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
  stamp.write_text(json.dumps(source))
  return out


def fetched_workdir_here(key: str) -> Path:
  """fetch_models.fetch_workdir(key) with CONVERT_OVERRIDES."""
  return Path(_fetch_module().fetch_workdir(key, CONVERT_OVERRIDES))


def maxlm_cli() -> list[str]:
  """The `maxlm` command of this interpreter's environment."""
  exe = Path(sys.executable).with_name("maxlm")
  return [str(exe)] if exe.is_file() else [sys.executable, "-m", "maxlm.cli"]


def _converted(key: str, gguf: Path, cache: Path) -> Path:
  """`maxlm convert --from-gguf` of a --gguf file into the cache (redone when the file changes)."""
  out = cache / "workdir" / key
  stamp = cache / "workdir" / f"{key}.json"
  source = {"gguf": str(gguf.resolve()), "size": gguf.stat().st_size, "mtime": gguf.stat().st_mtime,
            "overrides": list(CONVERT_OVERRIDES)}
  if stamp.is_file() and json.loads(stamp.read_text()) == source and (out / "config.json").is_file():
    return out
  shutil.rmtree(out, ignore_errors=True)
  cmd = [*maxlm_cli(), "convert", "--from-gguf", str(gguf), "--workdir", str(out), *CONVERT_OVERRIDES]
  progress(f"[models] {key}: {' '.join(cmd)}")
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
  stamp.write_text(json.dumps(source))
  return out


def prepare(key: str, given: dict[str, Path], cache: Path) -> RealModel:
  """The model's GGUF and maxlm workdir (fetched / converted if missing)."""
  gguf = gguf_path(key, given)
  how = f"maxlm convert --from-gguf {' '.join(CONVERT_OVERRIDES)}"
  if key in given:
    return RealModel(key, gguf, _converted(key, gguf, cache), how, cache)
  return RealModel(key, gguf, _in_child("fetched_workdir_here", key), f"fetch_models.fetch_workdir ({how})", cache)


def gguf_summary(path: Path) -> dict:
  """What llama.cpp runs of a GGUF file: its quantization (file type), tensor-type counts and bytes."""
  from gguf import GGUFReader, LlamaFileType

  reader = GGUFReader(str(path))
  types: dict[str, int] = {}
  for t in reader.tensors:
    types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
  tensors = {t.name: int(t.n_bytes) for t in reader.tensors}
  field = reader.fields.get("general.file_type")
  ftype = LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_") if field is not None else "?"
  return {"file": str(path), "file_bytes": path.stat().st_size, "tensor_bytes": sum(tensors.values()),
          "quantization": ftype, "tensor_types": types, "token_embd_bytes": tensors.get("token_embd.weight", 0),
          "has_output": "output.weight" in tensors}


def maxlm_overrides(*extra: str) -> tuple[str, ...]:
  """Config overrides of every maxlm model here: float32 compute on one device, plus `extra`."""
  return ("model.dtype=float32", "model.param_dtype=float32", "mesh.data=1", *extra)


def load_maxlm(m: RealModel, *extra: str):
  """(model, config, tokenizer) of the workdir on the first device, float32."""
  import jax

  from maxlm.workdir import load_model, load_workdir_tokenizer

  model, cfg, _ = load_model(str(m.workdir), maxlm_overrides(*extra), devices=jax.devices()[:1])
  return model, cfg, load_workdir_tokenizer(str(m.workdir), cfg)


def load_hf(m: RealModel):
  """The transformers model (float32, sdpa attention, eval mode) that generates exactly max_new_tokens."""
  import torch
  from transformers import AutoModelForCausalLM

  model = AutoModelForCausalLM.from_pretrained(str(m.hf_dir), dtype=torch.float32, attn_implementation="sdpa").eval()
  gen = model.generation_config  # no eos: generate exactly max_new_tokens (the engine is run with ignore_eos)
  gen.eos_token_id, gen.bos_token_id, gen.pad_token_id = None, None, 0
  gen.do_sample, gen.temperature, gen.top_p, gen.top_k = False, None, None, None
  return model


def threads() -> int:
  """CPU cores this process may use."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
