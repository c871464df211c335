"""Regression check of the headline ratios: reruns bench_train and bench_decode's Hugging Face section briefly and
compares maxlm/torch (training, vocab 512 and 32000) and maxlm/HF (greedy decode, batch 1 and 8) with the committed
baselines and the scripts' own targets.

Each benchmark runs as a subprocess (they tune malloc before importing jax) writing its JSON next to --out (never
over the baselines). A figure regresses when it falls more than --tolerance below its baseline or below its target;
then the exit code is 1 (--no-fail: always 0). Writes --out (JSON: the machine, the commands, one row per figure)
and a PNG beside it. A few minutes on 2 cores (--quick, fewer timed steps and noisier ratios: 2-3 minutes).

Run:  python scripts/bench_regress.py      (--sections train,decode --tolerance 0.15 --quick --no-fail)
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import cpu_model, machine, parse_sections, write_results  # noqa: E402  (light: no jax here)

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
SECTIONS = ("train", "decode")
TRAIN_VOCABS = (512, 32000)
DECODE_BATCHES = (1, 8)
# figure key -> (label, section); the order of the table and the plot.
FIGURES = {f"train_vocab{v}": (f"train vocab {v}, maxlm/torch", "train") for v in TRAIN_VOCABS} | {
  f"decode_batch{b}": (f"decode batch {b}, maxlm/HF", "decode") for b in DECODE_BATCHES}
# Each benchmark's arguments (besides --out): the full check and --quick.
RUN_ARGS = {
  "train": {"full": ["--vocab", ",".join(map(str, TRAIN_VOCABS)), "--rounds", "4", "--steps-per-round", "2",
                     "--warmup", "2", "--no-plot"],
            "quick": ["--vocab", ",".join(map(str, TRAIN_VOCABS)), "--rounds", "3", "--steps-per-round", "1",
                      "--warmup", "2", "--no-plot"]},  # one warm-up step leaves the first timed one ~3x slow
  "decode": {"full": ["--sections", "hf", "--hf-batches", ",".join(map(str, DECODE_BATCHES)), "--repeats", "3",
                      "--no-plot"],
             "quick": ["--sections", "hf", "--hf-batches", ",".join(map(str, DECODE_BATCHES)), "--repeats", "1",
                       "--no-plot"]},
}
SCRIPT = {"train": SCRIPTS / "bench_train.py", "decode": SCRIPTS / "bench_decode.py"}
# The committed runs: bench_train's, and bench_decode's Hugging Face section alone (bench_decode.json is a full run).
BASELINE = {"train": REPO / "bench_results" / "bench_train.json",
            "decode": REPO / "bench_results" / "bench_decode_hf.json"}
BUSY_CORES = 0.2  # more background load than this while timing makes a ratio unreliable (as bench_train warns)
_STAMPED = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line options."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="bench_results/bench_regress.json",
                 help="JSON path (the PNG and the sub-benchmarks' JSONs, OUT_train.json / OUT_decode.json, beside it)")
  p.add_argument("--tolerance", type=float, default=0.15,
                 help="a figure regresses when it is more than this fraction below its baseline")
  p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
  p.add_argument("--quick", action="store_true", help="even fewer timed steps, for a smoke test (noisier ratios)")
  p.add_argument("--no-fail", action="store_true", help="exit 0 even when a figure regresses or misses its target")
  p.add_argument("--baseline-train", default=str(BASELINE["train"]), help="bench_train JSON to compare with")
  p.add_argument("--baseline-decode", default=str(BASELINE["decode"]), help="bench_decode JSON to compare with")
  args = p.parse_args(argv)
  args.sections = parse_sections(p, args.sections, SECTIONS)
  if not 0 <= args.tolerance < 1:
    p.error("--tolerance: a fraction in [0, 1)")
  return args


def progress(msg: str) -> None:
  """A timestamped progress line."""
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def script_constant(path: Path, name: str) -> Any:
  """The literal value of a module-level `name = ...` in a script, read without importing it (that loads jax)."""
  for node in ast.parse(path.read_text()).body:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value is not None:
      return ast.literal_eval(node.value)
  raise KeyError(f"{path}: no module-level {name} = <literal>")


def targets() -> dict[str, float]:
  """Each figure's target, from bench_train.TARGET_RATIO and decode_bench.common.TARGETS (one source of truth)."""
  train = script_constant(SCRIPT["train"], "TARGET_RATIO")
  decode = script_constant(SCRIPTS / "decode_bench" / "common.py", "TARGETS")
  return {**{f"train_vocab{v}": float(train) for v in TRAIN_VOCABS},
          **{f"decode_batch{b}": float(decode[f"hf_ratio_batch{b}"]) for b in DECODE_BATCHES}}


