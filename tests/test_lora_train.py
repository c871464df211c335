"""LoRA and QLoRA training runs (`maxlm train --config.lora.base=WORKDIR`): frozen base, adapter-only checkpoints
that name their base, the same losses on a sharded mesh as on one device, resume, merge, and bad settings."""

import ast
import json

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import small_config, train_tiny_base

from maxlm.config import ConfigError
from maxlm.convert.lora_merge import merge_lora_workdir
from maxlm.metrics import read_metrics
from maxlm.models.lora import LoRA
from maxlm.train.loop import train
from maxlm.workdir import load_model

LORA = ("--config.lora.rank=4", "--config.lora.alpha=8", "--config.train.learning_rate=1e-2",
        "--config.train.warmup_steps=0", "--config.train.schedule=constant", "--config.train.eval_every=0")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny model trained for 3 steps: the frozen base of every run here."""
  return train_tiny_base(tmp_path_factory.mktemp("base") / "base")


def _lora(base, *extra):
  return small_config(*LORA, f"--config.lora.base={base}", *extra)


def _losses(workdir):
  return np.array([r["loss"] for r in read_metrics(workdir) if "loss" in r])


def _eval_loss(workdir):
  return [r["eval_loss"] for r in read_metrics(workdir) if "eval_loss" in r][-1]


def _files(workdir):
  return {p.relative_to(workdir): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("base_quant", [
  "none", pytest.param("int8", marks=pytest.mark.slow), pytest.param("nf4", marks=pytest.mark.slow)])
def test_sharded_lora_trains_like_one_device_and_saves_only_adapters(base, tmp_path, base_quant):
  before = _files(base)
  runs = {}
  for name, devices, mesh in [("one", 1, ()), ("mesh", 8, ("--config.mesh.fsdp=4", "--config.mesh.tensor=2"))]:
    cfg = _lora(base, "--config.train.steps=4", "--config.train.checkpoint_every=4",
                f"--config.lora.base_quant={base_quant}", *mesh)
    train(cfg, tmp_path / name, devices=jax.devices()[:devices])
    runs[name] = _losses(tmp_path / name)
  np.testing.assert_allclose(runs["mesh"], runs["one"], rtol=2e-5, atol=2e-5)
  # The adapters learn: the held-out loss falls below the base's own (same eval documents).
  assert _eval_loss(tmp_path / "one") < _eval_loss(base) - 0.02
  assert _files(base) == before  # the base is read, never written
  record = json.loads((tmp_path / "one" / "adapter.json").read_text())
  assert record["base"] == str(base.resolve()) and record["base_step"] == 3
  assert record["base_quant"] == base_quant and len(record["adapted"]) == 7
  saved = json.loads((tmp_path / "one" / "config.json").read_text())
  assert saved["lora"]["base"] == str(base.resolve())
  # The checkpoint's params item holds the adapters (A and B of each projection) and nothing of the base.
  params_dir = tmp_path / "one" / "checkpoints" / "4" / "params"
  meta = json.loads((params_dir / "_METADATA").read_text())
  leaves = [ast.literal_eval(k) for k in meta["tree_metadata"]]  # keys are tuple reprs: ('layers', 'attn', ...)
  assert {leaf[-1] for leaf in leaves} == {"a", "b"}, leaves
  assert len(leaves) == 14


def test_resumed_lora_run_continues_on_the_recorded_base_step(base, tmp_path):
  straight, split = tmp_path / "straight", tmp_path / "split"
  train(_lora(base, "--config.train.steps=4", "--config.train.checkpoint_every=2"), straight,
        devices=jax.devices()[:1])
  train(_lora(base, "--config.train.steps=2", "--config.train.checkpoint_every=2"), split, devices=jax.devices()[:1])
  train(_lora(base, "--config.train.steps=4", "--config.train.checkpoint_every=2"), split, devices=jax.devices()[:1])
  np.testing.assert_allclose(_losses(split), _losses(straight), rtol=1e-6)
  with pytest.raises(ConfigError, match="lora.rank: checkpoint 4 vs config 8"):
    train(_lora(base, "--config.train.steps=6", "--config.lora.rank=8"), split, devices=jax.devices()[:1])


def test_dropout_changes_training_but_not_evaluation(base, tmp_path):
  runs = {}
  for p in ("0", "0.3"):
    cfg = _lora(base, "--config.train.steps=3", "--config.train.checkpoint_every=3", f"--config.lora.dropout={p}")
    train(cfg, tmp_path / p, devices=jax.devices()[:1])
    runs[p] = _losses(tmp_path / p)
  # Step 1 has B = 0: the adapters add nothing whatever is dropped; later steps follow other gradients.
  assert runs["0.3"][0] == pytest.approx(runs["0"][0], abs=1e-6)
  assert np.abs(runs["0.3"][1:] - runs["0"][1:]).max() > 1e-4
  # Evaluation and serving run without dropout: the loaded model is deterministic.
  tokens = np.random.default_rng(0).integers(0, 512, (2, 16)).astype(np.int32)
  model, _, _ = load_model(tmp_path / "0.3", devices=jax.devices()[:1])
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(model(tokens)))


def test_merged_workdir_computes_what_the_adapted_model_computes(base, tmp_path):
  adapters = tmp_path / "adapters"
  train(_lora(base, "--config.train.steps=3", "--config.train.checkpoint_every=3"), adapters,
        devices=jax.devices()[:1])
  merged = tmp_path / "merged"
  paths, _ = merge_lora_workdir(adapters, merged)
  assert len(paths) == 7
  tokens = np.random.default_rng(0).integers(0, 512, (2, 16)).astype(np.int32)
  adapted, _, _ = load_model(adapters, devices=jax.devices()[:1])
  plain, cfg, step = load_model(merged, devices=jax.devices()[:1])
  base_model, _, _ = load_model(base, devices=jax.devices()[:1])
  assert step == 0 and not cfg.lora.base
  assert any(isinstance(m, LoRA) for _, m in nnx.iter_modules(adapted))
  want = np.asarray(adapted(tokens))
  np.testing.assert_allclose(np.asarray(plain(tokens)), want, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(base_model(tokens)) - want).max() > 1e-3  # the adapters moved away from the base
  with pytest.raises(FileExistsError):
    merge_lora_workdir(adapters, merged)
  with pytest.raises(ConfigError, match="holds no adapters"):
    merge_lora_workdir(base, tmp_path / "other")


@pytest.mark.parametrize("override, message", [
  ("--config.lora.base={missing}", "no such directory"),
  ("--config.lora.targets=nothing", "matches none of the model's projections"),
  ("--config.lora.base={workdir}", "the run's own --workdir"),
])
def test_bad_lora_settings_are_named_before_training(base, tmp_path, override, message):
  workdir = tmp_path / "run"
  workdir.mkdir()
  cfg = _lora(base, override.format(missing=tmp_path / "nope", workdir=workdir))
  with pytest.raises(ConfigError, match=message):
    train(cfg, workdir, devices=jax.devices()[:1])
