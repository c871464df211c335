"""Curate's resume state: an append-only log of finished shards, in plain formats (JSON lines and .npz arrays).

Beside the shards of a `maxlm curate` output:
  .curate_state.jsonl        a header line {"version", "fingerprint"}, then one line per finished shard: records
                             consumed, shards written, the next near-dedup id, done, and the stats added since the
                             line before
  .curate_state/S-R.npz      per line (S shards written, R records consumed), the dedup keys it added: exact-dedup
                             digests (uint8 [n, 16]) and the near-dedup index's new representatives (ids int64 [k],
                             MinHash signatures uint32 [k, p])
Each shard appends what it added, so the state costs I/O linear in the shards, and nothing is unpickled from an
output directory. A torn last line (a crash while appending) is dropped on resume; its shard is redone.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines import sources
from data_pipelines.fileio import atomic_write

VERSION = 3  # 3: this log; 2 was a pickle of the whole state, written again after every shard
STATE_FILE = sources.CURATE_STATE_FILE
KEYS_DIR = ".curate_state"


def minus(new: Any, old: Any) -> Any:
  """new - old for nested dicts of ints or lists of ints (the raw stats), leaving out what did not change."""
  if isinstance(new, dict):
    out = {}
    for k, v in new.items():
      d = minus(v, (old or {}).get(k))
      if d is not None:
        out[k] = d
    return out or None
  if isinstance(new, list):
    d = [a - b for a, b in zip(new, old or [0] * len(new), strict=True)]
    return d if any(d) else None
  return (new - (old or 0)) or None


def plus(acc: Any, delta: Any) -> Any:
  """acc + delta for what minus returns (acc is updated in place where it is a dict)."""
  if delta is None:
    return acc
  if isinstance(delta, dict):
    acc = {} if acc is None else acc
    for k, v in delta.items():
      acc[k] = plus(acc.get(k), v)
    return acc
  if isinstance(delta, list):
    return [a + b for a, b in zip(acc or [0] * len(delta), delta, strict=True)]
  return (acc or 0) + delta


class StateLog:
  """The resume log of one output directory, for runs of one fingerprint (inputs and config)."""

  def __init__(self, output: Path, fingerprint: str):
    self.output, self.fingerprint = output, fingerprint
    self.path = output / STATE_FILE

  def exists(self) -> bool:
    return self.path.is_file()

  def start(self) -> None:
    """A new log: the header only."""
    atomic_write(self.path, (json.dumps({"version": VERSION, "fingerprint": self.fingerprint}) + "\n").encode())

  def records(self) -> list[dict[str, Any]]:
    """The finished shards' lines in order, after checking the header; a torn last line is cut off the file."""
    data = self.path.read_bytes()
    lines = data.split(b"\n")
    try:
      header = json.loads(lines[0])
    except ValueError as e:
      raise ValueError(f"{self.path}: unreadable curate state ({e}); delete it and the shards to start over") from None
    version = header.get("version") if isinstance(header, dict) else None
    if version != VERSION:
      raise ValueError(f"{self.path}: curate state version {version} from another maxlm version (this one writes "
                       f"{VERSION}); rerun into a new --output")
    if header.get("fingerprint") != self.fingerprint:
      raise ValueError(f"{self.output} holds a curate run with other inputs or config; use a new --output")
    records, good = [], len(lines[0]) + 1
    for i, line in enumerate(lines[1:], start=1):
      complete = i < len(lines) - 1  # the text after the last newline is never a whole record
      try:
        record = json.loads(line) if complete else None
      except ValueError:
        record = None
      if record is None:
        if complete and i < len(lines) - 2:
          raise ValueError(f"{self.path}: line {i + 1} is corrupt; delete the state and the shards to start over")
        break
      records.append(record)
      good += len(line) + 1
    if good < len(data):
      os.truncate(self.path, good)  # the torn line: its shard is redone and appended again
    return records

  def append(self, record: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Writes the record's arrays, then appends its line (so a line always has its arrays)."""
    name = f"{KEYS_DIR}/{record['shards']:05d}-{record['consumed']}.npz"
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(self.output / name, buf.getvalue())
    with open(self.path, "ab") as f:
      f.write((json.dumps({**record, "keys": name}, separators=(",", ":")) + "\n").encode())
      f.flush()
      os.fsync(f.fileno())

  def arrays(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays a record's line names (plain arrays only: nothing is unpickled)."""
    path = self.output / record["keys"]
    try:
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
      raise ValueError(f"{path}: unreadable curate state ({e}); delete the state and the shards to start over"
                       ) from None
