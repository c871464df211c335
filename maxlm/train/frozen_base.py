"""An adapter workdir's frozen base: the base step its adapters were trained on, and its weights under them.

Kept apart from maxlm.train.adapters (which reads workdir configs) so that maxlm.workdir can load adapter workdirs
without an import cycle.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

from maxlm.config import ConfigError
from maxlm.train.checkpoint import Checkpointer
from maxlm.train.state import abstract_params, lora_from_base, without_lora

ADAPTER_RECORD = "adapter.json"


def recorded_base_step(workdir: str | Path) -> int | None:
  """The base step an adapter workdir was trained on (its adapter.json), None before its first run."""
  path = Path(workdir) / ADAPTER_RECORD
  return int(json.loads(path.read_text())["base_step"]) if path.is_file() else None


def load_frozen(cfg, mesh: jax.sharding.Mesh, step: int | None = None) -> tuple[dict, dict, int]:
  """(fresh adapters, frozen part, base step): the base's parameters of `step` (default: its newest readable
  ones) sharded on `mesh`, with the adapted projections moved under their adapters (quantized for QLoRA)."""
  ckpt = Checkpointer(Path(cfg.lora.base) / "checkpoints", async_save=False)
  try:
    step, params = ckpt.restore_params(abstract_params(without_lora(cfg), mesh), step)
  except (OSError, ValueError) as e:
    raise ConfigError(f"lora.base={cfg.lora.base!r}: {e}") from None
  finally:
    ckpt.close()
  try:
    adapters, frozen = lora_from_base(cfg, mesh, params)
  except ValueError as e:  # a targets expression that matches nothing, a bad int4 group
    raise ConfigError(str(e)) from None
  return adapters, frozen, step
