"""Tokenized corpus (cached on disk) and resumable grain iterators of packed next-token batches."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import pathlib
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import grain
import numpy as np

from data_pipelines import sources
from data_pipelines.cache import default_cache_dir
from data_pipelines.fileio import atomic_write
from data_pipelines.tokenizer import AnyTokenizer, bos_prefix, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

_CACHE_FORMAT = 1  # Bump when the tokenisation or split semantics change.
_ENCODE_BATCH_DOCS = 256
# A batch also closes at this much text, and a longer document is encoded in pieces of it where the tokenizer allows
# (Tokenizer.encode_array): their ids as Python ints (~36 bytes a token) are what tokenizing holds at its peak.
_ENCODE_BATCH_CHARS = 4 << 20
_PROGRESS_EVERY_S = 5.0
# Every batch holds these keys, each int32 [rows, seq_len].
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")


@dataclasses.dataclass
class TokenizedDocs:
  """Documents as one flat int32 token array plus int64 offsets (a grain random-access source)."""

  tokens: np.ndarray  # int32 [num_tokens]
  offsets: np.ndarray  # int64 [num_docs + 1]; document i is tokens[offsets[i]:offsets[i + 1]]

  def __post_init__(self):
    self.tokens = np.asarray(self.tokens, dtype=np.int32)
    self.offsets = np.asarray(self.offsets, dtype=np.int64)
    if (self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0
        or self.offsets[-1] != len(self.tokens) or np.any(np.diff(self.offsets) < 0)):
      raise ValueError(f"offsets must rise from 0 to {len(self.tokens)} (the token count), "
                       f"got {len(self.offsets)} offsets ending at {self.offsets[-1:]}")

  @classmethod
  def from_documents(cls, docs: Iterable[Sequence[int]]) -> TokenizedDocs:
    """Packs per-document token lists into the flat layout."""
    arrays = [np.asarray(d, dtype=np.int32) for d in docs]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
    return cls(tokens, offsets)

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> np.ndarray:
    if not -len(self) <= i < len(self):
      raise IndexError(f"document {i} out of range for {len(self)} documents")
    i %= len(self)
    return self.tokens[self.offsets[i]:self.offsets[i + 1]]

  @property
  def num_tokens(self) -> int:
    return len(self.tokens)

  def save(self, path: str | os.PathLike) -> None:
    """Writes an .npz atomically (temp file + rename)."""
    _savez(pathlib.Path(path), tokens=self.tokens, offsets=self.offsets)

  @classmethod
  def load(cls, path: str | os.PathLike) -> TokenizedDocs:
    """Reads a file written by save()."""
    with np.load(path) as f:
      return cls(f["tokens"], f["offsets"])


@dataclasses.dataclass
class Corpus:
  """A tokenizer and the train/eval splits it produced."""

  tokenizer: AnyTokenizer
  train: TokenizedDocs
  eval: TokenizedDocs
  unigram_entropy: float  # nats/token of the train targets' unigram distribution: a loss baseline
  description: str
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # bad records skipped, per reason


def _savez(path: pathlib.Path, **arrays: np.ndarray) -> None:
  """np.savez written atomically (no torn cache files)."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  atomic_write(path, buf.getvalue())


