"""Training: accumulation == large batch, NaN guard, schedules, decay mask, checkpoints, kill-and-resume."""

import json
import logging
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SMALL_TRAIN, small_config

from maxlm import sharding
from maxlm.metrics import read_metrics
from maxlm.train.checkpoint import Checkpointer
from maxlm.train.optim import decay_mask, make_schedule
from maxlm.train.state import init_train_state
from maxlm.train.step import accumulate_gradients, make_train_step, token_loss_sums


def _random_batch(batch, seq, vocab=512, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, vocab, (batch, seq + 1)), jnp.int32)
  seg = np.ones((batch, seq), np.int32)
  seg[:, seq // 2:] = 2
  seg[0, -5:] = 0  # some padding, which must carry no weight
  pos = np.concatenate([np.arange(seq // 2), np.arange(seq - seq // 2)])
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=jnp.asarray(seg),
              positions=jnp.broadcast_to(jnp.asarray(pos, jnp.int32), (batch, seq)))


def _one_step(cfg, batch):
  mesh = sharding.make_mesh(cfg.mesh)
  graphdef, state, tx, schedule = init_train_state(cfg, mesh)
  step = jax.jit(make_train_step(graphdef, tx, schedule, z_loss=cfg.train.z_loss,
                                 accum_steps=cfg.train.grad_accum_steps))
  state, m = step(state, batch)
  state, m2 = step(state, batch)  # two steps: Adam's moments from step one shape step two
  return state, m, m2


@pytest.mark.parametrize("dtype,z_loss,tol", [(jnp.float32, 0.0, 1e-6), (jnp.float32, 1e-2, 1e-6),
                                              (jnp.bfloat16, 1e-4, 1e-2)])
def test_loss_sums_and_their_gradient_equal_optax_cross_entropy(dtype, z_loss, tol):
  """The hand-written backward of token_loss_sums equals autodiff of optax's cross-entropy plus z-loss, for every
  output's cotangent (the total, and the nll and logZ^2 metrics), with padded tokens carrying no gradient."""
  import optax  # noqa: PLC0415

  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 5, 37)) * 4, dtype)
  targets = jnp.asarray(rng.integers(0, 37, (3, 5)), jnp.int32)
  weights = jnp.asarray(rng.integers(0, 2, (3, 5)), jnp.float32)
  cot = (0.7, -1.3, 2.1)

  def ours(x):
    total, (nll, z_sq) = token_loss_sums(x, targets, weights, z_loss)
    return cot[0] * total + cot[1] * nll + cot[2] * z_sq, (total, nll, z_sq)

  def reference(x):
    x = x.astype(jnp.float32)
    nll = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, targets) * weights)
    z_sq = jnp.sum(jnp.square(jax.scipy.special.logsumexp(x, axis=-1)) * weights)
    total = nll + z_loss * z_sq
    return cot[0] * total + cot[1] * nll + cot[2] * z_sq, (total, nll, z_sq)

  (_, got), g_got = jax.value_and_grad(ours, has_aux=True)(logits)
  (_, want), g_want = jax.value_and_grad(reference, has_aux=True)(logits)
  np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5)
  assert g_got.dtype == dtype
  np.testing.assert_allclose(np.asarray(g_got, np.float32), np.asarray(g_want, np.float32), atol=tol * 4, rtol=tol)
  assert not np.any(np.asarray(g_got, np.float32)[np.asarray(weights) == 0])


@pytest.mark.slow  # ~40 s; the slow job of .ci/run
def test_gradient_accumulation_equals_the_large_batch():
  batch = _random_batch(8, 32)
  big, m_big, m2_big = _one_step(small_config("--config.data.batch_size=8", "--config.train.z_loss=1e-4"), batch)
  acc, m_acc, m2_acc = _one_step(small_config("--config.data.batch_size=8", "--config.train.grad_accum_steps=4",
                                              "--config.train.z_loss=1e-4"), batch)
  np.testing.assert_allclose(m_acc["loss"], m_big["loss"], rtol=1e-6)
  np.testing.assert_allclose(m_acc["grad_norm"], m_big["grad_norm"], rtol=1e-5)
  np.testing.assert_allclose(m2_acc["loss"], m2_big["loss"], rtol=1e-5)
  # Adam divides by sqrt(v): where a gradient is ~0, float rounding of the summation order moves an update
  # by up to ~1e-3 of a step (lr 2e-3), hence atol 1e-5 on parameters; the gradients themselves match tightly.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), acc["params"], big["params"])
  cfg = small_config("--config.data.batch_size=8")
  graphdef, state, _, _ = init_train_state(cfg, sharding.make_mesh(cfg.mesh))
  g_big, aux_big = accumulate_gradients(state["params"], graphdef, batch, 1e-4, 1)
  g_acc, aux_acc = accumulate_gradients(state["params"], graphdef, batch, 1e-4, 4)
  np.testing.assert_allclose(aux_acc, aux_big, rtol=1e-6)
  # Gradient entries are sums of ~1e3 terms with cancellation: tolerance relative to each tensor's scale.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()), g_acc, g_big)
  # The first micro-batch alone is a different batch: accumulation is not just "the first micro-batch".
  part, m_part, _ = _one_step(small_config("--config.data.batch_size=2"), jax.tree.map(lambda x: x[:2], batch))
  assert abs(float(m_part["loss"]) - float(m_big["loss"])) > 1e-4


