"""MinHash signatures of hashed shingles, and LSH banding parameters, for near-duplicate detection.

Everything is vectorised numpy over uint64 with deliberate wrap-around (mod 2^64) arithmetic, and every hash
is stable across processes and machines (no salted Python hash(), no per-shingle hashlib calls).

Hash family: Dietzfelbinger's multiply-add-shift, h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32 for 32-bit keys x
(the top 32 bits of a shingle's 64-bit hash) and uniform 64-bit a_i, b_i. It is strongly universal from 32 to 32
bits, costs two array passes per (permutation, shingle) (numpy's uint64 multiply wraps mod 2^64), and the
minimum of the 64-bit values has the minimal top 32 bits, so signatures are uint32 minima taken before the
shift. (A Mersenne-prime (a*x + b) mod (2^61 - 1) family, as in datasketch, needs ~11 passes done exactly.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

_U64 = np.uint64
# Odd 64-bit constants: byte polynomial base, n-gram combiner, token-length salt (digits of pi / golden ratio).
_BYTE_BASE = _U64(0x9E3779B97F4A7C15)
_NGRAM_BASE = _U64(0xC2B2AE3D27D4EB4F)
_LEN_SALT = _U64(0x243F6A8885A308D3)
_WORD = re.compile(r"\w+")
# Shingles hashed per chunk in MinHasher: bounds the scratch buffers to num_perm * _CHUNK * 8 bytes each.
_CHUNK = 1024
EMPTY_VALUE = np.uint32(0xFFFFFFFF)  # Signature value of a document without shingles (min over nothing).

_byte_powers = np.ones(1, dtype=_U64)
_word_table: np.ndarray | None = None


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


def _word_code_points() -> np.ndarray:
  """[0x110000] bool: the code points that re's \\w matches, found by the regex itself so the two always agree."""
  global _word_table
  if _word_table is None:
    found = "".join(_WORD.findall("".join(map(chr, range(0x110000)))))
    table = np.zeros(0x110000, dtype=bool)
    table[np.frombuffer(found.encode("utf-32-le"), dtype=np.uint32)] = True
    _word_table = table
  return _word_table


def _word_bytes(buf: np.ndarray) -> np.ndarray:
  """Per byte of UTF-8 text: is it part of a \\w character? (Table lookups, no regex: ~10x faster than re.sub.)"""
  table = _word_code_points()
  word = table[:256][buf]
  word[buf >= 0x80] = False  # bytes of multi-byte characters are classified by their code point below
  leads = np.flatnonzero(buf >= 0xC0)
  if len(leads) == 0:
    return word
  padded = np.concatenate((buf, np.zeros(3, dtype=np.uint8))).astype(np.uint32)
  b0, b1, b2, b3 = padded[leads], padded[leads + 1] & 0x3F, padded[leads + 2] & 0x3F, padded[leads + 3] & 0x3F
  points = np.where(b0 < 0xE0, ((b0 & 0x1F) << 6) | b1,
                    np.where(b0 < 0xF0, ((b0 & 0x0F) << 12) | (b1 << 6) | b2,
                             ((b0 & 0x07) << 18) | (b1 << 12) | (b2 << 6) | b3))
  width = 2 + (b0 >= 0xE0) + (b0 >= 0xF0)
  word[buf >= 0x80] = np.repeat(table[points], width)  # every byte >= 0x80 belongs to one multi-byte character
  return word


