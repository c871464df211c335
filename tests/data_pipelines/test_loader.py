"""data.paths / the default corpus tokenized once into cached shards, and the packed, sharded, resumable streams."""

import collections
import json
import logging
import math
import os
import re

import helpers
import numpy as np
import pytest

from data_pipelines import corpus, loader, mixture, tokenized
from data_pipelines.corpus import prepare_corpus
from data_pipelines.loader import HostBatches, TokenizedDocs, make_eval_batches
from data_pipelines.tokenizer import train_tokenizer

SEQ_LEN = 16


@pytest.fixture(scope="module")
def docs():
  rng = np.random.default_rng(0)
  # Lengths span 2 (bos+eos only), exactly seq_len + 1, and several chunks' worth.
  lengths = [2, 3, SEQ_LEN, SEQ_LEN + 1, SEQ_LEN + 2, 2 * SEQ_LEN + 1, 70, *rng.integers(2, 60, 40)]
  return TokenizedDocs.from_documents([rng.integers(4, 1000, n) for n in lengths])


@pytest.fixture(scope="module")
def shards(docs, tmp_path_factory):
  """The same documents as one source of token shards on disk: what training reads."""
  root = tmp_path_factory.mktemp("shards")
  helpers.write_token_shards(root, {"docs": {"train": [docs[i] for i in range(len(docs))]}})
  return mixture.Mixture([tokenized.load_split(root, "docs", "train")], [1.0])


def make_train_iterator(shards, **kw):
  return shards.iterator(**kw)


def _epoch(shards, **kw):
  """All batches of one epoch (num_epochs=1)."""
  return list(make_train_iterator(shards, seq_len=SEQ_LEN, num_epochs=1, **kw))


def _split_docs(split):
  return [split[i] for i in range(len(split))]


def _segments(batches):
  """(inputs, targets) of every packed segment, in order."""
  out = []
  for b in batches:
    for row in range(b["inputs"].shape[0]):
      seg = b["segment_ids"][row]
      for s in np.unique(seg[seg > 0]):
        m = seg == s
        out.append((b["inputs"][row][m], b["targets"][row][m]))
  return out


def _chunk_key(inputs, targets):
  return tuple(inputs.tolist()) + (int(targets[-1]),)


def _expected_chunks(docs, shard_index=0, shard_count=1):
  ranges = loader.chunk_ranges(np.diff(docs.offsets), SEQ_LEN)[shard_index::shard_count]
  return collections.Counter(tuple(docs[d][s:e].tolist()) for d, s, e in ranges)


def test_tokenized_docs_basics():
  d = TokenizedDocs.from_documents([[5, 6, 7], [], [8]])
  assert len(d) == 3 and d.num_tokens == 4
  assert d[0].tolist() == [5, 6, 7] and d[1].tolist() == [] and d[-1].tolist() == [8]
  assert d.tokens.dtype == np.int32 and d.offsets.dtype == np.int64
  with pytest.raises(IndexError):
    d[3]
  with pytest.raises(ValueError, match="offsets"):
    TokenizedDocs(np.zeros(3, np.int32), np.array([0, 2]))


def test_batch_format_and_packing_invariants(shards):
  it = make_train_iterator(shards, seq_len=SEQ_LEN, batch_size=4, seed=0, num_packing_bins=3)
  for _ in range(30):
    b = next(it)
    assert set(b) == {"inputs", "targets", "segment_ids", "positions"}
    for v in b.values():
      assert v.shape == (4, SEQ_LEN) and v.dtype == np.int32
    seg, pos, x, y = b["segment_ids"], b["positions"], b["inputs"], b["targets"]
    pad = seg == 0
    assert not x[pad].any() and not y[pad].any() and not pos[pad].any()
    for row in range(4):
      ids = seg[row][seg[row] > 0]
      assert ids.tolist() == sorted(ids.tolist())
      assert ids.size == 0 or ids[0] == 1 and set(np.diff(ids).tolist()) <= {0, 1}
      for s in np.unique(ids):
        m = seg[row] == s
        assert pos[row][m].tolist() == list(range(m.sum()))
        np.testing.assert_array_equal(y[row][m][:-1], x[row][m][1:])  # next-token shift


