"""Where a training step and a decode run spend their time on XLA:CPU: op time by category and instruction.

Runs the workloads of scripts/bench_train.py (the same model, config and jitted, donated train step; seq 256 x
batch 8 at each --vocab) and of bench_decode's "vs Hugging Face" section (the serving engine over the same random
4-layer model, serve.max_batch = batch, greedy 128 new tokens from 32-token prompts, at batch 1 and 8). Each
workload runs --warmup times (compilation), --timed times untraced (the wall time without profiler overhead), then
--traced times under jax.profiler with XLA:CPU's per-thunk trace events on (XLA_FLAGS gets
--xla_cpu_enable_xprof_traceme=true, appended to any flags already set), each traced run inside a
TraceAnnotation marker. The trace (*.trace.json.gz) is aggregated by `aggregate`, a pure function:

- wall: the marker's duration per step (train) or per generate run (decode), under the profiler (the untraced
  median is printed beside it; the gap is tracing overhead, mostly the python tracer's).
- op time: the sum of the durations of leaf op events, XLA's thunks named after HLO instructions ("dot.183",
  "select_dynamic-update-slice_fusion.15", "wrapped_scatter"), over all XLA threads (so it can exceed the wall
  time when two threads run ops at once). Umbrella events (ThunkExecutor::Execute, its "wait for completion", the
  "end: op" completion callbacks, PjitFunction and python frames) and container ops (while / conditional / call,
  or any op containing another op on its thread) are not op time. Categories: "dot" (matmuls, including the
  ynn/xnn/oneDNN/custom-call fusions XLA:CPU lowers dots to), "fusion: <name>" (the fusion's name without
  "_fusion" and its number), "copy", "scatter", "gather", "sort", "other: <op>". Counts are ops executed.
- XLA busy / uncovered: the wall time covered by at least one op (containers included) on any XLA thread; the
  rest of the wall time is host work, dispatch, synchronisation or idle ("uncovered").
  Durations are wall clock: on a busy machine an op's time includes its thread's time descheduled (the JSON
  records how many cores other processes kept busy).
- python host (rough): wall time minus the python thread's waits for the device ("$numpy asarray",
  block_until_ready, PjRt Await / "Wait for ..." holds, overlaps counted once): the engine's host-side
  scheduling, argument handling and dispatch, inflated by the python tracer's per-call overhead.

Decode numbers are per generate run (prefill + 128 decode positions) and per decode position (run / new tokens;
at batch 8 each position yields 8 tokens). The JSON (--out) holds every workload's summary, all categories and
the top instructions (names as in an HLO dump, XLA_FLAGS=--xla_dump_to=DIR); the PNG beside it stacks the
categories' shares of op time per workload; --compare OTHER.json prints this run beside another's.

Run:  python scripts/profile_step.py --label before     (--workloads train,decode --vocab 512,32000)
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

_SCRIPTS = Path(__file__).resolve().parent
for _p in (str(_SCRIPTS.parent), str(_SCRIPTS)):  # the repo (maxlm) and scripts/ (bench_host, bench_train, ...)
  if _p not in sys.path:
    sys.path.insert(0, _p)
import bench_host  # noqa: E402  (light; tune_malloc must run before jax is imported)

XPROF_FLAG = "--xla_cpu_enable_xprof_traceme=true"
MARKER = "profile_step"  # the TraceAnnotation around each traced step / run
TOP = 10
WORKLOADS = ("train", "decode")
CONTAINERS = ("while", "conditional", "call")  # ops whose event spans other ops' events
_DOT_MARKS = ("custom-call", "custom_call", "onednn", "xnn", "ynn", "mkl")
_HLO_NAME = re.compile(r"[A-Za-z_][\w\-]*(\.\d+)?")
_WAIT_MARKS = ("asarray", "block_until_ready", "Await", "BlockHostUntilReady")


def enable_xla_traceme(environ: dict | None = None) -> str:
  """Appends XPROF_FLAG to XLA_FLAGS, keeping other flags, so XLA:CPU emits one trace event per executed thunk."""
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "").split()
  if XPROF_FLAG not in flags:
    flags.append(XPROF_FLAG)
  environ["XLA_FLAGS"] = " ".join(flags)
  return environ["XLA_FLAGS"]


MALLOC_TUNED = False
if __name__ == "__main__":  # only when run as a script: importing the pure parts (the test) changes nothing
  enable_xla_traceme()
  MALLOC_TUNED = bench_host.tune_malloc()


# ------------------------------------------------------------------------------------------- trace aggregation


def base_name(instruction: str) -> str:
  """An HLO instruction name without its ".N" number: "dot.183" -> "dot"."""
  return re.sub(r"\.\d+$", "", instruction)


def category(instruction: str) -> str:
  """The category an executed HLO instruction is reported under (see the module docstring)."""
  base = base_name(instruction)
  low = base.lower()
  if base.startswith(("dot", "convolution", "wrapped_dot", "wrapped_convolution")) or any(
      m in low for m in _DOT_MARKS):
    return "dot"
  if base == "fusion":
    return "fusion"
  if base.endswith("_fusion"):
    return f"fusion: {base[:-len('_fusion')]}"
  op = base.removeprefix("wrapped_")
  for known in ("copy", "scatter", "gather", "sort"):
    if op == known or op.startswith((f"{known}-", f"{known}_")):
      return known
  return f"other: {op}"


def _is_wait(name: str) -> bool:
  """Whether a python-thread event is the host waiting for the device (a result, a buffer hold)."""
  return any(m in name for m in _WAIT_MARKS) or name.startswith("Wait for")


def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
  """Sorted, disjoint intervals covering the same points."""
  out: list[list[float]] = []
  for a, b in sorted(intervals):
    if out and a <= out[-1][1]:
      out[-1][1] = max(out[-1][1], b)
    else:
      out.append([a, b])
  return [(a, b) for a, b in out]


def _overlap(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
  """Total length of the intersection of two sorted, disjoint interval lists."""
  total, i, j = 0.0, 0, 0
  while i < len(xs) and j < len(ys):
    lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
    total += max(hi - lo, 0.0)
    if xs[i][1] < ys[j][1]:
      i += 1
    else:
      j += 1
  return total


def _containers(ops: list[dict]) -> set[int]:
  """Indices (into ops) of op events that contain another op event on the same thread (while loops and such)."""
  by_thread: dict[tuple, list[int]] = defaultdict(list)
  for i, e in enumerate(ops):
    by_thread[(e.get("pid"), e.get("tid"))].append(i)
  found = set()
  for idx in by_thread.values():
    idx.sort(key=lambda i: (ops[i]["ts"], -ops[i]["dur"]))
    stack: list[int] = []
    for i in idx:
      start, end = ops[i]["ts"], ops[i]["ts"] + ops[i]["dur"]
      while stack and ops[stack[-1]]["ts"] + ops[stack[-1]]["dur"] <= start:
        stack.pop()
      if stack and end <= ops[stack[-1]]["ts"] + ops[stack[-1]]["dur"]:
        found.add(stack[-1])
      stack.append(i)
  return found


def aggregate(events: list[dict], marker: str = MARKER, top_instructions: int = 50) -> dict:
  """Per-step op time by category and instruction, XLA coverage and python host time, from Chrome trace events.

  `events` are a trace's traceEvents; every "X" event named `marker` is one step (without any, the whole span of
  the ops is one). Times are in ms per step, counts per step; see the module docstring for what each number is.
  """
  threads = {(e.get("pid"), e.get("tid")): (e.get("args") or {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  spans = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]

  def thread(e: dict) -> str:
    return threads.get((e.get("pid"), e.get("tid")), "")

  def on_python(e: dict) -> bool:
    return thread(e).startswith("python")

  by_hlo_arg = any("hlo_op" in (e.get("args") or {}) for e in spans)  # XLA tags its thunk events; else by name

  def instruction(e: dict) -> str | None:
    if on_python(e):
      return None
    if by_hlo_arg:
      return (e.get("args") or {}).get("hlo_op")
    name = e["name"]
    return name if _HLO_NAME.fullmatch(name) and not name.startswith(("jit_", "pjit")) else None

  marks = [e for e in spans if e["name"] == marker]
  windows = _union((e["ts"], e["ts"] + e["dur"]) for e in marks)
  ops = [e for e in spans if instruction(e) is not None]
  if windows:
    starts = [a for a, _ in windows]

    def inside(e: dict) -> bool:
      mid = e["ts"] + e["dur"] / 2
      k = bisect.bisect_right(starts, mid) - 1
      return k >= 0 and mid <= windows[k][1]

    ops = [e for e in ops if inside(e)]
  elif ops:
    windows = [(min(e["ts"] for e in ops), max(e["ts"] + e["dur"] for e in ops))]
  steps = max(len(marks), 1)
  wall = sum(b - a for a, b in windows)
  contained = _containers(ops)
  for i, e in enumerate(ops):
    if base_name(instruction(e)) in CONTAINERS:
      contained.add(i)
  leaves = [e for i, e in enumerate(ops) if i not in contained]
  busy = _overlap(_union((e["ts"], e["ts"] + e["dur"]) for e in ops), windows)
  waits = _union((e["ts"], e["ts"] + e["dur"]) for e in spans if on_python(e) and _is_wait(e["name"]))
  wait = _overlap(waits, windows)

  cats: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
  instrs: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
  groups: dict[str, dict] = defaultdict(lambda: {"names": set(), "us": 0.0})
  for e in leaves:
    name = instruction(e)
    for table, key in ((cats, category(name)), (instrs, name)):
      table[key][0] += e["dur"]
      table[key][1] += 1
    group = groups[thread(e).split("/")[0] or f"tid {e.get('tid')}"]
    group["names"].add(thread(e) or e.get("tid"))
    group["us"] += e["dur"]
  op_us = sum(e["dur"] for e in leaves)

  def rows(table: dict, limit: int | None) -> list[dict]:
    ranked = sorted(table.items(), key=lambda kv: (-kv[1][0], kv[0]))[:limit]
    return [{"name": k, **({"category": category(k)} if table is instrs else {}), "ms": us / steps / 1e3,
             "share": us / op_us if op_us else 0.0, "count": n / steps} for k, (us, n) in ranked]

  ms = 1e3 * steps
  return {
    "steps": len(marks), "wall_ms": wall / ms, "op_ms": op_us / ms, "ops": len(leaves) / steps,
    "xla_busy_ms": busy / ms, "uncovered_share": 1.0 - busy / wall if wall else 0.0,
    "container_ms": sum(e["dur"] for i, e in enumerate(ops) if i in contained) / ms,
    "python_wait_ms": wait / ms, "python_host_ms": (wall - wait) / ms if marks else None,
    "threads": {k: {"threads": len(g["names"]), "op_ms": g["us"] / ms} for k, g in sorted(groups.items())},
    "categories": rows(cats, None), "instructions": rows(instrs, top_instructions),
  }


def load_trace(trace_dir: str | Path) -> list[dict]:
  """The traceEvents of the newest *.trace.json.gz under trace_dir (searched recursively)."""
  files = sorted(Path(trace_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not files:
    raise SystemExit(f"no *.trace.json.gz under {trace_dir}: did jax.profiler write a trace?")
  with gzip.open(files[-1], "rt") as f:
    return json.load(f).get("traceEvents", [])


# ------------------------------------------------------------------------------------------- reporting


def _per(w: dict) -> str:
  return w.get("unit", "step")


def summary_line(name: str, w: dict) -> str:
  """One workload's totals in words."""
  unit = _per(w)
  untraced = f" (untraced median {w['untraced_ms']:.1f} ms)" if w.get("untraced_ms") else ""
  threads = ", ".join(f"{k} x{g['threads']} {g['op_ms']:.1f} ms" for k, g in w["threads"].items())
  host = f"; python host ~{w['python_host_ms']:.1f} ms/{unit}" if w.get("python_host_ms") is not None else ""
  line = (f"{name}: wall {w['wall_ms']:.1f} ms/{unit} traced, mean of {w['steps']} {unit}s{untraced}; op time "
          f"{w['op_ms']:.1f} ms/{unit} ({threads}); XLA busy {w['xla_busy_ms']:.1f} ms/{unit}, "
          f"{w['uncovered_share']:.1%} of wall not covered by any op; {w['ops']:,.0f} ops/{unit}; containers "
          f"(while) {w['container_ms']:.2f} ms/{unit}{host}")
  if w.get("new_tokens"):
    n = w["new_tokens"]
    line += (f"\n  per decode position (/{n}): wall {w['wall_ms'] / n * 1e3:.0f} us, op time "
             f"{w['op_ms'] / n * 1e3:.0f} us, {w['ops'] / n:.0f} ops"
             + (f", python host ~{w['python_host_ms'] / n * 1e3:.0f} us" if w.get("python_host_ms") else ""))
  return line


