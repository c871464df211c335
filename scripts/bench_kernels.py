"""Pallas kernels on CPU (interpret mode) against their XLA baselines: memory, time and pages read.

1. Flash attention vs dense XLA attention (the model's `xla` backend) as the sequence doubles up to 16k:
   peak memory of the compiled forward and forward+backward (XLA's buffer assignment: arguments + outputs +
   temporaries, from `compiled.memory_analysis()`; nothing is executed for it), and wall time of both.
   Dense attention holds [heads, seq, seq] scores: O(seq^2). Flash holds one block of scores: O(seq).
2. Paged attention vs a dense gather of every sequence's page table: pages read (the kernel reads
   ceil(length / page_size) pages per sequence, the gather reads all max_pages) and decode time, at mixed lengths.

The kernels run in the Pallas interpreter here, so their times say how the interpreted program compares with
XLA's on this CPU, not what a TPU or GPU would do; memory is the structural property that carries over.

Run:  python scripts/bench_kernels.py            (smoke run: --quick)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_host import cpu_model, machine, tune_malloc  # noqa: E402  (must run before jax is imported)

MALLOC_TUNED = tune_malloc()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels_pallas import paged_attention as paged  # noqa: E402
from kernels_pallas.flash_attention import flash_attention  # noqa: E402
from kernels_pallas.reference import paged_attention_reference  # noqa: E402
from maxlm.models.attention import attention_mask, xla_attention  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
  p.add_argument("--max-seq", type=int, default=16384, help="longest sequence of the memory sweep")
  p.add_argument("--max-time-seq", type=int, default=8192,
                 help="longest sequence that is also timed (dense fwd+bwd at 16k needs ~13 GiB)")
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3, help="timed runs per point (median)")
  p.add_argument("--out", default=None, help="JSON path (default bench_results/bench_kernels[_quick].json)")
  args = p.parse_args(argv)
  if args.quick:
    args.max_seq, args.max_time_seq, args.repeats = 2048, 1024, 2
  args.out = args.out or f"bench_results/bench_kernels{'_quick' if args.quick else ''}.json"
  return args


def timed(fn, *args, repeats: int) -> float:
  """Median wall seconds of fn(*args) after one warm-up run (compilation excluded)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def peak_bytes(compiled) -> int:
  """Arguments + outputs + temporaries of a compiled program (what it needs resident at its peak)."""
  stats = compiled.memory_analysis()
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
             - stats.alias_size_in_bytes)


def flash_sweep(args: argparse.Namespace) -> list[dict]:
  """Memory (every length) and time (up to --max-time-seq) of flash vs dense attention, fwd and fwd+bwd."""
  h, kvh, d = args.heads, args.kv_heads, args.head_dim
  dense = lambda q, k, v: xla_attention(q, k, v, attention_mask(q.shape[1], q.shape[1], None, None),  # noqa: E731
                                        d ** -0.5)
  impls = {"flash": lambda q, k, v: flash_attention(q, k, v), "dense": dense}
  rows = []
  seq = 1024 if not args.quick else 256
  lengths = []
  while seq <= args.max_seq:
    lengths.append(seq)
    seq *= 2
  for i, s in enumerate(lengths):
    key = jax.random.split(jax.random.PRNGKey(s), 3)
    q = jax.random.normal(key[0], (1, s, h, d), jnp.float32)
    k = jax.random.normal(key[1], (1, s, kvh, d), jnp.float32)
    v = jax.random.normal(key[2], (1, s, kvh, d), jnp.float32)
    row = {"seq": s}
    for name, attn in impls.items():
      train = jax.grad(lambda q, k, v, attn=attn: jnp.sum(attn(q, k, v)), argnums=(0, 1, 2))
      for kind, fn in (("fwd", attn), ("train", train)):
        compiled = jax.jit(fn).lower(q, k, v).compile()  # one compile serves the memory figure and the timing
        row[f"{name}_{kind}_mib"] = peak_bytes(compiled) / 2**20
        if s <= args.max_time_seq:
          row[f"{name}_{kind}_ms"] = 1e3 * timed(compiled, q, k, v, repeats=args.repeats)
    if "dense_train_ms" in row:
      row["train_time_ratio"] = row["flash_train_ms"] / row["dense_train_ms"]
      row["fwd_time_ratio"] = row["flash_fwd_ms"] / row["dense_fwd_ms"]
    row["train_memory_ratio"] = row["flash_train_mib"] / row["dense_train_mib"]
    rows.append(row)
    timing = (f", fwd+bwd {row['flash_train_ms']:.0f} vs {row['dense_train_ms']:.0f} ms"
              if "dense_train_ms" in row else "")
    print(f"[flash {i + 1}/{len(lengths)}] seq {s}: fwd+bwd memory {row['flash_train_mib']:.0f} vs "
          f"{row['dense_train_mib']:.0f} MiB{timing}", flush=True)
  return rows


