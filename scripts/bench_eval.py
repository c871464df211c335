"""Evaluation benchmark: the local lm-evaluation-harness tasks (maxlm/eval/lm_eval_tasks: cloze, two multiple
choice, two rolling perplexity, two generation tasks) through lm_eval.simple_evaluate with the `maxlm` backend and
with lm-eval's own `hf` backend on the same model (SmolLM2-135M-Instruct, float32 on both sides), in one run.

Sections (--sections):
  harness  wall time of the same task set through both backends: a cold run first (maxlm compiles its programs,
           torch makes its first calls); for maxlm then a "cached" run (in-memory caches cleared and the model
           loaded again, as a second process would, with the programs in the compile_cache the cold run filled);
           then --warm-runs more of each. Each split into loglikelihood, loglikelihood_rolling and generate_until
           time, with the background load. Also the agreement of every request (log-likelihood differences, greedy
           flags, chosen answers, generations) and both backends' metrics. Both backends use the workdir's tokenizer
           (transformers' own GGUF import of SmolLM2 drops the tokenizer's digit split, see docs/evaluation.md).
           Target: maxlm >= 2x faster than hf on the cold run (a user's first `lm_eval` run).
  tasks    `maxlm eval --tasks maxlm/eval/local_tasks` (maxlm.eval.task_report.run, in process) on each of
           --task-models (default SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct) with --task-limit records
           per task: every task's metrics with standard errors and its wall time (compilation included: one
           process per model, as a user runs it).

Models come from scripts/fetch_models.py (fetch_workdir / fetch_transformers, cached in $MAXLM_MODELS).

Run:  python scripts/bench_eval.py                 (full task set, ~15 minutes on 2 cores)
      python scripts/bench_eval.py --limit 4 --warm-runs 0 --out /tmp/bench_eval_quick.json   (a smoke run)
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench_host: light; must run before jax is imported
import bench_host  # noqa: E402
from bench_host import cpu_snapshot, tune_malloc  # noqa: E402

MALLOC_TUNED = tune_malloc()

SECTIONS = ("harness", "tasks")
LOCAL_TASKS = Path(__file__).resolve().parents[1] / "maxlm" / "eval" / "local_tasks"
TARGET = 2.0  # maxlm's speed-up over the hf backend, cold run
REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")
BACKENDS = ("maxlm", "hf")


def progress(message: str) -> None:
  print(f"[bench_eval {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line options (a bad value is a usage error naming the flag)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
  p.add_argument("--model", default="smollm2-135m", help="scripts/fetch_models.py key of the model")
  p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
  p.add_argument("--task-models", default="smollm2-135m,qwen2.5-coder-0.5b",
                 help="tasks section: comma-separated scripts/fetch_models.py keys")
  p.add_argument("--task-limit", type=int, default=40, help="tasks section: records per task")
  p.add_argument("--batch-size", type=int, default=8, help="batch size of both backends")
  p.add_argument("--warm-runs", type=int, default=1, help="runs after the cold one (compiled programs reused)")
  p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (default: torch's own)")
  p.add_argument("--out", default="bench_results/bench_eval.json", help="JSON (the PNG goes beside it)")
  p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
  args = p.parse_args(argv)
  args.sections = bench_host.parse_sections(p, args.sections, SECTIONS)
  if args.limit is not None and args.limit < 1:
    p.error("--limit must be >= 1")
  if args.task_limit < 1:
    p.error("--task-limit must be >= 1")
  args.task_models = [m for m in args.task_models.split(",") if m]
  if args.batch_size < 1 or args.warm_runs < 0 or args.torch_threads < 0:
    p.error("--batch-size must be >= 1, --warm-runs and --torch-threads >= 0")
  return args


def time_requests(lm: Any) -> dict[str, float]:
  """Wraps an lm-eval model's three request methods (on the instance) to add up their wall time per request type;
  returns the dict they add to."""
  spent = dict.fromkeys(REQUEST_TYPES, 0.0)
  for name in REQUEST_TYPES:
    method = getattr(lm, name)

    def timed(requests, *args, _method=method, _name=name, **kwargs):
      t0 = time.perf_counter()
      try:
        return _method(requests, *args, **kwargs)
      finally:
        spent[_name] += time.perf_counter() - t0

    setattr(lm, name, timed)
  return spent


def compare(ours: dict, theirs: dict) -> dict[str, Any]:
  """Per-request agreement of two simple_evaluate results with logged samples (ours: maxlm, theirs: hf)."""
  diffs = {"loglikelihood": [], "loglikelihood_rolling": []}
  out = {"greedy_mismatches": 0, "generations": 0, "generation_mismatches": 0, "choices": 0, "choice_mismatches": 0}
  for task, samples in ours["samples"].items():
    for a, b in zip(samples, theirs["samples"][task], strict=True):
      values = [(ra[0], rb[0]) for ra, rb in zip(a["resps"], b["resps"], strict=True)]
      if isinstance(values[0][0], str):
        out["generations"] += len(values)
        out["generation_mismatches"] += sum(x != y for x, y in values)
      elif isinstance(values[0][0], tuple):
        diffs["loglikelihood"] += [abs(x[0] - y[0]) for x, y in values]
        out["greedy_mismatches"] += sum(x[1] != y[1] for x, y in values)
        if len(values) > 1:
          out["choices"] += 1
          out["choice_mismatches"] += int(max(range(len(values)), key=lambda i: values[i][0][0])
                                          != max(range(len(values)), key=lambda i: values[i][1][0]))
      else:
        diffs["loglikelihood_rolling"] += [abs(x - y) for x, y in values]
  for kind, d in diffs.items():
    out[f"{kind}_requests"] = len(d)
    out[f"{kind}_max_abs_diff"] = max(d, default=0.0)
  return out


def metrics(result: dict) -> dict[str, dict[str, float]]:
  """{task: {metric: value}} without the standard errors."""
  return {task: {k: float(v) for k, v in m.items() if "," in k and "stderr" not in k and isinstance(v, int | float)}
          for task, m in result["results"].items()}


def section_harness(args: argparse.Namespace) -> dict[str, Any]:
  """The same task set through the maxlm and hf backends: a cold run, then warm runs, alternating backends."""
  import lm_eval  # noqa: PLC0415
  import torch  # noqa: PLC0415
  from fetch_models import fetch_transformers, fetch_workdir  # noqa: PLC0415
  from lm_eval.models.huggingface import HFLM  # noqa: PLC0415
  from lm_eval.tasks import TaskManager  # noqa: PLC0415

  from maxlm.eval.harness import MaxlmLM  # noqa: PLC0415
  from maxlm.eval.lm_eval_tasks import task_configs  # noqa: PLC0415

  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  workdir, folder = fetch_workdir(args.model), fetch_transformers(args.model)
  cache = tempfile.mkdtemp(prefix="bench_eval_xla_")  # empty: the cold run compiles everything

  def load(name: str) -> Any:
    t0 = time.perf_counter()
    if name == "maxlm":
      lm = MaxlmLM(workdir=str(workdir), batch_size=args.batch_size, compile_cache=cache)
    else:
      lm = HFLM(pretrained=str(folder), tokenizer=str(Path(workdir) / "tokenizer"), batch_size=args.batch_size,
                device="cpu", dtype="float32")
    loads[name if name not in loads else f"{name}_reload"] = time.perf_counter() - t0
    spent[name] = time_requests(lm)
    return lm

  loads, spent, runs, last = {}, {}, [], {}
  lms = {name: load(name) for name in BACKENDS}

  def run(name: str, label: str) -> None:
    progress(f"{name} {label} run ...")
    for kind in REQUEST_TYPES:
      spent[name][kind] = 0.0
    start = cpu_snapshot()
    result = lm_eval.simple_evaluate(model=lms[name], tasks=task_configs(), limit=args.limit, log_samples=True,
                                     bootstrap_iters=0, verbosity="ERROR",
                                     task_manager=TaskManager(include_defaults=False))
    end = cpu_snapshot()
    runs.append({"backend": name, "run": label, "seconds": end[0] - start[0], **dict(spent[name]),
                 "background_cores": bench_host.background_cores(start, end)})
    last[name] = result
    progress(f"{name} {label}: {runs[-1]['seconds']:.1f} s")

  for name in BACKENDS:
    run(name, "cold")
  import jax  # noqa: PLC0415

  del lms["maxlm"]
  jax.clear_caches()  # as a new process: traced and compiled programs gone, the persistent compile cache kept
  lms["maxlm"] = load("maxlm")
  run("maxlm", "cached")
  for i in range(args.warm_runs):
    for name in BACKENDS:
      run(name, f"warm{i + 1}")
  shutil.rmtree(cache, ignore_errors=True)
  jax.config.update("jax_compilation_cache_dir", None)  # the cache is gone: later sections compile afresh
  requests = {kind: sum(len(s["resps"]) for t, samples in last["maxlm"]["samples"].items() for s in samples
                        if last["maxlm"]["configs"][t]["output_type"] in kinds)
              for kind, kinds in (("loglikelihood", ("loglikelihood", "multiple_choice")),
                                  ("loglikelihood_rolling", ("loglikelihood_rolling",)),
                                  ("generate_until", ("generate_until",)))}
  return {"runs": runs, "speedup": speedups(runs), "load_seconds": loads, "requests": requests,
          "documents": {t: len(s) for t, s in last["maxlm"]["samples"].items()},
          "agreement": compare(last["maxlm"], last["hf"]),
          "metrics": {name: metrics(r) for name, r in last.items()},
          "settings": {"model": args.model, "workdir": str(workdir), "transformers": str(folder),
                       "hf_tokenizer": str(Path(workdir) / "tokenizer"),
                       "batch_size": args.batch_size, "limit": args.limit, "dtype": "float32",
                       "maxlm_batch": lms["maxlm"].batch_size,
                       "maxlm_engine_batch": int(lms["maxlm"].cfg.serve.max_batch),
                       "torch_threads": torch.get_num_threads()}}


def speedups(runs: list[dict]) -> dict[str, dict[str, float]]:
  """{maxlm run: {total and each request type: hf seconds / maxlm seconds}}, against hf's run of the same label
  (its cold run where it has none: the cached run)."""
  by = {(r["backend"], r["run"]): r for r in runs}
  out = {}
  for label in dict.fromkeys(r["run"] for r in runs):
    ours, theirs = by.get(("maxlm", label)), by.get(("hf", label), by.get(("hf", "cold")))
    if ours and theirs:
      out[label] = {kind: theirs[key] / ours[key] if ours[key] > 0 else math.nan
                    for kind, key in (("total", "seconds"), *((k, k) for k in REQUEST_TYPES))}
  return out


def verdicts(res: dict) -> dict[str, dict[str, Any]]:
  """The target: maxlm's cold-run speed-up over the hf backend."""
  out = {}
  speed = res.get("harness", {}).get("speedup", {}).get("cold")
  if speed:
    value = speed["total"]
    out["harness_speedup_cold"] = {"value": value, "target": TARGET, "met": value >= TARGET,
                                   "text": f"maxlm {value:.2f}x faster than hf (cold run; target >= {TARGET}x)"}
  return out


