"""`maxlm eval --tasks`: load the tasks and the workdir's model, run them, and report a table on stdout, a JSON file
(per-task metrics and per-sample records) and a PNG bar chart with standard-error bars."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from maxlm.eval.tasks import TaskError, discover, load_task


def run(workdir: str, task_paths: Sequence[str], *, num_fewshot: int = 0, limit: int | None = None,
        chat: bool = False, seed: int = 1234, batch_size: int | None = None, seq_len: int | None = None,
        overrides: tuple[str, ...] = (), progress: bool = True) -> dict[str, Any]:
  """Every task's report on the workdir's model (TaskError / ValueError on bad input, before the model loads)."""
  from maxlm.eval.perplexity import machine  # noqa: PLC0415
  from maxlm.eval.task_model import from_workdir  # noqa: PLC0415
  from maxlm.eval.task_runner import run_tasks  # noqa: PLC0415
  from maxlm.eval.tasks import fewshot_examples  # noqa: PLC0415
  from maxlm.workdir import load_workdir_config  # noqa: PLC0415

  if num_fewshot < 0:
    raise TaskError(f"--num-fewshot must be >= 0, got {num_fewshot}")
  if limit is not None and limit < 1:
    raise TaskError(f"--limit must be >= 1, got {limit}")
  if not (Path(workdir) / "config.json").is_file():
    raise TaskError(f"--workdir {workdir}: no config.json (not a maxlm workdir)")
  tasks = [load_task(p) for p in discover(task_paths)]
  for t in tasks:
    if t.type != "perplexity":
      fewshot_examples(t, 0, num_fewshot, seed)  # too few examples fails here, before any weights load
  cfg = load_workdir_config(workdir, overrides)
  if seq_len is not None and seq_len > int(cfg.model.max_seq_len):
    raise TaskError(f"--seq-len {seq_len} is longer than the model's context (model.max_seq_len="
                    f"{cfg.model.max_seq_len})")
  lm, step = from_workdir(workdir, overrides, batch_size=batch_size, seq_len=seq_len, chat=chat)
  report = run_tasks(lm, tasks, num_fewshot=num_fewshot, seed=seed, limit=limit, chat=chat, progress=progress)
  return {"workdir": str(workdir), "step": int(step), "seq_len": lm.seq_len, "batch_size": lm.batch_size,
          "limit": limit, **report, "machine": machine()}


def _fmt(x: float | None, digits: int = 4) -> str:
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_table(report: dict[str, Any]) -> str:
  """One row per task and metric: samples, value and standard error."""
  head = f"{'task':<24} {'type':<16} {'samples':>7} {'metric':<14} {'value':>9} {'± stderr':>9}"
  lines = [head, "-" * len(head)]
  for name, t in report["tasks"].items():
    for metric, m in t["metrics"].items():
      lines.append(f"{name[:24]:<24} {t['type']:<16} {t['samples_scored']:>7,} {metric:<14} {_fmt(m['value']):>9} "
                   f"{_fmt(m['stderr']):>9}")
  return "\n".join(lines)


def plot(report: dict[str, Any], path: str | Path) -> bool:
  """A bar chart of every task's metrics with standard-error bars (accuracies and exact match on a 0-1 axis,
  bits per byte on its own); False when matplotlib is not installed."""
  try:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    return False
  scored = [(f"{n}\n{k}", m["value"], m["stderr"]) for n, t in report["tasks"].items()
            for k, m in t["metrics"].items() if k in ("acc", "acc_norm", "exact_match")]
  bpb = [(n, t["metrics"]["bits_per_byte"]["value"]) for n, t in report["tasks"].items()
         if "bits_per_byte" in t["metrics"]]
  panels = [p for p in (scored, bpb) if p]
  fig, axes = plt.subplots(1, len(panels), figsize=(max(5.0, 1.1 * sum(len(p) for p in panels) + 2), 4.2),
                           squeeze=False, gridspec_kw={"width_ratios": [len(p) for p in panels]})
  for ax, panel in zip(axes[0], panels, strict=True):
    labels = [p[0] for p in panel]
    values = [p[1] for p in panel]
    if panel is scored:
      errors = [0.0 if p[2] is None or math.isnan(p[2]) else p[2] for p in panel]
      ax.bar(labels, values, yerr=errors, capsize=4, color="#4c72b0")
      ax.set_ylim(0, 1)
      ax.set_ylabel("score (± standard error)")
    else:
      ax.bar(labels, values, color="#dd8452")
      ax.set_ylabel("bits per byte (lower is better)")
    ax.tick_params(axis="x", labelsize=8)
  where = "/".join(Path(report["workdir"]).parts[-2:])
  fig.suptitle(f"{where} step {report['step']}: {len(report['tasks'])} tasks", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def write(report: dict[str, Any], output: str | Path) -> list[Path]:
  """The JSON report at `output` and the chart beside it (same name, .png); the paths written."""
  out = Path(output)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2) + "\n")
  written = [out]
  png = out.with_suffix(".png")
  if plot(report, png):
    written.append(png)
  return written