def paged_sweep(args: argparse.Namespace) -> list[dict]:
  """Decode (q_len 1) and verification (q_len 5) over a batch of mixed lengths: pages read and time."""
  rng = np.random.default_rng(0)
  batch, page_size, h, kvh, d = (8, 16, 8, 2, 64) if args.quick else (16, 16, 8, 2, 128)
  max_len = 1024 if args.quick else 4096
  max_pages = max_len // page_size
  # Mixed lengths, as a serving batch has: a few long, most short.
  lengths = np.minimum(max_len, np.maximum(8, rng.lognormal(np.log(max_len / 8), 1.0, batch))).astype(np.int32)
  num_pages = batch * max_pages
  page_table = rng.permutation(num_pages).reshape(batch, max_pages).astype(np.int32)
  k_pages = jnp.asarray(rng.normal(size=(num_pages, page_size, kvh, d)), jnp.float32)
  v_pages = jnp.asarray(rng.normal(size=(num_pages, page_size, kvh, d)), jnp.float32)
  rows = []
  for q_len in (1, 5):
    q = jnp.asarray(rng.normal(size=(batch, q_len, h, d)), jnp.float32)
    args_ = (q, k_pages, v_pages, jnp.asarray(page_table), jnp.asarray(lengths))
    kernel = jax.jit(paged.paged_attention)
    gather = jax.jit(paged_attention_reference)
    read, dense = paged.pages_read(page_table, lengths, page_size)
    row = {"q_len": q_len, "batch": batch, "page_size": page_size, "max_pages": max_pages,
           "lengths": lengths.tolist(), "pages_read": read, "pages_dense_gather": dense,
           "read_fraction": read / dense,
           "paged_ms": 1e3 * timed(kernel, *args_, repeats=args.repeats),
           "gather_ms": 1e3 * timed(gather, *args_, repeats=args.repeats),
           "max_abs_error": float(jnp.max(jnp.abs(kernel(*args_) - gather(*args_))))}
    row["time_ratio"] = row["paged_ms"] / row["gather_ms"]
    rows.append(row)
    print(f"[paged q_len {q_len}] pages read {read}/{dense} ({row['read_fraction']:.0%}), "
          f"{row['paged_ms']:.1f} vs {row['gather_ms']:.1f} ms", flush=True)
  return rows


