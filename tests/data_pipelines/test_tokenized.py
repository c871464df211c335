"""`maxlm tokenize`: exact round trip of real multilingual text, manifest counts and checksums, bad input."""

import json

import helpers
import numpy as np
import pytest

from data_pipelines import tokenized
from data_pipelines.curate import pipeline
from data_pipelines.tokenizer import load_tokenizer, train_tokenizer
from maxlm.configs.base import get_config

VOCAB = 400
# Byte fallback, a literal U+2581, tabs and indentation, CRLF, an emoji and combining marks must all survive.
EDGE_CASES = ["\u2581 marks \u2581\u2581", "def f():\n\tif x:\n        return  1\r\n", "emoji \U0001F600 e\u0301",
              "  leading and trailing spaces  "]


def _cfg(**overrides):
  cfg = get_config().tokenize
  cfg.update({"shard_mb": 0.004, "eval_fraction": 0.1, **overrides})
  return cfg


def _write_jsonl(path, texts, extra_lines=()):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "wb") as f:
    for t in texts:
      f.write(json.dumps({"text": t, "source": "x"}).encode() + b"\n")
    for line in extra_lines:
      f.write(line + b"\n")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("tok")
  texts = {
    "en": helpers.prose_documents("en", 300, 60) + EDGE_CASES,
    "de": helpers.prose_documents("de", 300, 40),
    "es": helpers.prose_documents("es", 200, 40),
  }
  for name, docs in texts.items():
    _write_jsonl(root / "curated" / name / "part-00000.jsonl", docs)
  bad = [b"\xff\xfe not utf-8", b'{"text": "broken', b'{"other": 1}', b'{"text": "   "}', b'{"text": 5}']
  _write_jsonl(root / "curated" / "de" / "part-00001.jsonl", ["ein letzter Satz."], bad)
  texts["de"].append("ein letzter Satz.")
  inputs = [str(root / "curated" / "en"), f"deutsch={root / 'curated' / 'de'}", str(root / "curated" / "es")]
  manifest = tokenized.tokenize(inputs, root / "out", _cfg(), vocab_size=VOCAB, progress=False)
  return root / "out", manifest, {"en": texts["en"], "deutsch": texts["de"], "es": texts["es"]}


def test_every_document_round_trips_exactly(dataset):
  root, manifest, texts = dataset
  tok = load_tokenizer(root / tokenized.TOKENIZER_DIR)
  assert tok.vocab_size == VOCAB and set(manifest["sources"]) == {"en", "deutsch", "es"}
  for name, expected in texts.items():
    decoded = []
    for split in tokenized.SPLITS:
      docs = tokenized.load_split(root, name, split)
      for i in range(len(docs)):
        ids = docs[i]
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) == docs.lengths[i]
        decoded.append(tok.decode(ids))
    assert sorted(decoded) == sorted(expected), name  # every document, exactly once, byte for byte


def test_manifest_counts_and_checksums_match_the_shards(dataset):
  root, manifest, texts = dataset
  assert manifest["dtype"] == "<u2"  # 400 ids fit 16 bits: half the bytes of int32
  for name, entry in manifest["sources"].items():
    docs = sum(entry["splits"][s]["documents"] for s in tokenized.SPLITS)
    assert docs == len(texts[name])
    assert entry["splits"]["eval"]["documents"] > 0  # 10% of >= 40 documents by hash
    train = tokenized.load_split(root, name, "train")
    assert train.num_tokens == entry["splits"]["train"]["tokens"]
    assert len(entry["splits"]["train"]["shards"]) > 1  # shard_mb=0.004 splits even these few documents
    assert entry["text_bytes"] == sum(len(t.encode()) for t in texts[name])
  tokenized.verify(root, checksums=True)


def test_bad_records_are_counted_per_reason_not_fatal(dataset):
  _, manifest, _ = dataset
  assert manifest["sources"]["deutsch"]["skipped"] == {
    "invalid_utf8": 1, "malformed_json": 1, "missing_field": 1, "empty_document": 1, "non_string_field": 1}
  assert manifest["sources"]["en"]["skipped"] == {}


def test_corrupt_or_truncated_shards_are_named(dataset, tmp_path):
  import shutil
  root, manifest, _ = dataset
  copy = tmp_path / "copy"
  shutil.copytree(root, copy)
  shard = copy / manifest["sources"]["es"]["splits"]["train"]["shards"][0]["file"]
  data = bytearray(shard.read_bytes())
  data[100] ^= 0xFF
  shard.write_bytes(bytes(data))
  tokenized.verify(copy, checksums=False)  # same size: only the checksum sees it
  with pytest.raises(tokenized.ManifestError, match="sha256 differs"):
    tokenized.verify(copy, checksums=True)
  shard.write_bytes(bytes(data[:-10]))
  with pytest.raises(tokenized.ManifestError, match="truncated"):
    tokenized.verify(copy, checksums=False)
  (copy / tokenized.MANIFEST).write_text("{not json")
  with pytest.raises(tokenized.ManifestError, match="corrupt"):
    tokenized.read_manifest(copy)
  with pytest.raises(tokenized.ManifestError, match="interrupted"):
    tokenized.read_manifest(tmp_path)


