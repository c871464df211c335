"""Rolling windows over documents: every token after a document's first is scored exactly once, each with as much
left context as a window of `seq_len` input tokens allows (numpy only, so the plan is testable without a model)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Window:
  """Inputs doc[start:end - 1] predict targets doc[start + 1:end]; targets before `first_scored` were scored by the
  document's previous window and only give context here."""

  start: int
  end: int
  first_scored: int

  @property
  def length(self) -> int:
    """Input tokens of the window (at most seq_len)."""
    return self.end - 1 - self.start


def check_window_args(seq_len: int, stride: int) -> None:
  """ValueError unless 1 <= stride <= seq_len (a stride above seq_len would leave tokens unscored)."""
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  if not 1 <= stride <= seq_len:
    raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")


def rolling_windows(num_tokens: int, seq_len: int, stride: int) -> list[Window]:
  """The windows of a document of num_tokens tokens: the first scores up to seq_len targets with all the context
  before them; each later one scores the next `stride` targets with seq_len - stride + 1 or more tokens of context."""
  check_window_args(seq_len, stride)
  windows, scored = [], 1
  while scored < num_tokens:
    end = min(num_tokens, scored + (seq_len if scored == 1 else stride))
    windows.append(Window(max(0, end - 1 - seq_len), end, scored))
    scored = end
  return windows


def bucket_length(length: int, seq_len: int, minimum: int = 16) -> int:
  """The padded row length of a window: the next power of two >= length (at least `minimum`), at most seq_len;
  a few shapes, so a few compilations, and less than 2x padding."""
  return min(seq_len, max(minimum, 1 << max(0, length - 1).bit_length()))


@dataclasses.dataclass
class WindowRows:
  """A batch of windows as right-padded rows; weights mark the scored targets (0 on context and padding)."""

  doc_ids: np.ndarray  # int64 [rows]: the document of each row (-1 on padding rows)
  inputs: np.ndarray  # int32 [rows, length]
  targets: np.ndarray  # int32 [rows, length]
  weights: np.ndarray  # float32 [rows, length]


def window_batches(docs: Sequence[np.ndarray], lengths: Sequence[int], *, seq_len: int, stride: int,
                   batch_size: int) -> Iterator[WindowRows]:
  """Every document's rolling windows in batches of `batch_size` rows (the last padded with empty rows), rows of
  one batch padded to one bucket length. docs[i] is read once per window, in document order within a bucket."""
  plan: dict[int, list[tuple[int, Window]]] = {}
  for i, n in enumerate(lengths):
    for w in rolling_windows(int(n), seq_len, stride):
      plan.setdefault(bucket_length(w.length, seq_len), []).append((i, w))
  cached: tuple[int, np.ndarray] | None = None
  for length in sorted(plan):
    entries = plan[length]
    for first in range(0, len(entries), batch_size):
      rows = WindowRows(np.full(batch_size, -1, np.int64), np.zeros((batch_size, length), np.int32),
                        np.zeros((batch_size, length), np.int32), np.zeros((batch_size, length), np.float32))
      for r, (i, w) in enumerate(entries[first:first + batch_size]):
        if cached is None or cached[0] != i:
          cached = (i, np.asarray(docs[i]))
        doc = cached[1]
        k = w.length
        rows.doc_ids[r] = i
        rows.inputs[r, :k] = doc[w.start:w.end - 1]
        rows.targets[r, :k] = doc[w.start + 1:w.end]
        rows.weights[r, w.first_scored - 1 - w.start:k] = 1.0
      yield rows


def scored_targets(lengths: Sequence[int]) -> int:
  """How many targets rolling windows score over documents of these lengths: each document's tokens but one."""
  return int(sum(max(0, int(n) - 1) for n in lengths))
