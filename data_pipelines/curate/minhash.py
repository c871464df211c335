"""MinHash signatures of hashed shingles, and LSH banding parameters, for near-duplicate detection.

Everything is vectorised numpy over uint64 with deliberate wrap-around (mod 2^64) arithmetic, and every hash
is stable across processes and machines (no salted Python hash(), no per-shingle hashlib calls).

Hash family: h_i(x) = (a_i * x + b_i) mod p with the Mersenne prime p = 2^61 - 1, a_i in [1, p), b_i in [0, p),
and 32-bit keys x (the top 32 bits of a shingle's 64-bit hash). a*x is up to 93 bits, so it is never formed
directly (datasketch does form it and lets it wrap mod 2^64 before "% p", which is not the textbook family).
Instead a = a_hi * 2^32 + a_lo and, using 2^61 = 1 (mod p):
  a_lo * x            < 2^64                       -> folded as (u & p) + (u >> 61)
  a_hi * x * 2^32,  v = a_hi * x < 2^61            -> = (v >> 29) * 2^61 + (v & (2^29-1)) * 2^32
                                                   = (v >> 29) + ((v & (2^29-1)) << 32)   (mod p)
The sum of those terms and b is < 2^63, so it never overflows; one more fold and a conditional subtract give
the exact residue in [0, p). The minimum over a document's shingles is kept as its top 32 bits (uint32), which
preserves the order (shift is monotone) and halves signature memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

_U64 = np.uint64
MERSENNE_61 = (1 << 61) - 1
_P = _U64(MERSENNE_61)
_MASK29 = _U64((1 << 29) - 1)
_MASK32 = _U64(0xFFFFFFFF)
# Odd 64-bit constants: byte polynomial base, n-gram combiner, token-length salt (digits of pi / golden ratio).
_BYTE_BASE = _U64(0x9E3779B97F4A7C15)
_NGRAM_BASE = _U64(0xC2B2AE3D27D4EB4F)
_LEN_SALT = _U64(0x243F6A8885A308D3)
_NON_WORD = re.compile(r"\W+")
_WHITESPACE = re.compile(r"\s+")
# Shingles hashed per chunk in MinHasher: bounds the scratch buffers to num_perm * _CHUNK * 8 bytes each.
_CHUNK = 2048
EMPTY_VALUE = np.uint32(0xFFFFFFFF)  # Signature value of a document without shingles (min over nothing).

_byte_powers = np.ones(1, dtype=_U64)


def _splitmix64(z: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser on a uint64 array: a bijective avalanche mix (wraps mod 2^64 by design)."""
  z = z ^ (z >> _U64(30))
  z *= _U64(0xBF58476D1CE4E5B9)
  z ^= z >> _U64(27)
  z *= _U64(0x94D049BB133111EB)
  z ^= z >> _U64(31)
  return z


def _powers(n: int) -> np.ndarray:
  """_BYTE_BASE**i mod 2^64 for i < n (cached, grown on demand)."""
  global _byte_powers
  if len(_byte_powers) < n:
    size = max(n, 2 * len(_byte_powers), 64)
    powers = np.empty(size, dtype=_U64)
    powers[0] = 1
    np.multiply.accumulate(np.full(size - 1, _BYTE_BASE, dtype=_U64), out=powers[1:])
    _byte_powers = powers
  return _byte_powers[:n]


def _word_hashes(text: str) -> np.ndarray:
  """64-bit hashes of the lowercased \\w+ words of text, in order, without a Python loop over words."""
  norm = _NON_WORD.sub(" ", text.lower()).strip()
  if not norm:
    return np.empty(0, dtype=_U64)
  buf = np.frombuffer(norm.encode("utf-8"), dtype=np.uint8)
  is_space = buf == 32
  starts = np.concatenate(([0], np.flatnonzero(is_space) + 1))
  lengths = np.diff(np.concatenate((starts, [len(buf) + 1]))) - 1
  token = np.cumsum(is_space)  # a separator byte belongs to the next word, with value 0 below
  pos = np.arange(len(buf)) - starts[token]
  np.maximum(pos, 0, out=pos)
  values = buf.astype(_U64) + _U64(1)
  values[is_space] = 0
  values *= _powers(int(lengths.max()))[pos]
  hashes = np.add.reduceat(values, starts)  # polynomial hash of each word's bytes, mod 2^64
  hashes += lengths.astype(_U64) * _LEN_SALT
  return _splitmix64(hashes)