def test_an_existing_tokenizer_is_used_and_output_is_never_overwritten(dataset, tmp_path):
  root, _, texts = dataset
  _write_jsonl(tmp_path / "in.jsonl", texts["es"][:5])
  out = tmp_path / "out"
  manifest = tokenized.tokenize([str(tmp_path / "in.jsonl")], out, _cfg(tokenizer=str(root / "tokenizer"),
                                eval_fraction=0.0), vocab_size=VOCAB, progress=False)
  assert manifest["tokenizer"]["sha256"] == load_tokenizer(root / "tokenizer").sha256
  assert list(manifest["sources"]) == ["in"] and manifest["sources"]["in"]["splits"]["eval"]["documents"] == 0
  with pytest.raises(FileExistsError, match="already holds"):
    tokenized.tokenize([str(tmp_path / "in.jsonl")], out, _cfg(), vocab_size=VOCAB, progress=False)
  with pytest.raises(ValueError, match="more than model.vocab_size"):
    tokenized.tokenize([str(tmp_path / "in.jsonl")], tmp_path / "o2", _cfg(tokenizer=str(root / "tokenizer")),
                       vocab_size=300, progress=False)
  with pytest.raises(FileNotFoundError):
    tokenized.tokenize([str(tmp_path / "missing")], tmp_path / "o3", _cfg(), vocab_size=VOCAB, progress=False)


def test_input_names():
  assert tokenized.parse_inputs(["web=/a/b", "/c/d/", "/e/part-*.jsonl", "/f/g.jsonl", "x=/h"]) == {
    "web": ["/a/b"], "d": ["/c/d/"], "e": ["/e/part-*.jsonl"], "g": ["/f/g.jsonl"], "x": ["/h"]}
  assert tokenized.parse_inputs(["a=/p", "a=/q"]) == {"a": ["/p", "/q"]}


def test_token_dtype_widens_past_16_bits():
  assert tokenized.token_dtype(65536) == np.dtype("<u2")
  assert tokenized.token_dtype(128_256) == np.dtype("<u4")


def test_trained_tokenizer_round_trips_unseen_multilingual_text(tmp_path):
  tok = train_tokenizer(helpers.prose_documents("en", 300, 30), VOCAB, tmp_path / "t")
  for text in helpers.prose_documents("it", 200, 10) + EDGE_CASES:
    assert tok.decode(tok.encode(text)) == text


def test_a_curate_output_directory_is_read_as_its_shards_only(dataset, tmp_path):
  root, _, _ = dataset
  raw = helpers.prose_documents("en", 300, 12) + helpers.prose_documents("it", 300, 6)
  _write_jsonl(tmp_path / "raw.jsonl", raw + raw[:2])  # two exact duplicates for curate to drop
  curated = tmp_path / "curated" / "web"
  cfg = get_config().curate
  cfg.update({"shard_docs": 5})
  pipeline.curate([str(tmp_path / "raw.jsonl")], curated, cfg, progress=False)
  assert (curated / "stats.json").is_file() and (curated / "stats.png").is_file()
  kept = [json.loads(line)["text"] for f in sorted(curated.glob("part-*.jsonl")) for line in f.read_text().splitlines()]
  assert len(kept) == len(raw)
  tok_cfg = _cfg(tokenizer=str(root / tokenized.TOKENIZER_DIR))
  # The output itself, and a directory above it (curated/ as the README's `maxlm curate --output curated/web` makes).
  for i, inputs in enumerate(([str(curated)], [f"web={tmp_path / 'curated'}"])):
    manifest = tokenized.tokenize(inputs, tmp_path / f"tok{i}", tok_cfg, vocab_size=VOCAB, progress=False)
    entry = manifest["sources"]["web"]
    assert entry["skipped"] == {}  # neither stats.json nor stats.png was read as records
    assert sum(entry["splits"][s]["documents"] for s in tokenized.SPLITS) == len(kept)
    assert entry["text_bytes"] == sum(len(t.encode()) for t in kept)
  # An interrupted curate run (its state and some shards, no stats yet) is not silently taken for the result.
  (curated / "stats.json").unlink()
  (curated / "stats.png").unlink()
  with pytest.raises(ValueError, match="unfinished `maxlm curate` output"):
    tokenized.tokenize([str(curated)], tmp_path / "tok2", tok_cfg, vocab_size=VOCAB, progress=False)
