"""A completion's text as its ids arrive: incremental detokenization and the stop strings' hold-back."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass
class IncrementalText:
  """The text of a growing list of ids, decoding only a short window of new ids per update (as vLLM / HF streamers).

  Pieces decode differently in context (leading spaces, multi-byte characters split over byte tokens), so the
  window starts a few tokens back; text ending in U+FFFD (an incomplete character) waits for more ids.
  """

  text: str = ""
  prefix_offset: int = 0
  read_offset: int = 0

  def update(self, tokenizer: Any, ids: Sequence[int], final: bool) -> str:
    """The text of `ids` (the previous update's ids plus new ones); `final` flushes an incomplete character."""
    before = tokenizer.decode(ids[self.prefix_offset:self.read_offset])
    after = tokenizer.decode(ids[self.prefix_offset:])
    if len(after) > len(before) and not after.endswith("\ufffd"):
      self.text += after[len(before):]
      self.prefix_offset, self.read_offset = self.read_offset, len(ids)
    elif final and after.endswith("\ufffd"):
      self.text += after[len(before):]
    return self.text


def find_stop(text: str, stops: Sequence[str], emitted: int) -> int | None:
  """Where the earliest stop string in `text` starts, searching only matches that end past `emitted` chars."""
  hits = [i for i in (text.find(stop, max(0, emitted - len(stop) + 1)) for stop in stops) if i >= 0]
  return min(hits) if hits else None


def streamable(text: str, stops: Sequence[str], finished: bool) -> int:
  """How much of `text` may be sent: all once finished, else all but a tail that could begin a stop string."""
  if finished:
    return len(text)
  return len(text) - (max((len(s) for s in stops), default=1) - 1)
