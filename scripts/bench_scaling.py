"""Parallelism scaling on simulated CPU devices: tokens/s, step-time breakdown and HLO collectives per preset.

For each sharding preset (dp, fsdp, fsdp_tp, fsdp_tp_sp with model.attention=ring) and each device count
(1, 2, 4, 8) the script builds the mesh over the first n of 8 simulated CPU devices, compiles the real train
step (as maxlm.train.loop does: in/out shardings, donated state, traced under the mesh's logical rules) and
measures: compile time (lower + compile), host data time (next packed batch from the real loader + transfer to
the devices), device step time (median of timed steps, block_until_ready) and the collectives of one step,
counted and sized from the compiled HLO. It then prints the `maxlm plan` of Llama-3-8B and Mixtral-8x7B on 256
chips.

The simulated devices all share this machine's CPU cores (2 here): n devices do the same total work as one plus
the partitioning and communication overhead, so the numbers measure that overhead, NOT a speed-up.

Run:  MAXLM_CACHE=/tmp/maxlm-cache-dev python scripts/bench_scaling.py   (smoke run: --quick)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

MAX_DEVICES = 8
PRESETS = ("dp", "fsdp", "fsdp_tp", "fsdp_tp_sp")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
SHORT = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "all-to-all": "A2A",
         "collective-permute": "CP"}
# configs/tiny.py's shape, stated here so the JSON says what was measured.
SHAPE = {"vocab_size": 2048, "d_model": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 768}
CAVEAT = (f"The {MAX_DEVICES} simulated CPU devices share this machine's {os.cpu_count()} CPU core(s): n devices do "
          "the work of one plus partitioning and communication overhead, so this measures that overhead, not "
          "speed-up. (A ratio above 1.0x vs 1 device only means one XLA:CPU device left a core idle; the 'cores' "
          "column shows how many this process kept busy.)")


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# bench_host: light; must run before jax is imported
from bench_host import cpu_model, cpu_snapshot, machine, tune_malloc  # noqa: E402

MALLOC_TUNED = "--no-malloc-tuning" not in sys.argv[1:] and tune_malloc()

import jax  # noqa: E402
import numpy as np  # noqa: E402

# Simulated devices: must be set before the CPU backend starts (a jax option, so XLA_FLAGS stays untouched).
jax.config.update("jax_num_cpu_devices", MAX_DEVICES)

import jax.numpy as jnp  # noqa: E402

from data_pipelines import loader  # noqa: E402
from data_pipelines.corpus import prepare_corpus  # noqa: E402
from maxlm import sharding  # noqa: E402
from maxlm.config import ConfigError, load_config  # noqa: E402
from maxlm.plan import format_plan, plan  # noqa: E402
from maxlm.train.state import count_params, init_train_state  # noqa: E402
from maxlm.train.step import make_train_step  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line options."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated sharding presets")
  p.add_argument("--devices", default="1,2,4,8", help=f"comma-separated device counts (<= {MAX_DEVICES})")
  p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (the median is reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--batch-size", type=int, default=16, help="global batch (rows)")
  p.add_argument("--data", choices=("corpus", "random"), default="corpus",
                 help="corpus: packed batches of the default corpus from the real loader (HostBatches), "
                      "tokenized by a small cached tokenizer; random: uniform random tokens, one document per row")
  p.add_argument("--corpus-vocab", type=int, default=512,
                 help="tokenizer size of --data corpus (<= the model's 2048; 512 at 0.5 MiB is the test suite's "
                      "cached corpus, so nothing is retrained)")
  p.add_argument("--corpus-mb", type=float, default=0.5, help="cap on the default corpus for --data corpus")
  p.add_argument("--plan-device", default="tpu-v5p", help="accelerator kind of the 256-chip memory plans")
  p.add_argument("--quick", action="store_true",
                 help="smoke run: devices 1,4, 2 timed steps, no warm-up; writes bench_scaling_quick.*")
  p.add_argument("--out", default=None,
                 help="JSON results path (default bench_results/bench_scaling.json, or _quick with --quick)")
  p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write a PNG next to the JSON")
  p.add_argument("--malloc-tuning", action=argparse.BooleanOptionalAction, default=True,
                 help="glibc mallopt for the whole process (applied at import)")
  args = p.parse_args(argv)
  if args.quick:
    args.devices, args.steps, args.warmup = "1,4", 2, 0
  if args.out is None:
    args.out = f"bench_results/bench_scaling{'_quick' if args.quick else ''}.json"
  return args


def mesh_axes(preset: str, n: int) -> dict[str, int]:
  """Mesh of `preset` on n devices: dp data=n; fsdp fsdp=n; +tensor=2 (fsdp_tp); +sequence=2 (fsdp_tp_sp)."""
  sequence = min(2, n) if preset == "fsdp_tp_sp" else 1
  tensor = min(2, n // sequence) if preset in ("fsdp_tp", "fsdp_tp_sp") else 1
  if preset == "dp":
    return {"data": n, "fsdp": 1, "sequence": 1, "tensor": 1}
  return {"data": 1, "fsdp": n // (sequence * tensor), "sequence": sequence, "tensor": tensor}


def bench_config(preset: str, axes: dict[str, int], args: argparse.Namespace):
  """The maxlm config of one measurement: configs/tiny.py's shape, fp32, on the given mesh."""
  overrides = [f"model.{k}={v}" for k, v in SHAPE.items()] + [
    f"model.max_seq_len={args.seq_len}", "model.dtype=float32", f"model.scan_unroll={SHAPE['num_layers']}",
    f"model.attention={'ring' if preset == 'fsdp_tp_sp' else 'xla'}", f"data.seq_len={args.seq_len}",
    f"data.batch_size={args.batch_size}", "train.grad_accum_steps=1", "train.schedule=constant",
    "train.warmup_steps=0", f"sharding.preset={preset}", *(f"mesh.{a}={n}" for a, n in axes.items()),
  ]
  return load_config("tiny", overrides)


