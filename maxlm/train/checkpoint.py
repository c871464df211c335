"""Orbax checkpoints: parameters, optimizer/step state, data-iterator state and the resolved config.

Each step directory holds the items `params`, `train` (everything else of the train state), `data` and
`config`, plus `checksums.json`: the sha256 of every file, written once the files are final and before the step
is committed, and verified before the step is restored (see maxlm.train.integrity). A converted (imported) model
is a step-0 checkpoint with `params` and `config` only: training starts from it with a fresh optimizer, and serving
reads `params` alone.

A step that cannot be restored (a file truncated, garbled or missing, a checksum mismatch, non-finite parameters)
is reported and the one before it is used; once a readable step is found, the damaged newer ones are renamed to
`<step>.corrupt-<UTC time>` in the same directory (orbax neither lists nor deletes them), so the run can write
those steps again. If no step is readable nothing is moved and `NoReadableCheckpoint` is raised.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from maxlm import distributed
from maxlm.train import integrity

log = logging.getLogger(__name__)

ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes step N into N.orbax-checkpoint-tmp*, then renames it
_warned_unverified: set[Path] = set()  # directories already warned about holding checkpoints without checksums


class NoReadableCheckpoint(RuntimeError):
  """The checkpoint directory holds steps, but none of them can be restored."""

  def __init__(self, directory: Path, damaged: list[tuple[int, str]]):
    self.directory, self.damaged = directory, damaged
    reasons = "; ".join(f"step {s}: {r[:200]}" for s, r in damaged)
    super().__init__(f"no readable checkpoint in {directory} ({reasons}); nothing was moved or deleted. Restore "
                     f"the steps from a backup, or move {directory} aside (or use a new --workdir) to start afresh")


def _abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


@jax.jit
def _finite_per_leaf(tree: dict) -> dict:
  return jax.tree.map(lambda x: jnp.isfinite(x).all(), tree)


def nonfinite_leaves(tree: Any) -> list[str]:
  """Paths of the floating-point leaves of `tree` holding a NaN or infinity (one jitted reduction; [] if none)."""
  leaves = {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if jnp.issubdtype(x.dtype, jnp.inexact)}
  return [k for k, ok in jax.device_get(_finite_per_leaf(leaves)).items() if not ok]


class Checkpointer:
  """Saves the steps it is given (async unless `async_save` is False; the newest `keep` are kept, None = all) and
  restores the newest readable one. The caller decides when to save (train.checkpoint_every in the loop)."""

  def __init__(self, directory: Path, *, keep: int | None = None, async_save: bool = True, checksums: bool = True):
    self.directory = Path(directory).absolute()
    self.async_save, self.checksums = async_save, checksums
    self._saving: int | None = None  # the step whose (async) save is in flight
    self.stats: dict[str, dict] = {}  # the last manifest write and verification: files, bytes, seconds
    # Always orbax's async checkpointer: its post-finalization callback (process 0, once every host has written
    # its files, before the step directory is renamed into place) writes the manifest, so a committed step always
    # holds one. A synchronous save is an async one waited for.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=True, create=True,
      async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest))
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: dict, data_state: dict | None, config: dict) -> None:
    """Starts writing checkpoint `step` of a train state {params, ...}; the previous async save is waited for."""
    items = {"params": ocp.args.StandardSave(state["params"]), "config": ocp.args.JsonSave(config)}
    rest = {k: v for k, v in state.items() if k != "params"}
    if rest:
      items["train"] = ocp.args.StandardSave(rest)
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    self.manager.wait_until_finished()  # the previous save's manifest callback reads self._saving
    self._saving = step
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    if not self.async_save:
      self.manager.wait_until_finished()

  def _write_manifest(self) -> None:
    """orbax's post-finalization callback: hashes the files of the step being committed (process 0 only)."""
    step = self._saving
    if step is None or not self.checksums:
      return
    try:
      tmp = [p for p in self.directory.glob(f"{step}{ORBAX_TMP_SUFFIX}*") if p.is_dir()]
      # Renamed into place after this callback; on storage without renames (orbax's commit-file mode) in place.
      step_dir = max(tmp, key=lambda p: p.stat().st_mtime) if tmp else self.directory / str(step)
      stats = integrity.write_manifest(step_dir)
      self.stats["save"] = {"step": step, **stats}
      log.info("checkpoint %d: %s of %d files (%.1f MB) in %.3f s", step, integrity.ALGORITHM, stats["files"],
               stats["bytes"] / 1e6, stats["seconds"])
    except Exception as e:  # noqa: BLE001 - a checkpoint without checksums still restores (unverified)
      log.warning("checkpoint %d: could not write %s (%s); it will restore unverified", step, integrity.MANIFEST,
                  _first_line(e))

  def save_params(self, step: int, params: Any, config: dict) -> None:
    """Writes a parameters-only checkpoint (an imported model), waiting until it is on disk."""
    self.save(step, {"params": params}, None, config)
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    """Steps of complete checkpoints, newest first (orbax ignores unfinished temporary directories)."""
    return sorted(self.manager.all_steps(), reverse=True)

  def _has(self, step: int, item: str) -> bool:
    return (self.directory / str(step) / item).is_dir()

  def has_train_state(self, step: int) -> bool:
    """Whether checkpoint `step` holds optimizer state (False: parameters only, e.g. an imported model)."""
    return self._has(step, "train")

  def saved_config(self, step: int) -> dict | None:
    """The config saved with checkpoint `step`, or None if it cannot be read."""
    try:
      return dict(self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
    except Exception:  # a damaged checkpoint: restore_latest reports it and falls back
      return None

  def verify(self, step: int, prefix: str = "") -> str | None:
    """Why checkpoint `step`'s files (those under `prefix`) do not match its checksums; None if they do.

    Every process hashes its share of the files (sorted names i::n) and all share the verdict, so every process
    makes the same choice. A checkpoint written before checksums existed passes (stats["verify"]["verified"] is
    False).
    """
    step_dir = self.directory / str(step)
    t0 = time.perf_counter()
    local: dict = {"problems": [], "bytes": 0, "manifest": True}
    try:
      files = integrity.read_manifest(step_dir) if self.checksums else {}
      if files is None:
        local["manifest"] = False
      else:
        local["problems"], local["bytes"] = integrity.verify_files(
          step_dir, files, process_index=jax.process_index(), process_count=jax.process_count(), prefix=prefix)
    except integrity.CorruptCheckpoint as e:
      local["problems"] = [str(e)]
    parts = distributed.allgather_json(local)
    problems = [p for part in parts for p in part["problems"]]
    self.stats["verify"] = {"step": step, "bytes": sum(p["bytes"] for p in parts),
                            "seconds": time.perf_counter() - t0, "verified": all(p["manifest"] for p in parts)}
    if problems:
      more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
      return f"checksum verification failed: {'; '.join(problems[:3])}{more}"
    return None

  def _warn_if_unverified(self, step: int) -> None:
    """One warning per directory when a checkpoint without checksums is restored."""
    if not self.stats["verify"]["verified"] and self.directory not in _warned_unverified:
      _warned_unverified.add(self.directory)
      log.warning("checkpoint %s has no %s (written before maxlm checksummed checkpoints): restored unverified",
                  self.directory / str(step), integrity.MANIFEST)

  def _restore_step(self, step: int, target_state: dict) -> tuple[dict, str | None]:
    """(restored items, None) or ({}, why checkpoint `step` cannot be restored); every process agrees."""
    reason = self.verify(step)
    if reason is not None:
      return {}, reason
    rest = {k: v for k, v in target_state.items() if k != "params"}
    items = {"params": ocp.args.StandardRestore(_abstract(target_state["params"])), "config": ocp.args.JsonRestore()}
    if self._has(step, "train") and rest:
      items["train"] = ocp.args.StandardRestore(_abstract(rest))
    if self._has(step, "data"):
      items["data"] = ocp.args.JsonRestore()
    try:
      restored, error = dict(self.manager.restore(step, args=ocp.args.Composite(**items))), None
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
      restored, error = {}, _first_line(e)
    errors = [e for e in distributed.allgather_json(error) if e]
    if errors:
      return {}, f"unreadable ({errors[0]})"
    bad = nonfinite_leaves(restored["params"])
    if bad:
      return {}, f"its parameters hold non-finite values ({', '.join(bad[:3])})"
    self._warn_if_unverified(step)
    return restored, None

  def _move_aside(self, steps: list[int]) -> None:
    """Renames damaged steps to <step>.corrupt-<time> (process 0; every process waits), then re-lists steps."""
    if steps and jax.process_index() == 0:
      for step in steps:
        try:
          moved = integrity.move_aside(self.directory / str(step))
          log.warning("moved damaged checkpoint %s aside to %s (kept for inspection; delete it when done)",
                      self.directory / str(step), moved)
        except OSError as e:
          log.error("could not move damaged checkpoint %s aside (%s)", self.directory / str(step), _first_line(e))
    if steps:
      distributed.allgather_json(None)  # a barrier: no process lists steps before the renames
      self.manager.reload()

  def restore_latest(self, target_state: dict) -> tuple[int, dict, dict, dict] | None:
    """(step, state, data_state, config) of the newest checkpoint that reads back; None if there is none.

    `target_state` may be abstract (jax.ShapeDtypeStruct leaves): arrays are read straight into its
    shardings, so a checkpoint written on one mesh restores onto any other, each device reading only its
    shards. A parameters-only checkpoint (an imported model) returns a state holding `params` alone. A
    damaged checkpoint is reported and the one before it is tried; once one restores, the damaged newer ones
    are moved aside. Raises NoReadableCheckpoint (moving nothing) if there are checkpoints but none restores.
    """
    damaged: list[tuple[int, str]] = []
    for step in self.steps():
      restored, reason = self._restore_step(step, target_state)
      if reason is not None:
        log.error("checkpoint %s is damaged or unreadable (%s); falling back to the previous one",
                  self.directory / str(step), reason)
        damaged.append((step, reason))
        continue
      self._move_aside([s for s, _ in damaged])
      if "train" not in restored:
        log.info("checkpoint %s holds parameters only: optimizer state starts fresh", self.directory / str(step))
      state = {"params": restored["params"], **restored.get("train", {})}
      data = dict(restored.get("data") or {})
      return step, state, data, dict(restored["config"] or {})
    if damaged:
      raise NoReadableCheckpoint(self.directory, damaged)
    return None

  def restore_params(self, target_params: Any, step: int | None = None) -> tuple[int, Any]:
    """(step, params) of checkpoint `step` (default: the newest readable one), in target_params' shardings.

    Read-only: the files under params/ are verified against the checksums, and a damaged step is skipped, not
    moved.
    """
    steps = self.steps() if step is None else [step]
    if not steps:
      raise FileNotFoundError(f"no checkpoints under {self.directory}")
    errors = []
    for s in steps:
      reason = self.verify(s, prefix="params/")
      if reason is None:
        try:
          restored = self.manager.restore(s, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(target_params))))
          self._warn_if_unverified(s)
          return s, restored["params"]
        except Exception as e:  # noqa: BLE001 - fall back to the previous checkpoint
          reason = f"unreadable ({_first_line(e)})"
      errors.append(f"{s}: {reason}")
      log.error("checkpoint %s is damaged or unreadable (%s)", self.directory / str(s), errors[-1])
    raise ValueError(f"no readable parameters under {self.directory}:\n  " + "\n  ".join(errors))

  def wait(self) -> None:
    """Blocks until the pending async save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
