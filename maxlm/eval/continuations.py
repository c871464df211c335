"""Log-likelihood of continuations given contexts, in batches of bucketed rows: the scoring primitive of
multiple-choice tasks and of the lm-evaluation-harness backend's `loglikelihood` requests.

A request (context, continuation) becomes one right-padded row whose inputs are context + continuation without its
last token, truncated on the left to seq_len inputs (the tokens nearest the continuation are kept, as lm-eval's
`hf` backend does), and whose weights mark the continuation's targets. Rows are sorted by length so each batch is
padded to one power-of-two bucket (`windows.bucket_length`): a handful of compiled shapes whatever the requests.
Only a bucket of the last positions (the longest continuation's, rounded up to a power of two) is projected to
logits: for a short continuation after a long context that skips most of the output projection and softmax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from maxlm.eval.loglikelihood import Scorer
from maxlm.eval.windows import bucket_length


@dataclasses.dataclass
class ContinuationScores:
  """Per request: sum of the continuation's token log-probabilities, and whether greedy decoding produces it."""

  logprob: np.ndarray  # float64 [requests]
  greedy: np.ndarray  # bool [requests]


def request_row(context: Sequence[int], continuation: Sequence[int], seq_len: int) -> tuple[np.ndarray, int]:
  """(tokens of the row: inputs + the last target, number of scored targets). ValueError for an empty continuation,
  one longer than seq_len, or no token to condition the first continuation token on (an empty context)."""
  if not continuation:
    raise ValueError("empty continuation: nothing to score")
  if not context:
    raise ValueError("empty context: the first continuation token needs a token before it (e.g. bos or eos)")
  if len(continuation) > seq_len:
    raise ValueError(f"continuation of {len(continuation)} tokens is longer than the scoring window ({seq_len})")
  whole = np.asarray([*context, *continuation], np.int32)[-(seq_len + 1):]
  return whole, len(continuation)


def score_continuations(scorer: Scorer, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, seq_len: int,
                        batch_size: int = 8, minimum_bucket: int = 16,
                        on_batch: Callable[[int], None] | None = None) -> ContinuationScores:
  """Scores (context tokens, continuation tokens) pairs; results in the order given. `on_batch(n)` is called after
  each batch with the number of real requests it held (a progress bar)."""
  rows = [request_row(c, k, seq_len) for c, k in requests]
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: a full first bucket fails early
  logprob = np.zeros(len(rows), np.float64)
  greedy = np.zeros(len(rows), bool)
  for first in range(0, len(order), batch_size):
    chunk = order[first:first + batch_size]
    length = bucket_length(max(len(rows[i][0]) - 1 for i in chunk), seq_len, minimum_bucket)
    inputs = np.zeros((batch_size, length), np.int32)
    targets = np.zeros((batch_size, length), np.int32)
    weights = np.zeros((batch_size, length), np.float32)
    for r, i in enumerate(chunk):
      whole, scored = rows[i]
      n = len(whole) - 1
      inputs[r, :n], targets[r, :n] = whole[:-1], whole[1:]
      weights[r, n - scored:n] = 1.0
    longest = max(rows[i][1] for i in chunk)
    tail = bucket_length(longest, length, 8)
    scores = scorer(inputs, targets, weights, tail=tail if tail < length else None)
    logprob[chunk] = scores.logprob[:len(chunk)]
    greedy[chunk] = scores.greedy[:len(chunk)]
    if on_batch is not None:
      on_batch(len(chunk))
  return ContinuationScores(logprob, greedy)
