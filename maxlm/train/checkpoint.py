"""Orbax checkpoints: parameters, optimizer/step state, data-iterator state and the resolved config.

Each step directory holds the items `params`, `train` (everything else of the train state), `data` and
`config`. A converted (imported) model is a step-0 checkpoint with `params` and `config` only: training
starts from it with a fresh optimizer, and serving reads `params` alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Saves every `every` steps (async, keeps `keep`); restores the newest readable checkpoint."""

  def __init__(self, directory: Path, *, keep: int | None = None, async_save: bool = True):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: dict, data_state: dict | None, config: dict) -> None:
    """Starts writing checkpoint `step` of a train state {params, ...}; the previous async save is waited for."""
    items = {"params": ocp.args.StandardSave(state["params"]), "config": ocp.args.JsonSave(config)}
    rest = {k: v for k, v in state.items() if k != "params"}
    if rest:
      items["train"] = ocp.args.StandardSave(rest)
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def save_params(self, step: int, params: Any, config: dict) -> None:
    """Writes a parameters-only checkpoint (an imported model), waiting until it is on disk."""
    self.save(step, {"params": params}, None, config)
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    """Steps of complete checkpoints, newest first (orbax ignores unfinished temporary directories)."""
    return sorted(self.manager.all_steps(), reverse=True)

  def _has(self, step: int, item: str) -> bool:
    return (self.directory / str(step) / item).is_dir()

  def saved_config(self, step: int) -> dict | None:
    """The config saved with checkpoint `step`, or None if it cannot be read."""
    try:
      return dict(self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
    except Exception:  # a damaged checkpoint: restore_latest reports it and falls back
      return None

  def restore_latest(self, target_state: dict) -> tuple[int, dict, dict, dict] | None:
    """(step, state, data_state, config) of the newest checkpoint that reads back; None if there is none.

    `target_state` may be abstract (jax.ShapeDtypeStruct leaves): arrays are read straight into its
    shardings, so a checkpoint written on one mesh restores onto any other, each device reading only its
    shards. A parameters-only checkpoint (an imported model) returns a state holding `params` alone. A
    truncated or corrupt checkpoint is reported and the one before it is tried.
    """
    rest = {k: v for k, v in target_state.items() if k != "params"}
    for step in self.steps():
      items = {"params": ocp.args.StandardRestore(_abstract(target_state["params"])),
               "config": ocp.args.JsonRestore()}
      if self._has(step, "train") and rest:
        items["train"] = ocp.args.StandardRestore(_abstract(rest))
      if self._has(step, "data"):
        items["data"] = ocp.args.JsonRestore()
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # orbax/tensorstore raise many types for damaged files
        log.error("checkpoint %s is unreadable (%s: %s); falling back to the previous one",
                  self.directory / str(step), type(e).__name__, str(e).splitlines()[0][:300])
        continue
      if "train" not in items:
        log.info("checkpoint %s holds parameters only: optimizer state starts fresh", self.directory / str(step))
      state = {"params": restored["params"], **(restored["train"] if "train" in items else {})}
      data = dict(restored["data"] or {}) if "data" in items else {}
      return step, state, data, dict(restored["config"] or {})
    return None

  def restore_params(self, target_params: Any, step: int | None = None) -> tuple[int, Any]:
    """(step, params) of checkpoint `step` (default: the newest readable one), in target_params' shardings."""
    steps = self.steps() if step is None else [step]
    if not steps:
      raise FileNotFoundError(f"no checkpoints under {self.directory}")
    errors = []
    for s in steps:
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(_abstract(target_params))))
        return s, restored["params"]
      except Exception as e:  # noqa: PERF203 - fall back to the previous checkpoint
        errors.append(f"{s}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        log.error("checkpoint %s is unreadable (%s)", self.directory / str(s), errors[-1])
    raise ValueError(f"no readable parameters under {self.directory}:\n  " + "\n  ".join(errors))

  def wait(self) -> None:
    """Blocks until the pending async save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
