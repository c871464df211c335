"""What every section of the serving benchmark shares: targets, model shapes, engines, timing and agreement."""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from maxlm import sharding
from maxlm.config import load_config
from maxlm.models.transformer import Transformer
from maxlm.serve.engine import Engine
from maxlm.serve.request import SamplingParams

TARGETS = {"hf_ratio_batch1": 3.0, "hf_ratio_batch8": 2.0, "spec_speedup": 2.0, "paged_waste": 0.02}


HF_SHAPE = {"num_layers": 4, "d_model": 256, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 768, "vocab_size": 512}


KV_SHAPE = {"num_layers": 2, "d_model": 64, "num_heads": 2, "num_kv_heads": 1, "mlp_dim": 128, "vocab_size": 512}


DRAFT = ["--config.model.num_layers=1", "--config.model.d_model=128", "--config.model.num_heads=2",
         "--config.model.num_kv_heads=1", "--config.model.mlp_dim=384", "--config.model.scan_unroll=1",
         "--config.distill.alpha=1.0", "--config.distill.temperature=1.0"]  # pure KL at T=1: argmax agreement


QUANT = [("none", "auto"), ("bf16", "auto"), ("int8", "auto"), ("int4", "auto"), ("none", "int8"), ("int8", "int8")]


def progress(msg: str) -> None:
  """A timestamped progress line."""
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class IdTokenizer:
  """Ids as characters (enough of the tokenizer interface for the engine over a random-init model)."""

  eos_id = 1
  bos_id = None

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def encode(self, text: str) -> list[int]:
    return [2 + ord(c) % (self.vocab_size - 2) for c in text]

  def decode(self, ids) -> str:
    return "".join(chr(0x100 + i) for i in ids)


def random_model_config(shape: dict, max_len: int, overrides: tuple[str, ...] = ()):
  """The tiny config at `shape`, float32, random init; serve.* from overrides."""
  return load_config("tiny", [f"model.{k}={v}" for k, v in shape.items()] + [
    "model.dtype=float32", "model.param_dtype=float32", f"model.max_seq_len={max_len}", f"data.seq_len={max_len}",
    f"model.scan_unroll={shape['num_layers']}", "mesh.data=1", f"serve.max_len={max_len}", *overrides])


def build_random_model(cfg, seed: int) -> Transformer:
  """A random-init Transformer on one device."""
  with sharding.use_mesh(sharding.make_mesh(cfg.mesh, jax.devices()[:1])):
    return Transformer(cfg.model, rngs=nnx.Rngs(seed))


def make_engine(model, cfg, tokenizer, draft=None) -> Engine:
  """An engine on one device."""
  return Engine(model, cfg, tokenizer, draft=draft, mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:1]))


def greedy(max_tokens: int) -> SamplingParams:
  """Greedy sampling of exactly max_tokens tokens."""
  return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def timed_generate(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list[list[int]]]:
  """(wall seconds, outputs) of one engine.generate run."""
  t0 = time.perf_counter()
  out = engine.generate(prompts, params)
  return time.perf_counter() - t0, out


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
  """(fraction of identical sequences, mean fraction of each sequence before the first difference)."""
  same = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
  prefix = []
  for x, y in zip(a, b, strict=True):
    n = next((i for i, (u, v) in enumerate(zip(x, y, strict=False)) if u != v), min(len(x), len(y)))
    prefix.append(n / max(len(x), 1))
  return same, float(np.mean(prefix))
