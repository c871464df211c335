"""Batch-1 matrix-vector products on XLA:CPU by weight dtype: why reduced-precision weights do not speed decode here.

A decode step at batch 1 is a chain of x [1, K] @ W [K, N] products, bound by reading W. This times one such
product (a real model's shape: Qwen2.5-0.5B's output head by default) with W in float32, bfloat16, float16 and int8
(x float32, W converted in the program, as serve.weights=bf16/int8 run; and both operands in W's dtype), at rows
1 and 8, and reports GB/s of W read and each one's time relative to float32 at the same rows (the baseline, in the
same run). Prints a table, writes JSON (with the machine and XLA_FLAGS) and a PNG.

  python scripts/bench_matvec.py                     # ~1 min
  python scripts/bench_matvec.py --k 576 --n 49152   # SmolLM2's tied head
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import machine, tune_malloc, write_results  # noqa: E402  (light; before jax)

MALLOC_TUNED = tune_malloc()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "int8": jnp.int8}


def _variants(name: str):
  """(label, fn(x, w)) pairs for weights stored in `name`."""
  dt = DTYPES[name]
  if name == "float32":
    return [("float32", lambda x, w: x @ w)]
  return [(f"{name} weights, converted to float32", lambda x, w: x @ w.astype(jnp.float32)),
          (f"{name} x {name}", lambda x, w, dt=dt: jnp.dot(x.astype(dt), w, preferred_element_type=jnp.float32))]


def _time(fn, x, w, repeats: int) -> float:
  """Median seconds of one call (after two warm-ups: compile, first touch)."""
  jitted = jax.jit(fn)
  for _ in range(2):
    jitted(x, w).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jitted(x, w).block_until_ready()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def run(k: int, n: int, rows: list[int], repeats: int) -> list[dict]:
  """One result per (rows, variant): seconds, GB/s of the weight and the ratio to float32 at those rows."""
  rng = np.random.default_rng(0)
  w32 = rng.standard_normal((k, n), dtype=np.float32)
  weights = {"float32": jnp.asarray(w32), "bfloat16": jnp.asarray(w32, jnp.bfloat16),
             "float16": jnp.asarray(w32, jnp.float16), "int8": jnp.asarray(np.clip(np.round(w32 * 40), -127, 127),
                                                                          jnp.int8)}
  out = []
  for m in rows:
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
    base = None
    for name, w in weights.items():
      for label, fn in _variants(name):
        t = _time(fn, x, w, repeats)
        base = t if base is None else base
        out.append({"rows": m, "weights": name, "variant": label, "seconds": t, "weight_bytes": w.nbytes,
                    "gb_per_s": w.nbytes / t / 1e9, "time_vs_float32": t / base})
        print(f"rows {m}: {label:40s} {t * 1e3:9.2f} ms {w.nbytes / t / 1e9:6.1f} GB/s  {t / base:6.2f}x float32",
              flush=True)
  return out


def plot(results: dict, path: Path) -> None:
  """Bars of GB/s per variant, one group per row count."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  rows = results["results"]
  fig = Figure(figsize=(9, 4.5), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  labels = list(dict.fromkeys(r["variant"] for r in rows))
  counts = list(dict.fromkeys(r["rows"] for r in rows))
  width = 0.8 / len(counts)
  for i, m in enumerate(counts):
    vals = {r["variant"]: r["gb_per_s"] for r in rows if r["rows"] == m}
    bars = ax.bar(np.arange(len(labels)) + (i - (len(counts) - 1) / 2) * width, [vals[v] for v in labels], width,
                  label=f"rows {m}")
    ax.bar_label(bars, fmt="{:.1f}", fontsize=7)
  ax.set_xticks(np.arange(len(labels)), [v.replace(", ", "\n") for v in labels], fontsize=7)
  ax.set_ylabel("GB/s of the weight read")
  m = results["machine"]
  ax.set_title(f"x @ W [{results['k']} x {results['n']}] on XLA:CPU ({m['cpu_model']}, {m['cpu_count']} cores)",
               fontsize=9)
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--k", type=int, default=896, help="contracted size (the model's width)")
  p.add_argument("--n", type=int, default=151936, help="output size (default: Qwen2.5's vocabulary)")
  p.add_argument("--rows", default="1,8", help="comma-separated row counts (the decode batch)")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--out", default="bench_results/bench_matvec.json")
  args = p.parse_args(argv)
  rows = [int(r) for r in args.rows.split(",") if r.strip()]
  if args.k < 1 or args.n < 1 or not rows or min(rows) < 1 or args.repeats < 1:
    p.error("--k, --n, --rows and --repeats must be positive")
  host = {**machine(MALLOC_TUNED), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
  print(f"{host['cpu_model']}, {host['cpu_count']} cores; jax {jax.__version__}; W [{args.k}, {args.n}]")
  results = {"k": args.k, "n": args.n, "machine": host, "results": run(args.k, args.n, rows, args.repeats)}
  print("\n| rows | weights | ms | GB/s of W | time vs float32 |\n|---:|---|---:|---:|---:|")
  for r in results["results"]:
    print(f"| {r['rows']} | {r['variant']} | {r['seconds'] * 1e3:.2f} | {r['gb_per_s']:.1f} | "
          f"{r['time_vs_float32']:.2f}x |")
  write_results(results, args.out, lambda path: plot(results, path))
  return 0


if __name__ == "__main__":
  sys.exit(main())
