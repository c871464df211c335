"""Lenient streaming reader for curation: every input record becomes a document or a counted skip reason.

Training reads strictly (a bad file is an error naming it); curation reads raw, messy inputs, so bad records
(invalid UTF-8, broken JSON lines, missing or non-string fields, empty or oversized documents) are skipped and
reported by reason, and nothing larger than `max_doc_bytes` is ever held in memory.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from data_pipelines.sources import Document, expand_paths

JSON_LINES_SUFFIXES = (".jsonl", ".json")
SKIP_REASONS = ("invalid_utf8", "malformed_json", "missing_field", "non_string_field", "empty_document",
                "document_too_large", "unreadable_file")
_CHUNK = 1 << 20


class Record(NamedTuple):
  """One input record: its document and "", or None and the reason it is skipped; `where` is its file:line
  (JSONL) or file (text), for good and bad records alike."""

  doc: Document | None
  reason: str
  where: str


def _read_line(f, limit: int) -> tuple[bytes, bool]:
  """The next line of binary file f, or its first `limit` bytes and True if it is longer (rest consumed)."""
  line = f.readline(limit + 1)
  if len(line) <= limit or line.endswith(b"\n"):
    return line, False
  while True:  # skip the rest of an oversized line without holding it
    chunk = f.readline(_CHUNK)
    if not chunk or chunk.endswith(b"\n"):
      return line[:limit], True


def _json_lines(path: pathlib.Path, text_field: str, max_doc_bytes: int) -> Iterator[Record]:
  with open(path, "rb") as f:
    lineno = 0
    while True:
      raw, too_long = _read_line(f, max_doc_bytes)
      if not raw:
        return
      lineno += 1
      where = f"{path}:{lineno}"
      if too_long:
        yield Record(None, "document_too_large", where)
        continue
      if not raw.strip():
        continue  # blank lines separate nothing in JSONL: not a record
      try:
        record = json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError:
        yield Record(None, "invalid_utf8", where)
        continue
      except json.JSONDecodeError:
        yield Record(None, "malformed_json", where)
        continue
      if not isinstance(record, dict) or text_field not in record:
        yield Record(None, "missing_field", where)
      elif not isinstance(record[text_field], str):
        yield Record(None, "non_string_field", where)
      elif not record[text_field].strip():
        yield Record(None, "empty_document", where)
      else:
        yield Record(Document(record[text_field], where), "", where)


def _text_file(path: pathlib.Path, max_doc_bytes: int) -> Iterator[Record]:
  where = str(path)
  if path.stat().st_size > max_doc_bytes:
    yield Record(None, "document_too_large", where)
    return
  data = path.read_bytes()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    yield Record(None, "invalid_utf8", f"{path}:{line}")
    return
  yield Record(Document(text, where), "", where) if text.strip() else Record(None, "empty_document", where)


def read_records(paths: Sequence[str], *, text_field: str = "text", max_doc_bytes: int = 64 << 20) -> Iterator[Record]:
  """A Record per input record, good (document, "") or bad (None, reason), in a deterministic order.

  One document per JSONL line (.jsonl / .json; field `text_field`), else one per file. Paths that match
  nothing raise FileNotFoundError before anything is read (a typo is not a skip). A `maxlm curate` output
  directory contributes its part-*.jsonl shards only (see sources.expand_paths).
  """
  for path in expand_paths(paths):
    try:
      if path.suffix.lower() in JSON_LINES_SUFFIXES:
        yield from _json_lines(path, text_field, max_doc_bytes)
      else:
        yield from _text_file(path, max_doc_bytes)
    except OSError:
      yield Record(None, "unreadable_file", str(path))
