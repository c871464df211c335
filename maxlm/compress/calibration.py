"""Calibration tokens for `maxlm quantize` / `maxlm prune`: `samples` windows of `seq_len` tokens of text, read
through the data pipeline (text / JSONL files, a `maxlm tokenize` directory, or the embedded default corpus).

As the GPTQ paper samples C4: the documents are encoded as training stores them ([bos] ids eos) and concatenated,
the stream is cut into consecutive seq_len windows, and `samples` of them are drawn without replacement (seeded).
Too little text is an error before any layer is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class CalibrationError(ValueError):
  """The calibration text cannot provide what was asked (too short, empty, unreadable)."""


def calibration_tokens(tokenizer: Any, *, samples: int, seq_len: int, paths: Sequence[str] = (),
                       tokenized: str | None = None, vocab_size: int | None = None, text_field: str = "text",
                       seed: int = 0) -> tuple[np.ndarray, str]:
  """(int32 [samples, seq_len] windows, a description of where they came from)."""
  if samples < 1 or seq_len < 2:
    raise CalibrationError(f"--samples {samples} / --seq-len {seq_len}: need at least 1 sample of 2 tokens")
  need = samples * seq_len
  if tokenized:
    stream, what = _tokenized_stream(tokenized, vocab_size, need)
  else:
    stream, what = _text_stream(tokenizer, paths, text_field, need)
  windows = len(stream) // seq_len
  if windows < samples:
    raise CalibrationError(f"calibration text ({what}) holds {len(stream):,} tokens: {samples} samples of "
                           f"{seq_len} tokens need {need:,}; give more text, or fewer --samples / a shorter --seq-len")
  pick = np.sort(np.random.default_rng(seed).choice(windows, samples, replace=False))
  out = stream[:windows * seq_len].reshape(windows, seq_len)[pick].astype(np.int32)
  return out, f"{samples} x {seq_len} tokens drawn from {windows:,} windows of {what}"


def _text_stream(tokenizer: Any, paths: Sequence[str], text_field: str, need: int) -> tuple[np.ndarray, str]:
  from data_pipelines import sources
  from data_pipelines.tokenized import encode_documents

  paths = [str(p) for p in paths if str(p).strip()]
  try:
    docs = sources.read_documents(paths, text_field) if paths else sources.default_documents(None)
    what = ", ".join(paths) if paths else "the embedded default corpus"
    parts, total = [], 0
    # Read only as far as a generous multiple of what is needed (the draw still spans many windows).
    for _, ids in encode_documents(docs, tokenizer):
      parts.append(ids)
      total += len(ids)
      if total >= 8 * need:
        break
  except (OSError, ValueError) as e:
    raise CalibrationError(f"calibration text {paths}: {e}") from e
  if not parts:
    raise CalibrationError(f"calibration text ({what}) holds no documents")
  return np.concatenate(parts), what


def _tokenized_stream(root: str, vocab_size: int | None, need: int) -> tuple[np.ndarray, str]:
  from data_pipelines.tokenized import load_split, read_manifest

  try:
    manifest = read_manifest(root)
  except (OSError, ValueError) as e:
    raise CalibrationError(f"--calibration-tokenized {root}: {e}") from e
  if vocab_size is not None and manifest["tokenizer"]["vocab_size"] > vocab_size:
    raise CalibrationError(f"{root}: its tokenizer has {manifest['tokenizer']['vocab_size']} ids, more than the "
                           f"model's vocab_size {vocab_size}: not this model's data")
  parts, total = [], 0
  for name in manifest["sources"]:
    data = load_split(root, name, "train", manifest)
    for i in range(len(data)):
      parts.append(np.asarray(data[i]))
      total += len(parts[-1])
      if total >= 8 * need:
        break
  if not parts:
    raise CalibrationError(f"{root}: no train documents")
  return np.concatenate(parts), f"{root} (train split)"
