"""Preference pairs packed into next-token rows for DPO: pair k of a row is segments 2k+1 (chosen), 2k+2 (rejected).

The row layout is maxlm's pretraining batch (inputs, targets, segment_ids, positions; see loader.py) plus a float32
loss_mask that is 1 where the target is a completion token, which maxlm.train.dpo.pair_logps sums over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass
class EncodedPair:
  """One preference pair, token level: each sequence is prompt + completion, its mask True on completion tokens."""

  chosen: np.ndarray  # int32 [chosen_len]
  chosen_mask: np.ndarray  # bool [chosen_len]
  rejected: np.ndarray  # int32 [rejected_len]
  rejected_mask: np.ndarray  # bool [rejected_len]

  def __post_init__(self):
    self.chosen = np.asarray(self.chosen, dtype=np.int32)
    self.chosen_mask = np.asarray(self.chosen_mask, dtype=bool)
    self.rejected = np.asarray(self.rejected, dtype=np.int32)
    self.rejected_mask = np.asarray(self.rejected_mask, dtype=bool)
    for name in ("chosen", "rejected"):
      tokens, mask = getattr(self, name), getattr(self, f"{name}_mask")
      if tokens.ndim != 1 or mask.shape != tokens.shape:
        raise ValueError(f"{name} must be 1-D tokens with a mask of the same shape, got {tokens.shape} tokens "
                         f"and a {mask.shape} mask")

  @property
  def num_positions(self) -> int:
    """Row positions the pair takes once shifted: (len(chosen) - 1) + (len(rejected) - 1)."""
    return len(self.chosen) - 1 + len(self.rejected) - 1


def _empty_row(seq_len: int) -> dict[str, np.ndarray]:
  """A row of padding: segment 0, no loss."""
  row = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
  row["loss_mask"] = np.zeros(seq_len, np.float32)
  return row


def pack_pairs(pairs: Sequence[EncodedPair], *, seq_len: int, max_pairs_per_row: int,
               with_index: bool = False) -> list[dict[str, np.ndarray]]:
  """First-fit rows of whole pairs, in the given order: int32 [seq_len] inputs, targets, segment_ids, positions and
  float32 [seq_len] loss_mask (the weight of predicting targets[t], i.e. mask[1:]); with_index adds int32
  [max_pairs_per_row] pair_index, the input index of the pair in each slot (-1: empty).

  Each sequence is shifted (inputs = tokens[:-1], targets = tokens[1:]) into len - 1 positions, restarting
  positions at 0; a pair goes to the first row with room for both its sequences and fewer than max_pairs_per_row
  pairs, else to a new row. Deterministic: the same pairs give the same rows.
  """
  if seq_len < 2 or max_pairs_per_row < 1:
    raise ValueError(f"seq_len must be >= 2 and max_pairs_per_row >= 1, got {seq_len} and {max_pairs_per_row}")
  rows: list[dict[str, np.ndarray]] = []
  used: list[int] = []  # positions filled in each row
  count: list[int] = []  # pairs in each row
  open_rows: list[int] = []  # rows that may take another pair, in creation order
  for i, pair in enumerate(pairs):
    lengths = (len(pair.chosen), len(pair.rejected))
    if min(lengths) < 2:
      raise ValueError(f"pair {i} has chosen/rejected lengths {lengths}: each needs >= 2 tokens (one to predict)")
    need = pair.num_positions
    if need > seq_len:
      raise ValueError(f"pair {i} does not fit in seq_len={seq_len}: chosen and rejected lengths {lengths} take "
                       f"{need} positions after the next-token shift")
    r = next((r for r in open_rows if used[r] + need <= seq_len), None)
    if r is None:
      r = len(rows)
      rows.append(_empty_row(seq_len))
      if with_index:
        rows[-1]["pair_index"] = np.full(max_pairs_per_row, -1, np.int32)
      used.append(0)
      count.append(0)
      open_rows.append(r)
    row, k = rows[r], count[r]
    for j, (tokens, mask) in enumerate(((pair.chosen, pair.chosen_mask), (pair.rejected, pair.rejected_mask))):
      start, n = used[r], len(tokens) - 1
      span = slice(start, start + n)
      row["inputs"][span] = tokens[:-1]
      row["targets"][span] = tokens[1:]
      row["segment_ids"][span] = 2 * k + 1 + j
      row["positions"][span] = np.arange(n, dtype=np.int32)
      row["loss_mask"][span] = mask[1:]
      used[r] += n
    if with_index:
      row["pair_index"][k] = i
    count[r] += 1
    if count[r] == max_pairs_per_row or seq_len - used[r] < 2:  # no room for another pair (>= 2 positions)
      open_rows.remove(r)
  return rows
