"""Log-likelihood of continuations given contexts, in batches of bucketed rows: the scoring primitive of
multiple-choice tasks and of the lm-evaluation-harness backend's `loglikelihood` requests.

A request (context, continuation) is scored on context + continuation without its last token, truncated on the
left to seq_len inputs (the tokens nearest the continuation are kept, as lm-eval's `hf` backend does). Requests
whose kept contexts are equal share one copy of it (the choices of a multiple-choice question), and these trees are
packed into rows of one length (maxlm.eval.packing): one or two compiled shapes whatever the requests. Only the
scored positions are projected to logits: for a short continuation that skips most of the output projection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from maxlm.eval.loglikelihood import WindowScorer
from maxlm.eval.packing import pack_requests, row_length


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


def score_continuations(scorer: WindowScorer, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        seq_len: int, batch_size: int = 8, minimum_bucket: int = 16, pack_length: int = 256,
                        on_batch: Callable[[int], None] | None = None) -> ContinuationScores:
  """Scores (context tokens, continuation tokens) pairs; results in the order given. Requests sharing a context
  are scored as one tree and trees are packed into rows of max(pack_length, the longest request) tokens (at most
  seq_len; maxlm.eval.packing). `on_batch(n)` is called after each batch with the number of requests it finished
  (a progress bar)."""
  rows = [request_row(c, k, seq_len) for c, k in requests]
  logprob = np.zeros(len(rows), np.float64)
  hits = np.zeros(len(rows), np.int64)
  if not rows:
    return ContinuationScores(logprob, np.zeros(0, bool))
  length = row_length([len(w) - 1 for w, _ in rows], seq_len, pack_length, minimum_bucket)
  for batch in pack_requests(rows, batch_size=batch_size, row_length=length):
    logp, greedy = scorer.score_packed(batch)
    real = batch.slot_request >= 0
    np.add.at(logprob, batch.slot_request[real], logp[real])
    np.add.at(hits, batch.slot_request[real], greedy[real])
    if on_batch is not None:
      on_batch(len(batch.requests))
  return ContinuationScores(logprob, hits == np.asarray([scored for _, scored in rows]))
