"""Packs continuation-scoring requests into few rows: requests that share a context become one tree (the context
once, then each continuation's inputs as a branch that sees the context and itself only), and trees are packed
first-fit into rows of one length. A 4-way multiple-choice question then costs its context once instead of four
times, and rows carry no padding but their tails. numpy only: the plan is testable without a model.

Each scored target is a slot (row position whose logits predict it, target token, request); the model gathers only
the slots' hidden states before the output projection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from maxlm.eval.windows import bucket_length


def row_length(inputs: Sequence[int], seq_len: int, pack_length: int, minimum: int = 16) -> int:
  """The one row length for requests of these input lengths: pack_length (at most seq_len, and no more than the
  requests' total needs), raised to the longest request's power-of-two bucket."""
  return max(bucket_length(max(inputs), seq_len, minimum),
             min(pack_length, seq_len, bucket_length(sum(inputs), seq_len, minimum)))


def _power_of_two(n: int, minimum: int) -> int:
  return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass
class PackedRows:
  """A batch of packed rows and their slots; padding has segment id 0 and slots with request -1."""

  tokens: np.ndarray  # int32 [rows, length]
  positions: np.ndarray  # int32 [rows, length]: position within its request (RoPE)
  segments: np.ndarray  # int32 [rows, length]: one id per tree (>= 1), 0 on padding
  branches: np.ndarray  # int32 [rows, length]: 0 on the shared context, b >= 1 on the b-th continuation
  slot_index: np.ndarray  # int32 [rows, slots]: the position whose logits score the slot
  slot_target: np.ndarray  # int32 [rows, slots]
  slot_request: np.ndarray  # int64 [rows, slots]: the request it belongs to, -1 on padding slots
  requests: list[int]  # the requests scored in this batch (each whole in one row)
  shared: bool  # some context is shared by several continuations: the tree mask is needed (else causal segments)


@dataclasses.dataclass
class _Tree:
  context: np.ndarray
  members: list[tuple[int, np.ndarray]]  # (request, continuation tokens)

  @property
  def size(self) -> int:
    return len(self.context) + sum(len(c) - 1 for _, c in self.members)

  @property
  def slots(self) -> int:
    return sum(len(c) for _, c in self.members)


def attention_mask(segments: np.ndarray, branches: np.ndarray, positions: np.ndarray,
                   sliding_window: int | None = None, xp=np):
  """[rows, length, length] visibility of packed rows: earlier-or-same index, same tree, and a key on the shared
  context or on the query's own branch (and within the window, by position). `xp` is numpy or jax.numpy."""
  idx = xp.arange(segments.shape[1])
  mask = (idx[:, None] >= idx[None, :])[None]
  mask = mask & (segments[:, :, None] == segments[:, None, :])
  mask = mask & ((branches[:, None, :] == 0) | (branches[:, None, :] == branches[:, :, None]))
  if sliding_window is not None:
    mask = mask & (positions[:, :, None] - positions[:, None, :] < sliding_window)
  return mask


def _trees(rows: Sequence[tuple[np.ndarray, int]], capacity: int, share: bool) -> list[_Tree]:
  """Requests grouped by their (kept) context; a group too big for one row is split into several trees."""
  groups: dict[bytes | int, _Tree] = {}
  for i, (whole, scored) in enumerate(rows):
    context, continuation = whole[:-scored], whole[-scored:]
    tree = groups.setdefault(context.tobytes() if share else i, _Tree(context, []))
    tree.members.append((i, continuation))
  trees = []
  for tree in groups.values():
    current = _Tree(tree.context, [])
    for member in tree.members:
      if current.members and current.size + len(member[1]) - 1 > capacity:
        trees.append(current)
        current = _Tree(tree.context, [])
      current.members.append(member)
    trees.append(current)
  return trees


def pack_requests(rows: Sequence[tuple[np.ndarray, int]], *, batch_size: int, row_length: int,
                  minimum_slots: int = 8, share_contexts: bool = True) -> Iterator[PackedRows]:
  """Batches of `batch_size` packed rows for requests given as (kept tokens: context + continuation, number of
  continuation tokens), as continuations.request_row makes them. Rows are `row_length` long (at least every
  request's inputs); slots per batch are padded to a power of two (few compiled shapes). Largest trees first.
  share_contexts=False: every request is its own tree (rolling windows: plain packing, any attention backend)."""
  longest = max((len(w) - 1 for w, _ in rows), default=1)
  if longest > row_length:
    raise ValueError(f"a request of {longest} input tokens does not fit rows of {row_length}")
  length = row_length
  trees = sorted(_trees(rows, length, share_contexts), key=lambda t: -t.size)
  packed: list[list[_Tree]] = []
  free: list[int] = []
  for tree in trees:  # first fit decreasing
    for r, room in enumerate(free):
      if tree.size <= room:
        packed[r].append(tree)
        free[r] -= tree.size
        break
    else:
      packed.append([tree])
      free.append(length - tree.size)
  for first in range(0, len(packed), batch_size):
    chunk = packed[first:first + batch_size]
    slots = _power_of_two(max(sum(t.slots for t in row) for row in chunk), minimum_slots)
    out = PackedRows(np.zeros((batch_size, length), np.int32), np.zeros((batch_size, length), np.int32),
                     np.zeros((batch_size, length), np.int32), np.zeros((batch_size, length), np.int32),
                     np.zeros((batch_size, slots), np.int32), np.zeros((batch_size, slots), np.int32),
                     np.full((batch_size, slots), -1, np.int64), [],
                     any(len(t.members) > 1 for row in chunk for t in row))
    for r, row in enumerate(chunk):
      at, slot = 0, 0
      for segment, tree in enumerate(row, 1):
        c = len(tree.context)
        out.tokens[r, at:at + c] = tree.context
        out.positions[r, at:at + c] = np.arange(c)
        out.segments[r, at:at + c] = segment
        trunk_last, at = at + c - 1, at + c
        for branch, (request, cont) in enumerate(tree.members, 1):
          k = len(cont)
          out.tokens[r, at:at + k - 1] = cont[:-1]
          out.positions[r, at:at + k - 1] = np.arange(c, c + k - 1)
          out.segments[r, at:at + k - 1] = segment
          out.branches[r, at:at + k - 1] = branch
          out.slot_index[r, slot:slot + k] = [trunk_last, *range(at, at + k - 1)]
          out.slot_target[r, slot:slot + k] = cont
          out.slot_request[r, slot:slot + k] = request
          at, slot = at + k - 1, slot + k
        out.requests += [request for request, _ in tree.members]
    yield out
