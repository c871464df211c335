"""A maxlm workdir as a loadable model: its saved config, newest parameters and tokenizer (for eval/serving)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from ml_collections import config_dict

from maxlm import sharding
from maxlm.compress.store import install_quantized
from maxlm.config import load_config
from maxlm.models.transformer import Transformer
from maxlm.train.checkpoint import Checkpointer
from maxlm.train.frozen_base import load_frozen, recorded_base_step
from maxlm.train.state import abstract_params, build_model, combine


def load_workdir_config(workdir: str | Path, overrides: tuple[str, ...] = ()) -> config_dict.ConfigDict:
  """The resolved config a workdir was trained (or imported) with, plus overrides."""
  path = Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{workdir}: no config.json (not a maxlm workdir)")
  return load_config(str(path), overrides)


def restore_params(workdir: str | Path, cfg: config_dict.ConfigDict, step: int | None = None,
                   mesh: jax.sharding.Mesh | None = None) -> tuple[int, dict]:
  """(step, params) of the newest readable checkpoint (or `step`'s), sharded on `mesh` (default: cfg's over every
  device); optimizer state stays on disk."""
  ckpt = Checkpointer(Path(workdir) / "checkpoints", async_save=False)
  try:
    return ckpt.restore_params(abstract_params(cfg, mesh or sharding.make_mesh(cfg.mesh)), step)
  finally:
    ckpt.close()


def load_model(workdir: str | Path, overrides: tuple[str, ...] = (), *, step: int | None = None,
               devices: Sequence[jax.Device] | None = None) -> tuple[Transformer, config_dict.ConfigDict, int]:
  """(model, config, step): the workdir's model with its newest readable (or `step`'s) parameters, on cfg's mesh
  over `devices` (default: every device)."""
  cfg = load_workdir_config(workdir, overrides)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  step, params = restore_params(workdir, cfg, step, mesh)
  if cfg.lora.base:  # adapters: on the frozen base they were trained on
    _, frozen, _ = load_frozen(cfg, mesh, recorded_base_step(workdir))
    params = combine(params, frozen)
  model = build_model(cfg, params, mesh)
  install_quantized(workdir, model, mesh)  # a `maxlm quantize` workdir: multiply with its packed codes
  return model, cfg, step


TOKENIZER_DIR = "tokenizer"  # WORKDIR/tokenizer/: the tokenizer a run trained with (train and convert copy it there)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what makes that directory a tokenizer


def local_tokenizer_dir(workdir: str | Path) -> Path | None:
  """WORKDIR/tokenizer/ if it holds a tokenizer file, else None."""
  local = Path(workdir) / TOKENIZER_DIR
  return local if any((local / n).is_file() for n in TOKENIZER_FILES) else None


def tokenizer_source(workdir: str | Path, cfg: config_dict.ConfigDict | None = None) -> str:
  """Where a workdir's tokenizer is: WORKDIR/tokenizer/ if present, else its config's data.tokenizer ("" if
  neither: the run trained its own BPE and did not keep it)."""
  local = local_tokenizer_dir(workdir)
  if local is not None:
    return str(local)
  return (cfg or load_workdir_config(workdir)).data.tokenizer


def load_workdir_tokenizer(workdir: str | Path, cfg: config_dict.ConfigDict | None = None) -> Any:
  """The tokenizer of a workdir: WORKDIR/tokenizer/ if present, else the config's data.tokenizer."""
  from data_pipelines.tokenizer import load_tokenizer

  source = tokenizer_source(workdir, cfg)
  if not source:
    raise FileNotFoundError(f"{workdir}: no tokenizer/ directory and data.tokenizer is empty")
  return load_tokenizer(source)
