"""Training data for `train.objective=dpo`: {"prompt", "chosen", "rejected"} JSONL as packed rows of pairs.

Each side is encoded as an SFT prompt/completion sample (strings, or message lists rendered with the chat
template), so its mask marks the completion's tokens. Pairs longer than data.seq_len are left out (counted in the
log); the rest are split into train and eval pairs by data.eval_fraction, and each epoch packs a seeded permutation
of a stream's pairs first-fit into rows (data_pipelines.preference.pack_pairs). The stream's position is (epoch,
row): a resumed run continues with the very next row.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.preference import EncodedPair, pack_pairs
from data_pipelines.sft import SFTDataError, encode_sample, jsonl_records
from data_pipelines.sources import expand_paths
from data_pipelines.tokenizer import load_tokenizer
from maxlm.config import ConfigError
from maxlm.train.sft_data import chat_template_of

log = logging.getLogger("maxlm.train")


def encode_pair(record: Any, tokenizer, template, where: str) -> EncodedPair:
  """One {"prompt", "chosen", "rejected"} record as an EncodedPair; SFTDataError naming `where` otherwise."""
  if not isinstance(record, dict) or not all(k in record for k in ("prompt", "chosen", "rejected")):
    raise SFTDataError(f"{where}: a preference sample needs \"prompt\", \"chosen\" and \"rejected\" (strings or "
                       "message lists)")
  sides = [encode_sample({"prompt": record["prompt"], "completion": record[k]}, tokenizer, template, where)
           for k in ("chosen", "rejected")]
  return EncodedPair(sides[0].tokens, sides[0].mask, sides[1].tokens, sides[1].mask)


def load_pairs(paths: list[Path], tokenizer, template) -> list[EncodedPair]:
  """Every pair of JSON-lines files in order; the first bad line is an SFTDataError naming file:line."""
  return [encode_pair(record, tokenizer, template, where) for where, record in jsonl_records(paths)]


def with_reference(rows: list[dict], ids: np.ndarray, ref: np.ndarray | None) -> list[dict]:
  """Rows packed with_index, their pair_index turned into float32 [pairs_per_row] ref_chosen / ref_rejected (the
  precomputed reference log-probabilities of the pairs `ids[pair_index]`; 0 in empty slots), or dropped."""
  out = []
  for row in rows:
    row = dict(row)
    slots = row.pop("pair_index")
    if ref is not None:
      filled = np.where(slots >= 0, ids[np.maximum(slots, 0)], -1)
      for j, name in enumerate(("ref_chosen", "ref_rejected")):
        row[name] = np.where(filled >= 0, ref[np.maximum(filled, 0), j], 0.0).astype(np.float32)
    out.append(row)
  return out


class _PairIterator:
  """Batches of `rows` packed rows from a stream's pairs, epoch after epoch; get_state / set_state resume it."""

  def __init__(self, pairs: list[EncodedPair], *, seq_len: int, rows: int, seed: int, pairs_per_row: int,
               ids: np.ndarray, ref: np.ndarray | None):
    self._pairs, self._seq_len, self._rows, self._seed, self._per_row = pairs, seq_len, rows, seed, pairs_per_row
    self._ids, self._ref = ids, ref  # the stream's pairs' indices among all train pairs, their reference logps
    self._epoch, self._row, self._packed = 0, 0, None

  def _epoch_rows(self) -> list[dict]:
    if self._packed is None:
      order = np.random.default_rng([self._seed, self._epoch]).permutation(len(self._pairs))
      rows = pack_pairs([self._pairs[i] for i in order], seq_len=self._seq_len, max_pairs_per_row=self._per_row,
                        with_index=True)
      self._packed = with_reference(rows, self._ids[order], self._ref)
    return self._packed

  def __iter__(self) -> _PairIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    out = []
    while len(out) < self._rows:
      rows = self._epoch_rows()
      if self._row >= len(rows):
        self._epoch, self._row, self._packed = self._epoch + 1, 0, None
        continue
      out.append(rows[self._row])
      self._row += 1
    return {k: np.stack([r[k] for r in out]) for k in out[0]}

  def get_state(self) -> dict[str, int]:
    return {"epoch": self._epoch, "row": self._row}

  def set_state(self, state: dict[str, int]) -> None:
    self._epoch, self._row, self._packed = int(state["epoch"]), int(state["row"]), None


