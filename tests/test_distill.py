"""Knowledge distillation: the KL term, its place in the objective, a student that learns it, `maxlm train` with
--config.distill.teacher and its errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import SMALL_TRAIN, apply, byte_level_bpe_json, small_config

from data_pipelines.tokenizer import load_tokenizer
from maxlm import sharding
from maxlm.cli import main as cli_main
from maxlm.config import ConfigError, to_json
from maxlm.metrics import read_metrics
from maxlm.models.transformer import Transformer
from maxlm.train import distill as distill_lib
from maxlm.train.checkpoint import Checkpointer
from maxlm.train.optim import make_optimizer, make_schedule
from maxlm.train.step import Distill, accumulate_gradients, distill_kl_sum, make_train_step, objective_sums

TINY = ("--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.mlp_dim=64")


def _batch(batch, seq, vocab=512, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, vocab, (batch, seq + 1)), jnp.int32)
  seg = np.ones((batch, seq), np.int32)
  seg[:, seq // 2:] = 2
  seg[0, -3:] = 0  # padding: no weight in either term
  pos = np.concatenate([np.arange(seq // 2), np.arange(seq - seq // 2)])
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=jnp.asarray(seg),
              positions=jnp.broadcast_to(jnp.asarray(pos, jnp.int32), (batch, seq)))


def _model(cfg, seed):
  """(graphdef, params) on one device: the step math needs no mesh, and 8 simulated devices would do it 8 times."""
  with sharding.use_mesh(sharding.make_mesh(cfg.mesh, jax.devices()[:1])):
    graphdef, state = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(state)


def _logits(graphdef, params, batch):
  return np.asarray(apply(graphdef, params, batch["inputs"], batch["positions"], batch["segment_ids"]))


def _np_kl_sum(student, teacher, weights, t):
  def log_softmax(x):
    x = x.astype(np.float64) / t
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  p_log, q_log = log_softmax(teacher), log_softmax(student)
  return float(((np.exp(p_log) * (p_log - q_log)).sum(-1) * weights).sum())


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_sum_matches_numpy_with_padding_and_temperature(temperature):
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(0, 3, (2, 7, 13)), rng.normal(0, 3, (2, 7, 13))
  weights = np.ones((2, 7))
  weights[1, 4:] = 0
  teacher[1, 4:] += 100.0  # huge disagreements on padded positions must not count
  got = float(distill_kl_sum(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(weights), temperature))
  np.testing.assert_allclose(got, _np_kl_sum(student, teacher, weights, temperature), rtol=1e-5)
  assert float(distill_kl_sum(teacher, teacher, weights, temperature)) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.slow  # moved out of the default suite (827 s in a clean CI run with the real-model tests)
def test_objective_mixes_kl_and_data_loss_and_alpha_zero_is_the_plain_objective():
  cfg = small_config(*TINY, "--config.train.z_loss=1e-3")
  graphdef, params = _model(cfg, seed=0)
  t_graphdef, t_params = _model(cfg, seed=1)  # a different model with the same vocabulary
  batch = _batch(4, 16)
  plain_fn = jax.jit(jax.value_and_grad(lambda p: objective_sums(p, graphdef, batch, 1e-3), has_aux=True))
  (plain, plain_sums), plain_grads = plain_fn(params)
  # alpha = 0: exactly the old objective, sums and gradient (the KL is computed, reported, and weighs nothing).
  (total, sums), grads = jax.jit(jax.value_and_grad(
    lambda p, tp: objective_sums(p, graphdef, batch, 1e-3, Distill(t_graphdef, 0.0, 2.0), tp), has_aux=True))(
      params, t_params)
  assert float(total) == float(plain) and len(sums) == 4 and float(sums[3]) > 0
  assert all(float(a) == float(b) for a, b in zip(sums[:3], plain_sums, strict=True))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), grads, plain_grads)
  # Otherwise alpha * T^2 * KL + (1 - alpha) * (nll + z_loss * z_sq), the KL as numpy computes it from the logits.
  distill = Distill(t_graphdef, 0.3, 1.5)
  accumulate = jax.jit(lambda p, tp, n: accumulate_gradients(p, graphdef, batch, 1e-3, n, distill, tp),
                       static_argnums=2)
  (total, s1), g1 = jax.jit(jax.value_and_grad(lambda p, tp: objective_sums(p, graphdef, batch, 1e-3, distill, tp),
                                               has_aux=True))(params, t_params)
  weights = np.asarray(batch["segment_ids"] > 0, np.float64)
  ref_kl = _np_kl_sum(_logits(graphdef, params, batch), _logits(t_graphdef, t_params, batch), weights, 1.5)
  np.testing.assert_allclose(float(s1[3]), ref_kl, rtol=1e-4)
  np.testing.assert_allclose(float(total), 0.3 * 1.5**2 * ref_kl + 0.7 * float(plain), rtol=1e-5)
  # Gradient accumulation keeps the KL term: 4 micro-batches give the full batch's gradient and sums.
  g4, s4 = accumulate(params, t_params, 4)
  np.testing.assert_allclose(s4, s1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max()), g4, g1)


def test_student_learns_a_fixed_teacher():
  """alpha=1: the student's only signal is the teacher; 40 steps cut the KL on held-out batches several-fold."""
  cfg = small_config(*TINY, "--config.train.learning_rate=1e-2", "--config.train.warmup_steps=0",
                     "--config.train.schedule=constant")
  t_graphdef, t_params = _model(cfg, seed=7)
  t_params["final_norm"]["scale"] = t_params["final_norm"]["scale"] * 8.0  # a peaked teacher, far from uniform
  graphdef, params = _model(cfg, seed=0)
  tx = make_optimizer(cfg.train)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "nonfinite_streak": jnp.zeros((), jnp.int32), "nonfinite_total": jnp.zeros((), jnp.int32)}
  distill = Distill(t_graphdef, 1.0, 1.0)
  step = jax.jit(make_train_step(graphdef, tx, make_schedule(cfg.train), z_loss=0.0, accum_steps=1,
                                 distill=distill))
  held_out = _batch(8, 16, seed=999)
  kl = jax.jit(lambda p: objective_sums(p, graphdef, held_out, 0.0, distill, t_params)[1])

  def mean_kl(p):
    sums = kl(p)
    return float(sums[-1] / sums[2])

  before = mean_kl(state["params"])
  for i in range(40):
    state, metrics = step(state, _batch(8, 16, seed=i), t_params)
  after = mean_kl(state["params"])
  assert "distill_kl" in metrics and np.isfinite(float(metrics["distill_kl"]))
  assert before > 0.5 and after < before / 4, (before, after)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A teacher workdir of the shared small settings: config.json and a parameters-only checkpoint at step 5, as
  `maxlm convert` writes one (training it first would only cost time: distillation reads config and params)."""
  workdir = tmp_path_factory.mktemp("teacher") / "t"
  cfg = small_config()
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "config.json").write_text(to_json(cfg))
  ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
  ckpt.save_params(5, _model(cfg, seed=3)[1], json.loads(to_json(cfg)))
  ckpt.close()
  return workdir


@pytest.mark.slow  # ~10 s; the objective and teacher checks stay in the default job
def test_train_with_a_teacher_end_to_end(tmp_path, teacher_dir, capsys):
  """A 1-layer student distils from the 2-layer teacher; on an FSDP mesh the teacher is split like the student."""
  fsdp = ("--config.sharding.preset=fsdp", "--config.mesh.data=2", "--config.mesh.fsdp=4",
          "--config.data.batch_size=8")
  cfg = small_config(*TINY, *fsdp, f"--config.distill.teacher={teacher_dir}")
  mesh, rules = sharding.mesh_for(cfg)
  tcfg = distill_lib.teacher_config(cfg, dict(mesh.shape), rules)
  _, t_params, t_step = distill_lib.load_teacher(cfg, tcfg, mesh)
  assert t_step == 5 and t_params["embed"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert len(t_params["embed"].addressable_shards) == 8 and t_params["embed"].addressable_shards[0].data.shape[1] == 16

  student = tmp_path / "student"
  args = ["train", f"--workdir={student}", *SMALL_TRAIN, *TINY, "--config.data.batch_size=8",  # 8-way data parallel
          f"--config.distill.teacher={teacher_dir}", "--config.distill.alpha=0.7", "--config.train.steps=3",
          "--config.train.eval_every=3", "--config.train.checkpoint_every=3"]
  assert cli_main(args) == 0, capsys.readouterr().err[-3000:]
  rows = read_metrics(student)
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3] and all(r["distill_kl"] > 0 for r in train_rows)
  assert any("eval_loss" in r for r in rows)
  saved = json.loads((student / "config.json").read_text())
  assert saved["distill"]["teacher"] == str(teacher_dir) and saved["model"]["num_layers"] == 1
  assert "distill: teacher" in (student / "train.log").read_text()


def test_bad_teachers_are_clear_errors(tmp_path, teacher_dir, capsys):
  def run(teacher, *extra):
    code = cli_main(["train", f"--workdir={tmp_path / 'w'}", *SMALL_TRAIN, "--config.data.batch_size=8",
                     f"--config.distill.teacher={teacher}", *extra])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    return err

  assert "no such directory" in run(tmp_path / "nope")
  assert "the student's own --workdir" in run(tmp_path / "w")
  (tmp_path / "empty").mkdir()
  assert "not a maxlm workdir" in run(tmp_path / "empty")
  (tmp_path / "untrained").mkdir()
  (tmp_path / "untrained" / "config.json").write_text((teacher_dir / "config.json").read_text())
  assert "no checkpoint" in run(tmp_path / "untrained")
  err = run(teacher_dir, "--config.model.vocab_size=1024")
  assert "model.vocab_size=512" in err and "model.vocab_size=1024" in err and str(teacher_dir) in err


def test_teacher_tokenizer_must_match_the_students(tmp_path, teacher_dir):
  def hf_tokenizer(directory, specials):
    directory.mkdir(parents=True)
    (directory / "tokenizer.json").write_text(byte_level_bpe_json(specials, False, 300))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": specials[0], "eos_token": specials[1]}))
    return directory

  (tmp_path / "t").mkdir()
  (tmp_path / "t" / "config.json").write_text((teacher_dir / "config.json").read_text())
  theirs = hf_tokenizer(tmp_path / "t" / "tokenizer", ["<s>", "</s>"])
  ours = hf_tokenizer(tmp_path / "student_tok", ["<bos>", "<eos>"])
  cfg = small_config(f"--config.distill.teacher={tmp_path / 't'}")
  with pytest.raises(ConfigError, match="tokenizer mismatch.*t/tokenizer/tokenizer.json.*student_tok"):
    distill_lib.check_teacher_tokenizer(cfg, load_tokenizer(ours))
  distill_lib.check_teacher_tokenizer(cfg, load_tokenizer(theirs))  # the same file
  # A teacher that trained its own BPE (no tokenizer/) matches only a student training the same one.
  cfg = small_config(f"--config.distill.teacher={teacher_dir}", "--config.data.max_corpus_mb=0.25")
  with pytest.raises(ConfigError, match="trained its own tokenizer"):
    distill_lib.check_teacher_tokenizer(cfg, load_tokenizer(ours))
