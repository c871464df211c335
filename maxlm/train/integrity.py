"""Checkpoint integrity: a sha256 manifest of every file of a step, written when the step commits and verified
before it is restored, and moving a damaged step aside (renamed, never deleted) so training can continue.

The manifest `checksums.json` lies inside the step directory: {"algorithm": "sha256", "files": {relative path:
{"size": bytes, "sha256": hex}}}. Orbax writes each host's array shards into its own files (OCDBT:
`<item>/ocdbt.process_<i>/d/<hash>`, merged by a small top-level index under `<item>/d/`), so a file is the
natural unit: process 0 hashes the files once every host has written them (after orbax's write barrier, before the
step is renamed into place), and on restore process i of n re-hashes the files sorted by name at positions i::n, so
each file is read once per job and the verdict is shared by every process. Two orbax bookkeeping files at the top
of the step (its metadata and commit marker) are rewritten at commit, after the manifest, and are not hashed; they
hold no tensors, and orbax fails loudly if they are unreadable.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from concurrent import futures
from pathlib import Path

from data_pipelines.fileio import atomic_write

MANIFEST = "checksums.json"
ALGORITHM = "sha256"  # hardware-accelerated (SHA-NI / ARMv8 crypto): ~1.7 GB/s per core here, faster than blake2b
UNHASHED = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt"})  # top-level files orbax rewrites at commit
CORRUPT_TAG = ".corrupt-"  # <step>.corrupt-<UTC time>: no orbax step name, so orbax neither lists nor deletes it


class CorruptCheckpoint(ValueError):
  """A checkpoint step's files do not match its manifest, or the manifest itself is unreadable."""


def _workers() -> int:
  return max(1, min(8, os.cpu_count() or 1))


def file_digest(path: Path) -> str:
  """Hex sha256 of a file, read in a stream (hashlib releases the GIL, so several files hash in parallel)."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, ALGORITHM).hexdigest()


def step_files(step_dir: Path) -> list[str]:
  """Relative paths of the files of a step directory that the manifest covers, sorted."""
  step_dir = Path(step_dir)
  names = []
  for root, _, files in os.walk(step_dir):
    rel_root = Path(root).relative_to(step_dir)
    for name in files:
      rel = (rel_root / name).as_posix()
      if rel == MANIFEST or rel in UNHASHED or (rel_root == Path(".") and name.startswith(f".{MANIFEST}.")):
        continue
      names.append(rel)
  return sorted(names)


def write_manifest(step_dir: Path) -> dict:
  """Hashes every file of `step_dir` and writes its manifest atomically; returns {files, bytes, seconds}."""
  step_dir = Path(step_dir)
  t0 = time.perf_counter()
  names = step_files(step_dir)
  with futures.ThreadPoolExecutor(_workers()) as pool:
    digests = list(pool.map(lambda n: file_digest(step_dir / n), names))
  entries = {n: {"size": (step_dir / n).stat().st_size, ALGORITHM: d} for n, d in zip(names, digests)}
  atomic_write(step_dir / MANIFEST, json.dumps({"algorithm": ALGORITHM, "files": entries}, indent=1).encode())
  return {"files": len(names), "bytes": sum(e["size"] for e in entries.values()),
          "seconds": time.perf_counter() - t0}


def read_manifest(step_dir: Path) -> dict | None:
  """The step's manifest {relative path: {size, sha256}}; None if it has none (written before checksums)."""
  path = Path(step_dir) / MANIFEST
  if not path.exists():
    return None
  try:
    manifest = json.loads(path.read_text())
    files = manifest["files"]
    if manifest.get("algorithm") != ALGORITHM or not all(
        isinstance(e["size"], int) and isinstance(e[ALGORITHM], str) for e in files.values()):
      raise ValueError("unexpected fields")
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise CorruptCheckpoint(f"{MANIFEST} is unreadable ({type(e).__name__}: {e})") from e
  return files


def verify_files(step_dir: Path, files: dict, *, process_index: int = 0, process_count: int = 1,
                 prefix: str = "") -> tuple[list[str], int]:
  """(problems, bytes hashed) for this process's share (sorted names i::n, under `prefix`) of a manifest."""
  step_dir = Path(step_dir)
  share = [n for n in sorted(files) if n.startswith(prefix)][process_index::process_count]

  def check(name: str) -> tuple[str | None, int]:
    path, want = step_dir / name, files[name]
    try:
      size = path.stat().st_size
      if size != want["size"]:
        return f"{name}: {size} bytes, {want['size']} when written", 0
      return (None if file_digest(path) == want[ALGORITHM] else f"{name}: {ALGORITHM} mismatch"), size
    except OSError as e:
      return f"{name}: {type(e).__name__}: {e.strerror or e}", 0

  with futures.ThreadPoolExecutor(_workers()) as pool:
    results = list(pool.map(check, share))
  return [p for p, _ in results if p], sum(n for _, n in results)


def move_aside(step_dir: Path) -> Path:
  """Renames a damaged step directory to <step>.corrupt-<UTC time> beside it (kept for inspection)."""
  step_dir = Path(step_dir)
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
  target = step_dir.with_name(f"{step_dir.name}{CORRUPT_TAG}{stamp}")
  n = 1
  while target.exists():
    target = step_dir.with_name(f"{step_dir.name}{CORRUPT_TAG}{stamp}-{n}")
    n += 1
  step_dir.rename(target)
  return target
