"""LoRA runs: the base workdir checked and read, the frozen part built around its weights, the adapter record.

`maxlm train --workdir NEW --config.lora.base=BASE` trains adapters on BASE's newest parameters, frozen. The model
section is BASE's; NEW's checkpoints hold the adapters and their optimizer state only, and NEW/adapter.json (with
the config's lora.base, an absolute path) names the base and the step its weights came from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
from ml_collections import config_dict

from maxlm.config import ConfigError, config_from_dict
from maxlm.train.frozen_base import ADAPTER_RECORD
from maxlm.train.state import abstract_params
from maxlm.workdir import load_workdir_config, tokenizer_source

log = logging.getLogger("maxlm.train")



def _where(cfg) -> str:
  return f"lora.base={cfg.lora.base!r}"


def base_config(cfg, workdir: str | Path) -> config_dict.ConfigDict:
  """`cfg` with the base's model section, lora.base made absolute and, when data.tokenizer and data.tokenized are
  empty, the base's tokenizer. ConfigError before anything is loaded: no such directory, not a maxlm workdir, no
  checkpoint, the run's own workdir, a LoRA workdir as base, or a sequence longer than the base reads."""
  where, base = _where(cfg), Path(cfg.lora.base)
  if not base.is_dir():
    raise ConfigError(f"{where}: no such directory")
  if base.resolve() == Path(workdir).resolve():
    raise ConfigError(f"{where}: that is the run's own --workdir; adapters go to a new workdir")
  try:
    saved = load_workdir_config(base)
  except FileNotFoundError:
    raise ConfigError(f"{where}: no config.json, not a maxlm workdir (import one with maxlm convert --from-hf or "
                      "--from-gguf, or train one)") from None
  except ConfigError as e:
    raise ConfigError(f"{where}: its config.json cannot be used: {e}") from None
  if saved.get("lora") and saved.lora.base:
    raise ConfigError(f"{where}: that workdir holds adapters on {saved.lora.base}; merge them first (maxlm convert "
                      "--merge-lora) to train new adapters on the result")
  ckpts = base / "checkpoints"
  if not (ckpts.is_dir() and any(p.name.isdigit() and p.is_dir() for p in ckpts.iterdir())):
    raise ConfigError(f"{where}: no checkpoint under {ckpts}")
  if cfg.data.seq_len > saved.model.max_seq_len:
    raise ConfigError(f"{where}: data.seq_len={cfg.data.seq_len} exceeds the base's model.max_seq_len="
                      f"{saved.model.max_seq_len}")
  d = cfg.to_dict()
  d["model"] = saved.model.to_dict()
  d["lora"]["base"] = str(base.resolve())
  if not cfg.data.tokenizer and not cfg.data.tokenized:
    d["data"]["tokenizer"] = tokenizer_source(base, saved)
  try:
    return config_from_dict(d)
  except ConfigError as e:
    raise ConfigError(f"{where}: the base's model with this run's settings: {e}") from None


def check_adapters(cfg, mesh: jax.sharding.Mesh) -> None:
  """ConfigError unless cfg.lora's adapters can be put on the model (a targets expression that matches, a group
  the quantized bases take), checked on shapes only."""
  try:
    abstract_params(cfg, mesh)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def write_record(workdir: Path, cfg, base_step: int, adapters: dict) -> None:
  """WORKDIR/adapter.json: the base (workdir and step), the LoRA settings and the adapted projections."""
  paths = sorted({"/".join(str(getattr(k, "key", k)) for k in path[:-1])
                  for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]})
  record = {"base": cfg.lora.base, "base_step": base_step, **{k: cfg.lora[k] for k in (
    "rank", "alpha", "dropout", "targets", "rslora", "base_quant", "base_quant_group")}, "adapted": paths}
  (workdir / ADAPTER_RECORD).write_text(json.dumps(record, indent=2) + "\n")