# ---- collectives in the compiled HLO ----

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEES = re.compile(r"\b(?:calls|body|true_computation|false_computation)=%?([\w.\-]+)")


def _shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape string (a tuple's elements summed); f8 types count one byte."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    size = _DTYPE_BYTES.get(dtype, 1)
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _group_size(attrs: str, num_devices: int) -> int:
  """Devices per replica group of a collective, from its replica_groups attribute (all devices if unknown)."""
  if m := re.search(r"replica_groups=\{\{([\d,]*)\}", attrs):
    return len(m.group(1).split(","))
  if m := re.search(r"replica_groups=\[([\d,]+)\]<=", attrs):
    return int(m.group(1).split(",")[-1])
  if m := re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs):
    sizes = {a: int(n) for a, n in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
    named = re.findall(r"'(\w+)'", m.group(2))
    if named and all(a in sizes for a in named):
      return math.prod(sizes[a] for a in named)
  return num_devices


def _sent_fraction(kind: str, attrs: str, group: int, num_devices: int) -> float:
  """Bytes a device sends per byte of the collective's full buffer, for ring/direct algorithms."""
  if kind == "collective-permute":  # each device sends its buffer once, except to itself
    pairs = re.findall(r"\{(\d+),(\d+)\}", attrs.split("source_target_pairs=", 1)[-1].split("}}", 1)[0] + "}")
    return sum(a != b for a, b in pairs) / max(num_devices, 1)
  if group <= 1:
    return 0.0
  return (2.0 if kind == "all-reduce" else 1.0) * (group - 1) / group


def hlo_collectives(hlo: str, num_devices: int) -> dict:
  """Per-step collectives of one device's SPMD program: {kind: {count, bytes, sent_bytes}} plus notes.

  Every device runs the same partitioned program, so the shapes in the HLO are per-device shapes and the
  traffic below is per device per step. `bytes` is each op's full buffer (the larger of its operands and its
  result: the gathered array of an all-gather, the unreduced input of a reduce-scatter); `sent_bytes`
  estimates what a device puts on the wire with ring algorithms (all-reduce 2(g-1)/g of the buffer,
  all-gather / reduce-scatter / all-to-all (g-1)/g, collective-permute the buffer unless sent to itself).
  Ops inside a while loop count its known trip count times; of a conditional's branches the largest counts.
  """
  comps: dict[str, list[tuple[str, str, str, str]]] = {}
  shapes: dict[str, str] = {}
  entry, current = None, None
  for line in hlo.splitlines():
    if not line.startswith((" ", "\t")):
      if m := _COMP.match(line):
        current = m.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
        # parameters of a computation: "name: shape" pairs in its signature
        for pname, pshape in re.findall(r"([\w.\-]+):\s*((?:\([^)]*\))|[^,)]+)", line.split("->", 1)[0]):
          shapes[pname] = pshape
      elif line.startswith("}"):
        current = None
      continue
    if current is None or not (m := _INSTR.match(line)):
      continue
    name, shape, op, rest = m.groups()
    shapes[name] = shape
    comps[current].append((name, shape, op, rest))
  notes: set[str] = set()
  memo: dict[str, dict] = {}

  def zero() -> dict:
    return {k: {"count": 0, "bytes": 0.0, "sent_bytes": 0.0} for k in COLLECTIVES}

  def add(acc: dict, other: dict, times: int = 1) -> None:
    for k in COLLECTIVES:
      for f in ("count", "bytes", "sent_bytes"):
        acc[k][f] += other[k][f] * times

  def tally(comp: str) -> dict:
    if comp in memo:
      return memo[comp]
    memo[comp] = acc = zero()  # guards against cycles
    for _, shape, op, rest in comps.get(comp, ()):
      kind = op.removesuffix("-start")
      if kind in COLLECTIVES and not op.endswith("-done"):
        operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        in_bytes = sum(_shape_bytes(shapes.get(o, "")) for o in operands)
        out_bytes = _shape_bytes(shape)
        if op.endswith("-start") and shape.startswith("("):  # async: (operands, result[, contexts])
          out_bytes = max(out_bytes - in_bytes, 0.0)
        buf = max(in_bytes, out_bytes)
        group = _group_size(rest, num_devices)
        acc[kind]["count"] += 1
        acc[kind]["bytes"] += buf
        acc[kind]["sent_bytes"] += buf * _sent_fraction(kind, rest, group, num_devices)
      elif op == "while":
        body = re.search(r"\bbody=%?([\w.\-]+)", rest)
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
        if not trips:
          notes.add("a while loop without a known trip count was counted once")
        if body:
          add(acc, tally(body.group(1)), int(trips.group(1)) if trips else 1)
      elif op == "conditional":
        branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
        names = re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else _CALLEES.findall(rest)
        tallies = [tally(b) for b in names]
        if tallies:
          add(acc, max(tallies, key=lambda t: sum(v["bytes"] for v in t.values())))
          if any(sum(v["count"] for v in t.values()) for t in tallies):
            notes.add("collectives inside conditional branches: the largest branch is counted")
      else:
        for callee in _CALLEES.findall(rest):
          add(acc, tally(callee))
    return acc

  result = tally(entry) if entry else zero()
  # The largest ops by source op (jax's op_name metadata), each counted once: which code the traffic comes from.
  groups: dict[tuple[str, str, str], list[float]] = {}
  for instrs in comps.values():
    for _, shape, op, rest in instrs:
      kind = op.removesuffix("-start")
      if kind in COLLECTIVES and not op.endswith("-done"):
        operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        buf = max(_shape_bytes(shape), sum(_shape_bytes(shapes.get(o, "")) for o in operands))
        source = re.search(r'op_name="([^"]*)"', rest)
        out_shape = re.sub(r"\{[\d,]*\}", "", shape)
        if out_shape.startswith("("):  # a combined op: name the element count, not 40 shapes
          out_shape = f"tuple of {len(_ARRAY.findall(out_shape))} arrays"
        op_name = source.group(1) if source else "?"
        op_name = op_name if len(op_name) <= 200 else op_name[:200] + "..."  # combined ops list every source
        g = groups.setdefault((kind, op_name, out_shape), [0, 0.0])
        g[0] += 1
        g[1] += buf
  largest = [{"kind": k, "op_name": name, "shape": shp, "count": c, "bytes": b}
             for (k, name, shp), (c, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:8]]
  return {"by_kind": result, "notes": sorted(notes), "largest": largest}


# ---- measurement ----

@contextlib.contextmanager
def capture_stderr(sink: list[str]) -> Iterator[None]:
  """Collects everything written to file descriptor 2 (XLA's C++ warnings included) into `sink`, then echoes it."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      text = tmp.read().decode(errors="replace")
      sink.extend(line for line in text.splitlines() if line.strip())
      if text:
        sys.stderr.write(text)
        sys.stderr.flush()


def cores_busy(start: tuple[float, float, float], end: tuple[float, float, float]) -> tuple[float, float]:
  """(cores this process kept busy, cores other processes kept busy) on average between two snapshots."""
  wall, busy, own = (b - a for a, b in zip(start, end))
  if wall <= 0:
    return math.nan, math.nan
  return own / wall, max(busy - own, 0.0) / wall


def random_batches(vocab: int, batch_size: int, seq_len: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
  """Endless uniform random token batches, one document per row."""
  rng = np.random.default_rng(seed)
  while True:
    tokens = rng.integers(0, vocab, size=(batch_size, seq_len + 1), dtype=np.int32)
    yield {"inputs": tokens[:, :-1].copy(), "targets": tokens[:, 1:].copy(),
           "segment_ids": np.ones((batch_size, seq_len), np.int32),
           "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy()}


def host_batches(args: argparse.Namespace, corpus) -> Iterator[dict[str, np.ndarray]]:
  """A fresh batch iterator (the same batches for every configuration)."""
  if corpus is None:
    return random_batches(SHAPE["vocab_size"], args.batch_size, args.seq_len, seed=0)
  return loader.HostBatches(corpus.mixture, seq_len=args.seq_len, batch_size=args.batch_size, seed=0,
                            num_packing_bins=8, num_streams=1)


def run_config(preset: str, n: int, args: argparse.Namespace, corpus) -> dict:
  """Compiles and times one (preset, device count); returns its result row (or a skipped row)."""
  axes = mesh_axes(preset, n)
  mesh_text = " x ".join(f"{a}={k}" for a, k in axes.items() if k > 1) or "1 device"
  row = {"preset": preset, "devices": n, "mesh": axes, "mesh_text": mesh_text,
         "attention": "ring" if preset == "fsdp_tp_sp" else "xla", "skipped": None}
  try:
    cfg = bench_config(preset, axes, args)
    mesh, rules = sharding.mesh_for(cfg, jax.devices()[:n])  # checks divisibility, naming the numbers
  except ConfigError as e:
    row["skipped"] = str(e)
    return row

  log: list[str] = []
  with capture_stderr(log), sharding.use_mesh(mesh, rules):
    graphdef, state, tx, schedule = init_train_state(cfg, mesh)
    n_params = count_params(state["params"])
    batch_sharding = sharding.batch_sharding(mesh, rules)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    step_fn = jax.jit(make_train_step(graphdef, tx, schedule, z_loss=0.0, accum_steps=1),
                      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
                      donate_argnums=0)
    abstract_batch = {k: jax.ShapeDtypeStruct((args.batch_size, args.seq_len), jnp.int32, sharding=batch_sharding)
                      for k in loader.BATCH_KEYS}
    t0 = time.perf_counter()
    lowered = step_fn.lower(state, abstract_batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  hlo = compiled.as_text()
  comm = hlo_collectives(hlo, n)
  try:
    mem = compiled.memory_analysis()
    temp_bytes = int(mem.temp_size_in_bytes)
  except Exception:  # noqa: BLE001  (not every backend/version reports it)
    temp_bytes = None

  batches = host_batches(args, corpus)
  global_rows = args.batch_size

  def next_batch() -> tuple[dict, float]:
    t = time.perf_counter()
    host = next(batches)
    batch = {k: jax.make_array_from_process_local_data(batch_sharding, v, (global_rows, *v.shape[1:]))
             for k, v in host.items()}
    jax.block_until_ready(batch)
    return batch, time.perf_counter() - t

  data_s, step_s, losses = [], [], []
  snap = None
  with sharding.use_mesh(mesh, rules):
    for i in range(1 + args.warmup + args.steps):
      if i == 1 + args.warmup:
        snap = cpu_snapshot()
      batch, dt = next_batch()
      t = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      st = time.perf_counter() - t
      losses.append(float(metrics["loss"]))
      if i == 0:
        first_step_s = st
      elif i > args.warmup:
        data_s.append(dt)
        step_s.append(st)
  own_cores, other_cores = cores_busy(snap, cpu_snapshot())
  del state
  remat = [line for line in log if "remat" in line.lower()]
  tokens = args.batch_size * args.seq_len
  step = statistics.median(step_s)
  by_kind = comm["by_kind"]
  row.update({
    "params": n_params,
    "lower_s": t1 - t0, "compile_s": t2 - t1, "first_step_s": first_step_s,
    "host_data_ms": statistics.median(data_s) * 1e3, "device_step_ms": step * 1e3,
    "min_step_ms": min(step_s) * 1e3, "step_times_ms": [s * 1e3 for s in step_s],
    "data_times_ms": [s * 1e3 for s in data_s], "tokens_per_step": tokens, "tokens_per_sec": tokens / step,
    "own_cores": own_cores, "background_cores": other_cores, "first_loss": losses[0], "last_loss": losses[-1],
    "temp_bytes_per_device": temp_bytes,
    "collectives": by_kind, "collective_notes": comm["notes"], "largest_collectives": comm["largest"],
    "collective_count": sum(v["count"] for v in by_kind.values()),
    "collective_bytes": sum(v["bytes"] for v in by_kind.values()),
    "collective_sent_bytes": sum(v["sent_bytes"] for v in by_kind.values()),
    "hlo_lines": hlo.count("\n"), "involuntary_remat_warnings": remat, "stderr": log,
  })
  return row


# ---- output ----

def markdown_table(rows: list[dict]) -> str:
  """The results as a markdown table (collectives: count x MiB of full buffers per device per step)."""
  head = ["preset", "dev", "mesh", "compile s", "data ms", "step ms", "tokens/s", "vs 1 dev",
          *(SHORT[k] for k in COLLECTIVES), "sent MiB/dev", "loss@1", "cores (bg)", "remat warn"]
  lines = [f"NOTE: {CAVEAT}",
           "Collectives (AR all-reduce, AG all-gather, RS reduce-scatter, A2A all-to-all, CP collective-permute): "
           "ops / MiB of their full buffers per device per step, from the compiled HLO's shapes; 'sent' = "
           "estimated MiB a device sends (ring algorithms). cores = cores this process kept busy while timing "
           "(bg = other processes).", "",
           "| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(head))) + "|"]
  for r in rows:
    if r["skipped"]:
      lines.append(f"| {r['preset']} | {r['devices']} | {r['mesh_text']} | skipped: {r['skipped']} |"
                   + " |" * (len(head) - 4))
      continue
    coll = []
    for k in COLLECTIVES:
      c = r["collectives"][k]
      coll.append(f"{c['count']} / {c['bytes'] / 2**20:.1f}" if c["count"] else "-")
    ratio = r.get("ratio_vs_1_device")
    lines.append(
      f"| {r['preset']} | {r['devices']} | {r['mesh_text']} | {r['lower_s'] + r['compile_s']:.1f} | "
      f"{r['host_data_ms']:.1f} | {r['device_step_ms']:.0f} | {r['tokens_per_sec']:,.0f} | "
      f"{'n/a' if ratio is None else f'{ratio:.2f}x'} | {' | '.join(coll)} | "
      f"{r['collective_sent_bytes'] / 2**20:.1f} | "
      f"{r['first_loss']:.4f} | {r['own_cores']:.2f} ({r['background_cores']:.2f}) | "
      f"{len(r['involuntary_remat_warnings'])} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
  """Tokens/s vs devices per preset, and stacked per-step time and collective bytes per configuration."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  done = [r for r in rows if not r["skipped"]]
  presets = list(dict.fromkeys(r["preset"] for r in done))
  fig = Figure(figsize=(15, 4.8), layout="constrained")
  FigureCanvasAgg(fig)
  ax_tps, ax_time, ax_comm = fig.subplots(1, 3, width_ratios=(1, 1.6, 1.6))
  for preset in presets:
    pts = sorted((r["devices"], r["tokens_per_sec"]) for r in done if r["preset"] == preset)
    ax_tps.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=preset)
  ax_tps.set_xscale("log", base=2)
  ax_tps.set_xlabel("simulated CPU devices (sharing the same cores)")
  ax_tps.set_ylabel("tokens/s (median step)")
  ax_tps.set_title("throughput")
  ax_tps.legend(fontsize=8)
  ax_tps.set_ylim(bottom=0)

  labels = [f"{r['preset']} x{r['devices']}" for r in done]
  x = np.arange(len(done))
  data = np.array([r["host_data_ms"] for r in done])
  step = np.array([r["device_step_ms"] for r in done])
  ax_time.bar(x, step, label="device step (compute + comm.)")
  ax_time.bar(x, data, bottom=step, label="host data (next batch + transfer)")
  for i, r in enumerate(done):
    ax_time.annotate(f"{r['lower_s'] + r['compile_s']:.0f}s", (i, step[i] + data[i]), ha="center", va="bottom",
                     fontsize=6)
  ax_time.set_xticks(x, labels, fontsize=7, rotation=90)
  ax_time.set_ylabel("ms per step (label: compile s)")
  ax_time.set_title("step-time breakdown")
  ax_time.legend(fontsize=8)

  bottom = np.zeros(len(done))
  for k in COLLECTIVES:
    mib = np.array([r["collectives"][k]["sent_bytes"] / 2**20 for r in done])
    if mib.any():
      ax_comm.bar(x, mib, bottom=bottom, label=k)
      bottom += mib
  ax_comm.set_xticks(x, labels, fontsize=7, rotation=90)
  ax_comm.set_ylabel("est. MiB sent per device per step (HLO)")
  ax_comm.set_title("collectives")
  ax_comm.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.savefig(path, dpi=100)


