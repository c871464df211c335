"""Evaluation tasks as local files: a small YAML or JSON description beside JSONL data, nothing downloaded.

A description names its type and how a record becomes a prompt and a target:

  task: prose_cloze                # name in reports (default: the file's stem)
  type: multiple_choice            # multiple_choice | generate | perplexity
  data: cloze.jsonl                # the scored records (JSONL, one object per line), relative to the description
  fewshot_data: cloze_train.jsonl  # the separate split few-shot examples are drawn from (needed for --num-fewshot)
  description: "..."               # optional text before the examples
  prompt: "{context}"              # str.format over a record's fields
  target_delimiter: " "            # between a prompt and its choice / target (default " ")
  fewshot_delimiter: "\\n\\n"        # between examples (default a blank line)
  choices: choices                 # multiple_choice: field holding the list of choice strings
  answer: answer                   # multiple_choice: field holding the correct choice (its index or its string)
  target: answer                   # generate: field holding the answer (a string or a list of accepted strings)
  stop: ["\\n"]                      # generate: stop sequences (default: a newline)
  max_tokens: 32                   # generate: new tokens at most
  regex: "answer is (\\\\d+)"         # generate: optional; the prediction is its first group (or match) in the output
  text: text                       # perplexity: field holding the document

Few-shot examples are drawn without replacement from `fewshot_data` by a generator seeded with (seed, record index),
so a record's prompt is the same whatever --limit or the other records.
"""

from __future__ import annotations

import dataclasses
import json
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TYPES = ("multiple_choice", "generate", "perplexity")
_KEYS = {"task", "type", "data", "fewshot_data", "description", "prompt", "target_delimiter", "fewshot_delimiter",
         "choices", "answer", "target", "stop", "max_tokens", "regex", "text"}
_REQUIRED = {"multiple_choice": ("prompt", "choices", "answer"), "generate": ("prompt", "target"),
             "perplexity": ("text",)}
TASK_SUFFIXES = (".yaml", ".yml", ".json")


class TaskError(ValueError):
  """A task description or its data that cannot be evaluated; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Task:
  """A loaded task: its settings, its records and its few-shot pool."""

  name: str
  type: str
  path: str
  records: list[dict[str, Any]]
  fewshot: list[dict[str, Any]]
  prompt: str = ""
  description: str = ""
  target_delimiter: str = " "
  fewshot_delimiter: str = "\n\n"
  choices: str = ""
  answer: str = ""
  target: str = ""
  stop: tuple[str, ...] = ("\n",)
  max_tokens: int = 32
  regex: str = ""
  text: str = ""


def _read_description(path: Path) -> dict[str, Any]:
  try:
    raw = path.read_text(encoding="utf-8")
  except OSError as e:
    raise TaskError(f"{path}: cannot read ({e.strerror})") from None
  try:
    if path.suffix == ".json":
      spec = json.loads(raw)
    else:
      import yaml  # noqa: PLC0415

      spec = yaml.safe_load(raw)
  except Exception as e:  # noqa: BLE001  (json and yaml raise different types; both are a malformed file)
    raise TaskError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
  if not isinstance(spec, dict):
    raise TaskError(f"{path}: expected a mapping of settings, got {type(spec).__name__}")
  return spec


def read_jsonl(path: Path, where: str) -> list[dict[str, Any]]:
  """The objects of a JSONL file; TaskError naming the line of a malformed one."""
  if not path.is_file():
    raise TaskError(f"{where}: data file {path} does not exist")
  records = []
  with path.open(encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise TaskError(f"{path}:{n}: not JSON ({e.msg})") from None
      if not isinstance(obj, dict):
        raise TaskError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
      records.append(obj)
  if not records:
    raise TaskError(f"{where}: data file {path} holds no records")
  return records


def _fields(template: str) -> set[str]:
  return {name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(template) if name}


def load_task(path: str | Path) -> Task:
  """The task described by `path`, its data read and checked (every record has the fields the task uses)."""
  path = Path(path)
  spec = _read_description(path)
  unknown = sorted(set(spec) - _KEYS)
  if unknown:
    raise TaskError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
  kind = spec.get("type")
  if kind not in TYPES:
    raise TaskError(f"{path}: type must be one of {', '.join(TYPES)}, got {kind!r}")
  missing = [k for k in ("data", *_REQUIRED[kind]) if not spec.get(k)]
  if missing:
    raise TaskError(f"{path}: type {kind} needs {', '.join(missing)}")
  for key in ("task", "prompt", "description", "target_delimiter", "fewshot_delimiter", "choices", "answer",
              "target", "regex", "text", "data", "fewshot_data"):
    if key in spec and not isinstance(spec[key], str):
      raise TaskError(f"{path}: {key} must be a string, got {spec[key]!r}")
  stop = spec.get("stop", ["\n"])
  stop = [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
    raise TaskError(f"{path}: stop must be a non-empty string or a list of at most 16, got {spec.get('stop')!r}")
  max_tokens = spec.get("max_tokens", 32)
  if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
    raise TaskError(f"{path}: max_tokens must be an integer >= 1, got {max_tokens!r}")
  if spec.get("regex"):
    import re  # noqa: PLC0415

    try:
      re.compile(spec["regex"])
    except re.error as e:
      raise TaskError(f"{path}: regex {spec['regex']!r} does not compile: {e}") from None
  records = read_jsonl(path.parent / spec["data"], str(path))
  fewshot = read_jsonl(path.parent / spec["fewshot_data"], str(path)) if spec.get("fewshot_data") else []
  task = Task(name=spec.get("task") or path.stem, type=kind, path=str(path), records=records, fewshot=fewshot,
              stop=tuple(stop), max_tokens=max_tokens,
              **{k: spec[k] for k in ("prompt", "description", "target_delimiter", "fewshot_delimiter", "choices",
                                      "answer", "target", "regex", "text") if k in spec})
  for where, pool in (("data", records), ("fewshot_data", fewshot)):
    for i, record in enumerate(pool):
      _check_record(task, record, f"{path}: {where} record {i + 1}")
  return task


def _check_record(task: Task, record: dict[str, Any], where: str) -> None:
  if task.type == "perplexity":
    if not isinstance(record.get(task.text), str):
      raise TaskError(f"{where}: field {task.text!r} must be a string")
    return
  absent = sorted(_fields(task.prompt) - set(record))
  if absent:
    raise TaskError(f"{where}: prompt uses field(s) {', '.join(absent)} the record lacks")
  if task.type == "multiple_choice":
    choices = record.get(task.choices)
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
      raise TaskError(f"{where}: field {task.choices!r} must be a list of at least two strings")
    correct_index(task, record, where)
  else:
    target = record.get(task.target)
    targets = target if isinstance(target, list) else [target]
    if not targets or not all(isinstance(t, str) for t in targets):
      raise TaskError(f"{where}: field {task.target!r} must be a string or a list of strings")


def correct_index(task: Task, record: dict[str, Any], where: str = "record") -> int:
  """Index of a multiple-choice record's correct choice (the answer field is an index or the choice's string)."""
  answer, choices = record.get(task.answer), record[task.choices]
  if isinstance(answer, bool) or not isinstance(answer, int | str):
    raise TaskError(f"{where}: field {task.answer!r} must be a choice index or a choice string, got {answer!r}")
  if isinstance(answer, int):
    if not 0 <= answer < len(choices):
      raise TaskError(f"{where}: answer index {answer} is not in [0, {len(choices)})")
    return answer
  if answer not in choices:
    raise TaskError(f"{where}: answer {answer!r} is not one of the choices")
  return choices.index(answer)


def targets_of(task: Task, record: dict[str, Any]) -> list[str]:
  """A generation record's accepted answers."""
  target = record[task.target]
  return target if isinstance(target, list) else [target]