def table(w: dict, key: str, top: int = TOP) -> str:
  """Markdown table of the top categories ("categories") or instructions ("instructions") of one workload."""
  unit, n = _per(w), w.get("new_tokens")
  heads = ["category"] if key == "categories" else ["instruction", "category"]
  heads += [f"ms/{unit}"] + (["us/position"] if n else []) + ["share of op time", f"count/{unit}"]
  lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" if h in ("category", "instruction") else "---:"
                                                         for h in heads) + "|"]

  def line(label: list[str], ms: float, share: float, count: float) -> str:
    cells = [*label, f"{ms:.2f}", *([f"{ms / n * 1e3:.1f}"] if n else []), f"{share:.1%}", f"{count:,.1f}"]
    return "| " + " | ".join(cells) + " |"

  for r in w[key][:top]:
    lines.append(line([r["name"]] + ([r["category"]] if key != "categories" else []), r["ms"], r["share"],
                      r["count"]))
  rest = w[key][top:]
  if rest and key == "categories":
    lines.append(line([f"(other {len(rest)} categories)"], sum(r["ms"] for r in rest), sum(r["share"] for r in rest),
                      sum(r["count"] for r in rest)))
  return "\n".join(lines)


def compare(this: dict, other: dict, top: int = TOP) -> str:
  """This run's categories beside another run's (ms per step, ratio this / other), per common workload."""
  a_label, b_label = other.get("label") or "other", this.get("label") or "this"
  out = []
  for name, w in this["workloads"].items():
    o = other.get("workloads", {}).get(name)
    if o is None:
      out.append(f"{name}: not in the other run")
      continue
    unit = _per(w)
    mine, theirs = {r["name"]: r for r in w["categories"]}, {r["name"]: r for r in o["categories"]}
    names = list(dict.fromkeys([r["name"] for r in o["categories"][:top]] + [r["name"] for r in w["categories"][:top]]))
    lines = [f"### {name}: {a_label} -> {b_label}", "",
             f"| | {a_label} ms/{unit} | {b_label} ms/{unit} | ratio |", "|---|---:|---:|---:|"]

    def row(label: str, x: float | None, y: float | None) -> str:
      ratio = f"{y / x:.2f}x" if x and y is not None else "-"
      fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
      return f"| {label} | {fmt(x)} | {fmt(y)} | {ratio} |"

    for key, label in (("untraced_ms", "wall (untraced)"), ("wall_ms", "wall (traced)"), ("op_ms", "op time"),
                       ("xla_busy_ms", "XLA busy"), ("python_host_ms", "python host (rough)"), ("ops", "ops (count)")):
      lines.append(row(label, o.get(key), w.get(key)))
    for c in names:
      lines.append(row(c, theirs[c]["ms"] if c in theirs else None, mine[c]["ms"] if c in mine else None))
    out.append("\n".join(lines))
  return "\n\n".join(out)


