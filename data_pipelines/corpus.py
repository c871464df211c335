"""data.paths and the embedded default corpus as a cached `maxlm tokenize` directory, read like any other.

The first run tokenizes the corpus into CACHE_DIR/corpus-<key>/ (the shard layout of tokenized.py, one source named
"corpus"); later runs with the same inputs find it there and tokenize nothing. The key covers the input files (path,
size, mtime), the cap, text_field, skip_bad_records, vocab_size, eval_fraction and the tokenizer's sha256, so any
change builds a new directory. Training then reads it through mixture.load, as it reads data.tokenized.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from data_pipelines import mixture, sources, tokenized
from data_pipelines.cache import default_cache_dir
from data_pipelines.tokenizer import AnyTokenizer, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

SOURCE = "corpus"  # the one source of a cached corpus directory
_TOKENIZER_KEY_FORMAT = 1  # the trained tokenizer's cache name: unchanged, so tokenizers cached earlier are reused
_CORPUS_FORMAT = 2  # 1 was an in-memory .npz cache; 2 is a tokenized directory
_SHARD_MB = 256.0
_ARRAY_RECORD_OPTIONS = "group_size:1"  # one record per chunk: cheap random access for the loader
_PROGRESS_EVERY_S = 5.0


def _key(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


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


@dataclasses.dataclass
class _Inputs:
  """The corpus's files, how to read them, and what the cache keys say about them."""

  paths: list[str]  # the user's paths; [] = the default corpus
  files: list[pathlib.Path]
  what: str  # e.g. "2 user file(s) (a.jsonl, b.txt)", for logs and the description
  key: dict[str, Any]
  text_field: str
  skip_bad_records: bool
  max_bytes: int | None

  def documents(self, skipped: sources.SkippedRecords | None = None) -> Iterator[sources.Document]:
    """One pass over the corpus; with skip_bad_records, the user files' bad records are counted in `skipped`."""
    if not self.paths:
      return sources.default_documents(self.max_bytes)  # skips (and logs) unreadable files itself
    if self.skip_bad_records and skipped is None:
      skipped = sources.SkippedRecords()  # a pass whose skips are not reported
    return sources.read_documents([str(f) for f in self.files], self.text_field, skipped=skipped)


def _inputs(paths: Sequence[str] | str, max_corpus_bytes: int | None, text_field: str,
            skip_bad_records: bool) -> _Inputs:
  """Resolves paths (or the default corpus) to files; a path matching nothing or an empty file fails here."""
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
  stats = []
  for f in files:
    st = f.stat()
    stats.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
  key = {"format": _TOKENIZER_KEY_FORMAT, "files": stats, "text_field": text_field, "max_bytes": max_corpus_bytes}
  if skip_bad_records:
    key["skip_bad_records"] = True  # only when set: the key of a strict run is unchanged
  return _Inputs(paths, files, what, key, text_field, skip_bad_records, max_corpus_bytes)


def _resolve_tokenizer(inputs: _Inputs, vocab_size: int, tokenizer_path: str, cache_dir: pathlib.Path
                       ) -> AnyTokenizer:
  """The given tokenizer (checked against vocab_size), else a BPE trained on the corpus (cached)."""
  if tokenizer_path:
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > vocab_size:
      raise ValueError(f"tokenizer {tokenizer_path!r} has vocab_size {tokenizer.vocab_size}, "
                       f"larger than the model's vocab_size {vocab_size}")
    return tokenizer
  prefix = cache_dir / f"tokenizer-{_key({**inputs.key, 'vocab_size': vocab_size})}"
  if pathlib.Path(f"{prefix}.model").is_file():
    return load_tokenizer(f"{prefix}.model")
  t0 = time.monotonic()
  log.info("training a %d-piece BPE tokenizer on %s", vocab_size, inputs.what)
  tokenizer = train_tokenizer((d.text for d in inputs.documents()), vocab_size, prefix)
  log.info("trained tokenizer %s in %.1fs", tokenizer.path, time.monotonic() - t0)
  return tokenizer