def test_one_epoch_predicts_every_token_exactly_once(docs, shards):
  batches = _epoch(shards, batch_size=4, seed=3, num_packing_bins=4)
  pairs = collections.Counter()
  for b in batches:
    m = b["segment_ids"] > 0
    pairs.update(zip(b["inputs"][m].tolist(), b["targets"][m].tolist()))
  expected = collections.Counter()
  for i in range(len(docs)):
    d = docs[i]
    expected.update(zip(d[:-1].tolist(), d[1:].tolist()))
  assert pairs == expected
  assert sum(pairs.values()) == docs.num_tokens - len(docs)
  # Stronger: the packed segments are exactly the overlapping chunks of the documents.
  chunks = collections.Counter(_chunk_key(x, y) for x, y in _segments(batches))
  assert chunks == _expected_chunks(docs)


def test_chunks_are_at_most_seq_len_plus_one_and_overlap_by_one(docs):
  lengths = np.diff(docs.offsets)
  index = loader.chunk_ranges(lengths, SEQ_LEN)[:, 1:]
  assert np.all(index[:, 1] - index[:, 0] <= SEQ_LEN + 1)
  assert np.all(index[:, 1] - index[:, 0] >= 2)
  assert len(index) == sum(math.ceil((n - 1) / SEQ_LEN) for n in lengths)


def test_resume_reproduces_continuation(shards):
  kw = dict(seq_len=SEQ_LEN, batch_size=4, seed=7, num_packing_bins=3)
  it = make_train_iterator(shards, **kw)
  for _ in range(13):  # 13 * 4 rows is mid-way through a 3-row packed batch.
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(40)]  # Crosses epoch boundaries too.
  it2 = make_train_iterator(shards, **kw)
  it2.set_state(state)
  for want in expected:
    got = next(it2)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_deterministic_and_reshuffled_per_epoch(docs, shards):
  kw = dict(batch_size=4, seed=1)
  a, b = _epoch(shards, **kw), _epoch(shards, **kw)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  other = _epoch(shards, batch_size=4, seed=2)
  assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, other))
  two = list(make_train_iterator(shards, seq_len=SEQ_LEN, num_epochs=2, **kw))
  keys = [_chunk_key(x, y) for x, y in _segments(two)]
  n = sum(_expected_chunks(docs).values())
  assert keys[:n] != keys[n:]  # A different order in the second epoch.
  assert collections.Counter(keys) == _expected_chunks(docs) + _expected_chunks(docs)


def test_shards_are_disjoint_and_cover_the_epoch(docs, shards):
  seen = collections.Counter()
  for shard in range(2):
    batches = _epoch(shards, batch_size=4, seed=0, shard_index=shard, shard_count=2)
    assert all(b["inputs"].shape == (2, SEQ_LEN) for b in batches)
    chunks = collections.Counter(_chunk_key(x, y) for x, y in _segments(batches))
    assert chunks == _expected_chunks(docs, shard, 2)
    assert not set(chunks) & set(seen)
    seen += chunks
  assert seen == _expected_chunks(docs)
  with pytest.raises(ValueError, match="multiple of shard_count"):
    make_train_iterator(shards, seq_len=SEQ_LEN, batch_size=3, seed=0, shard_count=2)
  with pytest.raises(ValueError, match="shard_index"):
    make_train_iterator(shards, seq_len=SEQ_LEN, batch_size=4, seed=0, shard_index=2, shard_count=2)


def test_eval_batches_are_deterministic_and_cycle():
  small = TokenizedDocs.from_documents([[2, 10, 11, 12, 3], [2, 20, 3]])
  batches = make_eval_batches(small, seq_len=8, batch_size=2, num_batches=3)
  again = make_eval_batches(small, seq_len=8, batch_size=2, num_batches=3)
  assert len(batches) == 3
  for a, b in zip(batches, again):
    for k in a:
      assert a[k].shape == (2, 8) and a[k].dtype == np.int32
      np.testing.assert_array_equal(a[k], b[k])
  # Only 2 chunks exist, so the 3 batches repeat them.
  assert sum(len(np.unique(b["segment_ids"][b["segment_ids"] > 0])) for b in batches) > 2


