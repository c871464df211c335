"""Greedy (or sampled) completions of many prompts through the serving engine's continuous batching, as text cut at
the request's stop sequences: the generation side of evaluation tasks."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from maxlm.serve.request import Request, SamplingParams

_ids = itertools.count()


def generate_texts(engine: Any, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                   *, on_finished: Callable[[int], None] | None = None) -> list[str]:
  """Each prompt's completion text (the engine's streamed text: stop sequences cut, eos excluded), in order. Requests
  join the running batch as slots free up; `on_finished(1)` is called as each one ends (a progress bar)."""
  params = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
  ids = [f"eval-{next(_ids)}" for _ in prompts]
  texts = {i: [] for i in ids}
  pending = deque(zip(ids, prompts, params, strict=True))
  while pending or engine.has_work():
    while pending and len(engine.scheduler.waiting) < engine.scheduler.max_queue:
      rid, prompt, p = pending.popleft()
      engine.add_request(Request(rid, list(prompt), p))
    for out in engine.step():
      if out.id in texts:
        texts[out.id].append(out.text)
        if out.finished and on_finished is not None:
          on_finished(1)
  return ["".join(texts[i]) for i in ids]