def _char_hashes(text: str) -> np.ndarray:
  """64-bit hashes of the code points of text, lowercased with whitespace runs collapsed to one space."""
  norm = _WHITESPACE.sub(" ", text.lower()).strip()
  if not norm:
    return np.empty(0, dtype=_U64)
  return _splitmix64(np.frombuffer(norm.encode("utf-32-le"), dtype=np.uint32).astype(_U64))


def shingles(text: str, size: int = 5, unit: Literal["word", "char"] = "word") -> np.ndarray:
  """Sorted distinct 64-bit hashes of text's `size`-grams of words (or characters): its shingle set.

  Words are lowercased \\w+ runs; characters are code points after lowercasing and collapsing whitespace.
  Empty (or punctuation-only, for words) text has no shingles; a text with fewer than `size` units has one
  shingle covering all of them, so short texts still compare equal to themselves and to nothing else.
  """
  if size < 1:
    raise ValueError(f"shingle size must be >= 1, got {size}")
  if unit == "word":
    units = _word_hashes(text)
  elif unit == "char":
    units = _char_hashes(text)
  else:
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
  if len(units) == 0:
    return units
  size = min(size, len(units))
  count = len(units) - size + 1
  grams = units[:count].copy()
  for offset in range(1, size):
    grams *= _NGRAM_BASE
    grams += units[offset:offset + count]
  grams += _U64(size)
  return np.unique(_splitmix64(grams))


class MinHasher:
  """num_perm independent (a*x + b) mod (2^61 - 1) hash functions; signatures are per-function minima (uint32).

  Holds reusable scratch buffers (3 x num_perm x 2048 x 8 bytes), so one instance is not thread-safe.
  """

  def __init__(self, num_perm: int = 128, seed: int = 0):
    if num_perm < 1:
      raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    self.num_perm = num_perm
    self.seed = seed
    rng = np.random.default_rng(seed)
    self.a = rng.integers(1, MERSENNE_61, size=num_perm, dtype=np.uint64)
    self.b = rng.integers(0, MERSENNE_61, size=num_perm, dtype=np.uint64)
    self._a_lo = (self.a & _MASK32)[:, None]
    self._a_hi = (self.a >> _U64(32))[:, None]
    self._b = self.b[:, None]
    self._scratch: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

  def _hash_min_chunk(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """[num_perm, len(x)] exact residues (a*x + b) mod p for 32-bit keys x, computed in place in scratch."""
    if self._scratch is None:
      self._scratch = tuple(np.empty(self.num_perm * _CHUNK, dtype=_U64) for _ in range(3))
    shape = (self.num_perm, len(x))
    size = shape[0] * shape[1]
    u, v, s = (buf[:size].reshape(shape) for buf in self._scratch)
    np.multiply(self._a_lo, x, out=u)  # < 2^64
    np.multiply(self._a_hi, x, out=v)  # < 2^61
    np.bitwise_and(u, _P, out=s)
    u >>= _U64(61)
    s += u
    s += self._b
    np.bitwise_and(v, _MASK29, out=u)
    u <<= _U64(32)
    s += u
    v >>= _U64(29)
    s += v  # < 2^63: no overflow
    np.right_shift(s, _U64(61), out=u)
    s &= _P
    s += u  # < p + 4
    return s

  @staticmethod
  def _finish(minima: np.ndarray) -> np.ndarray:
    """Reduce minima in [0, p + 4) to [0, p) and keep their top 32 bits as uint32."""
    minima = np.minimum(minima, minima - _P)  # wraps to a huge value unless minima >= p
    return (minima >> _U64(29)).astype(np.uint32)

  def signature(self, shingle_hashes: np.ndarray) -> np.ndarray:
    """MinHash signature [num_perm] uint32 of one shingle set (all EMPTY_VALUE when it is empty)."""
    x = np.asarray(shingle_hashes, dtype=_U64) >> _U64(32)
    if len(x) == 0:
      return np.full(self.num_perm, EMPTY_VALUE, dtype=np.uint32)
    minima = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=_U64)
    for start in range(0, len(x), _CHUNK):
      np.minimum(minima, self._hash_min_chunk(x[start:start + _CHUNK]).min(axis=1), out=minima)
    return self._finish(minima)

  def signatures(self, shingle_sets: Sequence[np.ndarray]) -> np.ndarray:
    """Signatures [len(shingle_sets), num_perm] uint32 of many shingle sets, hashed in shared chunks (faster)."""
    out = np.full((len(shingle_sets), self.num_perm), EMPTY_VALUE, dtype=np.uint32)
    pending: list[tuple[int, np.ndarray]] = []
    pending_size = 0

    def flush() -> None:
      nonlocal pending_size
      if not pending:
        return
      rows = [row for row, _ in pending]
      keys = np.concatenate([x for _, x in pending])
      offsets = np.cumsum([0] + [len(x) for _, x in pending[:-1]])
      hashed = self._hash_min_chunk(keys)
      out[rows] = self._finish(np.minimum.reduceat(hashed, offsets, axis=1).T)
      pending.clear()
      pending_size = 0

    for row, shingle_hashes in enumerate(shingle_sets):
      if len(shingle_hashes) == 0:
        continue
      if len(shingle_hashes) > _CHUNK:
        out[row] = self.signature(shingle_hashes)
        continue
      if pending_size + len(shingle_hashes) > _CHUNK:
        flush()
      pending.append((row, np.asarray(shingle_hashes, dtype=_U64) >> _U64(32)))
      pending_size += len(shingle_hashes)
    flush()
    return out


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
  """Estimated Jaccard similarity of two shingle sets: the fraction of equal MinHash signature entries."""
  if sig_a.shape != sig_b.shape:
    raise ValueError(f"signature shapes differ: {sig_a.shape} vs {sig_b.shape}")
  return float(np.mean(sig_a == sig_b))


