"""Training data for `train.objective=sft`: chat / prompt-completion / text JSONL as packed batches with loss masks.

The samples (data_pipelines.sft: TRL's formats, the model's chat template, assistant-only masks) are held in memory,
cut to data.seq_len + 1 tokens (TRL's truncation: the end is dropped), split into train and eval samples by
data.eval_fraction (a seeded draw), and packed with segment ids like pretraining; every batch carries "loss_mask",
1 on the targets trained on. The stream object has the `iterator` of a token-shard mixture, so the loop's streams,
resume and multi-host slicing are the same.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grain
import numpy as np

from data_pipelines import loader
from data_pipelines.chat_template import ChatTemplateError, load_chat_template
from data_pipelines.sft import SFTExample, load_sft_jsonl
from data_pipelines.sources import expand_paths
from data_pipelines.tokenizer import load_tokenizer
from maxlm.config import ConfigError

log = logging.getLogger("maxlm.train")


class _Pieces:
  """Random access to samples as packer pieces: {"inputs", "targets", "loss_mask"} of <= seq_len tokens."""

  def __init__(self, examples: list[SFTExample], seq_len: int):
    self._examples, self._seq_len = examples, seq_len

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    ex = self._examples[i]
    tokens, mask = ex.tokens[:self._seq_len + 1], ex.mask[:self._seq_len + 1]
    return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": mask[1:].astype(np.int32)}


class SFTStream:
  """The train samples as resumable packed streams (the `iterator` a token-shard mixture has)."""

  def __init__(self, examples: list[SFTExample]):
    self.examples = examples

  def iterator(self, *, seq_len: int, batch_size: int, seed: int, num_packing_bins: int = 8, shard_index: int = 0,
               shard_count: int = 1, num_epochs: int | None = None) -> grain.DatasetIterator:
    """Stream `shard_index` of `shard_count`: its strided slice of the samples, shuffled, repeated, packed."""
    if batch_size % shard_count:
      raise ValueError(f"batch_size {batch_size} must be a positive multiple of shard_count {shard_count}")
    mine = self.examples[shard_index::shard_count]
    if not mine:
      raise ValueError(f"{len(self.examples)} SFT samples cannot feed {shard_count} streams")
    ds = grain.MapDataset.source(_Pieces(mine, seq_len)).shuffle(seed=seed % 2**32).repeat(num_epochs)
    return iter(loader.pack_batches(ds, seq_len=seq_len, rows=batch_size // shard_count, seed=seed, shuffle=True,
                                    num_packing_bins=num_packing_bins, loss_mask=True))


def eval_batches(examples: list[SFTExample], *, seq_len: int, batch_size: int, num_batches: int,
                 num_packing_bins: int = 8) -> list[dict[str, np.ndarray]]:
  """The first num_batches packed batches of the eval samples in order (cycling), with their loss masks."""
  ds = grain.MapDataset.source(_Pieces(examples, seq_len)).repeat(None)
  it = iter(loader.pack_batches(ds, seq_len=seq_len, rows=batch_size, seed=0, shuffle=False,
                                num_packing_bins=num_packing_bins, loss_mask=True))
  return [next(it) for _ in range(num_batches)]


def chat_template_of(tokenizer_path: Path):
  """The chat template beside the tokenizer, or None (then only the plain-text formats can be used)."""
  try:
    return load_chat_template(tokenizer_path if tokenizer_path.is_dir() else tokenizer_path.parent)
  except ChatTemplateError:
    return None


def masked_unigram_entropy(examples: list[SFTExample], vocab_size: int) -> float:
  """Entropy (nats) of the trained targets' unigram distribution: the loss a model ignoring context reaches."""
  counts = np.zeros(vocab_size, np.int64)
  for ex in examples:
    np.add.at(counts, ex.tokens[ex.mask], 1)
  return loader.entropy_of_counts(counts)


def load_sft(cfg) -> tuple[SFTStream, list[SFTExample], object, Path, float, str]:
  """(train stream, eval samples, tokenizer, tokenizer directory, unigram entropy, description) of data.paths."""
  d = cfg.data
  if not d.tokenizer:
    raise ConfigError("train.objective=sft needs the model's own tokenizer: set data.tokenizer (a LoRA run takes its "
                      "base's, a workdir imported with maxlm convert its own)")
  if not d.paths.strip():
    raise ConfigError("train.objective=sft needs data.paths: JSONL files of {\"messages\"}, {\"prompt\", "
                      "\"completion\"} or {\"text\"} samples")
  tok_path = Path(d.tokenizer)
  tokenizer = load_tokenizer(tok_path)
  files = expand_paths([p.strip() for p in d.paths.split(",") if p.strip()])
  examples = load_sft_jsonl(files, tokenizer, chat_template_of(tok_path))
  if len(examples) < 2:
    raise ConfigError(f"data.paths holds {len(examples)} SFT sample: at least 2 are needed (train and eval)")
  order = np.random.default_rng(d.seed).permutation(len(examples))
  n_eval = min(len(examples) - 1, max(1, round(d.eval_fraction * len(examples))))
  train = [examples[i] for i in sorted(order[n_eval:])]
  held = [examples[i] for i in sorted(order[:n_eval])]
  cut = sum(len(ex.tokens) > d.seq_len + 1 for ex in train)
  lost = sum(not ex.mask[:d.seq_len + 1].any() for ex in train)
  if cut:
    log.warning("sft: %d of %d train samples are longer than data.seq_len + 1 = %d tokens and are cut there%s",
                cut, len(train), d.seq_len + 1, f" ({lost} keep no trained token)" if lost else "")
  trained = sum(int(ex.mask[:d.seq_len + 1].sum()) for ex in train)
  description = (f"sft: {len(train)} train / {len(held)} eval samples from {len(files)} file(s), {trained:,} trained "
                 f"tokens per epoch; tokenizer {tok_path}")
  tok_dir = tok_path if tok_path.is_dir() else tok_path.parent
  return SFTStream(train), held, tokenizer, tok_dir, masked_unigram_entropy(train, tokenizer.vocab_size), description
