"""Small models, a character tokenizer and engine builders shared by the serving tests."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from maxlm import sharding
from maxlm.config import load_config
from maxlm.models.transformer import Transformer
from maxlm.serve.engine import Engine

VOCAB = 64
SERVE_MODEL = [
  f"--config.model.vocab_size={VOCAB}", "--config.model.d_model=32", "--config.model.num_layers=2",
  "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.mlp_dim=64",
  "--config.model.max_seq_len=64", "--config.data.seq_len=64", "--config.model.dtype=float32",
  # a large init spreads the logits: greedy argmaxes are far from ties, so exact-equality checks are robust
  "--config.model.init_std=0.3", "--config.serve.max_batch=4", "--config.serve.page_size=4",
  "--config.serve.prefill_chunk=16",
]


class CharTokenizer:
  """ids 2.. map to letters; 0 = pad, 1 = eos (enough of the tokenizer interface for the engine)."""

  vocab_size = VOCAB
  eos_id = 1
  bos_id = None

  def encode(self, text: str) -> list[int]:
    return [2 + (ord(c) - 65) % (VOCAB - 2) for c in text]

  def decode(self, ids) -> str:
    return "".join(chr(65 + (i - 2) % (VOCAB - 2)) for i in ids if i >= 2)


def serve_config(*overrides: str):
  return load_config("tiny", SERVE_MODEL + list(overrides))


def one_device_mesh(cfg):
  return sharding.make_mesh(cfg.mesh, jax.devices()[:1])


def make_model(cfg, seed: int = 0) -> Transformer:
  with sharding.use_mesh(one_device_mesh(cfg)):
    return Transformer(cfg.model, rngs=nnx.Rngs(seed))


def make_engine(model, *overrides: str, draft=None) -> Engine:
  cfg = serve_config(*overrides)
  return Engine(model, cfg, CharTokenizer(), draft=draft, mesh=one_device_mesh(cfg))


def random_prompts(lengths, seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(2, VOCAB, n)] for n in lengths]


@pytest.fixture(scope="package")
def model():
  return make_model(serve_config())


@pytest.fixture(scope="package")
def draft_model():
  return make_model(serve_config("--config.model.num_layers=1", "--config.model.d_model=16"), seed=5)
