"""MinHash + LSH near-duplicate removal: estimator accuracy, band parameters, planted duplicates, streaming, memory."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import sysconfig

import datasketch
import numpy as np
import pytest

from data_pipelines.curate.dedup import NearDupIndex, band_keys, deduplicate
from data_pipelines.curate.minhash import (
  EMPTY_VALUE,
  MinHasher,
  candidate_probability,
  exact_jaccard,
  jaccard_estimate,
  lsh_params,
  shingle_hashes,
  shingles,
  shingles_batch,
)

_DOC_WORDS = 300
_LEVELS = (0.95, 0.9, 0.8, 0.55, 0.3)


def _real_documents(count: int) -> list[list[str]]:
  """`count` real, mutually dissimilar documents of 300 words: windows of the Python standard library's sources."""
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  docs: list[list[str]] = []
  owners: dict[int, int] = {}  # shingle -> first doc holding it, to reject base docs overlapping earlier ones
  for path in sorted(stdlib.glob("*.py")):
    words = re.findall(r"\w+", path.read_text(encoding="utf-8", errors="replace"))
    for start in range(0, len(words) - _DOC_WORDS + 1, _DOC_WORDS):
      doc = words[start:start + _DOC_WORDS]
      sh = shingles(" ".join(doc)).tolist()
      shared = sum(1 for s in sh if s in owners)
      if shared > 0.05 * len(sh):
        continue
      for s in sh:
        owners.setdefault(s, len(docs))
      docs.append(doc)
      if len(docs) == count:
        return docs
  raise AssertionError(f"only {len(docs)} documents found under {stdlib}")


def _mutate_to(words: list[str], target: float, rng: np.random.Generator) -> tuple[str, float]:
  """Text made from words by replacing words at random until one more edit would drop the Jaccard below target."""
  original = shingles(" ".join(words))
  current = list(words)
  similarity = 1.0
  while True:
    trial = list(current)
    trial[int(rng.integers(len(trial)))] = f"planted{int(rng.integers(1 << 40))}"
    trial_similarity = exact_jaccard(original, shingles(" ".join(trial)))
    if trial_similarity < target:
      return " ".join(current), similarity
    current, similarity = trial, trial_similarity


