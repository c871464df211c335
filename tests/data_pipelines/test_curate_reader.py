"""Curation reader: bad records are counted by reason and skipped, good ones survive, memory stays bounded."""

import collections
import json
import tracemalloc

import pytest

from data_pipelines.curate.reader import read_records


def _reasons(records):
  return collections.Counter(reason for doc, reason, _ in records if doc is None)


def test_bad_records_are_counted_and_good_ones_kept(tmp_path):
  good = ["first document", "second, with ünïcödé", "third"]
  lines = [json.dumps({"text": good[0], "id": 1}).encode(), b'{"text": "broken', b"\xff\xfe not utf-8",
           json.dumps({"body": "no text field"}).encode(), json.dumps({"text": 7}).encode(),
           json.dumps({"text": "   "}).encode(), b"", json.dumps({"text": good[1]}).encode(),
           json.dumps(["not", "an", "object"]).encode()]
  (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  (tmp_path / "b.txt").write_text(good[2])
  (tmp_path / "c.txt").write_bytes(b"caf\xe9 latin-1")
  (tmp_path / "d.txt").write_text("\n\n  \n")
  records = list(read_records([str(tmp_path)]))
  assert [d.text for d, _, _ in records if d is not None] == good
  assert _reasons(records) == {"malformed_json": 1, "invalid_utf8": 2, "missing_field": 2, "non_string_field": 1,
                               "empty_document": 2}
  assert [d.source for d, _, _ in records if d is not None][:2] == [f"{tmp_path}/a.jsonl:1", f"{tmp_path}/a.jsonl:8"]
  # Every record says where it is, bad ones too (file:line; for a text file, the line of its first bad byte).
  a = tmp_path / "a.jsonl"
  assert [(reason, where) for doc, reason, where in records if doc is None] == [
    ("malformed_json", f"{a}:2"), ("invalid_utf8", f"{a}:3"), ("missing_field", f"{a}:4"),
    ("non_string_field", f"{a}:5"), ("empty_document", f"{a}:6"), ("missing_field", f"{a}:9"),
    ("invalid_utf8", f"{tmp_path / 'c.txt'}:1"), ("empty_document", str(tmp_path / "d.txt"))]
  assert all(where == doc.source for doc, _, where in records if doc is not None)


def test_a_100mb_single_line_is_skipped_without_being_held(tmp_path):
  path = tmp_path / "huge.jsonl"
  with open(path, "wb") as f:
    f.write(json.dumps({"text": "before"}).encode() + b"\n")
    f.write(b'{"text": "' + b"x" * (100 << 20) + b'"}\n')
    f.write(json.dumps({"text": "after"}).encode() + b"\n")
  (tmp_path / "big.txt").write_bytes(b"y" * (2 << 20))
  tracemalloc.start()
  try:
    records = list(read_records([str(path), str(tmp_path / "big.txt")], max_doc_bytes=1 << 20))
    peak_mib = tracemalloc.get_traced_memory()[1] / 2**20
  finally:
    tracemalloc.stop()
  assert [d.text for d, _, _ in records if d is not None] == ["before", "after"]
  assert _reasons(records) == {"document_too_large": 2}
  assert peak_mib < 8, f"reading a 100 MiB line peaked at {peak_mib:.0f} MiB of Python allocations"


def test_missing_path_fails_before_reading(tmp_path):
  (tmp_path / "ok.txt").write_text("fine")
  with pytest.raises(FileNotFoundError, match="nope"):
    next(read_records([str(tmp_path / "ok.txt"), str(tmp_path / "nope*.jsonl")]))
