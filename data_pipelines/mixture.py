"""Weighted mixtures of named token-shard sources as resumable, packed, per-host streams (optional curriculum)."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from data_pipelines import tokenized
from data_pipelines.loader import DocumentPieces, TokenizedDocs, chunk_ranges, pack_batches
from data_pipelines.mixture_spec import CURRICULA, WEIGHT_UNITS, parse_mixture
from data_pipelines.tokenizer import AnyTokenizer, load_tokenizer

__all__ = ["CURRICULA", "WEIGHT_UNITS", "parse_mixture", "Mixture", "StagedShuffle", "TokenizedData", "load"]


class StagedShuffle(grain.MapDataset):
  """A curriculum order: pieces sorted by score into `stages` equal-size stages, easiest stage first,
  shuffled within each stage with a new seed every epoch (indices past the length are later epochs)."""

  def __init__(self, parent: grain.MapDataset, scores: np.ndarray, stages: int, seed: int):
    super().__init__(parent)
    if len(scores) != len(parent):
      raise ValueError(f"{len(scores)} scores for {len(parent)} elements")
    self._stages = np.array_split(np.argsort(scores, kind="stable"), max(1, min(stages, len(scores))))
    self._seed = seed
    self._epoch, self._order = -1, np.zeros(0, np.int64)

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return f"StagedShuffle(stages={len(self._stages)})"

  def _index(self, index: int) -> int:
    epoch, i = divmod(index, len(self._parent))
    if epoch != self._epoch:
      rng = np.random.default_rng([self._seed, epoch])
      self._order = np.concatenate([rng.permutation(s) for s in self._stages])
      self._epoch = epoch
    return int(self._order[i])

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._index(index)]


@dataclasses.dataclass
class Mixture:
  """Named token splits mixed by weight. Weights are shares of target tokens (weight_unit "tokens") or of
  document pieces ("documents"); curriculum orders each source's pieces by a difficulty score per epoch."""

  splits: list[tokenized.TokenSplit]
  weights: list[float]
  weight_unit: str = "tokens"
  curriculum: str = "none"
  curriculum_stages: int = 4

  def __post_init__(self):
    if len(self.splits) != len(self.weights) or not self.splits:
      raise ValueError(f"{len(self.splits)} sources for {len(self.weights)} weights")
    if self.weight_unit not in WEIGHT_UNITS:
      raise ValueError(f"weight unit {self.weight_unit!r} is not one of {', '.join(WEIGHT_UNITS)}")
    if self.curriculum not in CURRICULA:
      raise ValueError(f"curriculum {self.curriculum!r} is not one of {', '.join(CURRICULA)}")
    if self.curriculum_stages < 1:
      raise ValueError(f"curriculum_stages must be >= 1, got {self.curriculum_stages}")
    total = sum(self.weights)
    self.weights = [w / total for w in self.weights]

  @property
  def names(self) -> list[str]:
    return [s.name for s in self.splits]

  def _scores(self, split: tokenized.TokenSplit, docs: np.ndarray) -> np.ndarray:
    if self.curriculum == "length":
      return split.lengths[docs].astype(np.float64)
    return split.lengths[docs] / np.maximum(split.text_bytes[docs], 1)  # tokens per byte

  def _source(self, i: int, *, seq_len: int, seed: int, shard_index: int, shard_count: int,
              num_epochs: int | None) -> tuple[grain.MapDataset, float]:
    """Source i's slice for one stream, ordered and repeated, and its mean target tokens per piece."""
    split = self.splits[i]
    ranges = chunk_ranges(split.lengths, seq_len)[shard_index::shard_count]
    if len(ranges) == 0:
      raise ValueError(f"source {split.name!r} has too few pieces of seq_len {seq_len} for {shard_count} streams")
    ds = grain.MapDataset.source(DocumentPieces(split, ranges))
    if self.curriculum == "none":
      ds = ds.shuffle(seed=(seed + 7919 * i) % 2**32)
    else:
      ds = StagedShuffle(ds, self._scores(split, ranges[:, 0]), self.curriculum_stages, seed + 7919 * i)
    return ds.repeat(num_epochs), float(np.mean(ranges[:, 2] - ranges[:, 1] - 1))

  def dataset(self, *, seq_len: int, rows: int, seed: int, num_packing_bins: int = 8, shard_index: int = 0,
              shard_count: int = 1, num_epochs: int | None = None) -> grain.IterDataset:
    """Stream `shard_index` of `shard_count`: each source's strided slice, mixed, packed into `rows`-row batches."""
    parts = [self._source(i, seq_len=seq_len, seed=seed, shard_index=shard_index, shard_count=shard_count,
                          num_epochs=num_epochs) for i in range(len(self.splits))]
    if len(parts) == 1:
      mixed = parts[0][0]
    else:
      # Mixing proportions count pieces; dividing by tokens per piece makes "tokens" weights token shares.
      per_piece = [w / (n if self.weight_unit == "tokens" else 1.0)
                   for w, (_, n) in zip(self.weights, parts, strict=True)]
      mixed = grain.MapDataset.mix([ds for ds, _ in parts], per_piece)
    return pack_batches(mixed, seq_len=seq_len, rows=rows, seed=seed, shuffle=True,
                        num_packing_bins=num_packing_bins)

  def iterator(self, *, seq_len: int, batch_size: int, seed: int, num_packing_bins: int = 8, shard_index: int = 0,
               shard_count: int = 1, num_epochs: int | None = None) -> grain.DatasetIterator:
    """Resumable iterator of this stream's [batch_size // shard_count, seq_len] batches (loader.BATCH_KEYS)."""
    if shard_count < 1 or not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
    if batch_size < 1 or batch_size % shard_count:
      raise ValueError(f"batch_size {batch_size} must be a positive multiple of shard_count {shard_count}")
    return iter(self.dataset(seq_len=seq_len, rows=batch_size // shard_count, seed=seed,
                             num_packing_bins=num_packing_bins, shard_index=shard_index, shard_count=shard_count,
                             num_epochs=num_epochs))