def _word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """64-bit hashes of the lowercased \\w+ words of all texts, concatenated in order, and the word count per text.

  One vectorised pass over the lowercased texts' UTF-8 bytes joined by NUL (a \\W character, so a word never
  spans two texts): no Python loop over words and no regex (a re.sub over the text costs more than all the rest).
  """
  encoded = [text.lower().encode("utf-8", "surrogatepass") for text in texts]  # lone surrogates are \\W too
  sizes = np.array([len(e) for e in encoded], dtype=np.int64)
  buf = np.frombuffer(b"\0".join(encoded), dtype=np.uint8)
  at = np.flatnonzero(_word_bytes(buf))
  if len(at) == 0:
    return np.empty(0, dtype=_U64), np.zeros(len(texts), dtype=np.int64)
  breaks = np.flatnonzero(np.diff(at) != 1) + 1  # word starts (after the first) among the word bytes
  starts = np.concatenate(([0], breaks))
  lengths = np.diff(np.concatenate((starts, [len(at)])))
  pos = np.arange(len(at)) - np.repeat(starts, lengths)
  values = buf[at].astype(_U64)
  values += _U64(1)
  values *= _powers(int(lengths.max()))[pos]
  hashes = np.add.reduceat(values, starts)  # polynomial hash of each word's bytes, mod 2^64
  hashes += lengths.astype(_U64) * _LEN_SALT
  text_starts = np.cumsum(sizes + 1) - sizes - 1  # offset of each text in buf
  text_of_word = np.searchsorted(text_starts, at[starts], side="right") - 1
  return _splitmix64(hashes), np.bincount(text_of_word, minlength=len(texts))