def _build(out: pathlib.Path, inputs: _Inputs, tokenizer: AnyTokenizer, eval_fraction: float) -> None:
  """Tokenizes the corpus into `out` (a fresh directory) in the layout of `maxlm tokenize`."""
  skipped = sources.SkippedRecords() if inputs.skip_bad_records else None
  manifest = tokenized.new_manifest(tokenizer, eval_fraction)
  dtype = np.dtype(manifest["dtype"])
  start = last_log = time.monotonic()
  done = 0

  def progress() -> None:
    nonlocal done, last_log
    done += 1
    now = time.monotonic()
    if now - last_log > _PROGRESS_EVERY_S:
      last_log = now
      log.info("tokenizing: %d docs, %.0f docs/s", done, done / (now - start))

  log.info("tokenizing %s", inputs.what)
  entry = tokenized.write_source(out, SOURCE, inputs.documents(skipped), tokenizer, eval_fraction=eval_fraction,
                                 dtype=dtype, shard_tokens=tokenized.shard_tokens_of(_SHARD_MB, dtype),
                                 options=_ARRAY_RECORD_OPTIONS, on_document=progress)
  train, eval_ = entry["splits"]["train"], entry["splits"]["eval"]
  log.info("tokenized %d docs (%d tokens) in %.1fs", train["documents"] + eval_["documents"],
           train["tokens"] + eval_["tokens"], time.monotonic() - start)
  skipped_note = ""
  if skipped:
    log.warning("skipped %d bad record(s) of %s: %s; `maxlm curate` drops and counts them with the rest of its "
                "cleaning", sum(skipped.counts.values()), inputs.what, skipped.summary())
    skipped_note = f"; skipped {sum(skipped.counts.values())} bad record(s): {skipped.summary()}"
  manifest["sources"][SOURCE] = {"inputs": inputs.paths, "skipped": dict(skipped.counts) if skipped else {}, **entry}
  manifest["description"] = (
    f"{inputs.what}; tokenizer {tokenizer.path.name} (vocab {tokenizer.vocab_size}); "
    f"train {train['documents']} docs / {train['tokens']:,} tokens, eval {eval_['documents']} docs / "
    f"{eval_['tokens']:,} tokens; unigram entropy {train['unigram_entropy']:.3f} nats/token{skipped_note}")
  tokenized.save_tokenizer(tokenizer, out / tokenized.TOKENIZER_DIR)
  tokenized.write_manifest(out, manifest)
  log.info("%s", manifest["description"])


def _build_into_place(final: pathlib.Path, inputs: _Inputs, tokenizer: AnyTokenizer, eval_fraction: float) -> None:
  """_build in a private directory renamed to `final`: processes filling one cache never see a partial one."""
  tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    _build(tmp, inputs, tokenizer, eval_fraction)
    try:
      os.rename(tmp, final)
    except OSError:
      if not (final / tokenized.MANIFEST).is_file():  # not another process's finished copy: a real failure
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def prepare_corpus(paths: Sequence[str] | str, *, vocab_size: int, cache_dir: str | os.PathLike | None,
                   tokenizer_path: str = "", max_corpus_bytes: int | None, eval_fraction: float,
                   text_field: str = "text", skip_bad_records: bool = False) -> mixture.TokenizedData:
  """data.paths (or, if empty, the embedded default corpus capped at max_corpus_bytes) as tokenized data.

  tokenizer_path, if set, is a sentencepiece .model, a Hugging Face tokenizer.json, or a directory holding either
  (see load_tokenizer); otherwise a BPE is trained on the corpus (cached). A bad record in the user's files (invalid
  UTF-8, malformed JSON line, missing text field) is an error naming its file and line; with skip_bad_records it is
  skipped, counted (TokenizedData.skipped) and logged. A file named in `paths` that is empty, or a corpus of fewer
  than 2 documents, fails before any work.
  """
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
  cache_dir = pathlib.Path(cache_dir) if cache_dir not in ("", None) else default_cache_dir()
  inputs = _inputs(paths, max_corpus_bytes, text_field, skip_bad_records)
  try:
    check_skipped = sources.SkippedRecords() if skip_bad_records else None
    _check_documents(inputs.documents(check_skipped), [str(f) for f in inputs.files], check_skipped)
    tokenizer = _resolve_tokenizer(inputs, vocab_size, tokenizer_path, cache_dir)
    key = _key({**inputs.key, "corpus_format": _CORPUS_FORMAT, "vocab_size": vocab_size,
                "eval_fraction": eval_fraction, "tokenizer": tokenizer.sha256})
    root = cache_dir / f"corpus-{key}"
    if (root / tokenized.MANIFEST).is_file():
      log.info("tokenized corpus from the cache: %s", root)
    else:
      cache_dir.mkdir(parents=True, exist_ok=True)
      _build_into_place(root, inputs, tokenizer, eval_fraction)
  except sources.BadRecordError as e:
    raise _bad_record_hint(e) from None
  data = mixture.load([str(root)])
  description = tokenized.read_manifest(root).get("description", data.description)
  return dataclasses.replace(data, tokenizer=tokenizer, description=description)
