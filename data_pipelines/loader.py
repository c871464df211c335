"""Packed next-token batches: documents cut into pieces, first-fit packed by grain, drawn as resumable streams."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import grain
import numpy as np

# Every batch holds these keys, each int32 [rows, seq_len].
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")


@dataclasses.dataclass
class TokenizedDocs:
  """Documents as one flat int32 token array plus int64 offsets (a grain random-access source)."""

  tokens: np.ndarray  # int32 [num_tokens]
  offsets: np.ndarray  # int64 [num_docs + 1]; document i is tokens[offsets[i]:offsets[i + 1]]

  def __post_init__(self):
    self.tokens = np.asarray(self.tokens, dtype=np.int32)
    self.offsets = np.asarray(self.offsets, dtype=np.int64)
    if (self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0
        or self.offsets[-1] != len(self.tokens) or np.any(np.diff(self.offsets) < 0)):
      raise ValueError(f"offsets must rise from 0 to {len(self.tokens)} (the token count), "
                       f"got {len(self.offsets)} offsets ending at {self.offsets[-1:]}")

  @classmethod
  def from_documents(cls, docs: Iterable[Sequence[int]]) -> TokenizedDocs:
    """Packs per-document token lists into the flat layout."""
    arrays = [np.asarray(d, dtype=np.int32) for d in docs]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
    return cls(tokens, offsets)

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> np.ndarray:
    if not -len(self) <= i < len(self):
      raise IndexError(f"document {i} out of range for {len(self)} documents")
    i %= len(self)
    return self.tokens[self.offsets[i]:self.offsets[i + 1]]

  @property
  def num_tokens(self) -> int:
    return len(self.tokens)



def entropy_of_counts(counts: np.ndarray) -> float:
  """Entropy (nats) of the distribution that token counts describe; 0 for no tokens."""
  counts = np.asarray(counts, dtype=np.float64)
  total = counts.sum()
  if total == 0:
    return 0.0
  p = counts[counts > 0] / total
  return float(-(p * np.log(p)).sum())


def unigram_entropy(docs: TokenizedDocs, vocab_size: int) -> float:
  """Entropy (nats) of the predicted-token distribution: all tokens but each document's first."""
  first = np.zeros(len(docs.tokens), dtype=bool)
  first[docs.offsets[:-1][np.diff(docs.offsets) > 0]] = True
  return entropy_of_counts(np.bincount(docs.tokens[~first], minlength=vocab_size))