def _example(task: Task, record: dict[str, Any]) -> str:
  """A solved example: its prompt, the delimiter and its answer."""
  if task.type == "multiple_choice":
    answer = record[task.choices][correct_index(task, record)]
  else:
    answer = targets_of(task, record)[0]
  return task.prompt.format(**record) + task.target_delimiter + answer


def fewshot_examples(task: Task, index: int, k: int, seed: int) -> list[dict[str, Any]]:
  """The k few-shot records of record `index`: drawn without replacement by a generator seeded with (seed, index)."""
  if k == 0:
    return []
  if k > len(task.fewshot):
    what = f"only {len(task.fewshot)}" if task.fewshot else "no fewshot_data"
    raise TaskError(f"{task.path}: --num-fewshot {k} needs {k} examples but the task has {what}")
  picks = np.random.default_rng([seed, index]).choice(len(task.fewshot), size=k, replace=False)
  return [task.fewshot[int(i)] for i in picks]


def context(task: Task, index: int, k: int, seed: int) -> str:
  """The prompt of record `index` with its k few-shot examples before it (and the description first)."""
  shots = [_example(task, r) for r in fewshot_examples(task, index, k, seed)]
  query = task.prompt.format(**task.records[index])
  return task.description + task.fewshot_delimiter.join([*shots, query])


def discover(paths: Sequence[str]) -> list[Path]:
  """Task description files of --tasks: files as given, directories searched (sorted) for *.yaml / *.yml / *.json
  files that declare a `type` (other JSON or YAML there, e.g. data, is skipped)."""
  found: list[Path] = []
  for p in paths:
    path = Path(p)
    if path.is_dir():
      for f in sorted(path.rglob("*")):
        if f.suffix in TASK_SUFFIXES and f.is_file() and _declares_type(f):
          found.append(f)
    elif path.is_file():
      found.append(path)
    else:
      raise TaskError(f"--tasks {p}: no such task file or directory")
  if not found:
    raise TaskError(f"--tasks {', '.join(paths)}: no task descriptions (YAML / JSON with a `type`) found")
  return found


def _declares_type(path: Path) -> bool:
  try:
    spec = _read_description(path)
  except TaskError:
    return False
  return "type" in spec
