"""Local lm-evaluation-harness tasks (YAML here, JSONL data in data/, written by scripts/make_lm_eval_tasks.py):
two multiple-choice tasks and a cloze task (log-likelihood), two perplexity tasks (rolling log-likelihood) and two
short-answer generation tasks, all tagged `maxlm_local`; see README.md.

The YAML files name their data relative to this directory, which lm_eval does not do for data_files (datasets
resolves them against the working directory): `task_configs()` gives the configs with absolute paths (for
`lm_eval.simple_evaluate(tasks=...)`), and `write_task_dir(DIR)` (or `python -m maxlm.eval.lm_eval_tasks DIR`)
writes copies that work from any directory with `--include_path DIR`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent
TAG = "maxlm_local"


def _yaml_files() -> list[Path]:
  return sorted(TASKS_DIR.glob("*.yaml"))


def task_names() -> list[str]:
  """Every local task's name (lm_eval's `task:`), in file order."""
  return [task_configs([p.stem])[0]["task"] for p in _yaml_files()]


def task_configs(stems: list[str] | None = None) -> list[dict[str, Any]]:
  """The task configs (dicts, as lm_eval reads the YAML) of the given file stems (default all), their data_files
  made absolute."""
  import yaml  # noqa: PLC0415  (comes with lm_eval)

  paths = _yaml_files() if stems is None else [TASKS_DIR / f"{s}.yaml" for s in stems]
  configs = []
  for path in paths:
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    files = config.get("dataset_kwargs", {}).get("data_files")
    if isinstance(files, dict):
      config["dataset_kwargs"]["data_files"] = {split: str(TASKS_DIR / f) for split, f in files.items()}
    configs.append(config)
  return configs


def write_task_dir(dest: str | os.PathLike) -> Path:
  """Writes every task's YAML into dest with absolute data_files (the JSONL stays here); returns dest."""
  import yaml  # noqa: PLC0415

  dest = Path(dest)
  dest.mkdir(parents=True, exist_ok=True)
  for path, config in zip(_yaml_files(), task_configs(), strict=True):
    (dest / path.name).write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
  return dest
