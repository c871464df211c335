"""Atomic file writes: readers (and processes racing to fill a cache) never see a partial file."""

from __future__ import annotations

import os
import pathlib
import tempfile


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to a temp file beside `path`, fsyncs, then renames it over `path`."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; caches are meant to be shared.
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