@dataclasses.dataclass
class TokenizedData:
  """What training needs from tokenized directories: the train mixture, eval documents and the tokenizer."""

  mixture: Mixture
  eval_splits: list[tokenized.TokenSplit]
  tokenizer: AnyTokenizer
  tokenizer_dir: pathlib.Path
  description: str
  # Nats/token of the train targets' unigram distribution, a loss baseline: the mixture-weighted mean of the
  # sources' (exact for one source, a lower bound for several); None for directories tokenized before it was kept.
  unigram_entropy: float | None = None
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # bad records skipped when tokenizing

  def eval_docs(self, max_tokens: int) -> TokenizedDocs:
    """Up to max_tokens of eval documents, taken round-robin from the sources (held in memory)."""
    docs, total = [], 0
    cursors = [0] * len(self.eval_splits)
    while total < max_tokens and any(c < len(s) for c, s in zip(cursors, self.eval_splits, strict=True)):
      for k, split in enumerate(self.eval_splits):
        if cursors[k] < len(split) and total < max_tokens:
          docs.append(split[cursors[k]])
          cursors[k] += 1
          total += len(docs[-1])
    if not docs:
      names = ", ".join(s.name for s in self.eval_splits)
      raise ValueError(f"sources {names} have no eval documents: re-tokenize with tokenize.eval_fraction > 0 "
                       "or more documents")
    return TokenizedDocs.from_documents(docs)


def load(dirs: str | Sequence[str], spec: str = "", *, weight_unit: str = "tokens", curriculum: str = "none",
         curriculum_stages: int = 4, verify_checksums: bool = False) -> TokenizedData:
  """Resolves `spec` (parse_mixture) against the sources of one or more `maxlm tokenize` directories.

  Sources are found by name across `dirs`, which must share one tokenizer. Shard sizes are always checked
  against the manifests; sha256 only with verify_checksums (it reads every shard).
  """
  if isinstance(dirs, str):
    dirs = [d.strip() for d in dirs.split(",") if d.strip()]
  if not dirs:
    raise ValueError("no tokenized directory given (data.tokenized)")
  where: dict[str, tuple[pathlib.Path, dict[str, Any]]] = {}
  tokenizer_sha, tokenizer_dir = None, None
  for d in dirs:
    root = pathlib.Path(d)
    manifest = tokenized.read_manifest(root)
    tokenized.verify(root, manifest, checksums=verify_checksums)
    sha = manifest["tokenizer"]["sha256"]
    if tokenizer_sha not in (None, sha):
      raise ValueError(f"{root} was tokenized with a different tokenizer than {dirs[0]} (sha256 {sha[:12]} vs "
                       f"{tokenizer_sha[:12]}); a mixture needs one vocabulary")
    tokenizer_sha, tokenizer_dir = sha, tokenizer_dir or root / manifest["tokenizer"]["dir"]
    for name in manifest["sources"]:
      if name in where:
        raise ValueError(f"source {name!r} is in both {where[name][0]} and {root}; rename one when tokenizing")
      where[name] = (root, manifest)
  weights = parse_mixture(spec)
  unknown = [n for n in weights if n not in where]
  if unknown:
    raise ValueError(f"mixture names unknown source(s) {', '.join(unknown)}; the tokenized data has "
                     f"{', '.join(where)}")
  if not weights:  # every source, in its natural proportion
    weights = {n: float(m["sources"][n]["splits"]["train"]["tokens"]) for n, (_, m) in where.items()}
    weight_unit = "tokens"
  splits = [tokenized.load_split(where[n][0], n, "train", where[n][1]) for n in weights]
  evals = [tokenized.load_split(where[n][0], n, "eval", where[n][1]) for n in weights]
  mixture = Mixture(splits, list(weights.values()), weight_unit=weight_unit, curriculum=curriculum,
                    curriculum_stages=curriculum_stages)
  tokenizer = load_tokenizer(tokenizer_dir)
  entries = [where[n][1]["sources"][n] for n in weights]
  entropies = [e["splits"]["train"].get("unigram_entropy") for e in entries]
  entropy = (None if None in entropies
             else float(sum(w * h for w, h in zip(mixture.weights, entropies, strict=True))))
  skipped: dict[str, int] = {}
  for e in entries:
    for reason, n in e.get("skipped", {}).items():
      skipped[reason] = skipped.get(reason, 0) + n
  shares = ", ".join(f"{s.name} {w:.0%} ({s.num_tokens:,} tokens)"
                     for s, w in zip(splits, mixture.weights, strict=True))
  description = (f"tokenized {', '.join(str(d) for d in dirs)}: {shares} by {weight_unit}"
                 f"{f', curriculum {curriculum} in {curriculum_stages} stages' if curriculum != 'none' else ''}; "
                 f"tokenizer vocab {tokenizer.vocab_size}")
  return TokenizedData(mixture, evals, tokenizer, tokenizer_dir, description, entropy, skipped)