def tables(flash: list[dict], paged_rows: list[dict]) -> str:
  def ms(r, k):
    return f"{r[k]:.0f}" if k in r else "-"

  lines = ["| seq | flash fwd MiB | dense fwd MiB | flash fwd+bwd MiB | dense fwd+bwd MiB | memory ratio | "
           "flash fwd ms | dense fwd ms | flash fwd+bwd ms | dense fwd+bwd ms | time ratio |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in flash:
    ratio = f"{r['train_time_ratio']:.2f}x" if "train_time_ratio" in r else "-"
    lines.append(f"| {r['seq']} | {r['flash_fwd_mib']:.1f} | {r['dense_fwd_mib']:.1f} | {r['flash_train_mib']:.1f} "
                 f"| {r['dense_train_mib']:.1f} | {r['train_memory_ratio']:.3f}x | {ms(r, 'flash_fwd_ms')} | "
                 f"{ms(r, 'dense_fwd_ms')} | {ms(r, 'flash_train_ms')} | {ms(r, 'dense_train_ms')} | {ratio} |")
  lines += ["", "| q_len | batch | page size | pages read | dense gather | fraction | paged ms | gather ms | "
            "time ratio | max abs err |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in paged_rows:
    lines.append(f"| {r['q_len']} | {r['batch']} | {r['page_size']} | {r['pages_read']} | {r['pages_dense_gather']} "
                 f"| {r['read_fraction']:.1%} | {r['paged_ms']:.1f} | {r['gather_ms']:.1f} | {r['time_ratio']:.2f}x "
                 f"| {r['max_abs_error']:.1e} |")
  return "\n".join(lines)


def plot(flash: list[dict], paged_rows: list[dict], path: Path, title: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(15, 4.5), layout="constrained")
  FigureCanvasAgg(fig)
  ax_mem, ax_time, ax_pages = fig.subplots(1, 3)
  seqs = [r["seq"] for r in flash]
  for name, style in (("flash", "-"), ("dense", "--")):
    ax_mem.plot(seqs, [r[f"{name}_train_mib"] for r in flash], style, marker="o", label=f"{name} fwd+bwd")
    ax_mem.plot(seqs, [r[f"{name}_fwd_mib"] for r in flash], style, marker="x", label=f"{name} fwd")
    timed_rows = [r for r in flash if f"{name}_train_ms" in r]
    ax_time.plot([r["seq"] for r in timed_rows], [r[f"{name}_train_ms"] for r in timed_rows], style, marker="o",
                 label=f"{name} fwd+bwd")
    ax_time.plot([r["seq"] for r in timed_rows], [r[f"{name}_fwd_ms"] for r in timed_rows], style, marker="x",
                 label=f"{name} fwd")
  for ax, ylabel, t in ((ax_mem, "peak MiB (XLA buffer assignment)", "memory"),
                        (ax_time, "ms (median)", "time (flash interpreted on CPU)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel(ylabel)
    ax.set_title(t)
    ax.legend(fontsize=8)
  x = np.arange(len(paged_rows))
  ax_pages.bar(x - 0.2, [r["pages_dense_gather"] for r in paged_rows], 0.4, label="dense gather")
  ax_pages.bar(x + 0.2, [r["pages_read"] for r in paged_rows], 0.4, label="paged kernel")
  ax_pages.set_xticks(x, [f"q_len {r['q_len']}" for r in paged_rows])
  ax_pages.set_ylabel("KV pages read per step")
  ax_pages.set_title("paged attention, mixed lengths")
  ax_pages.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
  t0 = time.perf_counter()
  args = parse_args(argv)
  print(f"{cpu_model()}; jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} cores); kernels "
        f"interpreted; {args.heads} q heads / {args.kv_heads} kv heads of {args.head_dim}, float32, batch 1, causal")
  flash = flash_sweep(args)
  paged_rows = paged_sweep(args)
  table = tables(flash, paged_rows)
  print("\n" + table)
  grow = flash[-1]["flash_train_mib"] / flash[0]["flash_train_mib"]
  print(f"\nflash fwd+bwd memory grows {grow:.1f}x for {flash[-1]['seq'] // flash[0]['seq']}x the sequence "
        f"(dense: {flash[-1]['dense_train_mib'] / flash[0]['dense_train_mib']:.1f}x)")
  runtime = time.perf_counter() - t0
  print(f"total runtime {runtime:.0f}s")
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  meta = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
          "jax": jax.__version__, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
          "machine": platform.machine(), "cpu_model": cpu_model(), "malloc_tuning": MALLOC_TUNED, "runtime_s": runtime,
          "flash_shape": {"batch": 1, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                          "dtype": "float32", "causal": True},
          "memory": "argument + output + temp - alias bytes of the compiled program (memory_analysis)",
          "time": f"median of {args.repeats} runs after a warm-up; kernels in the Pallas interpreter",
          "dense": "maxlm.models.attention.xla_attention (the model's xla backend)"}
  out.write_text(json.dumps({"meta": meta, "machine": machine(MALLOC_TUNED), "flash": flash, "paged": paged_rows},
                            indent=2))
  png = out.with_suffix(".png")
  plot(flash, paged_rows, png, f"Pallas kernels (interpreted) vs XLA on CPU: {args.heads}/{args.kv_heads} heads x "
                               f"{args.head_dim}, float32")
  print(f"wrote {out} and {png}")


if __name__ == "__main__":
  main()
