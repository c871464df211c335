"""Greedy (or sampled) completions of many prompts through the serving engine's continuous batching, as text cut at
the request's stop sequences: the generation side of evaluation tasks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from maxlm.serve.request import SamplingParams


def generate_texts(engine: Any, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                   *, on_finished: Callable[[int], None] | None = None) -> list[str]:
  """Each prompt's completion text (the engine's streamed text: stop sequences cut, eos excluded), in order. Requests
  join the running batch as slots free up; `on_finished(1)` is called as each one ends (a progress bar)."""
  texts: list[list[str]] = [[] for _ in prompts]
  for index, out in engine.run_all(prompts, params):
    texts[index].append(out.text)
    if out.finished and on_finished is not None:
      on_finished(1)
  return ["".join(t) for t in texts]