def _key(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def eval_fraction_of(source: str) -> float:
  """Stable position in [0, 1) of a document, deciding its split."""
  # Salted so it is independent of the hash that picks the capped default-corpus subset.
  digest = hashlib.sha256(f"maxlm-eval-split\0{source}".encode()).digest()
  return int.from_bytes(digest[:8], "little") / 2.0**64


def unigram_entropy(docs: TokenizedDocs, vocab_size: int) -> float:
  """Entropy (nats) of the predicted-token distribution: all tokens but each document's first."""
  first = np.zeros(len(docs.tokens), dtype=bool)
  first[docs.offsets[:-1][np.diff(docs.offsets) > 0]] = True
  counts = np.bincount(docs.tokens[~first], minlength=vocab_size).astype(np.float64)
  if counts.sum() == 0:
    return 0.0
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def _tokenize(documents: Iterable[sources.Document], tokenizer: AnyTokenizer, eval_fraction: float
              ) -> tuple[TokenizedDocs, TokenizedDocs]:
  """[bos] + ids + [eos] per document (no bos if the tokenizer has none), split by source hash."""
  chunks, lengths, fractions = [], [], []
  start = last_log = time.monotonic()
  pending: list[sources.Document] = []
  pending_chars = 0
  prefix = bos_prefix(tokenizer)

  def add(doc: sources.Document, ids: Sequence[int]) -> None:
    chunk = np.empty(len(prefix) + len(ids) + 1, dtype=np.int32)
    chunk[:len(prefix)], chunk[len(prefix):-1], chunk[-1] = prefix, ids, tokenizer.eos_id
    chunks.append(chunk)
    lengths.append(len(chunk))
    fractions.append(eval_fraction_of(doc.source))

  def flush():
    nonlocal last_log, pending_chars
    encoded = tokenizer.encode_batch([d.text for d in pending])
    for i, doc in enumerate(pending):
      add(doc, encoded[i])
      encoded[i] = None  # a Python list of ints (~36 bytes a token): freed once packed
    pending.clear()
    pending_chars = 0
    now = time.monotonic()
    if now - last_log > _PROGRESS_EVERY_S:
      last_log = now
      log.info("tokenizing: %d docs, %.1fM tokens, %.0f docs/s", len(lengths),
               sum(lengths) / 1e6, len(lengths) / (now - start))

  for doc in documents:
    if len(doc.text) > _ENCODE_BATCH_CHARS:  # a giant document: encoded alone, a piece at a time where possible
      flush()
      add(doc, tokenizer.encode_array(doc.text, _ENCODE_BATCH_CHARS))
      continue
    pending.append(doc)
    pending_chars += len(doc.text)
    if len(pending) >= _ENCODE_BATCH_DOCS or pending_chars >= _ENCODE_BATCH_CHARS:
      flush()
  if pending:
    flush()
  if len(lengths) < 2:
    raise ValueError(f"the corpus has {len(lengths)} non-empty document(s); at least 2 are needed "
                     "to hold one out for eval (split a single text into files or JSONL lines)")
  fractions = np.asarray(fractions)
  is_eval = fractions < eval_fraction
  if not is_eval.any():
    is_eval[np.argmin(fractions)] = True
  if is_eval.all():
    is_eval[np.argmax(fractions)] = False
  lengths = np.asarray(lengths, dtype=np.int64)
  tokens = np.concatenate(chunks)
  token_is_eval = np.repeat(is_eval, lengths)

  def split(mask: np.ndarray, token_mask: np.ndarray) -> TokenizedDocs:
    offsets = np.zeros(mask.sum() + 1, dtype=np.int64)
    np.cumsum(lengths[mask], out=offsets[1:])
    return TokenizedDocs(tokens[token_mask], offsets)

  elapsed = time.monotonic() - start
  log.info("tokenized %d docs (%d tokens) in %.1fs, %.0f docs/s", len(lengths), len(tokens),
           elapsed, len(lengths) / max(elapsed, 1e-9))
  return split(~is_eval, ~token_is_eval), split(is_eval, token_is_eval)


def _check_documents(documents: Iterable[sources.Document], files: list[str],
                     skipped: sources.SkippedRecords | None) -> None:
  """Fails fast, before any tokenizer training or tokenizing, unless the corpus holds at least 2 documents.

  Reads only until the second document (a corpus of one giant line is refused in the time it takes to read it).
  `skipped` is where `documents` counts the bad records it skips, if it does.
  """
  found = 0
  for _ in documents:
    found += 1
    if found == 2:
      return
  if found == 0:
    shown = files[0] if len(files) == 1 else f"any of the {len(files)} files ({', '.join(files[:3])}" + (
        ", ...)" if len(files) > 3 else ")")
    bad = f" (every record was bad: {skipped.summary()})" if skipped else ""
    raise ValueError(f"no text in {shown}{bad}")
  raise ValueError("the corpus has 1 non-empty document; at least 2 are needed to hold one out for eval (split "
                   "a single text into files or JSONL lines)")


def _bad_record_hint(e: sources.BadRecordError) -> ValueError:
  """The strict reader's error, with the two ways out."""
  return ValueError(f"{e}; set data.skip_bad_records=true to skip and count such records, or clean the files "
                    "with `maxlm curate` (it drops and counts bad records)")


def prepare_corpus(paths: Sequence[str], *, vocab_size: int, cache_dir: str | os.PathLike,
                   tokenizer_path: str = "", max_corpus_bytes: int | None, eval_fraction: float,
                   text_field: str = "text", skip_bad_records: bool = False) -> Corpus:
  """Tokenizer + tokenized train/eval splits, built once and then served from cache_dir.

  Empty `paths` means the embedded default corpus, capped at max_corpus_bytes (the cap applies
  to the default corpus only). tokenizer_path, if set, is a sentencepiece .model, a Hugging Face
  tokenizer.json, or a checkpoint directory holding either (see load_tokenizer); otherwise a BPE
  is trained on the corpus. Cache keys cover the input files (path, size, mtime), vocab_size,
  the tokenizer's hash (file and special ids), eval_fraction and the cap, so any change rebuilds.

  A bad record in the user's files (invalid UTF-8, malformed JSON line, missing text field) is an error naming
  its file and line; with skip_bad_records it is skipped instead, counted in Corpus.skipped and logged. A file
  named in `paths` that is empty, or a corpus of fewer than 2 documents, fails before any work.
  """
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
  cache_dir = pathlib.Path(cache_dir) if cache_dir not in ("", None) else default_cache_dir()
  if isinstance(paths, str):
    paths = paths.split(",")  # The config's comma-separated form.
  paths = [str(p).strip() for p in paths if str(p).strip()]
  if paths:
    files = sources.expand_paths(paths)
    for raw in paths:
      if pathlib.Path(raw).is_file() and pathlib.Path(raw).stat().st_size == 0:
        raise ValueError(f"no text in {raw}: the file is empty")
    shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
    what = f"{len(files)} user file(s) ({shown})"
    max_corpus_bytes = None
  else:
    files = sources.default_corpus_files(max_corpus_bytes)
    cap = f", cap {max_corpus_bytes / 2**20:.1f} MiB" if max_corpus_bytes else ""
    what = f"default corpus: {len(files)} stdlib/doc files of Python {sys.version.split()[0]}{cap}"

  def documents(skipped: sources.SkippedRecords | None = None) -> Iterable[sources.Document]:
    """One pass over the corpus; with skip_bad_records, the user files' bad records are counted in `skipped`."""
    if not paths:
      return sources.default_documents(max_corpus_bytes)  # skips (and logs) unreadable files itself
    if skip_bad_records and skipped is None:
      skipped = sources.SkippedRecords()  # a pass whose skips are not reported
    return sources.read_documents([str(f) for f in files], text_field, skipped=skipped)

  stats = []
  for f in files:
    st = f.stat()
    stats.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
  inputs_key = {"format": _CACHE_FORMAT, "files": stats, "text_field": text_field,
                "max_bytes": max_corpus_bytes}
  if skip_bad_records:
    inputs_key["skip_bad_records"] = True  # only when set: the key of a strict run is unchanged

  skipped = sources.SkippedRecords() if skip_bad_records else None
  try:
    check_skipped = sources.SkippedRecords() if skip_bad_records else None
    _check_documents(documents(check_skipped), [str(f) for f in files], check_skipped)
    if tokenizer_path:
      tokenizer = load_tokenizer(tokenizer_path)
      if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {tokenizer_path!r} has vocab_size {tokenizer.vocab_size}, "
                         f"larger than the model's vocab_size {vocab_size}")
    else:
      prefix = cache_dir / f"tokenizer-{_key({**inputs_key, 'vocab_size': vocab_size})}"
      if pathlib.Path(f"{prefix}.model").is_file():
        tokenizer = load_tokenizer(f"{prefix}.model")
      else:
        t0 = time.monotonic()
        log.info("training a %d-piece BPE tokenizer on %s", vocab_size, what)
        tokenizer = train_tokenizer((d.text for d in documents()), vocab_size, prefix)
        log.info("trained tokenizer %s in %.1fs", tokenizer.path, time.monotonic() - t0)

    corpus_key = _key({**inputs_key, "vocab_size": vocab_size, "eval_fraction": eval_fraction,
                       "tokenizer": tokenizer.sha256})
    cache_file = cache_dir / f"corpus-{corpus_key}.npz"
    if cache_file.is_file():
      with np.load(cache_file) as f:
        train = TokenizedDocs(f["train_tokens"], f["train_offsets"])
        eval_ = TokenizedDocs(f["eval_tokens"], f["eval_offsets"])
        meta = json.loads(str(f["meta"]))
      log.info("loaded tokenized corpus from %s", cache_file)
      return Corpus(tokenizer, train, eval_, meta["unigram_entropy"], meta["description"],
                    meta.get("skipped", {}))

    log.info("tokenizing %s", what)
    train, eval_ = _tokenize(documents(skipped), tokenizer, eval_fraction)
  except sources.BadRecordError as e:
    raise _bad_record_hint(e) from None
  entropy = unigram_entropy(train, tokenizer.vocab_size)
  skipped_note = ""
  if skipped:
    log.warning("skipped %d bad record(s) of %s: %s; `maxlm curate` drops and counts them with the rest of its "
                "cleaning", sum(skipped.counts.values()), what, skipped.summary())
    skipped_note = f"; skipped {sum(skipped.counts.values())} bad record(s): {skipped.summary()}"
  description = (f"{what}; tokenizer {tokenizer.path.name} (vocab {tokenizer.vocab_size}); "
                 f"train {len(train)} docs / {train.num_tokens:,} tokens, "
                 f"eval {len(eval_)} docs / {eval_.num_tokens:,} tokens; "
                 f"unigram entropy {entropy:.3f} nats/token{skipped_note}")
  counts = dict(skipped.counts) if skipped else {}
  meta = json.dumps({"unigram_entropy": entropy, "description": description, "skipped": counts})
  _savez(cache_file, train_tokens=train.tokens, train_offsets=train.offsets,
                eval_tokens=eval_.tokens, eval_offsets=eval_.offsets, meta=np.asarray(meta))
  log.info("%s", description)
  return Corpus(tokenizer, train, eval_, entropy, description, counts)