def _write_corpus(root, n_docs=30):
  rng = np.random.default_rng(1)
  words = ["def", "return", "self", "x", "\n", "    ", "(", ")", ":", "é", "😀", "42"]
  lines = []
  for i in range(n_docs):
    text = f"# doc {i}\n" + "".join(rng.choice(words, 80))
    lines.append(json.dumps({"text": text}))
  (root / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  (root / "extra.txt").write_text("def extra():\n\treturn 1\n", encoding="utf-8")


def _unigram_entropy(split):
  """Entropy (nats) of every token but each document's first, counted with numpy from the documents read back."""
  targets = np.concatenate([d[1:] for d in _split_docs(split)])
  p = np.unique(targets, return_counts=True)[1] / len(targets)
  return float(-(p * np.log(p)).sum())


def test_prepare_corpus_splits_tokenizes_and_caches(tmp_path, monkeypatch):
  _write_corpus(tmp_path)
  paths = [str(tmp_path / "docs.jsonl"), str(tmp_path / "extra.txt")]
  kw = dict(vocab_size=300, cache_dir=tmp_path / "cache", max_corpus_bytes=None, eval_fraction=0.1)
  c = prepare_corpus(paths, **kw)
  tok = c.tokenizer
  [train], evals = c.mixture.splits, c.eval_splits
  assert len(train) + len(evals[0]) == 31 and len(evals[0]) >= 1 and len(train) >= 1
  texts = {json.loads(line)["text"] for line in (tmp_path / "docs.jsonl").read_text().splitlines()}
  texts.add((tmp_path / "extra.txt").read_text())
  decoded = set()
  for split in (train, evals[0]):
    for d in _split_docs(split):
      assert d[0] == tok.bos_id and d[-1] == tok.eos_id
      decoded.add(tok.decode(d))
  assert decoded == texts
  assert 0 < c.unigram_entropy < math.log(tok.vocab_size)
  assert c.unigram_entropy == pytest.approx(_unigram_entropy(train), rel=1e-9)
  assert "user file" in c.description
  assert c.tokenizer_dir.parent.parent == tmp_path / "cache"  # one tokenized directory in the cache

  # Second call: served from cache, no training or tokenizing.
  def boom(*a, **k):
    raise AssertionError("cache miss")
  monkeypatch.setattr(corpus, "train_tokenizer", boom)
  monkeypatch.setattr(tokenized, "write_source", boom)
  c2 = prepare_corpus(paths, **kw)
  assert [d.tolist() for d in _split_docs(c2.mixture.splits[0])] == [d.tolist() for d in _split_docs(train)]
  assert [d.tolist() for d in _split_docs(c2.eval_splits[0])] == [d.tolist() for d in _split_docs(evals[0])]
  assert c2.unigram_entropy == c.unigram_entropy and c2.description == c.description
  assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]

  # Changing an input file invalidates the cache.
  (tmp_path / "extra.txt").write_text("def extra():\n\treturn 2  # changed\n", encoding="utf-8")
  with pytest.raises(AssertionError, match="cache miss"):
    prepare_corpus(paths, **kw)


def test_every_split_gets_a_document_and_the_order_is_kept(tmp_path):
  """Too few documents for eval_fraction to pick one by hash: the last one is held out, the rest keep their order."""
  tok = train_tokenizer(helpers.prose_paragraphs("en"), 512, tmp_path / "tok")
  texts = [f"document number {i}." for i in range(6)]
  lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
  (tmp_path / "docs.jsonl").write_text(lines, encoding="utf-8")
  fraction = min(tokenized.eval_fraction_of(f"{tmp_path / 'docs.jsonl'}:{i}") for i in range(1, 7)) * 0.99
  c = prepare_corpus([str(tmp_path / "docs.jsonl")], vocab_size=512, tokenizer_path=str(tok.path),
                     cache_dir=tmp_path / "c", max_corpus_bytes=None, eval_fraction=fraction)
  assert [tok.decode(d) for d in _split_docs(c.mixture.splits[0])] == texts[:-1]
  assert [tok.decode(d) for d in _split_docs(c.eval_splits[0])] == texts[-1:]


