"""Text sources: user files (txt / JSONL / dirs / globs), the embedded default corpus, Debian fortune files.

The default corpus is the text every Python installation carries (standard-library sources and the
interpreter's own documentation), discovered at run time so nothing is committed or downloaded.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import logging
import os
import pathlib
import re
import sys
import sysconfig
from collections.abc import Iterator, Sequence

log = logging.getLogger(__name__)

_JSON_LINES_SUFFIXES = (".jsonl", ".json")
_DOC_SUFFIXES = (".txt", ".rst", ".md")
# Directories whose contents change when packages are installed, or are not source text.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "lib-dynload"})
# Test directories: only their .py files are kept (their data files are fixtures, often odd bytes).
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
# Where the Debian fortunes packages (fortunes, fortunes-de, -es, -it) install their %-separated text files.
FORTUNES_DIR = pathlib.Path("/usr/share/games/fortunes")
_FORTUNE_SEPARATOR = re.compile(r"^%$", flags=re.MULTILINE)
# What `maxlm curate` writes into its output directory (data_pipelines/curate/pipeline.py): the kept documents in
# numbered JSONL shards, and beside them its stats (JSON and a PNG plot) and its resume state.
CURATE_SHARD = re.compile(r"part-\d{5,}\.jsonl")
CURATE_STATS_FILE = "stats.json"
CURATE_STATE_FILE = ".curate_state.jsonl"


@dataclasses.dataclass(frozen=True)
class Document:
  """One training document and where it came from (path, or path:line for JSONL)."""

  text: str
  source: str


def _stable_hash(key: str) -> int:
  """Process-independent 64-bit hash (Python's hash() is salted per process)."""
  return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")


def _walk_files(root: pathlib.Path, suffixes: tuple[str, ...]) -> list[pathlib.Path]:
  """Files under root with one of suffixes, skipping excluded dirs and test-dir data files."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
    rel_parts = pathlib.Path(dirpath).relative_to(root).parts
    in_test_dir = any(part in _TEST_DIRS for part in rel_parts)
    for name in sorted(filenames):
      if not name.endswith(suffixes) or (in_test_dir and not name.endswith(".py")):
        continue
      path = pathlib.Path(dirpath, name)
      if path.is_file() and not path.is_symlink():
        found.append(path)
  return found


def _default_corpus_roots() -> list[tuple[pathlib.Path, tuple[str, ...]]]:
  """(root, suffixes) pairs of the base interpreter's own text; never site-packages."""
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()
  roots = [(stdlib, (".py", *_DOC_SUFFIXES))]
  # Distribution-packaged Python docs (e.g. Debian's /usr/share/doc/python3.11); the rest of
  # share/doc belongs to other packages and changes whenever they are installed.
  doc_dir = pathlib.Path(sys.base_prefix, "share", "doc")
  if doc_dir.is_dir():
    for sub in sorted(doc_dir.iterdir()):
      if sub.is_dir() and sub.name.startswith("python3"):
        roots.append((sub.resolve(), _DOC_SUFFIXES))
  return roots


def _default_corpus_entries(max_bytes: int | None) -> list[tuple[str, pathlib.Path]]:
  """(stable name, path) pairs of the default corpus, sorted by name; see default_corpus_files."""
  if max_bytes is not None and max_bytes <= 0:
    raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
  files: dict[str, pathlib.Path] = {}
  for root, suffixes in _default_corpus_roots():
    for path in _walk_files(root, suffixes):
      files.setdefault(f"{root.name}/{path.relative_to(root).as_posix()}", path)
  if not files:
    stdlib = sysconfig.get_paths()["stdlib"]
    raise FileNotFoundError(f"no default corpus under {stdlib!r}; pass data paths explicitly")
  if max_bytes is None:
    return sorted(files.items())
  selected, total = [], 0
  for name in sorted(files, key=lambda k: (_stable_hash(k), k)):
    size = files[name].stat().st_size
    if size == 0 or total + size > max_bytes:
      continue  # Keep filling with smaller files: the cap is a budget, not a cut-off point.
    selected.append(name)
    total += size
  return [(name, files[name]) for name in sorted(selected)]


def default_corpus_files(max_bytes: int | None) -> list[pathlib.Path]:
  """The embedded default corpus: stdlib sources and Python docs, optionally capped at max_bytes.

  The capped subset is chosen by a stable hash of each file's relative path so it spreads across
  the whole standard library instead of taking the alphabetically first modules.
  """
  return [path for _, path in _default_corpus_entries(max_bytes)]


def _is_hidden(path: pathlib.Path, root: pathlib.Path) -> bool:
  """Dot-files, dot-dirs (.git) and __pycache__ below root: not documents."""
  return any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(root).parts)


