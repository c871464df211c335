"""Reading and writing Hugging Face safetensors: memory-mapped, tensor by tensor, sharded with an index.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
and the raw little-endian tensor bytes. Reading maps each file once and hands out views, so converting a
model touches only the tensor being converted, never whole shards.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from data_pipelines.fileio import atomic_write

_DTYPES = {
  "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20


class CorruptCheckpointError(ValueError):
  """A safetensors file or index that cannot be read as written."""


class _File:
  """One memory-mapped safetensors file and its parsed header."""

  def __init__(self, path: Path):
    self.path = path
    size = path.stat().st_size
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CorruptCheckpointError(f"{path}: {size} bytes is too short for a safetensors file")
      (n,) = struct.unpack("<Q", head)
      if n > min(_MAX_HEADER, size - 8):
        raise CorruptCheckpointError(f"{path}: header length {n} exceeds the file ({size} bytes): truncated "
                                     "or not a safetensors file")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: unreadable header ({e})") from None
    header.pop("__metadata__", None)
    self.base = 8 + n
    self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for name, e in header.items():
      if e.get("dtype") not in _DTYPES:
        raise CorruptCheckpointError(f"{path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
      dtype, shape = _DTYPES[e["dtype"]], tuple(int(s) for s in e["shape"])
      begin, end = (int(o) for o in e["data_offsets"])
      if end - begin != dtype.itemsize * int(np.prod(shape)) or self.base + end > size:
        raise CorruptCheckpointError(f"{path}: tensor {name!r} {e['dtype']}{list(shape)} does not fit bytes "
                                     f"[{begin}, {end}) of a {size - self.base}-byte data section (truncated?)")
      self.entries[name] = (dtype, shape, begin, end)
    self._map = np.memmap(path, dtype=np.uint8, mode="r") if size > self.base else np.zeros(0, np.uint8)

  def get(self, name: str) -> np.ndarray:
    dtype, shape, begin, end = self.entries[name]
    return self._map[self.base + begin:self.base + end].view(dtype).reshape(shape)


class SafetensorsReader:
  """The tensors of a Hugging Face model directory (one file or shards + index), read lazily."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = Path(directory)
    index = self.directory / INDEX_FILE
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (KeyError, ValueError) as e:
        raise CorruptCheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
      files = sorted(set(weight_map.values()))
    elif (self.directory / SINGLE_FILE).is_file():
      files, weight_map = [SINGLE_FILE], None
    else:
      other = sorted(p.name for p in self.directory.glob("*.bin")) if self.directory.is_dir() else []
      hint = f" (found {other[:2]}: PyTorch pickles are not read; re-save with safe_serialization)" if other else ""
      raise FileNotFoundError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    self._files: dict[str, _File] = {}
    for name in files:
      if not (self.directory / name).is_file():
        raise CorruptCheckpointError(f"{index}: lists shard {name!r}, which does not exist")
      self._files[name] = _File(self.directory / name)
    self._where: dict[str, _File] = {}
    for f in self._files.values():
      for tensor in f.entries:
        self._where[tensor] = f
    if weight_map is not None:
      missing = [t for t, file in weight_map.items() if t not in self._files[file].entries]
      if missing:
        raise CorruptCheckpointError(f"{index}: tensor {missing[0]!r} is not in shard {weight_map[missing[0]]!r}")

  def keys(self) -> list[str]:
    return sorted(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    return self._where[name].entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._where[name].entries[name][0]

  def get(self, name: str) -> np.ndarray:
    """A read-only, memory-mapped view of tensor `name` (pages are read from disk on access)."""
    if name not in self._where:
      raise KeyError(f"{self.directory}: no tensor {name!r}")
    return self._where[name].get(name)


def write_safetensors(tensors: Iterable[tuple[str, np.ndarray]], directory: str | os.PathLike, *,
                      max_shard_bytes: int = 5 << 30) -> list[Path]:
  """Writes (name, array) pairs as model.safetensors, or as numbered shards plus an index when they exceed
  max_shard_bytes; at most one shard is held in memory. Returns the files written."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  written: list[Path] = []
  sizes = [0]
  total = 0

  def flush(i: int) -> None:
    tmp = directory / f".shard-{i:05d}.tmp"
    save_file(shards[i], str(tmp), metadata={"format": "pt"})
    written.append(tmp)
    shards[i] = {}

  for name, array in _chunks(tensors):
    nbytes = array.nbytes
    if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
      flush(len(shards) - 1)
      shards.append({})
      sizes.append(0)
    shards[-1][name] = np.ascontiguousarray(array)
    sizes[-1] += nbytes
    total += nbytes
  flush(len(shards) - 1)
  names = [SINGLE_FILE] if len(written) == 1 else [
    f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
  weight_map = {}
  final = []
  for tmp, name in zip(written, names):
    os.replace(tmp, directory / name)
    final.append(directory / name)
    for tensor in _File(directory / name).entries:
      weight_map[tensor] = name
  for stale in directory.glob("model*.safetensors"):  # shards of an earlier export with another count
    if stale not in final:
      stale.unlink()
  index = directory / INDEX_FILE
  if len(final) > 1:
    atomic_write(index, json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(
      weight_map.items()))}, indent=2).encode())
  elif index.exists():
    index.unlink()
  return final


def _chunks(tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
  seen = set()
  for name, array in tensors:
    if name in seen:
      raise ValueError(f"tensor {name!r} written twice")
    seen.add(name)
    yield name, np.asarray(array)