def chunk_ranges(lengths: np.ndarray, seq_len: int) -> np.ndarray:
  """[num_chunks, 3] (document, start, end): each document of `lengths` tokens cut into pieces of <= seq_len + 1
  tokens overlapping by one, so every token after a document's first is a target exactly once."""
  lengths = np.asarray(lengths, dtype=np.int64)
  num_chunks = np.where(lengths >= 2, (lengths - 1 + seq_len - 1) // seq_len, 0)
  doc = np.repeat(np.arange(len(lengths)), num_chunks)
  first_chunk = np.cumsum(num_chunks) - num_chunks
  k = np.arange(len(doc), dtype=np.int64) - np.repeat(first_chunk, num_chunks)
  starts = k * seq_len
  ends = np.minimum(starts + seq_len + 1, lengths[doc])
  return np.stack([doc, starts, ends], axis=1)


class DocumentPieces:
  """Random-access {"inputs", "targets"} pieces, by chunk_ranges(), of any random-access source of documents
  (TokenizedDocs in memory, a tokenized.TokenSplit on disk)."""

  def __init__(self, docs: Any, ranges: np.ndarray):
    self._docs, self._ranges = docs, ranges
    self._doc, self._tokens = -1, None  # the last document read: its other pieces usually follow

  def __len__(self) -> int:
    return len(self._ranges)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    doc, start, end = (int(v) for v in self._ranges[i])
    if doc != self._doc:
      self._doc, self._tokens = doc, self._docs[doc]
    chunk = self._tokens[start:end]
    return {"inputs": chunk[:-1], "targets": chunk[1:]}


class _ToBatch(grain.transforms.Map):
  """Renames packer outputs to maxlm's batch keys and pads a short final batch with empty rows."""

  def __init__(self, rows: int, loss_mask: bool = False):
    self._rows, self._loss_mask = rows, loss_mask

  def map(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys, names = BATCH_KEYS, ("inputs", "targets", "inputs_segment_ids", "inputs_positions")
    if self._loss_mask:
      keys, names = (*keys, "loss_mask"), (*names, "loss_mask")
    short = self._rows - packed["inputs"].shape[0]
    batch = {}
    for key, name in zip(keys, names, strict=True):
      v = packed[name].astype(np.int32, copy=False)
      batch[key] = np.pad(v, ((0, short), (0, 0))) if short else v
    return batch


def pack_batches(ds: grain.MapDataset, *, seq_len: int, rows: int, seed: int, shuffle: bool,
                 num_packing_bins: int, loss_mask: bool = False) -> grain.IterDataset:
  """{"inputs", "targets"} pieces of <= seq_len tokens -> first-fit packed batches of `rows` rows (BATCH_KEYS).

  With loss_mask, pieces also carry "loss_mask" (1 where the target is trained on, as long as "targets"), and the
  batches an int32 "loss_mask" (0 on padding).
  """
  if seq_len < 1 or num_packing_bins < 1:
    raise ValueError(
        f"seq_len and num_packing_bins must be >= 1, got {seq_len} and {num_packing_bins}")
  # Pieces are in-memory slices or single-record reads: reader threads would only contend for the GIL.
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  lengths = {"inputs": seq_len, "targets": seq_len, **({"loss_mask": seq_len} if loss_mask else {})}
  it_ds = grain.experimental.FirstFitPackIterDataset(
      it_ds, length_struct=lengths, num_packing_bins=num_packing_bins, seed=seed, shuffle_bins=shuffle)
  return it_ds.batch(rows, drop_remainder=False).map(_ToBatch(rows, loss_mask))


ELASTIC_STREAMS = 8  # default stream count: a run resumes on 1, 2, 4 or 8 hosts (when the batch divides)


def default_streams(batch_size: int, process_count: int) -> int:
  """Streams for data.loader_streams=0: lcm(8, processes) if the batch divides into them, else one per process."""
  streams = math.lcm(ELASTIC_STREAMS, process_count)
  return streams if batch_size % streams == 0 else process_count


class HostBatches:
  """This process's rows of every global batch, drawn from `num_streams` independent packed streams.

  The global batch is the rows of streams 0..num_streams-1 in order, however many processes there are:
  process p reads streams p, p + P, ... (P = process_count must divide num_streams). So 1, 2 or 4
  processes see the same data, and the position of every stream (`get_state`, gathered across processes)
  restores onto any such process count. `docs` is a `mixture.Mixture` of token shards (anything with its
  `iterator`).
  """

  def __init__(self, docs: Any, *, seq_len: int, batch_size: int, seed: int, num_packing_bins: int,
               num_streams: int, process_index: int = 0, process_count: int = 1):
    if num_streams < 1 or num_streams % process_count:
      raise ValueError(f"{num_streams} data streams cannot be split evenly over {process_count} processes")
    if batch_size % num_streams:
      raise ValueError(f"batch_size {batch_size} is not divisible by the {num_streams} data streams")
    self.num_streams = num_streams
    self.streams = list(range(process_index, num_streams, process_count))
    self._its = {j: docs.iterator(seq_len=seq_len, batch_size=batch_size, seed=seed, num_packing_bins=num_packing_bins,
                         shard_index=j, shard_count=num_streams)
                 for j in self.streams}

  def __iter__(self) -> HostBatches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(self._its[j]) for j in self.streams]
    return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict[str, Any]:
    """This process's streams' positions, keyed by stream index (merge every process's for a checkpoint)."""
    return {str(j): self._its[j].get_state() for j in self.streams}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores this process's streams from a merged state of all streams."""
    missing = [j for j in self.streams if str(j) not in state]
    if missing:
      raise ValueError(f"the data state holds streams {sorted(state, key=int)}, not {missing}: it was saved with "
                       f"a different data.loader_streams")
    for j in self.streams:
      self._its[j].set_state(state[str(j)])


def make_eval_batches(docs: TokenizedDocs, *, seq_len: int, batch_size: int, num_batches: int,
                      num_packing_bins: int = 8) -> list[dict[str, np.ndarray]]:
  """The first num_batches packed batches of docs in order (no shuffle), cycling if docs run out."""
  if len(docs) == 0:
    raise ValueError("cannot make eval batches from 0 documents")
  ds = grain.MapDataset.source(DocumentPieces(docs, chunk_ranges(np.diff(docs.offsets), seq_len))).repeat(None)
  it = iter(pack_batches(ds, seq_len=seq_len, rows=batch_size, seed=0, shuffle=False,
                         num_packing_bins=num_packing_bins))
  return [next(it) for _ in range(num_batches)]
