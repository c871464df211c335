"""`maxlm eval`: perplexity and bits per byte of a workdir's model over text files, JSONL or tokenized splits.

Each document is scored as training saw it: bos (if the tokenizer adds one), its tokens, eos; rolling windows
(maxlm.eval.windows) score every token after the first exactly once. Bits per byte = total NLL in bits / UTF-8 bytes
of the scored documents' text.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class EvalError(ValueError):
  """Input `maxlm eval` cannot score (missing or empty data, a mismatched tokenizer); the message says which."""


class FlagError(EvalError):
  """Flags that cannot go together or do not fit the model (a usage error)."""


@dataclasses.dataclass
class Source:
  """One named input: its documents as token arrays and the UTF-8 bytes of their text (None if unknown)."""

  name: str
  docs: Sequence[np.ndarray]
  lengths: np.ndarray  # int64 [documents]
  text_bytes: int | None
  origin: str  # the paths, or tokenized DIR:split


def text_sources(inputs: Sequence[str], tokenizer: Any, *, text_field: str = "text",
                 limit: int | None = None) -> list[Source]:
  """[NAME=]PATH arguments (text files, one document each; JSONL, one per line; dirs; globs) as tokenized sources."""
  from data_pipelines import sources
  from data_pipelines.tokenized import encode_documents, parse_inputs

  out = []
  for name, paths in parse_inputs(inputs).items():
    documents: list[sources.Document] = []
    for doc in sources.read_documents(paths, text_field):
      documents.append(doc)
      if limit is not None and len(documents) >= limit:
        break
    if not documents:
      raise EvalError(f"source {name!r} ({', '.join(paths)}) holds no documents (empty files, or no non-empty "
                      f"{text_field!r} field)")
    # as training stores a document ([bos] ids eos), by the code `maxlm tokenize` uses
    docs = [ids.astype(np.int32) for _, ids in encode_documents(documents, tokenizer)]
    out.append(Source(name, docs, np.asarray([len(d) for d in docs], np.int64),
                      sum(len(d.text.encode("utf-8")) for d in documents), ", ".join(paths)))
  return out


def tokenized_sources(root: str | os.PathLike, split: str, *, vocab_size: int, tokenizer_sha256: str | None = None,
                      limit: int | None = None) -> list[Source]:
  """Every source's `split` of a `maxlm tokenize` directory, checked against the model's vocabulary and tokenizer."""
  from data_pipelines.tokenized import SPLITS, load_split, read_manifest

  if split not in SPLITS:
    raise FlagError(f"--split {split!r}: a tokenized directory has the splits {', '.join(SPLITS)}")
  manifest = read_manifest(root)
  tok = manifest["tokenizer"]
  if tok["vocab_size"] > vocab_size:
    raise EvalError(f"{root}: its tokenizer has {tok['vocab_size']} ids, more than the model's vocab_size "
                    f"{vocab_size}: not this model's data")
  if tokenizer_sha256 is not None and tok["sha256"] != tokenizer_sha256:
    raise EvalError(f"{root}: tokenized with a different tokenizer (sha256 {tok['sha256'][:12]}) than the "
                    f"workdir's ({tokenizer_sha256[:12]}): the token ids would not mean the same text")
  out = []
  for name in manifest["sources"]:
    data = load_split(root, name, split, manifest)
    n = len(data) if limit is None else min(limit, len(data))
    if n == 0:
      continue
    text_bytes = int(data.text_bytes[:n].sum())
    out.append(Source(name, data, data.lengths[:n], text_bytes or None, f"{root}:{split}"))
  if not out:
    raise EvalError(f"{root}: no source has {split!r} documents")
  return out


def _metrics(nll: float, tokens: int, documents: int, text_bytes: int | None) -> dict[str, Any]:
  """The reported numbers of one source (or the total)."""
  mean = nll / tokens if tokens else math.nan
  return {"documents": documents, "tokens": tokens, "bytes": text_bytes, "nll": nll, "loss": mean,
          "perplexity": math.exp(min(mean, 709.0)) if tokens else math.nan,
          "bits_per_byte": nll / math.log(2) / text_bytes if text_bytes else None}


def machine() -> dict[str, Any]:
  """Where the numbers were measured."""
  import jax

  return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
          "devices": jax.device_count(), "processes": jax.process_count(), "cpu_count": os.cpu_count(),
          "platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__}


def evaluate_sources(scorer: Any, sources: Sequence[Source], *, seq_len: int, stride: int, batch_size: int,
                     progress: bool = True) -> dict[str, Any]:
  """Rolling-window NLL of every source: {"sources": {name: metrics}, "total": metrics, "seconds", ...}."""
  from tqdm import tqdm

  from maxlm.eval.loglikelihood import score_documents
  from maxlm.eval.windows import scored_targets

  total_targets = sum(scored_targets(s.lengths) for s in sources)
  if total_targets == 0:
    raise EvalError("nothing to score: every document is a single token")
  bar = tqdm(total=total_targets, desc="eval", unit="tok", unit_scale=True, dynamic_ncols=True, disable=not progress,
             file=sys.stderr)
  t0 = time.perf_counter()
  per_source = {}
  try:
    for s in sources:
      bar.set_postfix_str(s.name)
      scores = score_documents(scorer, s.docs, seq_len=seq_len, stride=stride, batch_size=batch_size,
                               lengths=s.lengths, on_batch=lambda done: bar.update(int(done.tokens.sum())))
      per_source[s.name] = {"origin": s.origin, **_metrics(float(scores.nll.sum()), int(scores.tokens.sum()),
                                                           len(s.lengths), s.text_bytes)}
  finally:
    bar.close()
  seconds = time.perf_counter() - t0
  rows = per_source.values()
  all_bytes = None if any(r["bytes"] is None for r in rows) else sum(r["bytes"] for r in rows)
  total = _metrics(sum(r["nll"] for r in rows), sum(r["tokens"] for r in rows), sum(r["documents"] for r in rows),
                   all_bytes)
  return {"sources": per_source, "total": total, "seconds": seconds, "tokens_per_sec": total["tokens"] / seconds}


def format_table(report: dict[str, Any]) -> str:
  """The report as a fixed-width table: one row per source, then the total."""
  head = f"{'source':<20} {'docs':>8} {'tokens':>12} {'bytes':>13} {'nll/token':>10} {'perplexity':>11} {'bpb':>7}"
  lines = [head, "-" * len(head)]
  entries = list(report["sources"].items())
  if len(entries) > 1:
    entries.append(("total", report["total"]))
  for name, m in entries:
    size = f"{m['bytes']:,}" if m["bytes"] is not None else "n/a"
    bpb = f"{m['bits_per_byte']:.4f}" if m["bits_per_byte"] is not None else "n/a"
    lines.append(f"{name[:20]:<20} {m['documents']:>8,} {m['tokens']:>12,} {size:>13} {m['loss']:>10.4f} "
                 f"{m['perplexity']:>11.3f} {bpb:>7}")
  if report["total"]["bits_per_byte"] is None:
    lines.append("bpb n/a: the tokenized manifest records no text byte counts")
  return "\n".join(lines)


def run(workdir: str, *, data: Sequence[str] = (), tokenized: str | None = None, split: str = "eval",
        seq_len: int | None = None, stride: int | None = None, batch_size: int | None = None,
        text_field: str = "text", limit: int | None = None, overrides: tuple[str, ...] = (),
        progress: bool = True) -> dict[str, Any]:
  """Loads the workdir's model and tokenizer, scores the inputs, returns the report (EvalError on bad input)."""
  from maxlm import sharding
  from maxlm.eval.loglikelihood import WindowScorer
  from maxlm.eval.windows import check_window_args
  from maxlm.workdir import load_model, load_workdir_config, load_workdir_tokenizer

  if not data and not tokenized:
    raise FlagError("nothing to evaluate: give --data PATH... and/or --tokenized DIR")
  if limit is not None and limit < 1:
    raise FlagError(f"--limit must be >= 1, got {limit}")
  if batch_size is not None and batch_size < 1:
    raise FlagError(f"--batch-size must be >= 1, got {batch_size}")
  if not (Path(workdir) / "config.json").is_file():
    raise EvalError(f"--workdir {workdir}: no config.json (not a maxlm workdir)")
  cfg = load_workdir_config(workdir, overrides)
  max_len = int(cfg.model.max_seq_len)
  seq_len = seq_len or max_len
  if seq_len > max_len:
    raise FlagError(f"--seq-len {seq_len} is longer than the model's context (model.max_seq_len={max_len})")
  stride = stride or seq_len
  try:
    check_window_args(seq_len, stride)
  except ValueError as e:
    raise FlagError(str(e).replace("seq_len", "--seq-len").replace("stride", "--stride")) from None
  tokenizer = load_workdir_tokenizer(workdir, cfg) if data or _has_tokenizer(workdir, cfg) else None
  inputs = text_sources(data, tokenizer, text_field=text_field, limit=limit) if data else []
  if tokenized:
    inputs += tokenized_sources(tokenized, split, vocab_size=int(cfg.model.vocab_size), limit=limit,
                                tokenizer_sha256=tokenizer.sha256 if tokenizer is not None else None)
  names = [s.name for s in inputs]
  if len(set(names)) < len(names):
    raise FlagError(f"two sources share a name ({', '.join(names)}): name them with NAME=PATH")
  model, cfg, step = load_model(workdir, overrides)
  scorer = WindowScorer(model, sharding.config_rules(cfg))
  if batch_size is None:
    batch_size = -(-8 // scorer.row_multiple) * scorer.row_multiple
  elif batch_size % scorer.row_multiple:
    raise FlagError(f"--batch-size {batch_size} must be a multiple of {scorer.row_multiple}, the devices the batch "
                    "is split over")
  report = evaluate_sources(scorer, inputs, seq_len=seq_len, stride=stride, batch_size=batch_size,
                            progress=progress)
  return {"workdir": str(workdir), "step": int(step), "seq_len": seq_len, "stride": stride, "batch_size": batch_size,
          "bos_id": tokenizer.bos_id if tokenizer is not None else None, **report, "machine": machine()}


def _has_tokenizer(workdir: str, cfg: Any) -> bool:
  """Whether the workdir names a tokenizer (to check a tokenized directory's ids against it)."""
  from maxlm.workdir import tokenizer_source  # noqa: PLC0415  (the command's imports stay lazy)

  return bool(tokenizer_source(workdir, cfg))
