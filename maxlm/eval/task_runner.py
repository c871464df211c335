"""Runs evaluation tasks (maxlm.eval.tasks) on a model: multiple choice by the log-likelihood of each choice,
generation through the serving engine's continuous batching, perplexity in rolling windows. Used by `maxlm eval
--tasks` and by the training loop's `train.eval_tasks`.

Tokenization follows the model's own conventions (data_pipelines.tokenizer.encode_prompt: bos only where the
tokenizer adds it). A context and its continuation are encoded together and split where the context's own encoding
ends, with the context's trailing whitespace moved to the continuation, as lm-evaluation-harness does; an empty
context is conditioned on bos (or eos where the tokenizer has no bos). With `chat=True` the prompt is one user turn
rendered by the model's chat template with the assistant's generation prompt, and the answer follows it directly.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from maxlm.eval import task_metrics
from maxlm.eval.tasks import Task, TaskError, context, correct_index, targets_of


@dataclasses.dataclass
class TaskModel:
  """What tasks run on: the model and its tokenizer, scorer (log-likelihoods) and engine (generation; built on first
  use by `make_engine(model)`, a maxlm.serve.engine.Engine over the same weights)."""

  model: Any
  tokenizer: Any
  scorer: Any
  make_engine: Callable[[Any], Any]
  seq_len: int
  batch_size: int
  chat_template: Any = None
  _engine: Any = None

  @property
  def engine(self) -> Any:
    if self._engine is None:
      self._engine = self.make_engine(self.model)
    return self._engine

  def update(self, model: Any) -> None:
    """New weights of the same model (training): the scorer keeps its compiled programs; the engine is rebuilt."""
    from flax import nnx  # noqa: PLC0415

    self.model = model
    self.scorer.state = nnx.state(model)
    self._engine = None


def _prefix(tokenizer: Any) -> list[int]:
  """The token an empty context is conditioned on: bos, else eos."""
  return [tokenizer.bos_id] if tokenizer.bos_id is not None else [tokenizer.eos_id]


def encode_context(lm: TaskModel, text: str, chat: bool) -> list[int]:
  """A prompt's ids: the chat template's rendering of it as a user turn, or the tokenizer's own encoding."""
  from data_pipelines.chat_template import chat_messages, chat_prompt_ids  # noqa: PLC0415
  from data_pipelines.tokenizer import encode_prompt  # noqa: PLC0415

  if chat:
    return chat_prompt_ids(lm.tokenizer, lm.chat_template, chat_messages(text))
  ids = encode_prompt(lm.tokenizer, text) if text else []
  return ids or _prefix(lm.tokenizer)