def tables(res: dict) -> str:
  """Markdown tables of the sections that ran."""
  return "\n\n".join(fn(res) for name, fn in (("harness", harness_table), ("tasks", tasks_table)) if name in res)


def tasks_table(res: dict) -> str:
  """One row per model, task and metric: value ± standard error, and the task's seconds."""
  s = res["tasks"]
  lines = [f"### maxlm eval --tasks {Path(s['tasks_dir']).name} (--limit {s['limit']}), float32", "",
           "| model | task | type | samples | metric | value | ± stderr | task s |",
           "|---|---|---|---:|---|---:|---:|---:|"]
  for model, m in s["models"].items():
    for task, t in m["tasks"].items():
      for metric, v in t["metrics"].items():
        err = "" if v["stderr"] is None or math.isnan(v["stderr"]) else f"{v['stderr']:.4f}"
        lines.append(f"| {model} | {task} | {t['type']} | {t['samples']} | {metric} | {v['value']:.4f} | {err} | "
                     f"{t['seconds']:.1f} |")
    lines.append(f"| {model} | **all** | | | | | | {m['seconds']:.1f} |")
  return "\n".join(lines)


def harness_table(res: dict) -> str:
  """The harness section: seconds per run and request type, agreement, metrics of both backends."""
  s = res["harness"]
  st = s["settings"]
  n = s["requests"]
  lines = [f"### lm-eval local tasks, {st['model']} float32, batch {st['batch_size']} ({n['loglikelihood']} "
           f"loglikelihood, {n['loglikelihood_rolling']} rolling, {n['generate_until']} generation requests)", "",
           "| backend | run | loglikelihood s | rolling s | generate s | total s | hf / maxlm | background cores |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in s["runs"]:
    ratio = s["speedup"].get(r["run"], {}).get("total") if r["backend"] == "maxlm" else None
    lines.append(f"| {r['backend']} | {r['run']} | {r['loglikelihood']:.1f} | {r['loglikelihood_rolling']:.1f} | "
                 f"{r['generate_until']:.1f} | {r['seconds']:.1f} | {f'{ratio:.2f}x' if ratio else ''} | "
                 f"{r['background_cores']:.2f} |")
  a = s["agreement"]
  lines += ["", (f"Agreement (last run): loglikelihood max |diff| {a['loglikelihood_max_abs_diff']:.2e} over "
                 f"{a['loglikelihood_requests']} requests, rolling max |diff| "
                 f"{a['loglikelihood_rolling_max_abs_diff']:.2e} over {a['loglikelihood_rolling_requests']}, "
                 f"greedy-flag mismatches {a['greedy_mismatches']}, chosen-answer mismatches "
                 f"{a['choice_mismatches']}/{a['choices']}, generation mismatches "
                 f"{a['generation_mismatches']}/{a['generations']}. Model load: maxlm "
                 f"{s['load_seconds']['maxlm']:.1f} s, hf {s['load_seconds']['hf']:.1f} s (not in the run times)."),
            "", "| task | metric | maxlm | hf |", "|---|---|---:|---:|"]
  for task, m in s["metrics"]["maxlm"].items():
    for key, value in m.items():
      lines.append(f"| {task} | {key} | {value:.4f} | {s['metrics']['hf'][task][key]:.4f} |")
  return "\n".join(lines)


def plot(res: dict, png: Path) -> None:
  """Harness: seconds per request type and run for both backends, with the total speed-up; tasks: every model's
  scores with standard-error bars, and bits per byte."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  panels = (["harness"] if "harness" in res else []) + (["scores", "bpb"] if "tasks" in res else [])
  fig = Figure(figsize=(6 * len(panels), 4.8))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, panel in zip(axes, panels, strict=True):
    if panel == "harness":
      _plot_harness(ax, res)
    else:
      _plot_tasks(ax, res, panel)
  fig.tight_layout()
  fig.savefig(png, dpi=120)


def _plot_tasks(ax: Any, res: dict, panel: str) -> None:
  models = res["tasks"]["models"]
  keep = ("acc", "acc_norm", "exact_match") if panel == "scores" else ("bits_per_byte",)
  bars = sorted({(task, metric) for m in models.values() for task, t in m["tasks"].items() for metric in t["metrics"]
                 if metric in keep})
  width = 0.8 / max(1, len(models))
  for i, (model, m) in enumerate(models.items()):
    xs = [j + i * width for j in range(len(bars))]
    values = [m["tasks"][task]["metrics"][metric]["value"] for task, metric in bars]
    errors = [m["tasks"][task]["metrics"][metric]["stderr"] or 0.0 for task, metric in bars]
    ax.bar(xs, values, width, yerr=errors if panel == "scores" else None, capsize=3, label=model)
  ax.set_xticks([j + 0.4 - width / 2 for j in range(len(bars))], [f"{t}\n{k}" for t, k in bars], fontsize=7,
                rotation=30, ha="right")
  ax.set_ylabel("score (± standard error)" if panel == "scores" else "bits per byte (lower is better)")
  ax.set_title(f"maxlm eval --tasks (limit {res['tasks']['limit']})", fontsize=9)
  ax.legend(fontsize=8)


def _plot_harness(ax: Any, res: dict) -> None:
  s = res["harness"]
  labels = list(dict.fromkeys(r["run"] for r in s["runs"]))
  colors = {"loglikelihood": "#4c72b0", "loglikelihood_rolling": "#55a868", "generate_until": "#c44e52"}
  x = 0.0
  ticks, names = [], []
  for label in labels:
    for r in [r for r in s["runs"] if r["run"] == label]:
      backend = r["backend"]
      bottom = 0.0
      for kind in REQUEST_TYPES:
        ax.bar(x, r[kind], 0.8, bottom=bottom, color=colors[kind], label=kind if x == 0 else None)
        bottom += r[kind]
      ax.text(x, r["seconds"], f"{r['seconds']:.0f} s", ha="center", va="bottom", fontsize=8)
      ticks.append(x)
      names.append(f"{backend}\n{label}")
      x += 1
    ratio = s["speedup"].get(label, {}).get("total")
    if ratio:
      first = x - sum(r["run"] == label for r in s["runs"])
      ax.text(first, 0, f"{ratio:.2f}x", ha="center", va="bottom", fontsize=9, color="white", weight="bold")
    x += 0.6
  ax.set_xticks(ticks, names)
  ax.set_ylabel("seconds (lm_eval.simple_evaluate)")
  ax.set_title(f"lm-eval local tasks, {s['settings']['model']}: maxlm vs hf backend\n{res['machine']['cpu_model']}",
               fontsize=9)
  ax.legend(fontsize=8)


def section_tasks(args: argparse.Namespace) -> dict[str, Any]:
  """`maxlm eval --tasks` over the local task files on each model: metrics, standard errors and seconds per task."""
  from fetch_models import fetch_workdir  # noqa: PLC0415

  from maxlm.eval import task_report  # noqa: PLC0415

  out = {}
  for key in args.task_models:
    workdir = fetch_workdir(key)
    progress(f"maxlm eval --tasks {LOCAL_TASKS.name} on {key} (limit {args.task_limit}) ...")
    t0 = time.perf_counter()
    report = task_report.run(str(workdir), [str(LOCAL_TASKS)], limit=args.task_limit, progress=False)
    seconds = time.perf_counter() - t0
    progress(f"{key}: {seconds:.1f} s")
    out[key] = {"seconds": seconds, "seq_len": report["seq_len"], "batch_size": report["batch_size"],
                "tasks": {name: {"type": t["type"], "samples": t["samples_scored"], "seconds": t["seconds"],
                                 "metrics": t["metrics"]} for name, t in report["tasks"].items()}}
  return {"models": out, "limit": args.task_limit, "tasks_dir": str(LOCAL_TASKS)}


def run_section(name: str, args: argparse.Namespace) -> dict[str, Any]:
  """One section's results."""
  if name == "harness":
    return section_harness(args)
  if name == "tasks":
    return section_tasks(args)
  raise ValueError(name)


def main(argv: list[str] | None = None) -> None:
  """Runs the sections, prints the tables and verdicts, writes the JSON and the PNG."""
  args = parse_args(argv)
  t0 = time.perf_counter()
  progress(f"{bench_host.cpu_model()}, {os.cpu_count()} CPUs; sections {','.join(args.sections)}; malloc tuning "
           f"{'on' if MALLOC_TUNED else 'off'}")
  res: dict[str, Any] = {}
  for name in args.sections:
    res[name] = run_section(name, args)
  res["machine"] = bench_host.machine(MALLOC_TUNED)
  res["meta"] = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                 "runtime_s": time.perf_counter() - t0, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "timing": "wall time of lm_eval.simple_evaluate (task building and metrics included, model load "
                           "not); request types: time inside the backend's method"}
  res["verdicts"] = verdicts(res)
  print("\n" + tables(res) + "\n")
  for key, v in res["verdicts"].items():
    print(f"{key}: {v['text']}: {'meets' if v['met'] else 'MISSES'}")
  bench_host.write_results(res, args.out, (lambda png: plot(res, png)) if args.plot else None)


if __name__ == "__main__":
  main()