def test_nonfinite_step_is_skipped_and_counted():
  cfg = small_config()
  mesh = sharding.make_mesh(cfg.mesh)
  graphdef, state, tx, schedule = init_train_state(cfg, mesh)
  state["params"]["final_norm"]["scale"] = state["params"]["final_norm"]["scale"].at[0].set(jnp.nan)
  before = jax.tree.map(np.asarray, state)
  step = jax.jit(make_train_step(graphdef, tx, schedule, z_loss=0.0, accum_steps=1))
  state, m = step(state, _random_batch(4, 16))
  state, m = step(state, _random_batch(4, 16, seed=1))
  assert int(m["skipped"]) == 1 and int(state["nonfinite_streak"]) == 2 and int(state["nonfinite_total"]) == 2
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), before["params"],
               jax.tree.map(np.asarray, state["params"]))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), before["opt_state"],
               jax.tree.map(np.asarray, state["opt_state"]))
  assert int(state["step"]) == 2


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules_warm_up_then_decay_to_the_floor(schedule):
  cfg = small_config(f"--config.train.schedule={schedule}", "--config.train.steps=100",
                     "--config.train.warmup_steps=10", "--config.train.learning_rate=1.0",
                     "--config.train.min_lr_ratio=0.1")
  lr = make_schedule(cfg.train)
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5) and float(lr(10)) == pytest.approx(1.0)
  end = {"cosine": 0.1, "linear": 0.1, "constant": 1.0}[schedule]
  assert float(lr(100)) == pytest.approx(end, rel=1e-5)
  if schedule == "cosine":  # halfway through the decay: the cosine midpoint
    assert float(lr(55)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
  if schedule == "linear":
    assert float(lr(55)) == pytest.approx(0.55, rel=1e-5)


def test_weight_decay_skips_norms_and_biases():
  cfg = small_config("--config.model.attention_bias=true")
  _, state, _, _ = init_train_state(cfg, sharding.make_mesh(cfg.mesh))
  mask = decay_mask(state["params"])
  assert mask["embed"] and mask["layers"]["attn"]["q"] and mask["layers"]["mlp"]["down"]
  assert not mask["final_norm"]["scale"] and not mask["layers"]["attn_norm"]["scale"]
  assert not mask["layers"]["attn"]["q_bias"] and not mask["layers"]["attn"]["v_bias"]


def _saved_state(tmp_path):
  cfg = small_config()
  mesh = sharding.make_mesh(cfg.mesh)
  graphdef, state, tx, schedule = init_train_state(cfg, mesh)
  step = jax.jit(make_train_step(graphdef, tx, schedule, z_loss=0.0, accum_steps=1))
  ckpt = Checkpointer(tmp_path / "ckpt", keep=3)
  states = {}
  for i in (1, 2):
    state, _ = step(state, _random_batch(4, 16, seed=i))
    states[i] = jax.tree.map(np.asarray, state)
    ckpt.save(i, state, {"epoch": i, "pos": [i, i]}, {"model": cfg.model.to_dict()})
  ckpt.close()
  return cfg, mesh, init_train_state(cfg, mesh)[1], states


@pytest.mark.slow  # moved out of the default suite (827 s in a clean CI run with the real-model tests)
def test_checkpoint_round_trip(tmp_path):
  cfg, _, fresh, states = _saved_state(tmp_path)
  step, restored, data_state, saved_cfg = Checkpointer(tmp_path / "ckpt", keep=3).restore_latest(fresh)
  assert step == 2 and data_state == {"epoch": 2, "pos": [2, 2]} and saved_cfg["model"] == cfg.model.to_dict()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), states[2], jax.tree.map(np.asarray, restored))
  assert jax.tree.structure(restored) == jax.tree.structure(fresh)


@pytest.mark.slow  # tests/test_checkpoint_recovery.py covers every kind of damage in the default job
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
  _, _, fresh, states = _saved_state(tmp_path)
  damaged = 0
  for f in (tmp_path / "ckpt" / "2" / "params").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated, as by a crash mid-copy
      damaged += 1
  assert damaged
  with caplog.at_level(logging.ERROR):
    step, restored, data_state, _ = Checkpointer(tmp_path / "ckpt", keep=3).restore_latest(fresh)
  assert step == 1 and data_state["epoch"] == 1
  assert "unreadable" in caplog.text and "/2" in caplog.text
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), states[1], jax.tree.map(np.asarray, restored))


def _train_cmd(workdir, *extra):
  return [sys.executable, "-m", "maxlm.cli", "train", f"--workdir={workdir}", *SMALL_TRAIN, *extra]


def _losses(workdir):
  by_step = {}
  for r in read_metrics(workdir):
    if "loss" in r:
      by_step[r["step"]] = r["loss"]
  return by_step