def ratios(section: str, doc: dict) -> dict[str, float | None]:
  """The headline ratios in one benchmark JSON (bench_train's or bench_decode's "verdicts"); None where absent."""
  verdicts = doc.get("verdicts") or {}
  if section == "train":
    return {f"train_vocab{v}": (verdicts.get(str(v)) or {}).get("ratio_vs_torch") for v in TRAIN_VOCABS}
  return {f"decode_batch{b}": (verdicts.get(f"hf_ratio_batch{b}") or {}).get("value") for b in DECODE_BATCHES}


def background(section: str, doc: dict) -> dict[str, float | None]:
  """Cores other processes kept busy while each figure was timed (both benchmarks record it), None where absent."""
  if section == "train":
    rows = doc.get("results") or []
    return {f"train_vocab{v}": max((r["background_cores"] for r in rows if r.get("vocab") == v), default=None)
            for v in TRAIN_VOCABS}
  rows = doc.get("hf") or []
  return {f"decode_batch{b}": next((r.get("background_cores") for r in rows if r.get("batch") == b), None)
          for b in DECODE_BATCHES}


def doc_cpu(doc: dict) -> str:
  """The CPU a benchmark JSON was measured on: machine.cpu_model [machine.cpu_id], else meta.cpu_model, else what
  meta has."""
  meta = doc.get("meta") or {}
  found = (doc.get("machine") or {}).get("cpu_model") or meta.get("cpu_model")
  cpu_id = (doc.get("machine") or {}).get("cpu_id")
  if found:
    return f"{found} [{cpu_id}]" if cpu_id else found
  arch = meta.get("machine") if isinstance(meta.get("machine"), str) else None
  return f"{arch or '?'}, {meta.get('cpu_count', '?')} CPUs (model not recorded)"


def compare(baseline: dict[str, float | None], new: dict[str, float | None], tolerance: float,
            target: dict[str, float]) -> list[dict[str, Any]]:
  """One row per figure in `new`: baseline, new, target, change; ok unless no result, below target or regressed."""
  rows = []
  for key in sorted(new, key=lambda k: list(FIGURES).index(k) if k in FIGURES else len(FIGURES)):
    base, now, goal = baseline.get(key), new[key], target[key]
    meets = None if now is None else now >= goal
    change = None if now is None or not base else now / base - 1
    regressed = change is not None and change < -tolerance
    problems = []
    if now is None:
      problems.append("no result")
    else:
      if regressed:
        problems.append(f"{-change:.0%} below the baseline {base:.2f}x")
      if not meets:
        problems.append(f"below the {goal:g}x target")
    rows.append({"figure": key, "label": FIGURES.get(key, (key, ""))[0], "baseline": base, "new": now,
                 "target": goal, "meets_target": meets, "change": change, "regressed": regressed,
                 "ok": not problems, "problems": problems})
  return rows


def markdown_table(rows: list[dict]) -> str:
  """The comparison as a markdown table."""
  lines = ["| figure | baseline | baseline CPU | now | target | meets target | vs baseline | other load | verdict |",
           "|---|---:|---|---:|---:|---|---:|---:|---|"]
  for r in rows:
    meets = "—" if r["meets_target"] is None else "yes" if r["meets_target"] else "no"
    change = "—" if r["change"] is None else f"{r['change']:+.0%}"
    load = "—" if r.get("background_cores") is None else f"{r['background_cores']:.2f} cores"
    verdict = "ok" if r["ok"] else "REGRESSION: " + "; ".join(r["problems"])
    lines.append(f"| {r['label']} | {_x(r['baseline'])} | {r.get('baseline_cpu', '—')} | {_x(r['new'])} | "
                 f"{r['target']:g}x | {meets} | {change} | {load} | {verdict} |")
  return "\n".join(lines)