def test_giant_documents_are_tokenized_in_pieces_to_the_same_ids(tmp_path, monkeypatch):
  _write_corpus(tmp_path)
  (tmp_path / "prose.txt").write_text("\n\n".join(helpers.prose_paragraphs("en")), encoding="utf-8")
  paths = [str(tmp_path / "docs.jsonl"), str(tmp_path / "prose.txt")]
  kw = dict(vocab_size=512, max_corpus_bytes=None, eval_fraction=0.1)
  whole = prepare_corpus(paths, cache_dir=tmp_path / "whole", **kw)
  monkeypatch.setattr(tokenized, "_ENCODE_BATCH_CHARS", 64)  # now every document is a "giant" one
  pieces = prepare_corpus(paths, cache_dir=tmp_path / "pieces", **kw)
  assert pieces.tokenizer._word_local  # a trained model: encoded in pieces indeed, not whole as a fallback
  for a, b in ((whole.mixture.splits[0], pieces.mixture.splits[0]), (whole.eval_splits[0], pieces.eval_splits[0])):
    assert [d.tolist() for d in _split_docs(a)] == [d.tolist() for d in _split_docs(b)]


def test_prepare_corpus_with_user_tokenizer(tmp_path):
  _write_corpus(tmp_path)
  tok = train_tokenizer([(tmp_path / "docs.jsonl").read_text()], 320, tmp_path / "user")
  kw = dict(cache_dir=tmp_path / "cache", max_corpus_bytes=None, eval_fraction=0.1)
  paths = [str(tmp_path / "docs.jsonl")]
  c = prepare_corpus(paths, vocab_size=512, tokenizer_path=str(tok.path), **kw)
  assert c.tokenizer.path == tok.path
  assert not list((tmp_path / "cache").glob("tokenizer-*"))
  with pytest.raises(ValueError, match=r"320.*256"):
    prepare_corpus(paths, vocab_size=256, tokenizer_path=str(tok.path), **kw)


def _no_work(monkeypatch):
  """Makes training a tokenizer or tokenizing fail the test: the error under test must come first."""
  def boom(*a, **k):
    raise AssertionError("trained or tokenized before the check")
  monkeypatch.setattr(corpus, "train_tokenizer", boom)
  monkeypatch.setattr(tokenized, "write_source", boom)


def test_prepare_corpus_rejects_single_document(tmp_path, monkeypatch):
  (tmp_path / "one.txt").write_text("only one document here", encoding="utf-8")
  _no_work(monkeypatch)
  with pytest.raises(ValueError, match="at least 2"):
    prepare_corpus([str(tmp_path / "one.txt")], vocab_size=300, cache_dir=tmp_path / "c",
                   max_corpus_bytes=None, eval_fraction=0.1)


def test_a_single_giant_document_fails_before_any_training_or_tokenizing(tmp_path, monkeypatch):
  line = " ".join(p.replace("\n", " ") for p in helpers.prose_paragraphs("en"))
  (tmp_path / "giant.txt").write_text(line * 100, encoding="utf-8")  # 4 MB, one line
  _no_work(monkeypatch)
  with pytest.raises(ValueError, match="has 1 non-empty document; at least 2"):
    prepare_corpus([str(tmp_path / "giant.txt")], vocab_size=2000, cache_dir=tmp_path / "c",
                   max_corpus_bytes=None, eval_fraction=0.1)


def test_an_empty_file_is_named(tmp_path, monkeypatch):
  _write_corpus(tmp_path)
  empty, blanks = tmp_path / "empty.txt", tmp_path / "blanks"
  empty.write_bytes(b"")
  blanks.mkdir()
  for name in ("a.jsonl", "b.jsonl"):
    (blanks / name).write_text('\n{"text": ""}\n\n', encoding="utf-8")
  _no_work(monkeypatch)
  kw = dict(vocab_size=300, cache_dir=tmp_path / "c", max_corpus_bytes=None, eval_fraction=0.1)
  for paths in ([empty], [tmp_path / "docs.jsonl", empty]):
    with pytest.raises(ValueError, match=f"^no text in {re.escape(str(empty))}"):
      prepare_corpus([str(p) for p in paths], **kw)
  with pytest.raises(ValueError, match=f"^no text in {re.escape(str(blanks / 'a.jsonl'))}$"):
    prepare_corpus([str(blanks / "a.jsonl")], **kw)
  with pytest.raises(ValueError, match="^no text in any of the 2 files"):
    prepare_corpus([str(blanks)], **kw)


