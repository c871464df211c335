"""Checkpoint recovery: damaged steps are detected (checksums, or orbax errors for older checkpoints), moved aside
and the run continues exactly as an uninterrupted one; non-finite states are never saved and a non-finite step
right after a restore names the checkpoint; no readable checkpoint, failures after start-up and imported weights
without a tokenizer end with clear errors."""

import contextlib
import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import SMALL_TRAIN, small_config

from maxlm import sharding
from maxlm.config import ConfigError, load_config
from maxlm.metrics import read_metrics
from maxlm.train import loop
from maxlm.train.checkpoint import Checkpointer
from maxlm.train.optim import make_optimizer
from maxlm.train.state import abstract_train_state

STEPS = 6
# A checkpoint after every step, all kept, written synchronously: every test starts from the same files.
BASE = ("--config.train.checkpoint_every=1", "--config.train.eval_every=0", "--config.train.async_checkpointing=false",
        f"--config.train.keep_checkpoints={STEPS}", "--config.mesh.data=1")
MANIFEST = "checksums.json"
BOOKKEEPING = {"_CHECKPOINT_METADATA", "commit_success.txt"}  # orbax rewrites these two at commit: not hashed


@contextlib.contextmanager
def _own_log_handlers():
  """loop.train adds a train.log handler to the root logger: remove it afterwards so later lines stay out."""
  before = list(logging.getLogger().handlers)
  try:
    yield
  finally:
    for handler in logging.getLogger().handlers[:]:
      if handler not in before:
        logging.getLogger().removeHandler(handler)
        handler.close()


@pytest.fixture(autouse=True)
def _detach_log_handlers():
  with _own_log_handlers():
    yield


def _train(workdir: Path, *overrides: str, steps: int = STEPS) -> dict:
  with _own_log_handlers():
    return loop.train(small_config(*BASE, f"--config.train.steps={steps}", *overrides), workdir,
                      devices=jax.devices()[:1])


def _losses(workdir: Path) -> list[tuple[int, float]]:
  """(step, loss) of every training record of metrics.jsonl, in file order (a step twice would show twice)."""
  return [(r["step"], r["loss"]) for r in read_metrics(workdir) if "loss" in r]


def _steps(ckpt_dir: Path) -> list[int]:
  """The steps orbax lists in a checkpoint directory, newest first."""
  ckpt = Checkpointer(ckpt_dir)
  try:
    return ckpt.steps()
  finally:
    ckpt.close()