def memory_plans(device: str) -> list[dict]:
  """`maxlm plan` of Llama-3-8B (fsdp=256) and Mixtral-8x7B (its docstring's fsdp=32 x expert=8) on 256 chips."""
  setups = [("llama3_8b", ["mesh.data=1", "mesh.fsdp=256"]),
            ("mixtral_8x7b", ["mesh.data=1", "mesh.fsdp=32", "mesh.expert=8"])]
  out = []
  for name, overrides in setups:
    cfg = load_config(name, overrides)
    try:
      result = plan(cfg, num_devices=256, device=device)
      out.append({"config": name, "overrides": overrides, "plan": result, "text": format_plan(result)})
    except ConfigError as e:
      out.append({"config": name, "overrides": overrides, "error": str(e), "text": f"maxlm plan: {e}"})
  return out


def main(argv: list[str] | None = None) -> None:
  """Runs every configuration, prints the table and plans, writes the JSON (and the PNG)."""
  t_start = time.perf_counter()
  args = parse_args(argv)
  presets = [p.strip() for p in args.presets.split(",") if p.strip()]
  counts = [int(n) for n in args.devices.split(",") if n.strip()]
  if max(counts) > MAX_DEVICES or len(jax.devices()) < max(counts):
    raise SystemExit(f"--devices {args.devices}: only {len(jax.devices())} simulated devices")
  print(f"{cpu_model()}; jax {jax.__version__} ({jax.devices()[0].platform}), {len(jax.devices())} simulated "
        f"devices on {os.cpu_count()} CPU core(s); malloc tuning {'on' if MALLOC_TUNED else 'off'}")
  print(f"NOTE: {CAVEAT}")

  corpus, data_desc = None, "uniform random tokens, one document per row"
  if args.data == "corpus":
    corpus = prepare_corpus([], vocab_size=args.corpus_vocab, cache_dir=None,
                            max_corpus_bytes=int(args.corpus_mb * 2**20), eval_fraction=0.02)
    data_desc = (f"real loader (HostBatches, packed) over {corpus.description}; ids < {args.corpus_vocab} in the "
                 f"model's {SHAPE['vocab_size']} vocabulary")
  print(f"data: {data_desc}")

  rows = []
  total = len(presets) * len(counts)
  for i, preset in enumerate(presets):
    for j, n in enumerate(counts):
      k = i * len(counts) + j + 1
      t = time.perf_counter()
      row = run_config(preset, n, args, corpus)
      rows.append(row)
      if row["skipped"]:
        print(f"[{k}/{total}] {preset:<10} {n} dev ({row['mesh_text']}): skipped: {row['skipped']}", flush=True)
        continue
      print(f"[{k}/{total}] {preset:<10} {n} dev ({row['mesh_text']}): "
            f"compile {row['lower_s'] + row['compile_s']:.1f}s, "
            f"data {row['host_data_ms']:.1f} ms, step {row['device_step_ms']:.0f} ms, "
            f"{row['tokens_per_sec']:,.0f} tok/s, {row['collective_count']} collectives "
            f"({row['collective_sent_bytes'] / 2**20:.1f} MiB sent/dev), loss@1 {row['first_loss']:.4f}, "
            f"{len(row['involuntary_remat_warnings'])} remat warning(s), cores {row['own_cores']:.2f} "
            f"(others {row['background_cores']:.2f}) [{time.perf_counter() - t:.0f}s]", flush=True)
  for r in rows:
    base = next((b for b in rows if b["preset"] == r["preset"] and b["devices"] == 1 and not b["skipped"]), None)
    if not r["skipped"]:
      r["ratio_vs_1_device"] = r["tokens_per_sec"] / base["tokens_per_sec"] if base else None

  print("\nplanning Llama-3-8B and Mixtral-8x7B on 256 chips ...", flush=True)
  plans = memory_plans(args.plan_device)
  table = markdown_table(rows)
  print("\n" + table)
  remats = {f"{r['preset']}/{r['devices']}": r["involuntary_remat_warnings"] for r in rows
            if not r["skipped"] and r["involuntary_remat_warnings"]}
  for key, lines in remats.items():
    print(f"\n{key}: {len(lines)} rematerialisation warning(s) from XLA, e.g.\n  {lines[0][:400]}")
  for preset in presets:
    top = max((r for r in rows if r["preset"] == preset and not r["skipped"]), key=lambda r: r["devices"], default=None)
    if top and top["largest_collectives"]:
      print(f"\nlargest collectives of {preset} on {top['devices']} devices (per device, by jax op):")
      for c in top["largest_collectives"][:3]:
        print(f"  {c['kind']:<18} {c['count']:>3} x {c['shape']:<24} {c['bytes'] / 2**20:6.1f} MiB  "
              f"{c['op_name'][:90]}")
  for p in plans:
    print(f"\n=== maxlm plan --config={p['config']} {' '.join('--config.' + o for o in p['overrides'])} "
          f"--num-devices 256 --device {args.plan_device}\n{p['text']}")
  runtime = time.perf_counter() - t_start
  print(f"\ntotal runtime {runtime:.0f}s")

  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  meta = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
          "caveat": CAVEAT, "simulated_devices": len(jax.devices()), "cpu_count": os.cpu_count(),
          "shape": SHAPE, "seq_len": args.seq_len, "global_batch": args.batch_size, "dtype": "float32",
          "data": data_desc, "timed_steps": args.steps, "warmup_steps": args.warmup,
          "compile_s": "lower + XLA compile of the train step (not the first execution)",
          "host_data_ms": "median of: next host batch + make_array_from_process_local_data + block_until_ready",
          "device_step_ms": "median of: compiled step on the sharded state + block_until_ready",
          "collectives": "per device per step, from the compiled HLO's shapes (every device runs the same SPMD "
                         "program): count, bytes = each op's full buffer, sent_bytes = ring-algorithm estimate",
          "mesh_rule": "dp data=n; fsdp fsdp=n; fsdp_tp tensor=min(2,n), fsdp=rest; fsdp_tp_sp (ring attention) "
                       "sequence=min(2,n), tensor=min(2,n/sequence), fsdp=rest",
          "jax": jax.__version__, "machine": platform.machine(),
          "cpu_model": cpu_model(), "malloc_tuning": MALLOC_TUNED,
          "runtime_s": runtime}
  out.write_text(json.dumps({"meta": meta, "machine": machine(MALLOC_TUNED), "results": rows,
                             "plans": [{k: v for k, v in p.items()} for p in plans]}, indent=2, default=str))
  print(f"wrote {out}")
  if args.plot:
    png = out.with_suffix(".png")
    plot(rows, png, f"train step, {SHAPE['num_layers']}L d{SHAPE['d_model']} vocab {SHAPE['vocab_size']}, seq "
                    f"{args.seq_len} x batch {args.batch_size}, fp32 — {len(jax.devices())} simulated CPU devices on "
                    f"{os.cpu_count()} cores: overhead, not speed-up")
    print(f"wrote {png}")


if __name__ == "__main__":
  main()