@pytest.fixture(scope="module")
def planted() -> tuple[list[str], list[tuple[str, int, float]]]:
  """120 real originals and, per original and level, a mutant with its original's index and exact Jaccard."""
  rng = np.random.default_rng(0)
  docs = _real_documents(120)
  originals = [" ".join(d) for d in docs]
  mutants = [(*_mutate_to(d, level, rng), ) for d in docs for level in _LEVELS]
  return originals, [(text, i // len(_LEVELS), sim) for i, (text, sim) in enumerate(mutants)]


def _random_pair(rng: np.random.Generator, similarity: float, union: int = 400) -> tuple[np.ndarray, np.ndarray]:
  """Two random shingle sets whose exact Jaccard is round(similarity * union) / union."""
  values = np.unique(rng.integers(0, np.iinfo(np.uint64).max, size=2 * union, dtype=np.uint64))[:union]
  rng.shuffle(values)
  common = int(round(similarity * union))
  only_a = (union - common) // 2
  return np.sort(values[: common + only_a]), np.sort(np.concatenate((values[:common], values[common + only_a:])))


def test_shingles_edge_cases_and_stability():
  """Empty -> no shingle, short -> one shingle of everything, case/punctuation-insensitive, distinct and stable."""
  assert len(shingles("")) == 0 and len(shingles("  ,;!  ")) == 0
  assert len(shingles("just three words", 5)) == 1
  assert np.array_equal(shingles("Just THREE words!", 5), shingles("just three words", 5))
  assert not np.array_equal(shingles("three words just", 5), shingles("just three words", 5))
  text = "a b c d e f a b c d e f"
  assert len(shingles(text, 5)) == 6  # 8 windows, two repeated
  assert len(shingles("abcabc", 3, "char")) == 3
  assert shingles("abc", 2, "char").dtype == np.uint64
  # Stable across processes: the same hashes in interpreters with differently salted str hashes.
  code = "from data_pipelines.curate.minhash import shingles; print(shingles('The quick, brown fox.', 2).tolist())"
  runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
  assert runs == {f"{shingles('The quick, brown fox.', 2).tolist()}\n"}
  assert len(shingles("ünïcode wörds ünïcode wörds", 2)) == 2


def test_hash_family_is_multiply_add_shift():
  """The vectorised wrapping multiply equals ((a*x + b) mod 2^64) >> 32 computed with Python integers."""
  hasher = MinHasher(num_perm=64, seed=3)
  rng = np.random.default_rng(1)
  keys = rng.integers(0, np.iinfo(np.uint64).max, size=50, dtype=np.uint64)
  keys[:2] = [0, np.iinfo(np.uint64).max]
  expected = [
    min(((int(a) * (int(k) >> 32) + int(b)) % 2**64) >> 32 for k in keys) for a, b in zip(hasher.a, hasher.b)
  ]
  assert hasher.signature(keys).tolist() == expected
  assert np.all(hasher.signature(np.empty(0, np.uint64)) == EMPTY_VALUE)


def test_batch_signatures_match_single():
  """signatures() over many (and empty, and longer-than-a-chunk) sets equals signature() one by one."""
  hasher = MinHasher(num_perm=32)
  rng = np.random.default_rng(2)
  sets = [np.unique(rng.integers(0, 1 << 63, size=n, dtype=np.uint64)) for n in (0, 5, 700, 3000, 1, 1500, 0)]
  batch = hasher.signatures(sets)
  assert np.array_equal(batch, np.stack([hasher.signature(s) for s in sets]))


def test_minhash_estimates_exact_jaccard_and_error_shrinks_with_num_perm():
  """Over random pairs at Jaccard 0.2..0.95 the mean absolute error is <= 0.05 at 128 and falls with num_perm."""
  rng = np.random.default_rng(0)
  levels = (0.2, 0.4, 0.6, 0.8, 0.9, 0.95)
  pairs = [(*_random_pair(rng, level), ) for level in levels for _ in range(60)]
  truth = np.array([exact_jaccard(a, b) for a, b in pairs])
  errors = {}
  for num_perm in (32, 128, 512):
    hasher = MinHasher(num_perm=num_perm, seed=7)
    estimates = np.array([jaccard_estimate(hasher.signature(a), hasher.signature(b)) for a, b in pairs])
    errors[num_perm] = np.abs(estimates - truth).mean()
    assert abs((estimates - truth).mean()) < 0.02  # unbiased
  assert errors[128] <= 0.05
  assert errors[32] > errors[128] > errors[512]
  assert errors[512] < 0.7 * errors[128]  # ~1/sqrt(num_perm): expect ~0.5


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
@pytest.mark.parametrize("num_perm", [64, 128, 256])
def test_lsh_params_s_curve(threshold, num_perm):
  """bands*rows fits num_perm and the S-curve crosses ~0.5 near the threshold, low below and high above it."""
  bands, rows = lsh_params(threshold, num_perm)
  assert bands * rows <= num_perm
  crossing = (1 - 0.5 ** (1 / bands)) ** (1 / rows)  # similarity where the S-curve is exactly 0.5
  assert abs(crossing - threshold) < 0.06
  assert 0.2 < candidate_probability(threshold, bands, rows) < 0.8
  assert candidate_probability(threshold - 0.25, bands, rows) < 0.1
  assert candidate_probability(min(threshold + 0.15, 1.0), bands, rows) > 0.85
  # Weighting false negatives more shifts the curve towards recall.
  recall_bands, recall_rows = lsh_params(threshold, num_perm, 0.1, 0.9)
  assert candidate_probability(threshold, recall_bands, recall_rows) >= candidate_probability(threshold, bands, rows)


def test_lsh_params_known_answer():
  """The classic (0.8, 128) optimum is 9 bands of 13 rows (as in datasketch's equal-weight optimisation)."""
  assert lsh_params(0.8, 128) == (9, 13)


def test_planted_near_duplicates_recall_and_precision(planted):
  """Mutants with Jaccard >= 0.88 are dropped as duplicates of their original; those <= 0.6 are kept."""
  originals, mutants = planted
  hasher = MinHasher(num_perm=128)
  index = NearDupIndex.for_threshold(0.8, num_perm=128)
  texts = originals + [text for text, _, _ in mutants]
  answers = index.add_batch(np.arange(len(texts)), hasher.signatures([shingles(t) for t in texts]))
  assert answers[: len(originals)] == [None] * len(originals)  # originals are kept representatives
  similar = [(answer, orig) for answer, (_, orig, sim) in zip(answers[len(originals):], mutants) if sim >= 0.88]
  dissimilar = [answer for answer, (_, _, sim) in zip(answers[len(originals):], mutants) if sim <= 0.6]
  assert len(similar) >= 200 and len(dissimilar) >= 200
  recall = np.mean([answer == orig for answer, orig in similar])
  assert recall >= 0.95
  false_positive_rate = np.mean([answer is not None for answer in dissimilar])
  assert false_positive_rate <= 0.01
  assert index.stats.docs == len(texts)
  assert index.stats.kept + index.stats.duplicates == len(texts)
  assert index.stats.candidates_checked >= index.stats.duplicates


def test_streaming_first_occurrence_wins_and_exact_duplicates_always_caught(planted):
  """The first-seen copy is the representative whatever the ids; every exact repeat is caught, verified or not."""
  originals, _ = planted
  hasher = MinHasher(num_perm=128)
  sigs = hasher.signatures([shingles(t) for t in originals])
  for verify in (True, False):
    index = NearDupIndex.for_threshold(0.8, verify=verify)
    ids = np.arange(1000, 1000 - len(originals), -1)  # descending ids: order of arrival, not id, decides
    assert index.add_batch(ids, sigs) == [None] * len(originals)
    assert index.add_batch(ids - 5000, sigs[::-1]) == ids[::-1].tolist()
    assert index.kept_ids().tolist() == ids.tolist()
  assert index.add(-1, hasher.signature(shingles(""))) is None
  assert index.add(-2, hasher.signature(shingles(" "))) == -1  # empty documents duplicate each other


def test_deduplicate_greedy_representatives():
  """deduplicate() maps each row to the first earlier row it near-duplicates, or to itself."""
  rng = np.random.default_rng(5)
  hasher = MinHasher()
  base = [rng.integers(0, 1 << 63, size=300, dtype=np.uint64) for _ in range(3)]
  near = np.concatenate((base[0][:290], rng.integers(0, 1 << 63, size=5, dtype=np.uint64)))
  sets = [np.unique(s) for s in (base[0], base[1], near, base[2], base[1])]
  # The same greedy rule over datasketch's MinHash and LSH: each set joins the first earlier kept set that its
  # LSH candidates include with an estimated Jaccard >= 0.8, else it is kept (and indexed) itself.
  lsh, minhashes, expected = datasketch.MinHashLSH(threshold=0.8, num_perm=128), [], []
  for row, values in enumerate(sets):
    m = datasketch.MinHash(num_perm=128)
    m.update_batch([v.tobytes() for v in values])
    minhashes.append(m)
    matches = sorted(key for key in lsh.query(m) if m.jaccard(minhashes[key]) >= 0.8)
    expected.append(matches[0] if matches else row)
    if not matches:
      lsh.insert(row, m)
  assert expected == [0, 1, 0, 3, 1]  # the planted structure: row 2 is near row 0, row 4 is row 1
  assert deduplicate(hasher.signatures(sets), 0.8).tolist() == expected


def test_index_memory_depends_on_kept_docs_not_text_length():
  """Kept documents of 1 MB and of 1 KB cost the index the same bytes, and the cost grows with kept docs."""
  rng = np.random.default_rng(0)
  vocabulary = np.array([f"w{i}" for i in range(50_000)])
  hasher = MinHasher()

  def index_after(num_docs: int, words_per_doc: int) -> NearDupIndex:
    index = NearDupIndex.for_threshold(0.8)
    for doc_id in range(num_docs):
      text = " ".join(rng.choice(vocabulary, size=words_per_doc).tolist())
      assert index.add(doc_id, hasher.signature(shingles(text))) is None
    return index

  big, small, more = index_after(6, 150_000), index_after(6, 150), index_after(60, 150)
  assert len(big) == len(small) == 6
  assert abs(big.memory_bytes() / small.memory_bytes() - 1) < 0.02
  per_doc = (more.memory_bytes() - small.memory_bytes()) / 54
  assert 128 * 4 < per_doc < 4096
  assert band_keys(hasher.signature(shingles("x")), 14, 9).shape == (14,)


def _reference_shingles(text: str, size: int, unit: str) -> list[int]:
  """Sorted distinct shingle hashes computed one unit at a time with Python integers (the documented definition)."""
  mask = (1 << 64) - 1

  def mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)

  if unit == "word":
    units = []
    for word in re.findall(r"\w+", text.lower()):
      data = word.encode("utf-8", "surrogatepass")
      h = sum((byte + 1) * pow(0x9E3779B97F4A7C15, k, 1 << 64) for k, byte in enumerate(data))
      units.append(mix((h + len(data) * 0x243F6A8885A308D3) & mask))
  else:
    units = [mix(ord(ch)) for ch in re.sub(r"\s+", " ", text.lower()).strip()]
  if not units:
    return []
  size = min(size, len(units))
  grams = set()
  for start in range(len(units) - size + 1):
    g = 0
    for u in units[start:start + size]:
      g = (g * 0xC2B2AE3D27D4EB4F + u) & mask
    grams.add(mix((g + size) & mask))
  return sorted(grams)


_VARIED_TEXTS = [
  "", "   ", ",;!? -- ...", "one", "two words", "exactly five words right here", "a_b c-d e.f 42 x",
  "ÜNÏCODE Wörter 日本語のテキスト Σίσυφος ΟΔΟΣ İstanbul ß 🙂 ١٢٣", "nul\0inside\0text", "lone \ud800 surrogate",
  "Tabs\tand\nnewlines\r\n\u2028and\u00a0spaces  ", "x" * 3000, "repeat " * 40,
  " ".join(f"w{i % 97}" for i in range(2500)),  # long, with repeated shingles
]


@pytest.mark.parametrize("unit", ["word", "char"])
def test_batch_shingles_equal_single_and_reference(unit):
  """shingles_batch over varied texts equals shingles() per text and a per-unit Python-integer reference."""
  rng = np.random.default_rng(3)
  texts = list(_VARIED_TEXTS)
  texts += ["".join(map(chr, rng.integers(0, 0x110000, size=int(rng.integers(0, 40))))) for _ in range(20)]
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  texts += [path.read_text(encoding="utf-8", errors="replace")[:4000] for path in sorted(stdlib.glob("*.py"))[:10]]
  for size in (1, 3, 5):
    batch = shingles_batch(texts, size, unit)
    assert len(batch) == len(texts)
    for text, got in zip(texts, batch):
      assert got.dtype == np.uint64
      assert np.array_equal(got, shingles(text, size, unit)), (text[:40], size)
      if len(text) <= 4000:
        assert got.tolist() == _reference_shingles(text, size, unit), (text[:40], size)
  assert shingles_batch([], 5, unit) == []


def test_shingle_hashes_and_text_signatures_match_per_document():
  """Flat shingle hashes (with repeats) sign like the distinct sets; empty texts get EMPTY_VALUE."""
  hasher = MinHasher(num_perm=64)
  texts = _VARIED_TEXTS * 3  # long enough to span several hashing chunks
  hashes, counts = shingle_hashes(texts)
  assert counts.sum() == len(hashes) and len(counts) == len(texts)
  expected = hasher.signatures([shingles(t) for t in texts])
  assert np.array_equal(hasher.text_signatures(texts), expected)
  assert np.array_equal(hasher.signatures_flat(hashes, counts), expected)
  assert np.all(expected[0] == EMPTY_VALUE)
  assert hasher.text_signatures([]).shape == (0, 64)


def test_pipeline_batches_do_not_change_results(tmp_path, monkeypatch):
  """curate() gives the same shards and stats whether near dedup signs 2 or 256 records per batch."""
  import json

  from data_pipelines.curate import pipeline
  from maxlm.config import load_config

  words = _real_documents(4)
  docs = [" ".join(d) for d in words]
  edited = " ".join(words[3][:10] + ["planted"] + words[3][11:])
  docs = [docs[0], docs[1], docs[0] + " tail", docs[2], docs[1], edited, docs[3]]
  path = tmp_path / "docs.jsonl"
  path.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
  cfg = load_config("tiny", ["--config.curate.shard_docs=2", "--config.curate.quality.enabled=false",
                             "--config.curate.language.enabled=false"]).curate
  runs = []
  for window in (2, 256):
    monkeypatch.setattr(pipeline, "_WINDOW_DOCS", window)
    stats = pipeline.curate([str(path)], tmp_path / f"w{window}", cfg, progress=False)
    stats.pop("seconds")
    shards = {p.name: p.read_text() for p in sorted((tmp_path / f"w{window}").glob("part-*.jsonl"))}
    runs.append((stats, shards))
  assert runs[0] == runs[1]
  assert runs[0][0]["stages"]["exact_dedup"]["dropped"] == {"exact_duplicate": 1}
  assert runs[0][0]["stages"]["near_dedup"]["dropped"] == {"near_duplicate": 2}