def plot(result: dict, path: Path, top: int = 6) -> None:
  """Horizontal stacked bars: each workload's op time split into its top categories (shares of op time)."""
  from matplotlib import colormaps
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  names = list(result["workloads"])
  shown = list(dict.fromkeys(r["name"] for w in result["workloads"].values() for r in w["categories"][:top]))
  fig = Figure(figsize=(10, 1.5 + 0.7 * len(names) + 0.1 * len(shown)), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  colors = [colormaps["tab20"](i % 20) for i in range(len(shown))]
  left = [0.0] * len(names)
  for c, color in zip(shown + ["(rest)"], colors + ["white"]):
    shares = []
    for w in result["workloads"].values():
      by = {r["name"]: r["share"] for r in w["categories"]}
      shares.append(100 * (by.get(c, 0.0) if c != "(rest)" else 1.0 - sum(by.get(s, 0.0) for s in shown)))
    ax.barh(range(len(names)), shares, left=left, color=color, label=c, edgecolor="grey" if c == "(rest)" else None,
            hatch="//" if c.startswith("other") else None)
    left = [a + b for a, b in zip(left, shares)]
  for i, w in enumerate(result["workloads"].values()):
    ax.text(101, i, f"{w['wall_ms']:.1f} ms/{_per(w)}\n{w['uncovered_share']:.0%} uncovered", va="center",
            fontsize=8)
  ax.set_yticks(range(len(names)), names)
  ax.invert_yaxis()
  ax.set_xlim(0, 118)
  ax.set_xlabel("share of op time (%), XLA:CPU")
  label = f" ({result['label']})" if result.get("label") else ""
  ax.set_title(f"profile_step{label}: where the op time goes")
  fig.legend(fontsize=7, ncols=3, loc="outside lower center")
  fig.savefig(path, dpi=100)


# ------------------------------------------------------------------------------------------- workloads


def progress(msg: str) -> None:
  """A timestamped progress line."""
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def profile(run: Callable[[], None], warmup: int, timed: int, traced: int, trace_dir: Path) -> dict:
  """Warms `run` up, times it untraced, traces it inside MARKER annotations; returns aggregate() of the trace."""
  import jax

  t0 = time.perf_counter()
  for _ in range(warmup):
    run()
  warm_s = time.perf_counter() - t0
  untraced = []
  for _ in range(timed):
    t0 = time.perf_counter()
    run()
    untraced.append(time.perf_counter() - t0)
  jax.profiler.start_trace(str(trace_dir))
  traced_s = []
  try:
    for _ in range(traced):
      t0 = time.perf_counter()
      with jax.profiler.TraceAnnotation(MARKER):
        run()
      traced_s.append(time.perf_counter() - t0)
  finally:
    jax.profiler.stop_trace()
  t0 = time.perf_counter()
  result = aggregate(load_trace(trace_dir))
  untraced_ms = statistics.median(untraced) * 1e3 if untraced else None
  progress(f"  warm-up {warm_s:.1f}s, untraced {'-' if untraced_ms is None else f'{untraced_ms:.1f}'} ms, "
           f"traced {statistics.median(traced_s) * 1e3:.1f} ms (medians); trace parsed in "
           f"{time.perf_counter() - t0:.1f}s")
  return {**result, "untraced_ms": untraced_ms,
          "untraced_runs_ms": [t * 1e3 for t in untraced], "traced_runs_ms": [t * 1e3 for t in traced_s],
          "warmup_s": warm_s}


def train_workloads(args: argparse.Namespace, trace_root: Path) -> dict[str, dict]:
  """bench_train's maxlm step (config, model, jitted donated step) at each vocab size, profiled."""
  from bench_train import MaxlmRunner, make_batch, maxlm_config

  out = {}
  for vocab in [int(v) for v in args.vocab.split(",") if v.strip()]:
    name = f"train vocab={vocab}"
    progress(f"{name}: seq {args.seq_len} x batch {args.batch_size}, building")
    cfg = maxlm_config(vocab, "xla", args.seq_len, args.batch_size)
    runner = MaxlmRunner(cfg, make_batch(vocab, args.batch_size, args.seq_len, args.seed))
    w = profile(runner.step, args.warmup, args.timed, args.traced, trace_root / f"train_v{vocab}")
    out[name] = {"unit": "step", "vocab": vocab, "seq_len": args.seq_len, "batch_size": args.batch_size,
                 "params": runner.num_params, "final_loss": runner.loss, **w}
    progress(summary_line(name, out[name]))
  return out


def decode_workloads(args: argparse.Namespace, trace_root: Path) -> dict[str, dict]:
  """bench_decode's engine (random 4-layer model, greedy generate) at each batch size, profiled per run."""
  import numpy as np
  from decode_bench.common import HF_SHAPE, IdTokenizer, build_random_model, greedy, make_engine, random_model_config

  max_len = args.prompt_len + args.new_tokens
  cfg = random_model_config(HF_SHAPE, max_len, ("model.init_std=0.1",))
  model = build_random_model(cfg, args.seed)
  tokenizer = IdTokenizer(HF_SHAPE["vocab_size"])
  rng = np.random.default_rng(args.seed)
  params = greedy(args.new_tokens)
  out = {}
  for batch in [int(b) for b in args.batches.split(",") if b.strip()]:
    name = f"decode batch={batch}"
    progress(f"{name}: prompt {args.prompt_len}, {args.new_tokens} new tokens greedy, building")
    prompts = [[int(t) for t in rng.integers(2, HF_SHAPE["vocab_size"], args.prompt_len)] for _ in range(batch)]
    bcfg = random_model_config(HF_SHAPE, max_len, ("model.init_std=0.1", f"serve.max_batch={batch}"))
    engine = make_engine(model, bcfg, tokenizer)
    w = profile(lambda e=engine, p=prompts: e.generate(p, params), args.warmup, args.timed, args.traced,
                trace_root / f"decode_b{batch}")
    out[name] = {"unit": "run", "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                 "decode_steps": bcfg.serve.decode_steps, **w}
    progress(summary_line(name, out[name]))
  return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line options."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of train,decode")
  p.add_argument("--vocab", default="512,32000", help="train: comma-separated vocabulary sizes")
  p.add_argument("--seq-len", type=int, default=256, help="train: sequence length")
  p.add_argument("--batch-size", type=int, default=8, help="train: batch size")
  p.add_argument("--batches", default="1,8", help="decode: comma-separated serve.max_batch values (= prompts)")
  p.add_argument("--prompt-len", type=int, default=32, help="decode: prompt tokens")
  p.add_argument("--new-tokens", type=int, default=128, help="decode: greedy tokens generated per prompt")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps / runs first (compilation)")
  p.add_argument("--timed", type=int, default=3, help="untraced timed steps / runs (wall time without profiler)")
  p.add_argument("--traced", type=int, default=3, help="traced steps / runs")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--label", default="", help="free text stored in the JSON and the PNG title, e.g. before/after")
  p.add_argument("--out", default="bench_results/profile_step.json", help="JSON results path (PNG beside it)")
  p.add_argument("--compare", default=None, help="another run's JSON: print its categories beside this run's")
  p.add_argument("--trace-dir", default=None, help="keep the raw traces here (default: a temporary directory)")
  p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write the PNG")
  args = p.parse_args(argv)
  args.workload_list = bench_host.parse_sections(p, args.workloads, WORKLOADS)
  return args


def main(argv: list[str] | None = None) -> None:
  """Profiles the workloads, prints the tables (and the comparison), writes the JSON and the PNG."""
  args = parse_args(argv)
  import jax

  if XPROF_FLAG not in os.environ.get("XLA_FLAGS", ""):
    progress(f"warning: XLA_FLAGS lacks {XPROF_FLAG}: the trace will have no per-op events")
  progress(f"jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} CPUs, "
           f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, malloc tuning {'on' if MALLOC_TUNED else 'off'}")
  trace_root = Path(args.trace_dir) if args.trace_dir else Path(tempfile.mkdtemp(prefix="profile_step-"))
  t_start, snap = time.perf_counter(), bench_host.cpu_snapshot()
  workloads: dict[str, dict] = {}
  try:
    if "train" in args.workload_list:
      workloads.update(train_workloads(args, trace_root))
    if "decode" in args.workload_list:
      workloads.update(decode_workloads(args, trace_root))
  finally:
    if not args.trace_dir:
      shutil.rmtree(trace_root, ignore_errors=True)
  background = bench_host.background_cores(snap, bench_host.cpu_snapshot())
  result = {
    "label": args.label, "machine": bench_host.machine(MALLOC_TUNED),
    "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    "xla_flags": os.environ.get("XLA_FLAGS", ""), "malloc_tuning": MALLOC_TUNED, "background_cores": background,
    "settings": {k: getattr(args, k) for k in ("vocab", "seq_len", "batch_size", "batches", "prompt_len",
                                                "new_tokens", "warmup", "timed", "traced", "seed")},
    "workloads": workloads,
  }
  label = f" ({args.label})" if args.label else ""
  m = result["machine"]
  print(f"\n## profile_step{label}: {m.get('cpu_model')}, {m.get('cpu_count')} CPUs, jax {m.get('jax')}, XLA:CPU; "
        f"other processes kept {background:.2f} cores busy\n")
  for name, w in workloads.items():
    print(f"### {summary_line(name, w)}\n")
    print(table(w, "categories") + "\n")
    print(f"top {TOP} instructions ({name}):\n")
    print(table(w, "instructions") + "\n")
  if args.compare:
    print(compare(result, json.loads(Path(args.compare).read_text())) + "\n")
  bench_host.write_results(result, args.out, (lambda png: plot(result, png)) if args.plot else None)
  progress(f"done in {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
  main()