def _show(path: Path) -> str:
  """A path relative to the repository where it is inside it (shorter table and progress lines)."""
  try:
    return str(path.resolve().relative_to(REPO))
  except ValueError:
    return str(path)


def _x(value: float | None) -> str:
  """A ratio as '1.23x', or a dash where there is none."""
  return "—" if value is None else f"{value:.2f}x"


def summary(rows: list[dict], tolerance: float) -> str:
  """The one-line verdict, with a caveat when other processes loaded the machine while it measured."""
  bad = [r for r in rows if not r["ok"]]
  if not rows:
    return "bench_regress: no figures compared"
  busy = max((r.get("background_cores") or 0.0 for r in rows), default=0.0)
  caveat = (f" (other processes kept up to {busy:.2f} cores busy while timing: rerun on a quiet machine before "
            "trusting these ratios)" if busy > BUSY_CORES else "")
  if not bad:
    return (f"bench_regress: ok, all {len(rows)} figures meet their targets and are within {tolerance:.0%} of the "
            f"baseline (or have none){caveat}")
  return (f"bench_regress: REGRESSION in {len(bad)} of {len(rows)} figures: "
          + "; ".join(f"{r['label']} {_x(r['new'])} ({', '.join(r['problems'])})" for r in bad) + caveat)


def run_benchmark(section: str, out: Path, quick: bool) -> dict[str, Any]:
  """Runs one benchmark as a subprocess, streaming its output with timestamps; what ran and how it ended."""
  argv = [sys.executable, "-u", str(SCRIPT[section]), *RUN_ARGS[section]["quick" if quick else "full"],
          "--out", str(out)]
  command = " ".join([Path(argv[2]).name, *argv[3:]])
  progress(f"[{section}] start: {command}")
  t0 = time.perf_counter()
  tail: list[str] = []
  with subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        bufsize=1) as proc:
    for line in proc.stdout:
      line = line.rstrip()
      tail = [*tail[-19:], line]
      stamped = _STAMPED.match(line)  # bench_decode stamps its progress lines: keep its time, in front
      stamp, text = (stamped.group(0).strip(), line[stamped.end():]) if stamped else (time.strftime("[%H:%M:%S]"), line)
      print(f"{stamp}   [{section}] {text}", flush=True)
  elapsed = time.perf_counter() - t0
  progress(f"[{section}] end: exit {proc.returncode} after {elapsed:.0f}s")
  doc = {}
  if proc.returncode == 0:
    try:
      doc = json.loads(out.read_text())
    except (OSError, ValueError) as e:
      progress(f"[{section}] cannot read {out}: {e}")
  return {"section": section, "command": command, "argv": argv[1:], "returncode": proc.returncode,
          "elapsed_s": elapsed, "out": str(out), "machine": doc.get("machine"), "doc": doc,
          "tail": tail if proc.returncode else []}