def _curate_status(directory: pathlib.Path) -> str:
  """"done" if directory is a finished `maxlm curate` output (by its stats.json), "unfinished" if it only holds
  curate's resume state, else ""."""
  stats = directory / CURATE_STATS_FILE
  if stats.is_file():
    try:
      data = json.loads(stats.read_bytes())
    except (OSError, ValueError):
      data = None
    if isinstance(data, dict) and "stages" in data and "shards" in data:
      return "done"
  return "unfinished" if (directory / CURATE_STATE_FILE).is_file() else ""


def _curate_extra(path: pathlib.Path, statuses: dict[pathlib.Path, str], *, in_dir: bool) -> bool:
  """Whether path is a file of a finished `maxlm curate` output that is not one of its part-NNNNN.jsonl shards
  (its stats.json, stats.png). A file found by walking an unfinished curate output's directory is an error."""
  if path.parent not in statuses:
    statuses[path.parent] = _curate_status(path.parent)
  status = statuses[path.parent]
  if status == "unfinished" and in_dir:
    raise ValueError(f"{path.parent} is an unfinished `maxlm curate` output (no {CURATE_STATS_FILE} yet): rerun "
                     "the same `maxlm curate` command to finish it, or name its part-*.jsonl shards explicitly")
  return status == "done" and not CURATE_SHARD.fullmatch(path.name)


def expand_paths(paths: Sequence[str]) -> list[pathlib.Path]:
  """Files of paths: files, directories (recursed, sorted, hidden entries skipped) and globs.

  A path matching nothing raises FileNotFoundError naming it, before any file is read. A `maxlm curate` output
  directory reached through a directory or glob contributes only its part-NNNNN.jsonl shards, not its stats.
  """
  if isinstance(paths, (str, os.PathLike)):
    raise TypeError(f"paths must be a sequence of paths, got the single path {paths!r}")
  out: list[pathlib.Path] = []
  statuses: dict[pathlib.Path, str] = {}
  for raw in paths:
    raw = os.fspath(raw)
    is_glob = glob.has_magic(raw)
    candidates = sorted(glob.glob(raw, recursive=True)) if is_glob else [raw]
    matched = []
    for candidate in candidates:
      p = pathlib.Path(candidate)
      if p.is_dir():
        _curate_extra(p / CURATE_STATS_FILE, statuses, in_dir=True)  # an unfinished curate output: even if no shards
        for f in sorted(p.rglob("*")):
          if f.is_file() and not _is_hidden(f, p) and not _curate_extra(f, statuses, in_dir=True):
            matched.append(f)
      elif p.is_file() and not (is_glob and _curate_extra(p, statuses, in_dir=False)):
        matched.append(p)
    if not matched:
      raise FileNotFoundError(f"data path {raw!r} matches no files")
    out.extend(matched)
  # A file named twice (e.g. by a directory and a glob) is still one set of documents.
  unique: dict[pathlib.Path, pathlib.Path] = {}
  for p in out:
    unique.setdefault(p.resolve(), p)
  return list(unique.values())


class BadRecordError(ValueError):
  """A record of a user file that cannot be a document (invalid UTF-8, malformed JSON, no text field)."""

  def __init__(self, message: str, reason: str, where: str):
    super().__init__(message)
    self.reason, self.where = reason, where


@dataclasses.dataclass
class SkippedRecords:
  """Bad records that read_documents skipped instead of raising: counts per reason and the first of each."""

  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  first: dict[str, str] = dataclasses.field(default_factory=dict)  # reason -> "file:line" of its first record

  def add(self, error: BadRecordError) -> None:
    """Counts one skipped record."""
    self.counts[error.reason] += 1
    self.first.setdefault(error.reason, error.where)

  def __bool__(self) -> bool:
    return bool(self.counts)

  def summary(self) -> str:
    """e.g. "3 invalid_utf8 (first: a.jsonl:7), 1 malformed_json (first: b.jsonl:2)"."""
    return ", ".join(f"{n} {reason} (first: {self.first[reason]})" for reason, n in sorted(self.counts.items()))


