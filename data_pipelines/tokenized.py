"""Token shards on disk: `maxlm tokenize` writes them (ArrayRecord + manifest), TokenSplit reads them back.

Layout of a tokenized directory:
  manifest.json               format, tokenizer, dtype, and per named source and split: shards with their
                              documents, tokens, byte size and sha256
  tokenizer/                  the tokenizer the ids belong to (loadable with tokenizer.load_tokenizer)
  <source>/<split>-NNNNN.arrayrecord   one record per document: [bos] ids [eos] as little-endian dtype
  <source>/<split>-NNNNN.index.npz     per document: tokens and UTF-8 bytes (so a loader can chunk, weight
                                       and order documents without reading the shards)
The manifest is written last: a directory without one is an interrupted run, not a dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import pathlib
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from data_pipelines import sources
from data_pipelines.curate.reader import read_records
from data_pipelines.fileio import atomic_write
from data_pipelines.loader import entropy_of_counts
from data_pipelines.tokenizer import AnyTokenizer, HFTokenizer, bos_prefix, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "eval")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ENCODE_BATCH_DOCS = 256
# A batch also closes at this much text, and a longer document is encoded alone, in pieces of it where the tokenizer
# allows (Tokenizer.encode_array): their ids as Python ints (~36 bytes a token) are what tokenizing holds at its peak.
_ENCODE_BATCH_CHARS = 4 << 20
_COUNT_EVERY_TOKENS = 1 << 20  # targets gathered before one bincount into a split's unigram counts
_HASH_CHUNK = 1 << 22


class ManifestError(ValueError):
  """A tokenized directory that is missing, incomplete, corrupt or incompatible; the message names the file."""


def parse_inputs(inputs: Sequence[str]) -> dict[str, list[str]]:
  """`NAME=PATH` or `PATH` arguments -> {source name: paths}; a bare PATH is named after its file or directory."""
  named: dict[str, list[str]] = {}
  for arg in inputs:
    name, eq, path = arg.partition("=")
    if not eq or "/" in name or not _NAME.fullmatch(name):
      p = pathlib.Path(arg.rstrip("/") or "/")
      name, path = (p.name if p.is_dir() else p.stem), arg
      if any(c in name for c in "*?["):  # a glob: named after its directory
        name = p.parent.name
    if not _NAME.fullmatch(name):
      raise ValueError(f"input {arg!r}: source name {name!r} must match {_NAME.pattern}; pass NAME=PATH")
    named.setdefault(name, []).append(path)
  return named


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_HASH_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def eval_fraction_of(source: str) -> float:
  """Stable position in [0, 1) of a document (by its origin, e.g. path:line), deciding its split."""
  # Salted so it is independent of the hash that picks the capped default-corpus subset.
  digest = hashlib.sha256(f"maxlm-eval-split\0{source}".encode()).digest()
  return int.from_bytes(digest[:8], "little") / 2.0**64


def token_dtype(vocab_size: int) -> np.dtype:
  """The narrowest unsigned dtype holding every id: uint16 below 65,536 ids, else uint32."""
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
  """Documents of one source and split -> numbered ArrayRecord shards of about `shard_tokens` tokens."""

  def __init__(self, root: pathlib.Path, source: str, split: str, dtype: np.dtype, shard_tokens: int,
               options: str, vocab_size: int = 0):
    self.root, self.source, self.split, self.dtype = root, source, split, dtype
    self.shard_tokens, self.options = shard_tokens, options
    self.shards: list[dict[str, Any]] = []
    self.documents = 0  # written so far, over every shard
    # With vocab_size, the unigram counts of the predicted tokens (all but each document's first), for summary().
    self._counts = np.zeros(vocab_size, np.int64) if vocab_size else None
    self._targets: list[np.ndarray] = []
    self._pending_targets = 0
    self._writer = None
    self._lengths: list[int] = []
    self._bytes: list[int] = []
    self._tokens = 0  # sum(self._lengths), kept as it grows

  def _path(self, suffix: str) -> pathlib.Path:
    return self.root / self.source / f"{self.split}-{len(self.shards):05d}{suffix}"

  def write(self, ids: np.ndarray, text_bytes: int) -> None:
    if self._writer is None:
      from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415
      self._path("").parent.mkdir(parents=True, exist_ok=True)
      self._tmp = self._path(".arrayrecord.tmp")
      self._writer = ArrayRecordWriter(str(self._tmp), self.options)
    self._writer.write(ids.astype(self.dtype).tobytes())
    self.documents += 1
    if self._counts is not None:
      self._targets.append(ids[1:])
      self._pending_targets += len(ids) - 1
      if self._pending_targets >= _COUNT_EVERY_TOKENS:
        self._count_targets()
    self._lengths.append(len(ids))
    self._bytes.append(text_bytes)
    self._tokens += len(ids)
    if self._tokens >= self.shard_tokens:
      self.close_shard()

  def close_shard(self) -> None:
    if self._writer is None:
      return
    self._writer.close()
    self._writer = None
    path, index_path = self._path(".arrayrecord"), self._path(".index.npz")
    buf = io.BytesIO()
    np.savez(buf, tokens=np.asarray(self._lengths, np.int64), text_bytes=np.asarray(self._bytes, np.int64))
    atomic_write(index_path, buf.getvalue())
    os.replace(self._tmp, path)
    self.shards.append({"file": str(path.relative_to(self.root)), "index": str(index_path.relative_to(self.root)),
                        "documents": len(self._lengths), "tokens": self._tokens,
                        "bytes": path.stat().st_size, "sha256": _sha256(path), "index_sha256": _sha256(index_path)})
    self._lengths, self._bytes, self._tokens = [], [], 0

  def _count_targets(self) -> None:
    if self._targets:
      self._counts += np.bincount(np.concatenate(self._targets), minlength=len(self._counts))[:len(self._counts)]
    self._targets, self._pending_targets = [], 0

  def summary(self) -> dict[str, Any]:
    """The split's manifest entry: documents, tokens, shards, and (with vocab_size) its targets' unigram entropy."""
    self.close_shard()
    out = {"documents": sum(s["documents"] for s in self.shards), "tokens": sum(s["tokens"] for s in self.shards),
           "shards": self.shards}
    if self._counts is not None:
      self._count_targets()
      out["unigram_entropy"] = entropy_of_counts(self._counts)
    return out


def encode_documents(documents: Iterable[sources.Document], tokenizer: AnyTokenizer
             ) -> Iterator[tuple[sources.Document, np.ndarray]]:
  """(document, [bos] ids eos as int64) per document, in order; encoded in batches, a giant document alone.

  A document is stored as its prompt encoding (encode_prompt: bos only if the tokenizer adds one) then one eos,
  the separator of packed documents (a tokenizer that appends eos to prompts gets no second one).
  """
  prefix, pending, pending_chars = bos_prefix(tokenizer), [], 0

  def packed(ids) -> np.ndarray:
    out = np.empty(len(prefix) + len(ids) + 1, dtype=np.int64)
    out[:len(prefix)], out[len(prefix):-1], out[-1] = prefix, ids, tokenizer.eos_id
    return out

  def flush() -> Iterator[tuple[sources.Document, np.ndarray]]:
    nonlocal pending_chars
    encoded = tokenizer.encode_batch([d.text for d in pending])
    for i, doc in enumerate(pending):
      yield doc, packed(encoded[i])
      encoded[i] = None  # a Python list of ints (~36 bytes a token): freed once packed
    pending.clear()
    pending_chars = 0

  for doc in documents:
    if len(doc.text) > _ENCODE_BATCH_CHARS:
      yield from flush()
      yield doc, packed(tokenizer.encode_array(doc.text, _ENCODE_BATCH_CHARS))
      continue
    pending.append(doc)
    pending_chars += len(doc.text)
    if len(pending) >= _ENCODE_BATCH_DOCS or pending_chars >= _ENCODE_BATCH_CHARS:
      yield from flush()
  yield from flush()


def write_source(out: pathlib.Path, name: str, documents: Iterable[sources.Document], tokenizer: AnyTokenizer, *,
                 eval_fraction: float, dtype: np.dtype, shard_tokens: int, options: str,
                 on_document: Callable[[], None] | None = None) -> dict[str, Any]:
  """Tokenizes one source's documents into out/name/{train,eval}-NNNNN shards; returns its manifest entry.

  The eval-split rule (the one `maxlm tokenize` and training's data.paths share): a document is eval when
  eval_fraction_of(its origin) < eval_fraction. With eval_fraction > 0 and >= 2 documents each split gets at
  least one: if none fell to a split, the other split's last document moves there (each split's latest document
  is written only once the next one comes, so the order of documents is kept).
  """
  writers = {split: ShardWriter(out, name, split, dtype, shard_tokens, options, tokenizer.vocab_size)
             for split in SPLITS}
  held: dict[str, tuple[np.ndarray, int] | None] = {split: None for split in SPLITS}
  text_bytes = 0
  for doc, ids in encode_documents(documents, tokenizer):
    size = len(doc.text.encode("utf-8"))
    text_bytes += size
    split = "eval" if eval_fraction_of(doc.source) < eval_fraction else "train"
    if held[split] is not None:
      writers[split].write(*held[split])
    held[split] = (ids, size)
    if on_document is not None:
      on_document()
  if eval_fraction > 0 and held["eval"] is None and writers["train"].documents:
    held["eval"], held["train"] = held["train"], None
  elif held["train"] is None and writers["eval"].documents:
    held["train"], held["eval"] = held["eval"], None
  for split, doc in held.items():
    if doc is not None:
      writers[split].write(*doc)
  return {"text_bytes": text_bytes, "splits": {split: w.summary() for split, w in writers.items()}}


def _interleaved_texts(named: dict[str, list[str]], text_field: str, max_doc_bytes: int) -> Iterator[str]:
  """Texts of every source, round-robin, so a tokenizer trained on a prefix sees all of them."""
  iters = [read_records(paths, text_field=text_field, max_doc_bytes=max_doc_bytes) for paths in named.values()]
  while iters:
    for it in list(iters):
      for doc, _, _ in it:
        if doc is not None:
          yield doc.text
          break
      else:
        iters.remove(it)


def save_tokenizer(tokenizer: AnyTokenizer, out: pathlib.Path) -> None:
  """Copies the tokenizer's file(s) into out/ (tokenizer.model, or tokenizer.json, its configs and chat template)."""
  out.mkdir(parents=True, exist_ok=True)
  if isinstance(tokenizer, HFTokenizer):
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
      if (tokenizer.path.parent / name).is_file():
        shutil.copyfile(tokenizer.path.parent / name, out / name)
  else:
    shutil.copyfile(tokenizer.path, out / "tokenizer.model")