def encode_pair(lm: TaskModel, ctx: str, continuation: str, chat: bool) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) of a scored continuation (see the module docstring for the split)."""
  from data_pipelines.tokenizer import encode_prompt  # noqa: PLC0415

  if chat:
    return encode_context(lm, ctx, True), list(lm.tokenizer.encode(continuation.lstrip()))
  stripped = ctx.rstrip()
  continuation = ctx[len(stripped):] + continuation
  if not stripped:
    return _prefix(lm.tokenizer), list(lm.tokenizer.encode(continuation))
  ctx_ids = encode_prompt(lm.tokenizer, stripped)
  whole = encode_prompt(lm.tokenizer, stripped + continuation)
  return ctx_ids, whole[len(ctx_ids):]


def _records(task: Task, limit: int | None) -> range:
  return range(len(task.records) if limit is None else min(limit, len(task.records)))


def run_multiple_choice(lm: TaskModel, task: Task, *, num_fewshot: int, seed: int, limit: int | None, chat: bool,
                        on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
  """acc and acc_norm with standard errors, and per-sample records (prompt, choices, log-likelihoods, picks)."""
  from maxlm.eval.continuations import score_continuations  # noqa: PLC0415

  prompts, requests, owners = [], [], []
  for i in _records(task, limit):
    ctx = context(task, i, num_fewshot, seed)
    prompts.append(ctx)
    for choice in task.records[i][task.choices]:
      requests.append(encode_pair(lm, ctx, task.target_delimiter + choice, chat))
      owners.append(len(prompts) - 1)
  too_long = [i for i, (_, cont) in enumerate(requests) if len(cont) > lm.seq_len]
  if too_long:
    raise TaskError(f"{task.path}: a choice of record {owners[too_long[0]] + 1} is longer than the window "
                    f"({lm.seq_len} tokens)")
  scores = score_continuations(lm.scorer, requests, seq_len=lm.seq_len, batch_size=lm.batch_size, on_batch=on_batch)
  owners_arr = np.asarray(owners)
  samples, acc, acc_norm = [], [], []
  for n, i in enumerate(_records(task, limit)):
    record = task.records[i]
    choices = record[task.choices]
    mine = owners_arr == n
    lp = scores.logprob[mine]
    pick, pick_norm = task_metrics.choice_picks(lp, choices)
    answer = correct_index(task, record)
    acc.append(float(pick == answer))
    acc_norm.append(float(pick_norm == answer))
    samples.append({"index": i, "prompt": prompts[n], "choices": choices, "answer": answer,
                    "logprobs": lp.tolist(), "greedy": scores.greedy[mine].tolist(), "pick": pick,
                    "pick_norm": pick_norm, "acc": acc[-1], "acc_norm": acc_norm[-1]})
  return {"metrics": _with_stderr({"acc": acc, "acc_norm": acc_norm}), "samples": samples}


def run_generate(lm: TaskModel, task: Task, *, num_fewshot: int, seed: int, limit: int | None, chat: bool,
                 on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
  """exact_match with its standard error over greedy generations (cut at the task's stop sequences)."""
  from maxlm.eval.generation import generate_texts  # noqa: PLC0415
  from maxlm.serve.request import SamplingParams  # noqa: PLC0415

  indices = list(_records(task, limit))
  prompts = [context(task, i, num_fewshot, seed) for i in indices]
  engine = lm.engine
  room = engine.max_len - task.max_tokens
  if room < 1:
    raise TaskError(f"{task.path}: max_tokens {task.max_tokens} leaves no room for a prompt in the engine's "
                    f"{engine.max_len}-token sequences")
  ids = [encode_context(lm, p, chat)[-room:] for p in prompts]  # the end of an over-long prompt is kept
  params = SamplingParams(max_tokens=task.max_tokens, temperature=0.0, stop=task.stop)
  texts = generate_texts(engine, ids, params, on_finished=on_batch)
  samples, em = [], []
  for i, prompt, text in zip(indices, prompts, texts, strict=True):
    targets = targets_of(task, task.records[i])
    prediction = task_metrics.extract(text, task.regex)
    em.append(float(task_metrics.exact_match(prediction, targets)))
    samples.append({"index": i, "prompt": prompt, "targets": targets, "output": text, "prediction": prediction,
                    "exact_match": em[-1]})
  return {"metrics": _with_stderr({"exact_match": em}), "samples": samples}


def run_perplexity(lm: TaskModel, task: Task, *, limit: int | None,
                   on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Token NLL, perplexity and bits per byte of the records' texts in rolling windows of the model's window."""
  from data_pipelines import sources  # noqa: PLC0415
  from data_pipelines.tokenized import encode_documents  # noqa: PLC0415
  from maxlm.eval.loglikelihood import score_documents  # noqa: PLC0415

  indices = list(_records(task, limit))
  documents = [sources.Document(task.records[i][task.text], f"{task.path}:{i + 1}") for i in indices]
  docs = [ids.astype(np.int32) for _, ids in encode_documents(documents, lm.tokenizer)]
  scores = score_documents(lm.scorer, docs, seq_len=lm.seq_len, batch_size=lm.batch_size)
  if on_batch is not None:
    on_batch(len(indices))
  nll, tokens = float(scores.nll.sum()), int(scores.tokens.sum())
  text_bytes = sum(len(d.text.encode("utf-8")) for d in documents)
  if tokens == 0:
    raise TaskError(f"{task.path}: nothing to score (every document is a single token)")
  metrics = {"nll": {"value": nll / tokens, "stderr": None}, "perplexity": {"value": float(np.exp(nll / tokens)),
                                                                            "stderr": None},
             "bits_per_byte": {"value": nll / np.log(2) / text_bytes, "stderr": None}}
  samples = [{"index": i, "tokens": int(t), "nll": float(n)} for i, t, n in zip(indices, scores.tokens, scores.nll,
                                                                                  strict=True)]
  return {"metrics": metrics, "samples": samples, "tokens": tokens, "bytes": text_bytes}


def _with_stderr(values: dict[str, list[float]]) -> dict[str, dict[str, float]]:
  out = {}
  for name, v in values.items():
    mean, err = task_metrics.mean_stderr(v)
    out[name] = {"value": mean, "stderr": err}
  return out


def units(task: Task, limit: int | None) -> int:
  """Progress units of a task: scored choices, generations or documents."""
  n = len(_records(task, limit))
  if task.type == "multiple_choice":
    return sum(len(task.records[i][task.choices]) for i in range(n))
  return n


def run_tasks(lm: TaskModel, tasks: Sequence[Task], *, num_fewshot: int = 0, seed: int = 1234,
              limit: int | None = None, chat: bool = False, progress: bool = True) -> dict[str, Any]:
  """Every task's metrics and samples: {"tasks": {name: {"type", "metrics", "samples", "samples_scored",
  "seconds", ...}}, "seconds"}. Few-shot examples and chat apply to multiple-choice and generation tasks."""
  from tqdm import tqdm  # noqa: PLC0415

  names = [t.name for t in tasks]
  if len(set(names)) < len(names):
    raise TaskError(f"two tasks share a name ({', '.join(names)}): set `task:` in their descriptions")
  if chat and lm.chat_template is None:
    raise TaskError("--chat-template: the model's tokenizer has no chat template")
  bar = tqdm(total=sum(units(t, limit) for t in tasks), desc="eval tasks", unit="req", dynamic_ncols=True,
             disable=not progress, file=sys.stderr)
  out: dict[str, Any] = {}
  t_all = time.perf_counter()
  try:
    for task in tasks:
      bar.set_postfix_str(task.name)
      t0 = time.perf_counter()
      if task.type == "multiple_choice":
        result = run_multiple_choice(lm, task, num_fewshot=num_fewshot, seed=seed, limit=limit, chat=chat,
                                     on_batch=bar.update)
      elif task.type == "generate":
        result = run_generate(lm, task, num_fewshot=num_fewshot, seed=seed, limit=limit, chat=chat,
                              on_batch=bar.update)
      else:
        result = run_perplexity(lm, task, limit=limit, on_batch=bar.update)
      out[task.name] = {"type": task.type, "path": task.path, "samples_scored": len(result["samples"]),
                        "num_fewshot": 0 if task.type == "perplexity" else num_fewshot,
                        "seconds": time.perf_counter() - t0, **result}
  finally:
    bar.close()
  return {"tasks": out, "seconds": time.perf_counter() - t_all, "seed": seed, "chat_template": chat}
