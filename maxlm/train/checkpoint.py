"""Orbax checkpoints holding train state, data-iterator state and the resolved config together."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Saves every `every` steps (async, keeps `keep`); restores the newest readable checkpoint."""

  def __init__(self, directory: Path, *, keep: int, async_save: bool = True):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, data_state: dict | None, config: dict) -> None:
    """Starts writing checkpoint `step`; the previous async save is waited for first."""
    self.manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state or {}),
      config=ocp.args.JsonSave(config),
    ), force=True)

  def steps(self) -> list[int]:
    """Steps of complete checkpoints, newest first (orbax ignores unfinished temporary directories)."""
    return sorted(self.manager.all_steps(), reverse=True)

  def saved_config(self, step: int) -> dict | None:
    """The config saved with checkpoint `step`, or None if it cannot be read."""
    try:
      return dict(self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
    except Exception:  # a damaged checkpoint: restore_latest reports it and falls back
      return None

  def restore_latest(self, target_state: Any) -> tuple[int, Any, dict, dict] | None:
    """(step, state, data_state, config) of the newest checkpoint that reads back; None if there is none.

    A truncated or corrupt checkpoint is reported and the one before it is tried.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    for step in self.steps():
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          data=ocp.args.JsonRestore(),
          config=ocp.args.JsonRestore(),
        ))
      except Exception as e:  # orbax/tensorstore raise many types for damaged files
        log.error("checkpoint %s is unreadable (%s: %s); falling back to the previous one",
                  self.directory / str(step), type(e).__name__, str(e).splitlines()[0][:300])
        continue
      return step, restored["state"], dict(restored["data"] or {}), dict(restored["config"] or {})
    return None

  def wait(self) -> None:
    """Blocks until the pending async save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