def chunk_ranges(lengths: np.ndarray, seq_len: int) -> np.ndarray:
  """[num_chunks, 3] (document, start, end): each document of `lengths` tokens cut into pieces of <= seq_len + 1
  tokens overlapping by one, so every token after a document's first is a target exactly once."""
  lengths = np.asarray(lengths, dtype=np.int64)
  num_chunks = np.where(lengths >= 2, (lengths - 1 + seq_len - 1) // seq_len, 0)
  doc = np.repeat(np.arange(len(lengths)), num_chunks)
  first_chunk = np.cumsum(num_chunks) - num_chunks
  k = np.arange(len(doc), dtype=np.int64) - np.repeat(first_chunk, num_chunks)
  starts = k * seq_len
  ends = np.minimum(starts + seq_len + 1, lengths[doc])
  return np.stack([doc, starts, ends], axis=1)


class DocumentPieces:
  """Random-access {"inputs", "targets"} pieces, by chunk_ranges(), of any random-access source of documents
  (TokenizedDocs in memory, a tokenized.TokenSplit on disk)."""

  def __init__(self, docs: Any, ranges: np.ndarray):
    self._docs, self._ranges = docs, ranges
    self._doc, self._tokens = -1, None  # the last document read: its other pieces usually follow

  def __len__(self) -> int:
    return len(self._ranges)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    doc, start, end = (int(v) for v in self._ranges[i])
    if doc != self._doc:
      self._doc, self._tokens = doc, self._docs[doc]
    chunk = self._tokens[start:end]
    return {"inputs": chunk[:-1], "targets": chunk[1:]}


class _ToBatch(grain.transforms.Map):
  """Renames packer outputs to maxlm's batch keys and pads a short final batch with empty rows."""

  def __init__(self, rows: int):
    self._rows = rows

  def map(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = ("inputs", "targets", "inputs_segment_ids", "inputs_positions")
    short = self._rows - packed["inputs"].shape[0]
    batch = {}
    for key, name in zip(BATCH_KEYS, names):
      v = packed[name].astype(np.int32, copy=False)
      batch[key] = np.pad(v, ((0, short), (0, 0))) if short else v
    return batch


def pack_batches(ds: grain.MapDataset, *, seq_len: int, rows: int, seed: int, shuffle: bool,
                 num_packing_bins: int) -> grain.IterDataset:
  """{"inputs", "targets"} pieces of <= seq_len tokens -> first-fit packed batches of `rows` rows (BATCH_KEYS)."""
  if seq_len < 1 or num_packing_bins < 1:
    raise ValueError(
        f"seq_len and num_packing_bins must be >= 1, got {seq_len} and {num_packing_bins}")
  # Pieces are in-memory slices or single-record reads: reader threads would only contend for the GIL.
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  it_ds = grain.experimental.FirstFitPackIterDataset(
      it_ds, length_struct={"inputs": seq_len, "targets": seq_len},
      num_packing_bins=num_packing_bins, seed=seed, shuffle_bins=shuffle)
  return it_ds.batch(rows, drop_remainder=False).map(_ToBatch(rows))


def _packed_dataset(docs: TokenizedDocs, *, seq_len: int, rows: int, seed: int, shuffle: bool,
                    num_packing_bins: int, shard_index: int, shard_count: int,
                    num_epochs: int | None) -> grain.IterDataset:
  """Chunks -> (shard, shuffle per epoch) -> first-fit packing -> batches of `rows` rows."""
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  ranges = chunk_ranges(np.diff(docs.offsets), seq_len)
  if len(ranges) < shard_count:
    raise ValueError(f"{len(ranges)} chunks of seq_len {seq_len} cannot feed {shard_count} shards")
  ds = grain.MapDataset.source(DocumentPieces(docs, ranges))[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)  # Reseeds the shuffle every epoch: a new, reproducible order.
  return pack_batches(ds, seq_len=seq_len, rows=rows, seed=seed, shuffle=shuffle,
                      num_packing_bins=num_packing_bins)


def make_train_iterator(docs: TokenizedDocs, *, seq_len: int, batch_size: int, seed: int,
                        num_packing_bins: int = 8, shard_index: int = 0, shard_count: int = 1,
                        num_epochs: int | None = None) -> grain.DatasetIterator:
  """Resumable iterator of packed int32 [batch_size // shard_count, seq_len] training batches.

  Yields dicts with inputs, targets, segment_ids (1, 2, .. per document piece, 0 on padding) and
  positions (restarting at 0 per segment). Shuffled by `seed`, a new order each epoch, forever
  unless num_epochs is set (the last batch is then padded with empty rows). Shards take disjoint
  strided slices of the chunks. Resume with `it.set_state(state)` on a fresh iterator built with
  the same arguments; `it.get_state()` is a small JSON-serialisable dict of ints (store it with
  orbax `JsonSave`, or pass the iterator to `grain.checkpoint.CheckpointSave`).
  """
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
  if batch_size < 1 or batch_size % shard_count:
    raise ValueError(
        f"batch_size {batch_size} must be a positive multiple of shard_count {shard_count}")
  if len(docs) == 0:
    raise ValueError("cannot make a training iterator over 0 documents")
  return iter(_packed_dataset(
      docs, seq_len=seq_len, rows=batch_size // shard_count, seed=seed, shuffle=True,
      num_packing_bins=num_packing_bins, shard_index=shard_index, shard_count=shard_count,
      num_epochs=num_epochs))


ELASTIC_STREAMS = 8  # default stream count: a run resumes on 1, 2, 4 or 8 hosts (when the batch divides)


def default_streams(batch_size: int, process_count: int) -> int:
  """Streams for data.loader_streams=0: lcm(8, processes) if the batch divides into them, else one per process."""
  streams = math.lcm(ELASTIC_STREAMS, process_count)
  return streams if batch_size % streams == 0 else process_count


class HostBatches:
  """This process's rows of every global batch, drawn from `num_streams` independent packed streams.

  The global batch is the rows of streams 0..num_streams-1 in order, however many processes there are:
  process p reads streams p, p + P, ... (P = process_count must divide num_streams). So 1, 2 or 4
  processes see the same data, and the position of every stream (`get_state`, gathered across processes)
  restores onto any such process count. `docs` is an in-memory corpus or a `mixture.Mixture` of token shards.
  """

  def __init__(self, docs: TokenizedDocs | Any, *, seq_len: int, batch_size: int, seed: int, num_packing_bins: int,
               num_streams: int, process_index: int = 0, process_count: int = 1):
    if num_streams < 1 or num_streams % process_count:
      raise ValueError(f"{num_streams} data streams cannot be split evenly over {process_count} processes")
    if batch_size % num_streams:
      raise ValueError(f"batch_size {batch_size} is not divisible by the {num_streams} data streams")
    self.num_streams = num_streams
    self.streams = list(range(process_index, num_streams, process_count))
    make = functools.partial(make_train_iterator, docs) if isinstance(docs, TokenizedDocs) else docs.iterator
    self._its = {j: make(seq_len=seq_len, batch_size=batch_size, seed=seed, num_packing_bins=num_packing_bins,
                         shard_index=j, shard_count=num_streams)
                 for j in self.streams}

  def __iter__(self) -> HostBatches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(self._its[j]) for j in self.streams]
    return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict[str, Any]:
    """This process's streams' positions, keyed by stream index (merge every process's for a checkpoint)."""
    return {str(j): self._its[j].get_state() for j in self.streams}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores this process's streams from a merged state of all streams."""
    missing = [j for j in self.streams if str(j) not in state]
    if missing:
      raise ValueError(f"the data state holds streams {sorted(state, key=int)}, not {missing}: it was saved with "
                       f"a different data.loader_streams")
    for j in self.streams:
      self._its[j].set_state(state[str(j)])


def make_eval_batches(docs: TokenizedDocs, *, seq_len: int, batch_size: int, num_batches: int,
                      num_packing_bins: int = 8) -> list[dict[str, np.ndarray]]:
  """The first num_batches packed batches of docs in order (no shuffle), cycling if docs run out."""
  if len(docs) == 0:
    raise ValueError("cannot make eval batches from 0 documents")
  ds = _packed_dataset(docs, seq_len=seq_len, rows=batch_size, seed=0, shuffle=False,
                       num_packing_bins=num_packing_bins, shard_index=0, shard_count=1,
                       num_epochs=None)
  it = iter(ds)
  return [next(it) for _ in range(num_batches)]

