"""Default-corpus discovery and user-file reading, including the error messages."""

import json
import pathlib

import pytest

from data_pipelines import sources


def test_default_corpus_is_discovered_and_deterministic():
  files = sources.default_corpus_files(None)
  assert len(files) > 100
  assert files == sources.default_corpus_files(None)
  assert all(f.is_file() for f in files)
  for f in files:
    assert not {"site-packages", "dist-packages", "__pycache__"} & set(f.parts), f
  names = {f.name for f in files}
  assert {"os.py", "functools.py"} <= names
  assert any(f.suffix == ".py" for f in files)


def test_default_corpus_excludes_test_data_files():
  for f in sources.default_corpus_files(None):
    if {"test", "tests", "idle_test"} & set(f.parts):
      assert f.suffix == ".py", f


def test_default_corpus_cap_is_respected_and_spread():
  cap = 1 << 20
  files = sources.default_corpus_files(cap)
  assert files == sources.default_corpus_files(cap)
  total = sum(f.stat().st_size for f in files)
  assert 0.9 * cap < total <= cap
  # A hash-ordered subset touches many packages, not just the alphabetically first modules.
  assert len({f.parent for f in files}) >= 5
  assert files != sources.default_corpus_files(None)[: len(files)]


def test_default_documents_have_stable_relative_sources():
  docs = list(sources.default_documents(256 << 10))
  assert docs and all(d.text for d in docs)
  for d in docs:
    assert not pathlib.PurePath(d.source).is_absolute()
  assert [d.source for d in docs] == [d.source for d in sources.default_documents(256 << 10)]


def test_default_corpus_rejects_bad_cap():
  with pytest.raises(ValueError, match="max_bytes"):
    sources.default_corpus_files(0)


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_read_txt_jsonl_dir_and_glob(tmp_path):
  (tmp_path / "a.txt").write_text("alpha\n\tbeta  gamma\n", encoding="utf-8")
  (tmp_path / "empty.txt").write_text("", encoding="utf-8")
  sub = tmp_path / "sub"
  sub.mkdir()
  _write_jsonl(sub / "b.jsonl", [{"text": "one"}, {"text": ""}, {"text": "two", "id": 7}])
  (sub / "c.md").write_text("# title é😀", encoding="utf-8")

  docs = list(sources.read_documents([str(tmp_path / "a.txt")]))
  assert [(d.text, d.source) for d in docs] == [("alpha\n\tbeta  gamma\n", str(tmp_path / "a.txt"))]

  docs = list(sources.read_documents([str(sub / "b.jsonl")]))
  assert [d.text for d in docs] == ["one", "two"]
  assert docs[1].source.endswith("b.jsonl:3")

  # Directory: recursed and sorted, empty documents skipped.
  docs = list(sources.read_documents([str(tmp_path)]))
  assert [d.text for d in docs] == ["alpha\n\tbeta  gamma\n", "one", "two", "# title é😀"]

  docs = list(sources.read_documents([str(tmp_path / "**" / "*.md")]))
  assert [d.text for d in docs] == ["# title é😀"]

  # The same file reached twice is read once.
  docs = list(sources.read_documents([str(sub), str(sub / "c.md")]))
  assert [d.text for d in docs] == ["one", "two", "# title é😀"]


def test_custom_text_field(tmp_path):
  _write_jsonl(tmp_path / "d.jsonl", [{"content": "x y"}])
  assert [d.text for d in sources.read_documents([str(tmp_path / "d.jsonl")], "content")] == ["x y"]


def test_missing_path_is_named(tmp_path):
  (tmp_path / "ok.txt").write_text("fine", encoding="utf-8")
  missing = str(tmp_path / "nope" / "*.txt")
  with pytest.raises(FileNotFoundError, match="nope"):
    list(sources.read_documents([str(tmp_path / "ok.txt"), missing]))
  with pytest.raises(TypeError, match="single path"):
    list(sources.read_documents(str(tmp_path)))