def _char_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """64-bit hashes of the code points of all texts (lowercased, whitespace runs collapsed), and counts per text."""
  norms = [" ".join(text.lower().split()) for text in texts]  # str.split's whitespace is re's \\s
  points = np.frombuffer("".join(norms).encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(_U64)
  return _splitmix64(points), np.array([len(n) for n in norms], dtype=np.int64)


def shingle_hashes(
  texts: Sequence[str], size: int = 5, unit: Literal["word", "char"] = "word"
) -> tuple[np.ndarray, np.ndarray]:
  """Shingle hashes of many texts in one vectorised pass: (hashes, count per text), texts' shingles in order.

  A text's hashes are its shingle set with repeats (in text order); `shingles()` gives the sorted distinct set.
  Repeats do not change a MinHash signature, so `MinHasher.signatures_flat` takes these hashes as they are.
  """
  if size < 1:
    raise ValueError(f"shingle size must be >= 1, got {size}")
  if unit == "word":
    units, counts = _word_hashes(texts)
  elif unit == "char":
    units, counts = _char_hashes(texts)
  else:
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
  ends = np.cumsum(counts)
  long = counts >= size  # texts with full windows; shorter non-empty texts have one shingle of all their units
  gram_counts = np.where(long, counts - size + 1, np.minimum(counts, 1))
  out = np.empty(int(gram_counts.sum()), dtype=_U64)
  from_long = np.repeat(long, gram_counts)
  if len(units) >= size:
    count = len(units) - size + 1
    grams = units[:count].copy()
    for offset in range(1, size):
      grams *= _NGRAM_BASE
      grams += units[offset:offset + count]
    inside = np.arange(count) + size <= np.repeat(ends, counts)[:count]  # window ends within its own text
    out[from_long] = grams[inside] + _U64(size)
  short = np.flatnonzero(~long & (counts > 0))
  if len(short):
    lengths, first = counts[short], (ends - counts)[short]
    grams = units[first]
    for offset in range(1, int(lengths.max())):
      more = lengths > offset
      grams[more] = grams[more] * _NGRAM_BASE + units[first[more] + offset]
    out[~from_long] = grams + lengths.astype(_U64)
  return _splitmix64(out), gram_counts


def shingles_batch(texts: Sequence[str], size: int = 5, unit: Literal["word", "char"] = "word") -> list[np.ndarray]:
  """`shingles()` of every text, computed in one vectorised pass (much faster than one call per text)."""
  hashes, counts = shingle_hashes(texts, size, unit)
  if len(counts) == 0:
    return []
  return [np.unique(part) for part in np.split(hashes, np.cumsum(counts)[:-1])]


def shingles(text: str, size: int = 5, unit: Literal["word", "char"] = "word") -> np.ndarray:
  """Sorted distinct 64-bit hashes of text's `size`-grams of words (or characters): its shingle set.

  Words are lowercased \\w+ runs; characters are code points after lowercasing and collapsing whitespace.
  Empty (or punctuation-only, for words) text has no shingles; a text with fewer than `size` units has one
  shingle covering all of them, so short texts still compare equal to themselves and to nothing else.
  """
  return shingles_batch([text], size, unit)[0]


class MinHasher:
  """num_perm independent multiply-add-shift hash functions; signatures are per-function minima (uint32).

  Holds a reusable scratch buffer (num_perm x 1024 x 8 bytes), so one instance is not thread-safe.
  """

  def __init__(self, num_perm: int = 128, seed: int = 0):
    if num_perm < 1:
      raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    self.num_perm = num_perm
    self.seed = seed
    rng = np.random.default_rng(seed)
    self.a = rng.integers(0, 1 << 64, size=num_perm, dtype=np.uint64, endpoint=False)
    self.b = rng.integers(0, 1 << 64, size=num_perm, dtype=np.uint64, endpoint=False)
    self._a, self._b = self.a[:, None], self.b[:, None]
    self._scratch: np.ndarray | None = None

  def _hash_chunk(self, x: np.ndarray) -> np.ndarray:
    """[num_perm, len(x)] values (a*x + b) mod 2^64 for 32-bit keys x (in scratch space); top 32 bits = hash."""
    if self._scratch is None:
      self._scratch = np.empty(self.num_perm * _CHUNK, dtype=_U64)
    s = self._scratch[: self.num_perm * len(x)].reshape(self.num_perm, len(x))
    np.multiply(self._a, x, out=s)  # wraps mod 2^64
    s += self._b
    return s

  @staticmethod
  def _finish(minima: np.ndarray) -> np.ndarray:
    """The top 32 bits of the 64-bit minima: the minima of the hash values, as uint32."""
    return (minima >> _U64(32)).astype(np.uint32)

  def signature(self, shingle_hashes: np.ndarray) -> np.ndarray:
    """MinHash signature [num_perm] uint32 of one shingle set (all EMPTY_VALUE when it is empty)."""
    hashes = np.asarray(shingle_hashes, dtype=_U64)
    return self.signatures_flat(hashes, np.array([len(hashes)]))[0]

  def signatures(self, shingle_sets: Sequence[np.ndarray]) -> np.ndarray:
    """Signatures [len(shingle_sets), num_perm] uint32 of many shingle sets, hashed in shared chunks (faster)."""
    counts = np.array([len(s) for s in shingle_sets], dtype=np.int64)
    flat = np.concatenate([np.asarray(s, dtype=_U64) for s in shingle_sets]) if len(counts) else np.empty(0, _U64)
    return self.signatures_flat(flat, counts)

  def signatures_flat(self, hashes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Signatures [len(counts), num_perm] of consecutive runs of `counts` shingle hashes (as `shingle_hashes` gives).

    Runs are packed into shared chunks of <= 1024 keys (one reduceat per chunk); longer runs are hashed alone in
    pieces. A run may repeat hashes (the minimum is the same); an empty run gets EMPTY_VALUE.
    """
    counts = np.asarray(counts, dtype=np.int64)
    x = np.asarray(hashes, dtype=_U64) >> _U64(32)
    out = np.full((len(counts), self.num_perm), EMPTY_VALUE, dtype=np.uint32)
    rows = np.flatnonzero(counts)
    ends = np.cumsum(counts)[rows]
    starts = ends - counts[rows]
    i = 0
    while i < len(rows):
      lo, hi = int(starts[i]), int(ends[i])
      if hi - lo > _CHUNK:  # alone, in pieces
        minima = self._hash_chunk(x[lo:lo + _CHUNK]).min(axis=1)
        for piece in range(lo + _CHUNK, hi, _CHUNK):
          np.minimum(minima, self._hash_chunk(x[piece:min(piece + _CHUNK, hi)]).min(axis=1), out=minima)
        out[rows[i]] = self._finish(minima)
        i += 1
        continue
      j = int(np.searchsorted(ends, lo + _CHUNK, side="right"))  # runs i..j-1 end within this chunk
      hashed = self._hash_chunk(x[lo:int(ends[j - 1])])
      out[rows[i:j]] = self._finish(np.minimum.reduceat(hashed, starts[i:j] - lo, axis=1).T)
      i = j
    return out

  def text_signatures(
    self, texts: Sequence[str], size: int = 5, unit: Literal["word", "char"] = "word"
  ) -> np.ndarray:
    """Signatures [len(texts), num_perm] of the texts' shingle sets: `shingle_hashes` + `signatures_flat`."""
    return self.signatures_flat(*shingle_hashes(texts, size, unit))


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