def _sha256(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_hashes(directory: Path) -> dict[str, str]:
  return {p.relative_to(directory).as_posix(): _sha256(p) for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of STEPS steps: (workdir, [(step, loss)])."""
  workdir = tmp_path_factory.mktemp("ref") / "w"
  _train(workdir)
  losses = _losses(workdir)
  assert [s for s, _ in losses] == list(range(1, STEPS + 1))
  return workdir, losses


def _victim(tmp_path: Path, reference, newest: int = STEPS) -> Path:
  """A copy of the reference run as it stood when checkpoint `newest` was its newest."""
  workdir = tmp_path / "victim"
  shutil.copytree(reference[0], workdir)
  for step in range(newest + 1, STEPS + 1):
    shutil.rmtree(workdir / "checkpoints" / str(step))
  return workdir


# ---- the ways a step's files get damaged --------------------------------------------------------------------------


def _files(step_dir: Path) -> list[Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file())


def _array_files(step_dir: Path) -> list[Path]:
  """The tensor data orbax writes (OCDBT data files of each process), not its metadata."""
  return [p for p in _files(step_dir) if p.parent.name == "d" and p.parent.parent.name.startswith("ocdbt.process_")]


def truncate_all(step_dir: Path) -> None:
  for f in _files(step_dir):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def random_bytes(step_dir: Path) -> None:
  rng = np.random.default_rng(0)
  for f in _files(step_dir):  # same sizes: only the contents tell
    f.write_bytes(rng.integers(0, 256, f.stat().st_size, dtype=np.uint8).tobytes())


def garble_iterator_json(step_dir: Path) -> None:
  path = step_dir / "data" / "metadata"
  text = bytearray(path.read_bytes())
  json.loads(text)  # it is the data-iterator position, as JSON
  text[len(text) // 2: len(text) // 2 + 3] = b"#!?"  # same size, no longer JSON
  path.write_bytes(bytes(text))


def truncate_arrays(step_dir: Path) -> None:
  arrays = _array_files(step_dir)
  assert arrays
  for f in arrays:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_bits(step_dir: Path) -> None:
  """XORs three bytes inside the largest array file: silent bit rot (sizes and JSON unchanged)."""
  f = max(_array_files(step_dir), key=lambda p: p.stat().st_size)
  data = bytearray(f.read_bytes())
  for i in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):
    data[i] ^= 0x5A
  f.write_bytes(bytes(data))


DAMAGE = {"truncated": truncate_all, "random_bytes": random_bytes, "garbled_iterator_json": garble_iterator_json,
          "truncated_arrays": truncate_arrays, "bit_flips": flip_bits}


def _check_moved_aside(workdir: Path, step: int, damaged: dict[str, str]) -> None:
  """Checkpoint `step` was reported, then moved aside intact (renamed, not deleted) and written anew."""
  ckpt_dir = workdir / "checkpoints"
  aside = [p for p in ckpt_dir.iterdir() if p.name.startswith(f"{step}.corrupt-")]
  assert len(aside) == 1, sorted(p.name for p in ckpt_dir.iterdir())
  assert _tree_hashes(aside[0]) == damaged  # the damaged files, byte for byte, kept for inspection
  log_text = (workdir / "train.log").read_text()
  assert f"{ckpt_dir / str(step)} is damaged" in log_text and str(aside[0]) in log_text


def _check_steps_verify(ckpt_dir: Path) -> None:
  """Every listed step's files match its manifest (recomputed here with hashlib)."""
  for step in _steps(ckpt_dir):
    files = json.loads((ckpt_dir / str(step) / MANIFEST).read_text())["files"]
    assert all(_sha256(ckpt_dir / str(step) / n) == e["sha256"] for n, e in files.items())


# ---- items 1 and 2: damaged newest checkpoints ----------------------------------------------------------------------


def test_every_step_carries_checksums_of_its_files(reference):
  ckpt_dir = reference[0] / "checkpoints"
  assert _steps(ckpt_dir) == list(range(STEPS, 0, -1))
  for step_dir in (ckpt_dir / str(s) for s in range(1, STEPS + 1)):
    manifest = json.loads((step_dir / MANIFEST).read_text())
    assert manifest["algorithm"] == "sha256"
    on_disk = {p.relative_to(step_dir).as_posix() for p in _files(step_dir)} - {MANIFEST} - BOOKKEEPING
    assert set(manifest["files"]) == on_disk  # every tensor, metadata and JSON file of the step
    for name, entry in manifest["files"].items():
      assert entry["sha256"] == _sha256(step_dir / name) and entry["size"] == (step_dir / name).stat().st_size
    assert any(n.startswith(("params/ocdbt.process_0/d/", "train/ocdbt.process_0/d/")) for n in manifest["files"])


def test_each_kind_of_damage_is_detected_moved_aside_and_the_run_completes(tmp_path, reference):
  """Steps 6..2 each damaged differently: every one is found (by its checksums), moved aside, and the run resumes
  from step 1 to finish exactly as the uninterrupted run did (the steps 2..6 it writes again no longer collide).
  The moved-aside directories survive orbax's clean-up of old steps (keep 3)."""
  victim = _victim(tmp_path, reference)
  damaged = {}
  for step, kind in zip(range(STEPS, 1, -1), ("bit_flips", "garbled_iterator_json", "random_bytes",
                                              "truncated_arrays", "truncated")):
    DAMAGE[kind](victim / "checkpoints" / str(step))
    damaged[step] = _tree_hashes(victim / "checkpoints" / str(step))
  _train(victim, "--config.train.keep_checkpoints=3")
  assert _losses(victim) == reference[1]  # every step exactly once, bit-identical losses
  for step, hashes in damaged.items():
    _check_moved_aside(victim, step, hashes)
  log_text = (victim / "train.log").read_text()
  assert log_text.count("checksum verification failed") == len(damaged) and "sha256 mismatch" in log_text
  assert "resumed from step 1 " in log_text
  assert _steps(victim / "checkpoints") == [6, 5, 4]  # the newest 3, not the moved-aside ones
  _check_steps_verify(victim / "checkpoints")


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_one_damaged_newest_checkpoint(tmp_path, reference, kind):
  victim = _victim(tmp_path, reference, newest=4)
  DAMAGE[kind](victim / "checkpoints" / "4")
  damaged = _tree_hashes(victim / "checkpoints" / "4")
  _train(victim)  # restores step 3, trains 4..6 and writes step 4 again
  assert _losses(victim) == reference[1]
  _check_moved_aside(victim, 4, damaged)
  assert "checksum verification failed" in (victim / "train.log").read_text()


def test_checkpoints_without_checksums_restore_and_orbax_errors_still_count(tmp_path, reference):
  """Checkpoints written before checksums: restored unverified (one warning); a deleted newest step is skipped and
  damage that orbax notices still moves a step aside."""
  victim = _victim(tmp_path, reference)
  for manifest in (victim / "checkpoints").glob(f"*/{MANIFEST}"):
    manifest.unlink()
  shutil.rmtree(victim / "checkpoints" / "6")
  truncate_arrays(victim / "checkpoints" / "5")
  garble_iterator_json(victim / "checkpoints" / "4")
  damaged = {s: _tree_hashes(victim / "checkpoints" / str(s)) for s in (5, 4)}
  _train(victim)
  assert _losses(victim) == reference[1]
  for step, hashes in damaged.items():
    _check_moved_aside(victim, step, hashes)
  log_text = (victim / "train.log").read_text()
  assert log_text.count("restored unverified") == 1 and "resumed from step 3 " in log_text
  assert "checksum verification failed" not in log_text
  assert all((victim / "checkpoints" / str(s) / MANIFEST).is_file() for s in (4, 5, 6))  # new steps carry them


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated", "random_bytes", "garbled_iterator_json", "truncated_arrays"])
def test_damage_without_checksums_is_caught_by_orbax(tmp_path, reference, kind):
  victim = _victim(tmp_path, reference, newest=4)
  for manifest in (victim / "checkpoints").glob(f"*/{MANIFEST}"):
    manifest.unlink()
  DAMAGE[kind](victim / "checkpoints" / "4")
  damaged = _tree_hashes(victim / "checkpoints" / "4")
  _train(victim)
  assert _losses(victim) == reference[1]
  _check_moved_aside(victim, 4, damaged)


# ---- item 2: non-finite values ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the learning rate 1e39
def test_nonfinite_states_are_not_saved_and_a_divergence_after_a_restore_names_the_checkpoint(tmp_path, reference):
  victim = _victim(tmp_path, reference, newest=4)
  before = _tree_hashes(victim / "checkpoints")
  # An infinite learning rate: step 5's update turns the parameters into inf/NaN (its loss is still finite);
  # from step 6 on every loss is NaN, and the third such step in a row stops the run.
  with pytest.raises(loop.TrainingDiverged) as e:
    _train(victim, "--config.train.learning_rate=1e39", "--config.train.schedule=constant",
           "--config.train.max_nonfinite_steps=3", steps=10)
  losses = dict(_losses(victim))
  assert np.isfinite(losses[5]) and not any(np.isfinite(losses[s]) for s in (6, 7, 8))
  assert _steps(victim / "checkpoints") == [4, 3, 2, 1]  # no step 5, 6 or 7
  assert _tree_hashes(victim / "checkpoints") == before  # the good checkpoints untouched
  log_text = (victim / "train.log").read_text()
  for step in (5, 6, 7):
    assert f"step {step}: no checkpoint written: the train state holds non-finite values" in log_text
  restored = str(victim / "checkpoints" / "4")
  assert f"it began 2 step(s) after restoring checkpoint {restored}, a suspect" in str(e.value)
  assert f"step 6: non-finite loss or gradient; update skipped (1 in a row); it began 2 step(s) after restoring " \
         f"checkpoint {restored}" in log_text
  assert "TrainingDiverged" in log_text  # the error that ended the run is in train.log too


@pytest.mark.slow
def test_a_checkpoint_that_trains_to_nan_is_named_a_suspect(tmp_path, reference):
  """A checkpoint whose values are finite but wrong (damaged before its checksums were taken) trains to NaN."""
  victim = _victim(tmp_path, reference, newest=4)
  cfg = small_config(*BASE, f"--config.train.steps={STEPS}")
  ckpt = Checkpointer(victim / "checkpoints", async_save=False)
  target = abstract_train_state(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]), make_optimizer(cfg.train))
  step, state, data_state, saved_cfg = ckpt.restore_latest(target)
  assert step == 4
  state["params"]["final_norm"]["scale"] = state["params"]["final_norm"]["scale"] * 3e38  # finite; overflows
  shutil.rmtree(victim / "checkpoints" / "4")
  ckpt.manager.reload()
  ckpt.save(4, state, data_state, saved_cfg)
  ckpt.close()
  with pytest.raises(loop.TrainingDiverged) as e:
    _train(victim, "--config.train.max_nonfinite_steps=2")
  assert f"it began 1 step(s) after restoring checkpoint {victim / 'checkpoints' / '4'}, a suspect" in str(e.value)


