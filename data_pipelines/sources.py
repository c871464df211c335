"""Text sources: user files (txt / JSONL / dirs / globs), the embedded default corpus, Debian fortune files.

The default corpus is the text every Python installation carries (standard-library sources and the
interpreter's own documentation), discovered at run time so nothing is committed or downloaded.
"""

from __future__ import annotations

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


def expand_paths(paths: Sequence[str]) -> list[pathlib.Path]:
  """Files of paths: files, directories (recursed, sorted, hidden entries skipped) and globs.

  A path matching nothing raises FileNotFoundError naming it, before any file is read.
  """
  if isinstance(paths, (str, os.PathLike)):
    raise TypeError(f"paths must be a sequence of paths, got the single path {paths!r}")
  out: list[pathlib.Path] = []
  for raw in paths:
    raw = os.fspath(raw)
    candidates = sorted(glob.glob(raw, recursive=True)) if glob.has_magic(raw) else [raw]
    matched = []
    for candidate in candidates:
      p = pathlib.Path(candidate)
      if p.is_dir():
        matched.extend(sorted(f for f in p.rglob("*") if f.is_file() and not _is_hidden(f, p)))
      elif p.is_file():
        matched.append(p)
    if not matched:
      raise FileNotFoundError(f"data path {raw!r} matches no files")
    out.extend(matched)
  # A file named twice (e.g. by a directory and a glob) is still one set of documents.
  unique: dict[pathlib.Path, pathlib.Path] = {}
  for p in out:
    unique.setdefault(p.resolve(), p)
  return list(unique.values())


def _decode(data: bytes, source: str) -> str:
  """Strict UTF-8 decode with an error naming the source, byte offset and line."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise ValueError(
        f"{source}: invalid UTF-8 at byte offset {e.start} (line {line}): {e.reason}") from None


def _read_json_lines(path: pathlib.Path, text_field: str) -> Iterator[Document]:
  """One document per non-blank JSONL line, from its text_field."""
  with open(path, "rb") as f:
    offset = 0
    for lineno, raw in enumerate(f, start=1):
      line_offset, offset = offset, offset + len(raw)
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}:{lineno}: invalid UTF-8 at byte offset {line_offset + e.start}: {e.reason}"
        ) from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                         "expected one JSON object per line") from None
      if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path}:{lineno}: missing text field {text_field!r} (found {keys})")
      text = record[text_field]
      if not isinstance(text, str):
        raise ValueError(
            f"{path}:{lineno}: field {text_field!r} must be a string, got {type(text).__name__}")
      if text:
        yield Document(text, f"{path}:{lineno}")


def read_documents(paths: Sequence[str], text_field: str = "text") -> Iterator[Document]:
  """Documents from user paths: one per JSONL line (.jsonl/.json), else one per UTF-8 file."""
  files = expand_paths(paths)  # Resolve everything first so a bad path fails before any work.
  for path in files:
    if path.suffix.lower() in _JSON_LINES_SUFFIXES:
      yield from _read_json_lines(path, text_field)
    else:
      text = _decode(path.read_bytes(), str(path))
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