@pytest.mark.slow  # ~40 s; the slow job of .ci/run
def test_killed_run_resumes_to_the_same_losses(tmp_path):
  args = ["--config.train.steps=30", "--config.train.checkpoint_every=5", "--config.train.eval_every=0"]
  ref = subprocess.run(_train_cmd(tmp_path / "ref", *args), capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]

  victim = tmp_path / "victim"
  proc = subprocess.Popen(_train_cmd(victim, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not (victim / "checkpoints" / "10").is_dir():
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(_losses(victim))
  assert killed_at < 30, "the run finished before it could be killed"

  resumed = subprocess.run(_train_cmd(victim, *args), capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step" in resumed.stderr
  ref_losses, got = _losses(tmp_path / "ref"), _losses(victim)
  assert sorted(got) == list(range(1, 31))
  assert got == ref_losses  # bit-identical, step for step


@pytest.mark.slow  # moved out of the default suite (827 s in a clean CI run with the real-model tests)
def test_diverging_run_stops_with_a_clear_message(tmp_path):
  out = subprocess.run(_train_cmd(tmp_path / "w", "--config.train.steps=30", "--config.train.learning_rate=1e30",
                                  "--config.train.grad_clip=0", "--config.train.max_nonfinite_steps=3"),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 1
  assert "3 consecutive steps" in out.stderr and "non-finite" in out.stderr
  records = [r for r in read_metrics(tmp_path / "w") if "skipped" in r]
  assert sum(r["skipped"] for r in records) >= 3 and len(records) < 30


@pytest.mark.slow  # 16-30 s: the default suite is near its 10-minute budget
def test_user_jsonl_data_trains_and_a_different_model_refuses_the_workdir(tmp_path):
  rng = np.random.default_rng(0)
  letters = list("abcdefghijklmnopqrstuvwxyz")
  words = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(3000)]
  with open(tmp_path / "docs.jsonl", "w") as f:
    for _ in range(300):
      f.write(json.dumps({"text": " ".join(rng.choice(words, size=40)) + "."}) + "\n")
  (tmp_path / "notes.txt").write_text("plain text documents count too.\n" * 50)
  data = [f"--config.data.paths={tmp_path / 'docs.jsonl'},{tmp_path / 'notes.txt'}", "--config.train.steps=4",
          "--config.train.checkpoint_every=2", "--config.train.eval_every=2"]
  out = subprocess.run(_train_cmd(tmp_path / "w", *data), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "docs.jsonl" in (tmp_path / "w" / "train.log").read_text()
  assert [r["step"] for r in read_metrics(tmp_path / "w") if "loss" in r] == [1, 2, 3, 4]

  out = subprocess.run(_train_cmd(tmp_path / "w", *data, "--config.model.d_model=32", "--config.train.steps=6"),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 1
  assert "different model" in out.stderr and "model.d_model: checkpoint 64 vs config 32" in out.stderr


def test_missing_data_path_is_a_clear_error(tmp_path):
  out = subprocess.run(_train_cmd(tmp_path / "w", f"--config.data.paths={tmp_path / 'nope.jsonl'}"),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 1
  assert "data error" in out.stderr and "nope.jsonl" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow  # curate + tokenize + train through the CLI: 18-24 s here
def test_curated_text_tokenizes_and_trains_from_a_named_mixture(tmp_path):
  rng = np.random.default_rng(1)
  letters = list("abcdefghijklmnopqrstuvwxyz")
  words = {name: ["".join(rng.choice(letters, size=rng.integers(2, 9))) + end for _ in range(1500)]
           for name, end in (("prose", ""), ("code", "()"))}
  for name, vocab in words.items():
    (tmp_path / name).mkdir()
    with open(tmp_path / name / "part-00000.jsonl", "w") as f:
      for _ in range(150):
        f.write(json.dumps({"text": " ".join(rng.choice(vocab, size=rng.integers(10, 80))), "source": name}) + "\n")
  tok = subprocess.run([sys.executable, "-m", "maxlm.cli", "tokenize", f"--output={tmp_path / 'tok'}", "--quiet",
                        *SMALL_TRAIN, f"english={tmp_path / 'prose'}", str(tmp_path / "code")],
                       capture_output=True, text=True, timeout=600)
  assert tok.returncode == 0, tok.stderr[-3000:]
  assert "--config.data.mixture=english=1,code=1" in tok.stdout
  data = [f"--config.data.tokenized={tmp_path / 'tok'}", "--config.data.mixture=english=0.8,code=0.2",
          "--config.train.steps=3", "--config.train.eval_every=3", "--config.train.sample_tokens=4"]
  out = subprocess.run(_train_cmd(tmp_path / "w", *data), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "english 80%" in (tmp_path / "w" / "train.log").read_text()
  assert [r["step"] for r in read_metrics(tmp_path / "w") if "loss" in r] == [1, 2, 3]
  assert (tmp_path / "w" / "tokenizer" / "tokenizer.model").is_file()  # the workdir serves with its tokenizer

  bad = subprocess.run(_train_cmd(tmp_path / "w2", data[0], "--config.data.mixture=books=1"),
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode == 1 and "unknown source(s) books" in bad.stderr and "english, code" in bad.stderr