# ---- item 3: no readable checkpoint, through the CLI --------------------------------------------------------------


def test_no_readable_checkpoint_is_one_line_and_exit_status_1(tmp_path, reference):
  victim = _victim(tmp_path, reference, newest=2)
  for step in ("1", "2"):
    truncate_arrays(victim / "checkpoints" / step)
  before = _tree_hashes(victim / "checkpoints")
  cmd = [sys.executable, "-m", "maxlm.cli", "train", f"--workdir={victim}", *SMALL_TRAIN, *BASE,
         f"--config.train.steps={STEPS}"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert out.returncode == 1, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  ours = [line for line in out.stderr.splitlines() if line.startswith("maxlm train:")]
  assert len(ours) == 1 and ours[0] == out.stderr.strip().splitlines()[-1]
  assert f"no readable checkpoint in {victim / 'checkpoints'}" in ours[0]
  assert "step 2: " in ours[0] and "step 1: " in ours[0] and "new --workdir" in ours[0]
  assert _tree_hashes(victim / "checkpoints") == before  # nothing moved or deleted when nothing can be restored
  assert "NoReadableCheckpoint" in (victim / "train.log").read_text()


# ---- item 5b: errors found after start-up are in train.log --------------------------------------------------------


def test_errors_after_startup_are_written_to_train_log(tmp_path):
  with pytest.raises(loop.DataError) as e, _own_log_handlers():
    loop.train(small_config("--config.mesh.data=1", f"--config.data.paths={tmp_path / 'nothing' / '*.jsonl'}"),
               tmp_path / "data", devices=jax.devices()[:1])
  log_text = (tmp_path / "data" / "train.log").read_text()
  assert f"ERROR maxlm.train: DataError: {e.value}" in log_text and "Traceback" not in log_text
  with pytest.raises(ConfigError) as e, _own_log_handlers():  # a 4-way fsdp mesh on one device
    loop.train(small_config("--config.mesh.data=1", "--config.mesh.fsdp=4"), tmp_path / "mesh",
               devices=jax.devices()[:1])
  assert f"ERROR maxlm.train: {type(e.value).__name__}: {e.value}" in (tmp_path / "mesh" / "train.log").read_text()


# ---- item 8: imported weights without a tokenizer -----------------------------------------------------------------


def _imported_without_tokenizer(tmp_path: Path, reference) -> tuple[Path, list[str]]:
  """`maxlm convert --from-hf` of a model directory without tokenizer files, and a fine-tune on new data refused."""
  from maxlm.convert import hf

  trained = _victim(tmp_path, reference)
  saved = json.loads((trained / "config.json").read_text())
  saved["mesh"]["data"] = -1  # export onto every device of this process
  (trained / "config.json").write_text(json.dumps(saved))
  hf_dir = hf.convert_to_hf(trained, tmp_path / "hf")
  for name in hf.TOKENIZER_FILES:
    (hf_dir / name).unlink(missing_ok=True)
  work = tmp_path / "imported"
  hf.convert_from_hf(hf_dir, work)  # warns: no tokenizer
  assert not (work / "tokenizer").exists()
  data = tmp_path / "docs.jsonl"
  data.write_text("".join(json.dumps({"text": f"document {i} about checkpoints and tokens."}) + "\n"
                          for i in range(200)))
  overrides = [*SMALL_TRAIN, *BASE, f"--config.data.paths={data}", "--config.train.steps=1"]
  with pytest.raises(ConfigError, match="data.tokenizer") as e, _own_log_handlers():
    loop.train(load_config(str(work / "config.json"), overrides), work, devices=jax.devices()[:1])
  assert "--config.data.tokenizer=" in str(e.value)
  assert not (work / "metrics.jsonl").exists() and _steps(work / "checkpoints") == [0]
  return work, overrides


def test_imported_weights_without_a_tokenizer_refuse_a_freshly_trained_one(tmp_path, reference):
  _imported_without_tokenizer(tmp_path, reference)


@pytest.mark.slow
def test_imported_weights_train_with_the_workdir_tokenizer(tmp_path, reference):
  """The workdir's own tokenizer (copied in by hand: the one the weights were trained with) is used instead."""
  work, overrides = _imported_without_tokenizer(tmp_path, reference)
  shutil.copytree(reference[0] / "tokenizer", work / "tokenizer")
  with _own_log_handlers():
    loop.train(load_config(str(work / "config.json"), overrides), work, devices=jax.devices()[:1])
  assert [s for s, _ in _losses(work)] == [1]
  assert json.loads((work / "config.json").read_text())["data"]["tokenizer"] == str((work / "tokenizer").absolute())


def test_resuming_on_other_data_keeps_the_tokenizer_of_the_checkpoints(tmp_path, reference):
  """A run resumed with new data.paths and no data.tokenizer encodes with the tokenizer its embeddings were trained
  with (WORKDIR/tokenizer/), not a BPE trained afresh on the new text; that file is left as it was."""
  work = _victim(tmp_path, reference)
  before = _sha256(work / "tokenizer" / "tokenizer.model")
  data = tmp_path / "other.jsonl"
  data.write_text("".join(json.dumps({"text": f"zebra {i} quartz vexing jumps {i * i}"}) + "\n" for i in range(200)))
  _train(work, f"--config.data.paths={data}", steps=STEPS + 1)
  assert [s for s, _ in _losses(work)][-1] == STEPS + 1
  assert _sha256(work / "tokenizer" / "tokenizer.model") == before
  assert json.loads((work / "config.json").read_text())["data"]["tokenizer"] == str((work / "tokenizer").absolute())
