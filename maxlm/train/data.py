"""Training data for `maxlm train`: one token-shard mixture, its eval documents and tokenizer, whatever data.* names."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from data_pipelines import corpus as corpus_lib
from data_pipelines import loader
from data_pipelines import mixture as mixture_lib
from data_pipelines.cache import default_cache_dir
from data_pipelines.tokenizer import MIN_TRAINED_VOCAB
from maxlm.config import ConfigError
from maxlm.train import dpo_data, sft_data


class DataError(ValueError):
  """The training data cannot be read or tokenized (missing path, bad UTF-8, malformed JSONL, ...)."""


def cache_dir(cfg) -> Path:
  """Where tokenizers, tokenized corpora and the measured CPU peak are cached."""
  return Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()


def process_rows(batch: dict, index: int, count: int) -> dict:
  """Process `index` of `count`'s rows of a global batch (each process feeds its own rows)."""
  rows = batch["inputs"].shape[0] // count
  return {k: v[index * rows:(index + 1) * rows] for k, v in batch.items()}


def stream_state(data_state: dict) -> dict:
  """A checkpoint's data position keyed by stream; checkpoints of one unnamed stream predate streams."""
  if data_state and not all(k.isdigit() for k in data_state):
    return {"0": data_state}
  return data_state


@dataclasses.dataclass
class TrainingData:
  """The training stream's token-shard mixture, the eval documents and the tokenizer, whichever data.* named them."""

  train: Any  # what loader.HostBatches draws from: a mixture_lib.Mixture, or SFT samples (sft_data.SFTStream)
  eval: Any  # loader.TokenizedDocs, or the held-out SFT samples
  tokenizer: Any
  unigram_entropy: float  # nats/token of the train targets' unigram distribution: a loss baseline
  description: str
  tokenizer_dir: Path  # the data's tokenizer directory, copied into the workdir
  eval_ref: Any = None  # DPO with dpo.reference=precomputed: the held-out pairs' reference log-probabilities

  def eval_batches(self, *, seq_len: int, batch_size: int, num_batches: int) -> list[dict]:
    """The held-out batches of every eval pass (with loss masks for SFT samples)."""
    if isinstance(self.eval, loader.TokenizedDocs):
      return loader.make_eval_batches(self.eval, seq_len=seq_len, batch_size=batch_size, num_batches=num_batches)
    if isinstance(self.train, dpo_data.PairStream):
      return dpo_data.eval_batches(self.eval, seq_len=seq_len, batch_size=batch_size, num_batches=num_batches,
                                   pairs_per_row=self.train.pairs_per_row, ref=self.eval_ref)
    return sft_data.eval_batches(self.eval, seq_len=seq_len, batch_size=batch_size, num_batches=num_batches)


def load_training_data(cfg, eval_tokens: int | None = None) -> TrainingData:
  """data.tokenized (token shards mixed by data.mixture) if set, else data.paths / the default corpus, tokenized
  once into the cache as the same shards: one loader, one eval split, one resume state. The eval documents are
  `eval_tokens` of the held-out split (default: what train.eval_batches batches use)."""
  m, d, t = cfg.model, cfg.data, cfg.train
  if t.objective in ("sft", "dpo"):
    try:
      if t.objective == "sft":
        stream, held, tok, tok_dir, entropy, description = sft_data.load_sft(cfg)
      else:  # the loss of a policy equal to its reference: log 2 (sigmoid), the baseline of the DPO loss
        stream, held, tok, tok_dir, description = dpo_data.load_dpo(cfg)
        entropy = math.log(2)
    except ConfigError:
      raise
    except (ValueError, OSError) as e:
      raise DataError(f"data.paths={d.paths!r}: {e}") from e
    if tok.vocab_size > m.vocab_size:
      raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's vocabulary "
                        f"({tok.vocab_size} ids)")
    return TrainingData(stream, held, tok, entropy, description, tok_dir)
  if not d.tokenized and not d.tokenizer and m.vocab_size < MIN_TRAINED_VOCAB:
    raise ConfigError(f"model.vocab_size={m.vocab_size}: training a byte-fallback tokenizer (data.tokenizer is "
                      f"empty) needs >= {MIN_TRAINED_VOCAB}")
  where = f"data.tokenized={d.tokenized!r}, data.mixture={d.mixture!r}" if d.tokenized else f"data.paths={d.paths!r}"
  try:
    if d.tokenized:
      data = mixture_lib.load(d.tokenized, d.mixture, weight_unit=d.mixture_unit, curriculum=d.curriculum,
                              curriculum_stages=d.curriculum_stages, verify_checksums=d.verify_checksums)
    else:
      data = corpus_lib.prepare_corpus(
        d.paths, vocab_size=m.vocab_size, cache_dir=cache_dir(cfg), tokenizer_path=d.tokenizer,
        max_corpus_bytes=int(d.max_corpus_mb * 2**20), eval_fraction=d.eval_fraction, text_field=d.text_field,
        skip_bad_records=d.skip_bad_records)
    if eval_tokens is None:
      eval_tokens = 2 * t.eval_batches * d.batch_size * (d.seq_len + 1)
    eval_docs = data.eval_docs(eval_tokens)
  except (ValueError, OSError) as e:
    raise DataError(f"{where}: {e}") from e
  if data.tokenizer.vocab_size > m.vocab_size:
    raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenized data's vocabulary "
                      f"({data.tokenizer.vocab_size} ids)")
  entropy = data.unigram_entropy  # None for directories tokenized before manifests kept it: the eval docs' then
  if entropy is None:
    entropy = loader.unigram_entropy(eval_docs, data.tokenizer.vocab_size)
  return TrainingData(data.mixture, eval_docs, data.tokenizer, entropy, data.description, data.tokenizer_dir)
