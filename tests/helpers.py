"""The tests' one helper module: small configs and models, tokenizers, fixtures' data and tolerances.

Fixtures (the shared cache, simulated devices, package-scoped models) stay in the conftest.py files; everything a
test imports comes from here, never from another test file.
"""

from __future__ import annotations

import inspect
import json
import pathlib
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

from data_pipelines import tokenized
from maxlm import sharding
from maxlm.config import load_config
from maxlm.models.transformer import Transformer
from maxlm.serve.engine import Engine

# --- small training configs and models ---

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

# --- tiny random transformers models imported into maxlm workdirs (evaluation parity tests) ---

TINY_VOCAB = 512
TINY_BOS, TINY_EOS = 0, 1


def tiny_hf_model(family: str, seed: int = 0, **overrides):
  """A random-init transformers model (std 0.08, norm scales around 1), float32: vocab 512, 2 layers, 128 positions,
  bos 0 and eos 1."""
  import torch
  import transformers

  torch.manual_seed(seed)
  cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}[family]
  cfg = cls(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=TINY_BOS,
            eos_token_id=TINY_EOS, **overrides)
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1 + 0.2 * torch.randn_like(p)) if name.endswith("norm.weight") else p.normal_(0, 0.08)
  return model


def import_tiny_hf_model(model, root) -> tuple:
  """(workdir, transformers tokenizer): the model saved to root/hf with a byte-level BPE (Llama-3 style: bos
  prepended) and imported by `maxlm convert` into root/work."""
  import transformers

  from maxlm.convert import hf

  hf_dir, work = root / "hf", root / "work"
  model.save_pretrained(hf_dir)
  (hf_dir / "tokenizer.json").write_text(byte_level_bpe_json(["<|begin_of_text|>", "<|end_of_text|>"], True,
                                                             vocab_size=TINY_VOCAB))
  (hf_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                            "eos_token": "<|end_of_text|>"}))
  hf.convert_from_hf(hf_dir, work)
  return work, transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))

# --- serving: a character tokenizer and engine builders ---

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

# --- the committed multilingual prose fixture (data_pipelines/fixtures/prose: en, de, es, it; see its README) ---

PROSE_DIR = pathlib.Path(__file__).parent / "data_pipelines" / "fixtures" / "prose"
PROSE_LANGUAGES = ("en", "de", "es", "it")


def prose_paragraphs(lang: str) -> list[str]:
  """The paragraphs of one language's file (blank-line separated, hard-wrapped lines kept), in file order."""
  text = (PROSE_DIR / f"{lang}.txt").read_text(encoding="utf-8")
  found = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
  assert found, f"no paragraphs in {PROSE_DIR / f'{lang}.txt'}"
  return found


def prose_documents(lang: str, min_chars: int, limit: int, *, skip: int = 0) -> list[str]:
  """Up to `limit` documents of consecutive paragraphs (after the first `skip`), each at least min_chars long."""
  docs, current = [], []
  for paragraph in prose_paragraphs(lang)[skip:]:
    current.append(paragraph)
    if sum(map(len, current)) >= min_chars:
      docs.append("\n\n".join(current))
      current = []
      if len(docs) == limit:
        break
  return docs

# --- a tokenized directory (the `maxlm tokenize` layout, no tokenizer) written from token lists ---

def write_token_shards(root, docs_by_source, text_bytes=lambda name, doc: len(doc)):
  """A tokenized directory holding docs_by_source[name][split] via the real shard writer; returns its manifest."""
  manifest = {"format": tokenized.FORMAT, "dtype": "<u2", "sources": {},
              "tokenizer": {"dir": tokenized.TOKENIZER_DIR, "sha256": "0" * 64}}
  for name, splits in docs_by_source.items():
    entry = {"splits": {}}
    for split, docs in splits.items():
      w = tokenized.ShardWriter(root, name, split, np.dtype("<u2"), shard_tokens=700, options="group_size:1")
      for d in docs:
        w.write(np.asarray(d), text_bytes=text_bytes(name, d))
      entry["splits"][split] = w.summary()
    manifest["sources"][name] = entry
  (root / tokenized.MANIFEST).write_text(json.dumps(manifest))
  return manifest

# --- kernel tolerances ---

# Per-dtype tolerances for every kernel-vs-reference comparison, in one place.
#
# The reference computes in float32 at Precision.HIGHEST. float32 kernels differ only by summation order
# (blockwise online softmax); bfloat16 kernels round q, k, v, probabilities and outputs to 8 mantissa bits,
# so their errors are ~2^-8 relative. Gradients accumulate over whole sequences and get a looser bound.
TOLERANCES = {
  # (what, dtype): (atol, rtol)
  ("out", jnp.float32): (2e-5, 2e-5),
  ("out", jnp.bfloat16): (2e-2, 2e-2),
  ("grad", jnp.float32): (1e-4, 1e-4),
  ("grad", jnp.bfloat16): (6e-2, 6e-2),
}


def assert_close(actual, expected, dtype, what: str = "out", name: str = "") -> None:
  """Asserts `actual` ~ `expected` within the (what, dtype) tolerance, comparing in float32."""
  atol, rtol = TOLERANCES[(what, jnp.dtype(dtype).type)]
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), atol=atol,
                             rtol=rtol, err_msg=name)

# --- the real models: scripts/fetch_models.py downloads, verifies and converts them once into $MAXLM_MODELS ---


def fetch_models():
  """scripts/fetch_models.py as a module (scripts/ is not a package): MODELS, fetch_gguf(key), fetch_workdir(key)."""
  import importlib.util
  import sys

  if "fetch_models" not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        "fetch_models", pathlib.Path(__file__).resolve().parent.parent / "scripts" / "fetch_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before running it: dataclasses look their module up there
    spec.loader.exec_module(module)
  return sys.modules["fetch_models"]


def leaf_build_memory(monkeypatch, load) -> list[tuple[int, int]]:
  """(parameter bytes in float32, peak host bytes allocated while building it) per leaf that `load()` builds with
  jax.make_array_from_callback, measured with tracemalloc: how a converter's memory scales with a parameter."""
  import tracemalloc

  measured_leaves, original = [], jax.make_array_from_callback

  def measured(shape, sharding, callback, *args, **kwargs):
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    out = original(shape, sharding, callback, *args, **kwargs).block_until_ready()
    measured_leaves.append((int(np.prod(shape)) * 4, tracemalloc.get_traced_memory()[1] - before))
    return out

  monkeypatch.setattr(jax, "make_array_from_callback", measured)
  tracemalloc.start()
  try:
    load()
  finally:
    tracemalloc.stop()
  return measured_leaves


def train_tiny_base(workdir):
  """A small_config model trained for 3 steps on the default corpus (one device): a frozen base for LoRA runs."""
  import jax

  from maxlm.train.loop import train

  train(small_config("--config.train.steps=3", "--config.train.checkpoint_every=3"), workdir,
        devices=jax.devices()[:1])
  return workdir