def _skip_or_raise(error: BadRecordError, skipped: SkippedRecords | None) -> None:
  """The bad-record policy of read_documents: counted in `skipped` if given, else raised."""
  if skipped is None:
    raise error
  skipped.add(error)


def _decode(data: bytes, source: str) -> str:
  """Strict UTF-8 decode with an error naming the source, byte offset and line."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise BadRecordError(f"{source}: invalid UTF-8 at byte offset {e.start} (line {line}): {e.reason}",
                         "invalid_utf8", f"{source}:{line}") from None


def _json_line_text(raw: bytes, offset: int, where: str, text_field: str) -> str | None:
  """The text field of one JSONL line (None for a blank line); BadRecordError names where if it has none."""
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadRecordError(f"{where}: invalid UTF-8 at byte offset {offset + e.start}: {e.reason}",
                         "invalid_utf8", where) from None
  if not line.strip():
    return None
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise BadRecordError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); expected one JSON object per "
                         "line", "malformed_json", where) from None
  if not isinstance(record, dict) or text_field not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise BadRecordError(f"{where}: missing text field {text_field!r} (found {keys})", "missing_field", where)
  text = record[text_field]
  if not isinstance(text, str):
    raise BadRecordError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}",
                         "non_string_field", where)
  return text


def _read_json_lines(path: pathlib.Path, text_field: str, skipped: SkippedRecords | None) -> Iterator[Document]:
  """One document per non-blank JSONL line, from its text_field; bad lines raise, or are counted in skipped."""
  with open(path, "rb") as f:
    offset = 0
    for lineno, raw in enumerate(f, start=1):
      line_offset, offset = offset, offset + len(raw)
      where = f"{path}:{lineno}"
      try:
        text = _json_line_text(raw, line_offset, where, text_field)
      except BadRecordError as e:
        _skip_or_raise(e, skipped)
        continue
      if text:
        yield Document(text, where)


def read_documents(paths: Sequence[str], text_field: str = "text", *,
                   skipped: SkippedRecords | None = None) -> Iterator[Document]:
  """Documents from user paths: one per JSONL line (.jsonl/.json), else one per UTF-8 file.

  A bad record (invalid UTF-8, malformed JSON line, missing or non-string text field) raises BadRecordError
  naming its file and line, unless `skipped` is given: then it is skipped and counted there.
  """
  files = expand_paths(paths)  # Resolve everything first so a bad path fails before any work.
  for path in files:
    if path.suffix.lower() in _JSON_LINES_SUFFIXES:
      yield from _read_json_lines(path, text_field, skipped)
      continue
    try:
      text = _decode(path.read_bytes(), str(path))
    except BadRecordError as e:
      _skip_or_raise(e, skipped)
      continue
    if text:
      yield Document(text, str(path))


def default_documents(max_bytes: int | None) -> Iterator[Document]:
  """Default-corpus documents named by relative path; non-UTF-8 files are skipped and counted."""
  skipped = []
  for name, path in _default_corpus_entries(max_bytes):
    try:
      text = path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
      skipped.append(path.name)
      continue
    if text.strip():
      yield Document(text, name)  # e.g. "python3.11/json/decoder.py": the same on every machine
  if skipped:
    log.warning("default corpus: skipped %d files that are not readable UTF-8 (e.g. %s)",
                len(skipped), ", ".join(skipped[:3]))


def fortune_records(path: str | os.PathLike) -> list[str]:
  """The non-empty records of a fortune file, preferring its UTF-8 ".u8" twin (the others are Latin-1 where not
  ASCII): real multilingual text for tests and benchmarks."""
  path = pathlib.Path(path)
  if path.with_name(path.name + ".u8").is_file():
    path = path.with_name(path.name + ".u8")
  raw = path.read_bytes()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    text = raw.decode("latin-1")
  return [r.strip("\n") for r in _FORTUNE_SEPARATOR.split(text) if r.strip()]