def _bad_corpus(root):
  """Good documents and planted bad records in root: (good texts, {reason: count}, {reason: its first file:line})."""
  good = [f"document {i}: " + p for i, p in enumerate(helpers.prose_paragraphs("es")[:12])]
  lines = [json.dumps({"text": t}).encode() for t in good[:10]]
  lines[3:3] = [b'{"text": "caf\xe9"}']  # line 4: Latin-1, not UTF-8
  lines[6:6] = [b'{"text": "cut off', b'{"body": "x"}']  # lines 7, 8
  (root / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  (root / "b.txt").write_bytes(b"ok\n\xff\xfe\n")  # line 2: invalid UTF-8, a whole-file record
  (root / "c.txt").write_text(good[10], encoding="utf-8")
  (root / "d.txt").write_text(good[11], encoding="utf-8")
  a = root / "a.jsonl"
  return (good, {"invalid_utf8": 2, "malformed_json": 1, "missing_field": 1},
          {"invalid_utf8": f"{a}:4", "malformed_json": f"{a}:7", "missing_field": f"{a}:8"})


def test_bad_records_stop_the_run_unless_skipped_and_counted(tmp_path, caplog):
  data = tmp_path / "data"
  data.mkdir()
  good, counts, first = _bad_corpus(data)
  kw = dict(vocab_size=400, cache_dir=tmp_path / "cache", max_corpus_bytes=None, eval_fraction=0.2)
  with pytest.raises(ValueError, match=rf"^{re.escape(first['invalid_utf8'])}: invalid UTF-8.*"
                                       r"data\.skip_bad_records=true.*maxlm curate"):
    prepare_corpus([str(data)], **kw)
  with caplog.at_level(logging.WARNING, logger="data_pipelines.corpus"):
    c = prepare_corpus([str(data)], skip_bad_records=True, **kw)
  assert c.skipped == counts
  decoded = sorted(c.tokenizer.decode(d) for split in (c.mixture.splits[0], c.eval_splits[0])
                   for d in _split_docs(split))
  assert decoded == sorted(good)
  warning = "\n".join(r.getMessage() for r in caplog.records)
  assert "maxlm curate" in warning and all(f"(first: {where})" in warning for where in first.values())
  again = prepare_corpus([str(data)], skip_bad_records=True, **kw)  # from the cache: the counts too
  assert again.skipped == counts and again.description == c.description
  with pytest.raises(ValueError, match="invalid UTF-8"):  # a strict run never reuses the lenient run's cache
    prepare_corpus([str(data)], **kw)
  for f in data.glob("[ab].*"):
    f.unlink()
  (data / "c.txt").write_bytes(b"\xff")
  (data / "d.txt").write_bytes(b"\xfe")
  with pytest.raises(ValueError, match=r"^no text in any of the 2 files .*every record was bad: 2 invalid_utf8"):
    prepare_corpus([str(data)], skip_bad_records=True, **kw)


def test_default_corpus_end_to_end(tmp_path):
  kw = dict(vocab_size=512, cache_dir=tmp_path, max_corpus_bytes=1 << 20, eval_fraction=0.02)
  c = prepare_corpus([], **kw)
  assert c.mixture.splits[0].num_tokens > 100_000 and len(c.eval_splits[0]) >= 1
  assert 3.0 < c.unigram_entropy < math.log(512)
  assert "default corpus" in c.description
  b = next(HostBatches(c.mixture, seq_len=128, batch_size=4, seed=0, num_packing_bins=8, num_streams=1))
  assert b["inputs"].shape == (4, 128) and (b["segment_ids"] > 0).mean() > 0.5
  assert c.tokenizer.decode(b["inputs"][0][b["segment_ids"][0] == 1])
  eval_batches = make_eval_batches(c.eval_docs(10_000), seq_len=128, batch_size=4, num_batches=2)
  assert len(eval_batches) == 2
  c2 = prepare_corpus([], **kw)
  assert c2.tokenizer_dir == c.tokenizer_dir
  assert os.path.samefile(c2.tokenizer.path, c.tokenizer.path)


def test_default_streams_make_1_2_4_8_hosts_interchangeable():
  assert [loader.default_streams(16, p) for p in (1, 2, 4, 8)] == [8, 8, 8, 8]
  assert loader.default_streams(48, 3) == 24  # lcm(8, 3)
  assert loader.default_streams(12, 2) == 2  # 12 rows do not split into 8 streams: one per process