class PairStream:
  """The train pairs as resumable streams (the `iterator` of a token-shard mixture). `ref` (float32 [pairs, 2],
  set before the first iterator) adds each pair's precomputed reference log-probabilities to the batches."""

  def __init__(self, pairs: list[EncodedPair], pairs_per_row: int):
    self.pairs, self.pairs_per_row = pairs, pairs_per_row
    self.ref: np.ndarray | None = None

  def iterator(self, *, seq_len: int, batch_size: int, seed: int, num_packing_bins: int = 8, shard_index: int = 0,
               shard_count: int = 1) -> _PairIterator:
    """Stream `shard_index` of `shard_count`: its strided slice of the pairs (num_packing_bins is unused)."""
    del num_packing_bins
    mine = self.pairs[shard_index::shard_count]
    if not mine or batch_size % shard_count:
      raise ValueError(f"{len(self.pairs)} preference pairs and batch_size {batch_size} cannot feed {shard_count} "
                       "streams")
    return _PairIterator(mine, seq_len=seq_len, rows=batch_size // shard_count, seed=seed + 7919 * shard_index,
                         pairs_per_row=self.pairs_per_row, ids=np.arange(len(self.pairs))[shard_index::shard_count],
                         ref=self.ref)


def eval_batches(pairs: list[EncodedPair], *, seq_len: int, batch_size: int, num_batches: int, pairs_per_row: int,
                 ref: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
  """The held-out pairs packed in order into num_batches batches (cycling; every pair at least once if they fit),
  with their precomputed reference log-probabilities when `ref` is given."""
  rows = with_reference(pack_pairs(pairs, seq_len=seq_len, max_pairs_per_row=pairs_per_row, with_index=True),
                        np.arange(len(pairs)), ref)
  need = num_batches * batch_size
  rows = (rows * math.ceil(need / len(rows)))[:need]
  return [{k: np.stack([r[k] for r in rows[b * batch_size:(b + 1) * batch_size]]) for k in rows[0]}
          for b in range(num_batches)]


def load_dpo(cfg) -> tuple[PairStream, list[EncodedPair], Any, Path, str]:
  """(train stream, eval pairs, tokenizer, tokenizer directory, description) of data.paths."""
  d = cfg.data
  if not d.tokenizer:
    raise ConfigError("train.objective=dpo needs the model's own tokenizer: set data.tokenizer (a LoRA run takes its "
                      "base's)")
  if not d.paths.strip():
    raise ConfigError("train.objective=dpo needs data.paths: JSONL files of {\"prompt\", \"chosen\", \"rejected\"}")
  tok_path = Path(d.tokenizer)
  tokenizer = load_tokenizer(tok_path)
  files = expand_paths([p.strip() for p in d.paths.split(",") if p.strip()])
  pairs = load_pairs(files, tokenizer, chat_template_of(tok_path))
  fits = [p for p in pairs if p.num_positions <= d.seq_len]
  if len(fits) < len(pairs):
    log.warning("dpo: %d of %d pairs are longer than data.seq_len=%d (prompt + chosen + rejected) and are left out",
                len(pairs) - len(fits), len(pairs), d.seq_len)
  if len(fits) < 2:
    raise ConfigError(f"data.paths holds {len(fits)} preference pair(s) that fit data.seq_len={d.seq_len}: at least "
                      "2 are needed (train and eval)")
  order = np.random.default_rng(d.seed).permutation(len(fits))
  n_eval = min(len(fits) - 1, max(1, round(d.eval_fraction * len(fits))))
  train = [fits[i] for i in sorted(order[n_eval:])]
  held = [fits[i] for i in sorted(order[:n_eval])]
  description = (f"dpo: {len(train)} train / {len(held)} eval pairs from {len(files)} file(s), up to "
                 f"{cfg.dpo.pairs_per_row} per row; tokenizer {tok_path}")
  tok_dir = tok_path if tok_path.is_dir() else tok_path.parent
  return PairStream(train, cfg.dpo.pairs_per_row), held, tokenizer, tok_dir, description
