"""Streaming near-duplicate removal: an LSH index over MinHash signatures that keeps one document per cluster.

Clustering is greedy in stream order: a document joins the first-kept representative it matches (the best
verified match among the LSH candidates) or becomes a representative itself. Only representatives are indexed,
so a chain a ~ b ~ c with a !~ c keeps a and c (no transitive closure, unlike union-find over all pairs); this is
what a single streaming pass can do in memory bounded by the kept documents, never by their texts.

Memory per kept document (num_perm=128 with the recall-leaning 14 bands x 9 rows for threshold 0.8):
  signature  num_perm * 4 bytes (uint32, in a growable array; only with verify=True)   = 512 B
  doc id     8 bytes (int64, growable array)                                           =   8 B
  bands      one entry per band in a per-band dict {64-bit band key: row}; CPython costs ~100 B per entry
             (dict slot + index + a 64-bit int key object), i.e. ~16 B of payload with Python overhead
                                                                                      ~ 1.4 KB
`NearDupIndex.memory_bytes()` measures the actual figure; it does not depend on text length.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from data_pipelines.curate.minhash import lsh_params

_U64 = np.uint64


@dataclasses.dataclass
class DedupStats:
  """Counters of one index: documents seen / kept / dropped, and LSH candidates verified or rejected."""

  docs: int = 0
  kept: int = 0
  duplicates: int = 0
  candidates_checked: int = 0
  candidates_rejected: int = 0  # LSH candidates whose estimated Jaccard fell below the threshold


def _band_weights(rows: int) -> np.ndarray:
  """Fixed odd 64-bit multipliers combining a band's rows into one key (stable across processes)."""
  rng = np.random.default_rng(0x5EED_BA4D)
  return rng.integers(0, 1 << 63, size=rows, dtype=np.uint64) * _U64(2) + _U64(1)


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
  """64-bit key per band [..., bands] of uint32 signatures [..., num_perm]: a mixed linear hash of its rows."""
  sig = np.asarray(signatures)
  banded = sig[..., : bands * rows].reshape(*sig.shape[:-1], bands, rows).astype(_U64)
  keys = (banded * _band_weights(rows)).sum(axis=-1, dtype=_U64)  # wraps mod 2^64
  keys ^= keys >> _U64(31)
  keys *= _U64(0xBF58476D1CE4E5B9)
  keys ^= keys >> _U64(29)
  return keys


