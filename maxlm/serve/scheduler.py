"""Which requests hold the engine's decode slots and KV pages: admission, page allocation, preemption.

Requests are admitted in arrival order into free slots. Paged: a request gets pages as it grows, starting from
the full prompt pages another request already computed (prefix sharing); when the pool runs out the youngest
running request is preempted (its pages freed, requeued first, recomputed later). Contiguous: slot i owns page
i + 1, which holds a whole sequence.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque

import numpy as np

from maxlm.serve import kv_cache
from maxlm.serve.detokenize import IncrementalText
from maxlm.serve.kv_cache import OutOfPages, PageAllocator
from maxlm.serve.request import QueueFull, Request, SamplingParams

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Seq:
  """A request's serving state: its tokens, how many have K/V in the cache, its pages and emitted text."""

  request: Request
  seed: int
  arrival: int
  tokens: list[int]
  num_prompt: int
  computed: int = 0
  pages: list[int] = dataclasses.field(default_factory=list)
  hashes: list[bytes] = dataclasses.field(default_factory=list)
  indexed: int = 0
  slot: int = -1
  text: IncrementalText = dataclasses.field(default_factory=IncrementalText)  # the completion so far
  emitted_chars: int = 0
  emitted_tokens: int = 0
  finish_reason: str | None = None

  @property
  def params(self) -> SamplingParams:
    return self.request.params

  @property
  def generated(self) -> list[int]:
    return self.tokens[self.num_prompt:]


class Scheduler:
  """The waiting queue, the decode slots and the KV page pool of one engine (not thread-safe)."""

  def __init__(self, *, max_batch: int, max_queue: int, paged: bool, page_size: int, max_pages: int,
               num_pages: int, prefix_sharing: bool, counters: dict[str, int]):
    self.max_queue, self.paged, self.page_size, self.max_pages = max_queue, paged, page_size, max_pages
    self.prefix_sharing = paged and prefix_sharing
    self.allocator = PageAllocator(num_pages) if paged else None
    self.waiting: deque[Seq] = deque()
    self.slots: list[Seq | None] = [None] * max_batch
    self.by_id: dict[str, Seq] = {}
    self.counters = counters  # the engine's; preemptions are counted here

  def queue(self, seq: Seq) -> None:
    """Adds a new request at the back of the queue; QueueFull when serve.max_queue requests wait."""
    if len(self.waiting) >= self.max_queue:
      raise QueueFull(f"{len(self.waiting)} requests are waiting (serve.max_queue={self.max_queue})")
    self.waiting.append(seq)
    self.by_id[seq.request.id] = seq

  def abort(self, request_id: str) -> None:
    """Drops a request (its slot and pages are freed); unknown or finished ids are ignored."""
    seq = self.by_id.pop(request_id, None)
    if seq is None:
      return
    if seq.slot >= 0:
      self.release(seq)
    else:
      self.waiting.remove(seq)

  def finish(self, seq: Seq) -> None:
    """Frees a finished request's slot and pages."""
    self.release(seq)
    self.by_id.pop(seq.request.id, None)

  def has_work(self) -> bool:
    return bool(self.waiting) or any(s is not None for s in self.slots)

  def running(self) -> list[Seq]:
    """The requests holding slots, oldest first."""
    return sorted((s for s in self.slots if s is not None), key=lambda s: s.arrival)

  def admit(self) -> None:
    """Moves waiting requests into free slots (paged: only while the pool can hold their prompts)."""
    while self.waiting and None in self.slots:
      seq = self.waiting[0]
      if self.paged:
        need = kv_cache.pages_for(len(seq.tokens) + 1, self.page_size)
        if self.allocator.num_free < need and any(s is not None for s in self.slots):
          return  # wait for running requests to free pages rather than thrash
      self.waiting.popleft()
      seq.slot = self.slots.index(None)
      self.slots[seq.slot] = seq
      seq.computed, seq.pages, seq.indexed = 0, [], 0
      if not self.paged:
        seq.pages = [seq.slot + 1]
      elif self.prefix_sharing:
        full = (seq.num_prompt - 1) // self.page_size  # the last prompt token is always recomputed (its logits)
        seq.hashes = PageAllocator.page_hashes(seq.tokens, self.page_size, full)
        seq.pages = self.allocator.match_prefix(seq.hashes)
        seq.computed, seq.indexed = len(seq.pages) * self.page_size, len(seq.pages)

  def release(self, seq: Seq) -> None:
    """Frees seq's slot and pages (it keeps its tokens)."""
    if self.paged:
      self.allocator.release(seq.pages)
    seq.pages = []
    self.slots[seq.slot] = None
    seq.slot = -1

  def ensure_pages(self, seq: Seq, tokens: int) -> None:
    """Gives seq pages for its first `tokens` positions, preempting younger requests if the pool is empty."""
    if not self.paged:
      return
    need = kv_cache.pages_for(tokens, self.page_size) - len(seq.pages)
    while need > 0:
      try:
        seq.pages += self.allocator.allocate(need)
        return
      except OutOfPages:
        victims = [s for s in self.running() if s is not seq]
        if not victims:
          raise RuntimeError(f"serve.num_pages={self.allocator.num_pages} cannot hold one sequence of {tokens} "
                             "tokens") from None
        self.preempt(victims[-1])

  def preempt(self, seq: Seq) -> None:
    """Frees a running request's pages and requeues it first; it resumes by recomputing its tokens."""
    log.info("preempting request %s (KV pages exhausted); it will be recomputed", seq.request.id)
    self.counters["preemptions_total"] += 1
    self.release(seq)
    seq.computed = 0
    self.waiting.appendleft(seq)

  def trim(self, seq: Seq) -> None:
    """Returns seq's pages past its computed tokens (and the next one) to the pool: a speculative roll-back."""
    if seq.slot >= 0 and self.paged:
      keep = kv_cache.pages_for(seq.computed + 1, self.page_size)
      self.allocator.release(seq.pages[keep:])
      del seq.pages[keep:]

  def index_prefix(self, seq: Seq) -> None:
    """Makes seq's fully computed prompt pages findable by later requests with the same prefix."""
    if not self.prefix_sharing:
      return
    done = min(len(seq.hashes), seq.computed // self.page_size)
    for i in range(seq.indexed, done):
      self.allocator.index(seq.pages[i], seq.hashes[i])
    seq.indexed = max(seq.indexed, done)

  def page_table(self, seqs: list[Seq | None], rows: int) -> np.ndarray:
    """[rows, max_pages] page ids of each sequence (the scratch page past its pages and in empty rows)."""
    table = np.full((rows, self.max_pages), kv_cache.SCRATCH_PAGE, np.int32)
    for i, s in enumerate(seqs):
      if s is not None:
        table[i, :len(s.pages)] = s.pages
    return table

  def pages_used(self) -> tuple[int, int]:
    """(pages in use, pages in the pool): contiguous counts one page per running request of max_batch."""
    if self.paged:
      return self.allocator.num_used, self.allocator.num_pages - 1
    return sum(s is not None for s in self.slots), len(self.slots)