def test_invalid_utf8_names_file_and_offset(tmp_path):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"fine line\nbro\xffken\n")
  with pytest.raises(ValueError, match=r"bad\.txt.*byte offset 13.*line 2"):
    list(sources.read_documents([str(bad)]))

  bad_jsonl = tmp_path / "bad.jsonl"
  bad_jsonl.write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:2.*byte offset 25"):
    list(sources.read_documents([str(bad_jsonl)]))


def test_broken_jsonl_names_file_line_and_field(tmp_path):
  broken = tmp_path / "broken.jsonl"
  broken.write_text('{"text": "a"}\n\n{"text": "b"\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"broken\.jsonl:3: malformed JSON"):
    list(sources.read_documents([str(broken)]))

  no_field = tmp_path / "nofield.jsonl"
  _write_jsonl(no_field, [{"text": "a"}, {"body": "b"}])
  with pytest.raises(ValueError, match=r"nofield\.jsonl:2: missing text field 'text'"):
    list(sources.read_documents([str(no_field)]))

  not_str = tmp_path / "notstr.jsonl"
  _write_jsonl(not_str, [{"text": 3}])
  with pytest.raises(ValueError, match=r"notstr\.jsonl:1: field 'text' must be a string"):
    list(sources.read_documents([str(not_str)]))


def test_bad_records_are_skipped_and_counted_when_asked(tmp_path):
  good = ["first", "zweiter Text", "third, é"]
  lines = [json.dumps({"text": good[0]}).encode(), b'{"text": "\xc3("}', b'{"text": "unterminated',
           json.dumps({"body": "no text"}).encode(), json.dumps({"text": good[1]}).encode(), b'{"text": "\xff"}',
           json.dumps({"text": 4}).encode()]
  (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  (tmp_path / "b.txt").write_bytes(b"ok line\nlatin-1 caf\xe9\n")
  (tmp_path / "c.txt").write_text(good[2], encoding="utf-8")
  a, b = tmp_path / "a.jsonl", tmp_path / "b.txt"
  with pytest.raises(sources.BadRecordError, match=r"a\.jsonl:2: invalid UTF-8"):
    list(sources.read_documents([str(tmp_path)]))
  skipped = sources.SkippedRecords()
  docs = list(sources.read_documents([str(tmp_path)], skipped=skipped))
  assert [d.text for d in docs] == good
  assert dict(skipped.counts) == {"invalid_utf8": 3, "malformed_json": 1, "missing_field": 1, "non_string_field": 1}
  assert skipped.first == {"invalid_utf8": f"{a}:2", "malformed_json": f"{a}:3", "missing_field": f"{a}:4",
                           "non_string_field": f"{a}:7"}
  assert f"{b}:2" not in skipped.summary()  # only the first of each reason is named
  assert f"3 invalid_utf8 (first: {a}:2)" in skipped.summary()


def test_a_user_directory_with_its_own_stats_json_is_read_whole(tmp_path):
  data = tmp_path / "mine"
  data.mkdir()
  (data / "part-00000.jsonl").write_text(json.dumps({"text": "a"}) + "\n", encoding="utf-8")
  (data / "stats.json").write_text(json.dumps({"text": "my own stats record"}) + "\n", encoding="utf-8")
  assert [d.text for d in sources.read_documents([str(data)])] == ["a", "my own stats record"]


def test_an_unfinished_curate_output_is_refused(tmp_path):
  half = tmp_path / "half"  # what an interrupted `maxlm curate` leaves: shards and its resume state, no stats yet
  half.mkdir()
  for i in range(2):
    (half / f"part-{i:05d}.jsonl").write_text(json.dumps({"text": f"kept {i}"}) + "\n", encoding="utf-8")
  (half / sources.CURATE_STATE_FILE).write_bytes(b"\x80\x04state")
  with pytest.raises(ValueError, match="unfinished `maxlm curate` output"):
    sources.expand_paths([str(tmp_path / "half")])
  with pytest.raises(ValueError, match="unfinished"):
    sources.expand_paths([str(tmp_path)])  # found by walking a directory above it
  shards = sources.expand_paths([str(tmp_path / "half" / "part-*.jsonl")])  # named explicitly: the user's choice
  assert [p.name for p in shards] == ["part-00000.jsonl", "part-00001.jsonl"]