class NearDupIndex:
  """Streaming MinHash-LSH deduplicator: `add` keeps a document or names the kept document it duplicates.

  Documents whose bands collide with a kept document's are candidates; with verify=True a candidate is a
  duplicate only if the signature-estimated Jaccard is >= threshold (LSH false positives are then harmless,
  so recall-leaning band parameters are the default), otherwise any collision is a duplicate.
  """

  def __init__(self, num_perm: int, bands: int, rows: int, threshold: float, verify: bool = True):
    if bands * rows > num_perm:
      raise ValueError(f"bands * rows = {bands * rows} exceeds num_perm = {num_perm}")
    self.num_perm, self.bands, self.rows = num_perm, bands, rows
    self.threshold = threshold
    self.verify = verify
    self.stats = DedupStats()
    self._tables: list[dict[int, int | list[int]]] = [{} for _ in range(bands)]
    self._ids = np.empty(1024, dtype=np.int64)
    self._sigs = np.empty((1024 if verify else 0, num_perm), dtype=np.uint32)
    self._kept = 0

  @classmethod
  def for_threshold(cls, threshold: float, num_perm: int = 128, verify: bool = True) -> NearDupIndex:
    """Index with bands/rows from `lsh_params`, weighted 0.1 / 0.9 towards recall when candidates are verified."""
    weights = (0.1, 0.9) if verify else (0.5, 0.5)
    bands, rows = lsh_params(threshold, num_perm, *weights)
    return cls(num_perm, bands, rows, threshold, verify)

  def __len__(self) -> int:
    """Number of kept (representative) documents."""
    return self._kept

  def kept_ids(self) -> np.ndarray:
    """Ids of the kept documents, in the order they were kept."""
    return self._ids[: self._kept].copy()

  def add(self, doc_id: int, signature: np.ndarray, keys: np.ndarray | None = None) -> int | None:
    """Id of the kept document that doc_id near-duplicates, or None if doc_id is new (and is now kept)."""
    if keys is None:
      keys = band_keys(signature, self.bands, self.rows)
    key_list = keys.tolist()
    self.stats.docs += 1
    candidates: set[int] = set()
    for table, key in zip(self._tables, key_list, strict=True):
      hit = table.get(key)
      if hit is None:
        continue
      if isinstance(hit, int):
        candidates.add(hit)
      else:
        candidates.update(hit)
    if candidates:
      rows = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
      rows.sort()
      self.stats.candidates_checked += len(rows)
      if self.verify:
        similarity = (self._sigs[rows] == signature).mean(axis=1)
        best = int(np.argmax(similarity))  # first maximum: the earliest kept among equally similar
        self.stats.candidates_rejected += int(np.count_nonzero(similarity < self.threshold))
        if similarity[best] >= self.threshold:
          self.stats.duplicates += 1
          return int(self._ids[rows[best]])
      else:
        self.stats.duplicates += 1
        return int(self._ids[rows[0]])
    self._keep(doc_id, signature, key_list)
    return None

  def add_batch(self, doc_ids: np.ndarray, signatures: np.ndarray) -> list[int | None]:
    """`add` for many documents in order (band keys computed at once); returns each document's answer."""
    keys = band_keys(signatures, self.bands, self.rows)
    return [self.add(int(i), sig, k) for i, sig, k in zip(np.asarray(doc_ids).tolist(), signatures, keys, strict=True)]

  def _keep(self, doc_id: int, signature: np.ndarray, key_list: list[int]) -> None:
    """Store a new representative: its id, its signature (verify only) and one entry per band."""
    row = self._kept
    if row == len(self._ids):
      self._ids = np.concatenate((self._ids, np.empty_like(self._ids)))
      if self.verify:
        self._sigs = np.concatenate((self._sigs, np.empty_like(self._sigs)))
    self._ids[row] = doc_id
    if self.verify:
      self._sigs[row] = signature
    for table, key in zip(self._tables, key_list, strict=True):
      hit = table.get(key)
      if hit is None:
        table[key] = row
      elif isinstance(hit, int):
        table[key] = [hit, row]
      else:
        hit.append(row)
    self._kept += 1
    self.stats.kept += 1

  def kept_since(self, row: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, signatures) of the documents kept from row `row` on (what a resume log appends); verify only."""
    if not self.verify:
      raise ValueError("an index without verify keeps no signatures to save")
    return self._ids[row:self._kept].copy(), self._sigs[row:self._kept].copy()

  def restore(self, doc_ids: np.ndarray, signatures: np.ndarray) -> None:
    """Keeps documents saved by kept_since, in order, without checking them again (resuming an index)."""
    keys = band_keys(signatures, self.bands, self.rows)
    for doc_id, sig, k in zip(np.asarray(doc_ids).tolist(), signatures, keys, strict=True):
      self._keep(doc_id, sig, k.tolist())

  def memory_bytes(self) -> int:
    """Bytes held by the index: used id/signature rows plus the band dicts with their keys and buckets."""
    total = self._kept * (self._ids.itemsize + (self.num_perm * 4 if self.verify else 0))
    for table in self._tables:
      total += sys.getsizeof(table)
      for key, hit in table.items():
        total += sys.getsizeof(key) + (0 if isinstance(hit, int) else sys.getsizeof(hit))
    return total


def deduplicate(signatures: np.ndarray, threshold: float, verify: bool = True) -> np.ndarray:
  """Representative id (row index) per row of signatures [n, num_perm], greedy in row order; kept rows map to self."""
  index = NearDupIndex.for_threshold(threshold, signatures.shape[1], verify)
  answers = index.add_batch(np.arange(len(signatures)), signatures)
  return np.array([row if rep is None else rep for row, rep in enumerate(answers)], dtype=np.int64)
