"""`train.objective=sft`: packed chat batches train only the masked targets (checked against each sample scored on
its own), a LoRA SFT run on SmolLM2's tokenizer and template learns its task, and bad data or settings are named."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import fetch_models, small_config

from data_pipelines.chat_template import load_chat_template
from data_pipelines.sft import load_sft_jsonl
from data_pipelines.tokenizer import load_tokenizer
from maxlm import sharding
from maxlm.config import ConfigError, load_config
from maxlm.metrics import read_metrics
from maxlm.models.transformer import Transformer
from maxlm.train.data import DataError
from maxlm.train.loop import train
from maxlm.train.sft_data import SFTStream
from maxlm.train.step import objective_sums

VOCAB = 49152  # SmolLM2's


@pytest.fixture(scope="module")
def tokenizer_dir():
  return fetch_models().fetch_transformers("smollm2-135m")


def _chats(n, seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    a, b = (int(x) for x in rng.integers(2, 50, 2))
    system = [{"role": "system", "content": "Answer with the number only."}] if i % 3 == 0 else []
    turn = [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]
    more = [{"role": "user", "content": "And doubled?"}, {"role": "assistant", "content": str(2 * (a + b))}]
    rows.append({"messages": system + turn + (more if i % 2 else [])})
  return rows


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _sft(tokenizer_dir, *extra):
  return small_config(f"--config.model.vocab_size={VOCAB}", "--config.train.objective=sft",
                      f"--config.data.tokenizer={tokenizer_dir}", "--config.data.seq_len=96", *extra)


def test_packed_sft_batches_weigh_exactly_the_masked_targets_of_each_sample(tokenizer_dir, tmp_path):
  tok = load_tokenizer(tokenizer_dir)
  examples = load_sft_jsonl([_write(tmp_path / "chat.jsonl", _chats(12))], tok, load_chat_template(tokenizer_dir))
  cfg = _sft(tokenizer_dir)
  batch = next(SFTStream(examples).iterator(seq_len=96, batch_size=4, seed=0))
  with sharding.use_mesh(sharding.make_mesh(cfg.mesh, jax.devices()[:1])):
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  _, (nll, _, count) = objective_sums(nnx.to_pure_dict(params), graphdef,
                                      {k: jnp.asarray(v) for k, v in batch.items()}, 0.0)
  # Independently: every packed segment is one sample; score it alone and sum -log p over its masked targets.
  want_nll, want_count, seen = 0.0, 0, 0
  for row in range(4):
    seg = batch["segment_ids"][row]
    for s in sorted(set(seg[seg > 0].tolist())):
      tokens = np.concatenate([batch["inputs"][row][seg == s], batch["targets"][row][seg == s][-1:]])
      match = [ex for ex in examples if np.array_equal(ex.tokens, tokens)]
      assert match, "a packed segment is not one whole sample"
      mask = match[0].mask[1:]
      logits = np.asarray(model(jnp.asarray(tokens[None, :-1])), np.float64)[0]
      logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
      want_nll -= float(logp[np.arange(len(tokens) - 1), tokens[1:]][mask].sum())
      want_count += int(mask.sum())
      seen += 1
  assert seen >= 4 and want_count < (batch["segment_ids"] > 0).sum() / 3  # only assistant answers are trained
  assert float(count) == want_count
  np.testing.assert_allclose(float(nll), want_nll, rtol=2e-5)


def test_sft_on_smollm2_tokens_learns_the_answers(tokenizer_dir, tmp_path):
  data = _write(tmp_path / "chat.jsonl", _chats(64))
  cfg = _sft(tokenizer_dir, f"--config.data.paths={data}", "--config.train.steps=30",
             "--config.train.learning_rate=1e-2", "--config.train.warmup_steps=0", "--config.train.eval_every=30",
             "--config.train.checkpoint_every=30", "--config.data.eval_fraction=0.25", "--config.data.batch_size=8")
  last = train(cfg, tmp_path / "sft", devices=jax.devices()[:1])
  losses = [r["loss"] for r in read_metrics(tmp_path / "sft") if "loss" in r]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 3.0, losses
  assert last["eval_loss"] < last["unigram_entropy"], last  # beyond the answers' unigram statistics


@pytest.mark.slow  # ~2 min: SmolLM2-135M-Instruct forward and backward on 2 CPU cores
def test_lora_sft_on_smollm2_instruct_lowers_the_held_out_answer_loss(tokenizer_dir, tmp_path):
  base = fetch_models().fetch_workdir("smollm2-135m")
  data = _write(tmp_path / "chat.jsonl", _chats(48))
  cfg = load_config(str(base / "config.json"), [
    f"--config.lora.base={base}", "--config.lora.rank=8", "--config.train.objective=sft",
    f"--config.data.paths={data}", "--config.data.seq_len=64", "--config.data.batch_size=8",
    "--config.train.steps=10", "--config.train.learning_rate=1e-3", "--config.train.warmup_steps=0",
    "--config.train.eval_every=1", "--config.train.eval_batches=1", "--config.train.progress_bar=false",
    "--config.train.sample_tokens=0", "--config.train.checkpoint_every=10", "--config.data.eval_fraction=0.25"])
  train(cfg, tmp_path / "sft")
  evals = [r["eval_loss"] for r in read_metrics(tmp_path / "sft") if "eval_loss" in r]
  assert evals[-1] < 0.6 * evals[0], evals  # the held-out answers' loss: the model learned the format and sums


def test_bad_sft_data_and_settings_are_named(tokenizer_dir, tmp_path):
  good = _write(tmp_path / "good.jsonl", _chats(4))
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(_chats(1)[0]) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
  with pytest.raises(DataError, match=r"bad.jsonl:2: no token to train on"):
    train(_sft(tokenizer_dir, f"--config.data.paths={bad}"), tmp_path / "a", devices=jax.devices()[:1])
  with pytest.raises(ConfigError, match="needs the model's own tokenizer"):
    train(small_config("--config.train.objective=sft", f"--config.data.paths={good}"), tmp_path / "b",
          devices=jax.devices()[:1])
  with pytest.raises(ConfigError, match="needs data.paths"):
    train(_sft(tokenizer_dir), tmp_path / "c", devices=jax.devices()[:1])


@pytest.mark.slow  # ~40 s: three small SFT runs
def test_sft_accumulation_and_resume_equal_the_straight_run(tokenizer_dir, tmp_path):
  """Accumulated micro-batches weigh each masked target as the full batch does (per-token mean over the whole
  batch), and a stopped run resumes the packed chat stream where its checkpoint left it."""
  data = _write(tmp_path / "chat.jsonl", _chats(40))
  common = (f"--config.data.paths={data}", "--config.train.eval_every=0", "--config.train.checkpoint_every=2",
            "--config.data.batch_size=4", "--config.train.learning_rate=1e-2", "--config.train.warmup_steps=0",
            "--config.train.schedule=constant")  # a cosine schedule would follow train.steps, which the stop changes

  def run(name, *extra, steps=4):
    train(_sft(tokenizer_dir, *common, f"--config.train.steps={steps}", *extra), tmp_path / name,
          devices=jax.devices()[:1])
    return [(r["step"], r["loss"]) for r in read_metrics(tmp_path / name) if "loss" in r]

  straight = run("straight")
  np.testing.assert_allclose(run("accum", "--config.train.grad_accum_steps=2"), straight, rtol=2e-5)
  run("resumed", steps=2)
  np.testing.assert_allclose(run("resumed"), straight, rtol=1e-6)
  assert len({round(x, 5) for _, x in straight}) == 4