def exact_jaccard(set_a: np.ndarray, set_b: np.ndarray) -> float:
  """Exact Jaccard similarity of two shingle sets given as distinct hash arrays (1.0 for two empty sets)."""
  union = len(np.union1d(set_a, set_b))
  return 1.0 if union == 0 else len(np.intersect1d(set_a, set_b, assume_unique=True)) / union


def candidate_probability(similarity: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
  """LSH S-curve: probability that two sets of this Jaccard similarity share at least one of `bands` bands."""
  return 1.0 - (1.0 - np.power(similarity, rows)) ** bands


def lsh_params(
  threshold: float,
  num_perm: int,
  false_positive_weight: float = 0.5,
  false_negative_weight: float = 0.5,
) -> tuple[int, int]:
  """(bands, rows) with bands*rows <= num_perm minimising the weighted false-positive + false-negative areas.

  False positives: integral over s in [0, threshold] of the candidate probability; false negatives: integral
  over s in [threshold, 1] of its complement. Both are computed for every (bands, rows) pair at once.
  """
  if not 0.0 < threshold < 1.0:
    raise ValueError(f"threshold must be in (0, 1), got {threshold}")
  pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=np.float64)
  bands, rows = pairs[:, :1], pairs[:, 1:]
  steps = 512

  def area(lo: float, hi: float, false_negative: bool) -> np.ndarray:
    s = np.linspace(lo, hi, steps + 1)[None, :]
    p = candidate_probability(s, bands, rows)
    y = 1.0 - p if false_negative else p
    return (y[:, :-1] + y[:, 1:]).sum(axis=1) * (hi - lo) / (2 * steps)

  cost = false_positive_weight * area(0.0, threshold, False) + false_negative_weight * area(threshold, 1.0, True)
  best = int(np.argmin(cost))
  return int(pairs[best, 0]), int(pairs[best, 1])


def threshold_estimate(bands: int, rows: int) -> float:
  """Similarity near which the S-curve rises through ~0.5: (1/bands)^(1/rows)."""
  return math.pow(1.0 / bands, 1.0 / rows)