def plot(rows: list[dict], path: Path, title: str) -> None:
  """Bars of each figure's baseline and new ratio, with its target as a line over the pair."""
  import numpy as np
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.lines import Line2D
  from matplotlib.patches import Patch

  fig = Figure(figsize=(8, 4.5), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  x = np.arange(len(rows))
  base = ax.bar(x - 0.2, [r["baseline"] or 0.0 for r in rows], 0.4, color="tab:gray")
  now = ax.bar(x + 0.2, [r["new"] or 0.0 for r in rows], 0.4,
               color=["tab:green" if r["ok"] else "tab:red" for r in rows])
  ax.bar_label(base, labels=["no baseline" if r["baseline"] is None else _x(r["baseline"]) for r in rows], fontsize=8)
  ax.bar_label(now, labels=[_x(r["new"]) for r in rows], fontsize=8)
  ax.hlines([r["target"] for r in rows], x - 0.45, x + 0.45, colors="black", linestyles="--")
  ax.set_xticks(x, [r["label"].replace(", ", "\n") for r in rows], fontsize=8)
  ax.set_ylabel("maxlm / reference (x)")
  ax.set_title(title, fontsize=9)
  ax.legend(handles=[Patch(color="tab:gray", label="baseline"), Patch(color="tab:green", label="now: ok"),
                     Patch(color="tab:red", label="now: regression / below target"),
                     Line2D([], [], color="black", linestyle="--", label="target")], fontsize=8)
  fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
  """Runs the benchmarks, prints the comparison, writes the JSON and PNG; 1 on a regression unless --no-fail."""
  t_start = time.perf_counter()
  args = parse_args(argv)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  baseline_path = {"train": Path(args.baseline_train), "decode": Path(args.baseline_decode)}
  run_path = {s: out.resolve().with_name(f"{out.stem}_{s}.json") for s in args.sections}  # the children run in REPO
  for s, path in run_path.items():
    if path.resolve() in {p.resolve() for p in (*baseline_path.values(), *BASELINE.values())}:
      raise SystemExit(f"--out {out}: {s}'s run would overwrite the baseline {path}")
  target = targets()
  here = machine()
  progress(f"{here['cpu_model']}, {here['cpu_count']} CPUs ({here['usable_cpus']} usable); jax {here['jax']}, "
           f"torch {here['torch']}; sections {','.join(args.sections)}{' (quick)' if args.quick else ''}; "
           f"tolerance {args.tolerance:.0%}")

  baseline: dict[str, float | None] = {}
  baseline_cpu: dict[str, str] = {}
  described: dict[str, str] = {}
  for s in args.sections:
    path = baseline_path[s]
    try:
      doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      progress(f"[{s}] no baseline: {_show(path)} ({e.__class__.__name__}); comparing with the target only")
      baseline_cpu[s], described[s] = "—", f"{s}: none ({_show(path)} missing)"
      continue
    baseline.update(ratios(s, doc))
    baseline_cpu[s] = doc_cpu(doc)
    described[s] = f"{s}: {_show(path)} ({baseline_cpu[s]})"

  runs, new, load = [], {}, {}
  for s in args.sections:
    run = run_benchmark(s, run_path[s], args.quick)
    new.update(ratios(s, run["doc"]))
    load.update(background(s, run["doc"]))
    runs.append(run)
  rows = compare(baseline, new, args.tolerance, target)
  for r in rows:
    r["baseline_cpu"] = baseline_cpu[FIGURES[r["figure"]][1]]
    r["background_cores"] = load.get(r["figure"])

  print(f"\nnow: {cpu_model()} [{here['cpu_id']}], {here['cpu_count']} CPUs; baselines: "
        f"{'; '.join(described.values())}")
  print("\n" + markdown_table(rows) + "\n")
  for run in runs:
    if run["returncode"]:
      print(f"{run['section']} failed (exit {run['returncode']}); its last lines:\n  " + "\n  ".join(run["tail"]))
  line = summary(rows, args.tolerance)
  ok = all(r["ok"] for r in rows)
  runtime = time.perf_counter() - t_start
  res = {
    "meta": {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
             "sections": args.sections, "quick": args.quick, "tolerance": args.tolerance, "targets": target,
             "baselines": {s: str(baseline_path[s]) for s in args.sections}, "baseline_cpu": baseline_cpu,
             "cpu_model": here["cpu_model"], "runtime_s": runtime},
    "machine": here,
    "commands": [{k: v for k, v in run.items() if k != "doc"} for run in runs],
    "rows": rows,
    "verdict": {"ok": ok, "summary": line},
  }
  write_results(res, out, lambda png: plot(rows, png, f"headline ratios, baseline vs now ({here['cpu_model']}, "
                                                      f"{here['cpu_count']} CPUs); dashed: target"))
  print(f"total runtime {runtime:.0f}s")
  print(line)
  return 0 if ok or args.no_fail else 1


if __name__ == "__main__":
  sys.exit(main())
