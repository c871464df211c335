"""The README's main job: `maxlm train` with no config trains the tiny default on the embedded corpus."""

import json
import subprocess
import sys

import pytest

from maxlm.metrics import read_metrics

REQUIRED = {"step", "loss", "grad_norm", "lr", "step_time", "tokens_per_sec", "mfu"}


@pytest.mark.slow  # ~4-5 min: the whole default job; runs in the slow job of .ci/run
def test_quickstart_learns_far_beyond_unigram_statistics(tmp_path):
  workdir = tmp_path / "tiny"
  out = subprocess.run([sys.executable, "-m", "maxlm.cli", "train", f"--workdir={workdir}"],
                       capture_output=True, text=True, timeout=1500)
  assert out.returncode == 0, out.stderr[-4000:]
  records = read_metrics(workdir)
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  config = json.loads((workdir / "config.json").read_text())
  assert [r["step"] for r in train] == list(range(1, config["train"]["steps"] + 1))
  assert all(REQUIRED <= r.keys() for r in train)
  # The unigram entropy of the training tokens is what a model ignoring context can reach at best.
  entropy = float(out.stdout.split("unigram_entropy=")[1].split(",")[0])
  assert 4.0 < entropy < 9.0
  assert evals[-1]["eval_loss"] < entropy - 1.5, (evals[-1], entropy)
  assert train[-1]["loss"] < train[0]["loss"] - 3.0
  assert (workdir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "sample.txt").read_text().strip()
  assert (workdir / "checkpoints" / str(config["train"]["steps"])).is_dir()
  # The trained model serves: `maxlm generate` completes a prompt with the KV-cache engine (greedy), and the same
  # model as its own draft (speculative decoding) gives the same text with every draft token accepted.
  run = [sys.executable, "-m", "maxlm.cli", "generate", f"--workdir={workdir}", "--prompt=def ", "--max-tokens=24"]
  plain = subprocess.run(run, capture_output=True, text=True, timeout=600)
  assert plain.returncode == 0, plain.stderr[-4000:]
  assert plain.stdout.startswith("def ") and len(plain.stdout.strip()) > len("def ")
  spec = subprocess.run(run + [f"--draft-workdir={workdir}"], capture_output=True, text=True, timeout=600)
  assert spec.returncode == 0, spec.stderr[-4000:]
  assert spec.stdout == plain.stdout and "speculative: 100% of" in spec.stderr
