"""maxlm.eval.packing against its definition: every scored request sees exactly its own kept tokens, at their own
positions, in order; nothing is scored twice; trees fit their rows."""

import numpy as np
import pytest

from maxlm.eval.continuations import request_row
from maxlm.eval.packing import attention_mask, pack_requests


def _requests(seed: int) -> list[tuple[list[int], list[int]]]:
  rng = np.random.default_rng(seed)
  contexts = [rng.integers(1, 50, int(n)).tolist() for n in rng.integers(1, 30, 6)]
  return [(contexts[int(rng.integers(0, 6))], rng.integers(1, 50, int(rng.integers(1, 6))).tolist())
          for _ in range(25)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_slot_sees_exactly_its_request(seed):
  seq_len = 24
  requests = _requests(seed)
  rows = [request_row(c, k, seq_len) for c, k in requests]
  seen = np.zeros(len(rows), int)
  for batch in pack_requests(rows, batch_size=2, row_length=32):
    mask = attention_mask(batch.segments, batch.branches, batch.positions)
    for r in range(batch.tokens.shape[0]):
      for s in range(batch.slot_index.shape[1]):
        i = batch.slot_request[r, s]
        if i < 0:
          continue
        whole, scored = rows[i]
        inputs, targets = whole[:-1], whole[1:]
        j = int(np.sum(batch.slot_request[r, :s] == i))  # the j-th scored target of request i
        t = len(inputs) - scored + j  # its index among the request's inputs and targets
        at = batch.slot_index[r, s]
        visible = np.flatnonzero(mask[r, at])
        # the query at `at` sees the request's inputs[:t + 1], at positions 0..t, and is the last of them
        assert batch.tokens[r, visible].tolist() == inputs[:t + 1].tolist()
        assert batch.positions[r, visible].tolist() == list(range(t + 1))
        assert visible[-1] == at and batch.slot_target[r, s] == targets[t]
        seen[i] += 1
  assert seen.tolist() == [scored for _, scored in rows]


def test_shared_contexts_are_stored_once_and_rows_fit():
  context = list(range(1, 21))
  rows = [request_row(context, [30 + i, 40 + i], 64) for i in range(4)]
  (batch,) = pack_requests(rows, batch_size=1, row_length=32)
  assert int(np.sum(batch.segments > 0)) == 20 + 4 * 1  # the context once, each continuation's one input token
  assert sorted(batch.requests) == [0, 1, 2, 3] and batch.shared
  with pytest.raises(ValueError, match="does not fit rows of 16"):
    list(pack_requests(rows, batch_size=1, row_length=16))