def new_manifest(tokenizer: AnyTokenizer, eval_fraction: float) -> dict[str, Any]:
  """A manifest without sources yet, for ids of `tokenizer` stored in the narrowest dtype."""
  return {"format": FORMAT, "dtype": token_dtype(tokenizer.vocab_size).str, "eval_fraction": eval_fraction,
          "tokenizer": {"dir": TOKENIZER_DIR, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id},
          "sources": {}}


def write_manifest(out: pathlib.Path, manifest: dict[str, Any]) -> None:
  """Written last, atomically: a directory with a manifest is a complete dataset."""
  atomic_write(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def shard_tokens_of(shard_mb: float, dtype: np.dtype) -> int:
  """Tokens per shard of about shard_mb MB."""
  return max(1, int(shard_mb * 2**20) // dtype.itemsize)


def tokenize(inputs: Sequence[str], output: str | os.PathLike, cfg: Any, *, vocab_size: int,
             progress: bool = True) -> dict[str, Any]:
  """Tokenizes curated inputs (NAME=PATH or PATH: JSONL shards, text files, dirs, globs) into `output`.

  cfg is the config's `tokenize` section. The tokenizer is loaded from cfg.tokenizer or trained on the inputs
  (sentencepiece BPE, byte fallback, identity normalization: decode(encode(text)) == text). Each document is
  stored as [bos] ids [eos]; write_source's rule puts cfg.eval_fraction of them in the eval split.
  Bad records are counted per reason in the manifest, never fatal. A `maxlm curate` output directory is read as
  its part-*.jsonl shards only, not its stats.json and stats.png. Returns the manifest.
  """
  named = parse_inputs(inputs)
  out = pathlib.Path(output)
  if (out / MANIFEST).exists():
    raise FileExistsError(f"{out} already holds a tokenized dataset ({MANIFEST}); choose another --output")
  if not 0.0 <= cfg.eval_fraction < 1.0:
    raise ValueError(f"tokenize.eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
  if cfg.shard_mb <= 0:
    raise ValueError(f"tokenize.shard_mb must be > 0, got {cfg.shard_mb}")
  for paths in named.values():
    sources.expand_paths(paths)  # a typo is an error before anything is written
  max_doc_bytes = int(cfg.max_doc_mb * 2**20)
  out.mkdir(parents=True, exist_ok=True)
  for stale in out.glob("*/*.tmp"):
    stale.unlink()  # an interrupted earlier run's partial shard

  t0 = time.monotonic()
  if cfg.tokenizer:
    save_tokenizer(load_tokenizer(cfg.tokenizer), out / TOKENIZER_DIR)
    tokenizer = load_tokenizer(out / TOKENIZER_DIR)  # the copy: its sha256 is what the loader will see
  else:
    size = cfg.vocab_size or vocab_size
    log.info("training a %d-piece BPE tokenizer on up to %.0f MB of %s", size, cfg.max_train_mb, ", ".join(named))
    tokenizer = train_tokenizer(_interleaved_texts(named, cfg.text_field, max_doc_bytes), size,
                                out / TOKENIZER_DIR / "tokenizer", max_train_bytes=int(cfg.max_train_mb * 2**20))
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, more than model.vocab_size={vocab_size}")
  manifest = new_manifest(tokenizer, cfg.eval_fraction)
  dtype = np.dtype(manifest["dtype"])
  bar = tqdm(desc="tokenize", unit="doc", disable=not progress, dynamic_ncols=True)
  for name, paths in named.items():
    skipped: dict[str, int] = {}

    def documents(name=name, paths=paths, skipped=skipped) -> Iterator[sources.Document]:
      for doc, reason, where in read_records(paths, text_field=cfg.text_field, max_doc_bytes=max_doc_bytes):
        if doc is not None:
          yield doc
          continue
        if reason not in skipped:
          log.warning("%s: skipping records: %s (first: %s; counted in the manifest)", name, reason, where)
        skipped[reason] = skipped.get(reason, 0) + 1

    entry = write_source(out, name, documents(), tokenizer, eval_fraction=cfg.eval_fraction, dtype=dtype,
                         shard_tokens=shard_tokens_of(cfg.shard_mb, dtype), options=cfg.array_record_options,
                         on_document=lambda: bar.update(1))
    if entry["splits"]["train"]["documents"] == 0:
      raise ValueError(f"source {name!r} ({', '.join(paths)}) has no training documents")
    manifest["sources"][name] = {"inputs": [str(p) for p in paths], "skipped": skipped, **entry}
  bar.close()
  manifest["seconds"] = round(time.monotonic() - t0, 3)
  write_manifest(out, manifest)
  return manifest


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
  """The manifest of a tokenized directory, with a clear error if it is missing or not ours."""
  path = pathlib.Path(root) / MANIFEST
  if not path.is_file():
    raise ManifestError(f"{root}: no {MANIFEST} (not a `maxlm tokenize` output, or an interrupted run)")
  try:
    manifest = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ManifestError(f"{path} is corrupt: {e}") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ManifestError(f"{path}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                        f"expected {FORMAT}")
  return manifest


def verify(root: str | os.PathLike, manifest: dict[str, Any] | None = None, *, checksums: bool = True) -> None:
  """Checks every shard and index file exists with the manifest's size (and sha256 if `checksums`)."""
  root = pathlib.Path(root)
  manifest = manifest or read_manifest(root)
  for name, entry in manifest["sources"].items():
    for split in entry["splits"].values():
      for shard in split["shards"]:
        path = root / shard["file"]
        if not path.is_file():
          raise ManifestError(f"{path}: missing (listed in {root / MANIFEST}, source {name!r})")
        if path.stat().st_size != shard["bytes"]:
          raise ManifestError(f"{path}: {path.stat().st_size} bytes, the manifest says {shard['bytes']} (truncated "
                              "or rewritten)")
        for key, file_key in (("sha256", "file"), ("index_sha256", "index")):
          if checksums and _sha256(root / shard[file_key]) != shard[key]:
            raise ManifestError(f"{root / shard[file_key]}: sha256 differs from the manifest (corrupt)")


@dataclasses.dataclass
class TokenSplit:
  """One source's split as random-access documents (int32 token arrays), plus per-document sizes."""

  name: str
  paths: list[pathlib.Path]
  dtype: np.dtype
  lengths: np.ndarray  # int64 [documents]: tokens per document, bos and eos included
  text_bytes: np.ndarray  # int64 [documents]: UTF-8 bytes of each document's text

  def __post_init__(self):
    self._source = None

  def __len__(self) -> int:
    return len(self.lengths)

  def __getitem__(self, i: int) -> np.ndarray:
    if self._source is None:  # opened lazily, in the process that reads (grain workers included)
      import grain  # noqa: PLC0415
      self._source = grain.sources.ArrayRecordDataSource([str(p) for p in self.paths])
    return np.frombuffer(self._source[int(i)], dtype=self.dtype).astype(np.int32)

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_source": None}

  @property
  def num_tokens(self) -> int:
    return int(self.lengths.sum())


def load_split(root: str | os.PathLike, name: str, split: str, manifest: dict[str, Any] | None = None) -> TokenSplit:
  """Source `name`'s `split` of a tokenized directory (reads only the small index files)."""
  root = pathlib.Path(root)
  manifest = manifest or read_manifest(root)
  if name not in manifest["sources"]:
    raise ManifestError(f"{root}: no source {name!r}; it has {', '.join(manifest['sources'])}")
  shards = manifest["sources"][name]["splits"][split]["shards"]
  lengths, text_bytes = [], []
  for shard in shards:
    try:
      with np.load(root / shard["index"]) as f:
        lengths.append(f["tokens"])
        text_bytes.append(f["text_bytes"])
    except (OSError, ValueError, KeyError) as e:
      raise ManifestError(f"{root / shard['index']}: unreadable index ({e})") from None
    if len(lengths[-1]) != shard["documents"]:
      raise ManifestError(f"{root / shard['index']}: {len(lengths[-1])} documents, the manifest says "
                          f"{shard['documents']}")
  empty = np.zeros(0, np.int64)
  return TokenSplit(name, [root / s["file"] for s in shards], np.dtype(manifest["dtype"]),
                    np.concatenate([empty, *lengths]), np.concatenate([empty, *text_bytes]))
