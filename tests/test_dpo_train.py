"""`train.objective=dpo` runs: with LoRA the reference is the base (adapters off), so the first step's loss is
log 2 and its rewards zero exactly; training ranks chosen above rejected on held-out pairs; a sharded run equals
one device; bad settings and data are named."""

import json
import math

import jax
import numpy as np
import pytest
from helpers import small_config, train_tiny_base

from maxlm.config import ConfigError
from maxlm.metrics import read_metrics
from maxlm.train.data import DataError
from maxlm.train.loop import train

DPO = ("--config.train.objective=dpo", "--config.lora.rank=8", "--config.lora.alpha=16",
       "--config.train.learning_rate=2e-2", "--config.train.warmup_steps=0", "--config.train.schedule=constant",
       "--config.data.eval_fraction=0.25", "--config.dpo.beta=0.5")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny model trained for 3 steps: the frozen base of every run here."""
  return train_tiny_base(tmp_path_factory.mktemp("dpo") / "base")


def _pairs(path, n=48, seed=0):
  """Sums with the right answer chosen and a plausible wrong one (off by one to nine) rejected."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    a, b = (int(x) for x in rng.integers(10, 90, 2))
    wrong = a + b + int(rng.choice([-1, 1])) * int(rng.integers(1, 10))
    rows.append({"prompt": f"{a} + {b} = ", "chosen": f"{a + b}", "rejected": f"{wrong}"})
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _records(workdir):
  return [r for r in read_metrics(workdir) if "loss" in r]


def test_lora_dpo_starts_at_log_two_and_learns_the_preference(base, tmp_path):
  data = _pairs(tmp_path / "pairs.jsonl")
  cfg = small_config(*DPO, f"--config.lora.base={base}", f"--config.data.paths={data}", "--config.train.steps=40",
                     "--config.train.eval_every=40", "--config.train.checkpoint_every=40")
  last = train(cfg, tmp_path / "dpo", devices=jax.devices()[:1])
  records = _records(tmp_path / "dpo")
  first = records[0]
  # Step 1 runs the policy at B = 0, i.e. the reference itself: every log-ratio is 0.
  assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6)
  assert first["rewards/margins"] == pytest.approx(0, abs=1e-6)
  assert {"rewards/rejected", "rewards/accuracies"} <= first.keys()
  # A 3-step base over a 512-piece BPE learns slowly; still, the preference shows in training and held-out pairs.
  assert np.mean([r["rewards/accuracies"] for r in records[-10:]]) > 0.7
  assert np.mean([r["loss"] for r in records[-10:]]) < math.log(2) - 0.1
  assert last["eval_loss"] < math.log(2) - 0.04, last  # held-out pairs: ranked better than chance


def test_sharded_lora_dpo_equals_one_device(base, tmp_path):
  data = _pairs(tmp_path / "pairs.jsonl", n=24)
  losses = {}
  for name, devices, mesh in [("one", 1, ()), ("mesh", 8, ("--config.mesh.fsdp=4", "--config.mesh.tensor=2"))]:
    cfg = small_config(*DPO, f"--config.lora.base={base}", f"--config.data.paths={data}", "--config.train.steps=3",
                       "--config.train.eval_every=0", "--config.train.checkpoint_every=3", *mesh)
    train(cfg, tmp_path / name, devices=jax.devices()[:devices])
    losses[name] = [(r["loss"], r["rewards/margins"]) for r in _records(tmp_path / name)]
  np.testing.assert_allclose(losses["mesh"], losses["one"], rtol=1e-4, atol=1e-5)


def test_dpo_settings_and_data_errors_are_named(base, tmp_path):
  data = _pairs(tmp_path / "pairs.jsonl", n=8)
  with pytest.raises(ConfigError, match="dpo.reference=base needs LoRA"):
    train(small_config("--config.train.objective=dpo", f"--config.data.paths={data}"), tmp_path / "a",
          devices=jax.devices()[:1])
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "1 + 1 = ", "chosen": "2"}) + "\n")
  with pytest.raises(DataError, match=r"bad.jsonl:1: .*\"rejected\""):
    train(small_config(*DPO, f"--config.lora.base={base}", f"--config.data.paths={bad}"), tmp_path / "b",
          devices=jax.devices()[:1])
  with pytest.raises(ConfigError, match="dpo.loss_type='kto'"):
    small_config(*DPO, "--config.dpo.loss_type=kto")


@pytest.mark.slow  # ~1 min: three DPO runs
def test_precomputed_reference_equals_the_live_one_and_serves_full_fine_tuning(base, tmp_path):
  data = _pairs(tmp_path / "pairs.jsonl", n=24)
  runs = {}
  for ref in ("base", "precomputed"):
    cfg = small_config(*DPO, f"--config.lora.base={base}", f"--config.data.paths={data}", "--config.train.steps=4",
                       "--config.train.eval_every=4", "--config.train.checkpoint_every=4",
                       f"--config.dpo.reference={ref}")
    last = train(cfg, tmp_path / ref, devices=jax.devices()[:1])
    runs[ref] = [(r["loss"], r["rewards/margins"]) for r in _records(tmp_path / ref)] + [(last["eval_loss"], 0.0)]
  np.testing.assert_allclose(runs["precomputed"], runs["base"], rtol=1e-4, atol=1e-5)
  assert (tmp_path / "precomputed" / "dpo_reference.npz").is_file()
  # Full fine-tuning of a copy of the base: step 1 is the starting model itself, so its loss is log 2.
  import shutil

  shutil.copytree(base, tmp_path / "full")
  cfg = small_config("--config.train.objective=dpo", "--config.dpo.reference=precomputed",
                     f"--config.data.paths={data}", "--config.train.steps=5", "--config.train.eval_every=0",
                     "--config.train.checkpoint_every=5", "--config.train.learning_rate=1e-3",
                     "--config.train.warmup_steps=0", "--config.data.eval_fraction=0.25")
  train(cfg, tmp_path / "full", devices=jax.devices()[:1])
  records = [r for r in _records(tmp_path / "full") if r["step"] > 3]
  assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert records[-1]["rewards/margins"] != 0


@pytest.mark.slow  # ~45 s: four DPO runs
def test_dpo_accumulation_and_resume_equal_the_straight_run(base, tmp_path):
  """Gradient accumulation (with remat) equals the full batch, and a run stopped and resumed equals one run: the
  pair stream and the adapters' optimizer state continue where the checkpoint left them."""
  data = _pairs(tmp_path / "pairs.jsonl", n=40)
  common = (*DPO, f"--config.lora.base={base}", f"--config.data.paths={data}", "--config.train.eval_every=0",
            "--config.train.checkpoint_every=2", "--config.data.batch_size=4")

  def run(name, *extra, steps=4):
    train(small_config(*common, f"--config.train.steps={steps}", *extra), tmp_path / name, devices=jax.devices()[:1])
    return [(r["step"], r["loss"], r["rewards/margins"]) for r in _records(tmp_path / name)]

  straight = run("straight")
  accumulated = run("accum", "--config.train.grad_accum_steps=2", "--config.model.remat=full")
  np.testing.assert_allclose(accumulated, straight, rtol=2e-5, atol=1e-6)
  run("resumed", steps=2)
  resumed = run("resumed")
  assert [s for s, _, _ in resumed] == [1, 2, 3, 4]
  np.testing.assert_allclose(resumed, straight, rtol=1e-6, atol=1e-7)
  assert len({round(m, 6) for _, _, m in straight}) == 4  # the steps differ: the comparison is not of constants
