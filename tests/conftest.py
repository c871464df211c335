"""Shared fixtures: an isolated cache for tokenizers/corpora, and small model builders."""

import os
import tempfile

# One cache per test session (tokenizer + tokenized corpus are built once, reused by every test and
# by the CLI subprocesses, which inherit the environment). Never the user's ~/.cache.
os.environ.setdefault("MAXLM_CACHE", tempfile.mkdtemp(prefix="maxlm-test-cache-"))

import jax  # noqa: E402

# Eight simulated CPU devices for the in-process tests (meshes of 1, 2, 4 or 8 are built over subsets).
# A jax config option, not XLA_FLAGS: CLI subprocesses started by tests keep their own device count.
jax.config.update("jax_num_cpu_devices", 8)

import inspect  # noqa: E402
import json  # noqa: E402
import textwrap  # noqa: E402

import tokenizers  # noqa: E402
from flax import nnx  # noqa: E402
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from maxlm import sharding  # noqa: E402
from maxlm.config import load_config  # noqa: E402
from maxlm.models.transformer import Transformer  # noqa: E402

# Small settings shared by training tests, so the tokenizer/corpus cache is built once per session.
SMALL_TRAIN = [
  "--config.model.vocab_size=512", "--config.model.d_model=64", "--config.model.num_layers=2",
  "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.mlp_dim=128",
  "--config.model.max_seq_len=128", "--config.data.seq_len=64", "--config.data.batch_size=4",
  "--config.data.max_corpus_mb=0.5", "--config.train.warmup_steps=2", "--config.train.progress_bar=false",
  "--config.train.sample_tokens=0", "--config.train.eval_batches=1",
]


def small_config(*overrides: str):
  """The tiny config shrunk further for fast tests, plus `overrides`."""
  return load_config("tiny", SMALL_TRAIN + list(overrides))


def build_model(cfg, seed: int = 0):
  """(graphdef, params as a pure dict) of a freshly initialised Transformer for `cfg`."""
  with sharding.use_mesh(sharding.make_mesh(cfg.mesh)):
    graphdef, state = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(state)


def apply(graphdef, params, tokens, positions=None, segment_ids=None):
  """Logits of the model described by (graphdef, params)."""
  return nnx.merge(graphdef, params)(tokens, positions, segment_ids)


# Llama-3's pre-tokenizer split (tiktoken's cl100k pattern).
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_level_bpe_json(specials: list[str], add_bos: bool, vocab_size: int = 600) -> str:
  """tokenizer.json text of a small Llama-3 / Qwen2-style byte-level BPE trained on stdlib code."""
  tok = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([inspect.getsource(json), inspect.getsource(textwrap)], trainer=trainer)
  post = [processors.ByteLevel(trim_offsets=False)]
  if add_bos:  # As Llama-3 does: encode(text) with special tokens would prepend bos.
    post.append(processors.TemplateProcessing(
        single=f"{specials[0]} $A", pair=f"{specials[0]} $A {specials[0]} $B",
        special_tokens=[(specials[0], 0)]))
  tok.post_processor = processors.Sequence(post)
  return tok.to_str()
