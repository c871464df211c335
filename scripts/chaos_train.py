"""Chaos test of training: SIGKILLs at random moments and damaged checkpoints, against one uninterrupted run.

Sections (`--sections`, default all):
  kills       `maxlm train` subprocesses of a tiny model (async checkpoints every --checkpoint-every steps) are
              SIGKILLed at seeded random moments (--kills per run, --runs runs): mostly once the run has logged a
              random step (so kills land mid-step and mid-checkpoint-write), sometimes during start-up or restore.
              Each is resumed until it finishes; its final metrics.jsonl must hold every step exactly once with
              the uninterrupted run's losses (the data-iterator position is restored exactly).
  corruption  On a copy of the uninterrupted run, the newest checkpoint is damaged (truncated files, random
              bytes, truncated array files only, bit flips in array files, a garbled data-iterator JSON, the
              newest directory deleted) and the run resumed after each: the damage must be reported, the step
              moved aside intact (renamed, not deleted), and the run must finish with the same losses.
  overhead    Checksum cost on configs/tiny.py's train state: save with/without checksums, restore with
              verification, hashing throughput, and the estimate for Llama-3-8B (8.03B params, fp32 weights +
              Adam moments = 96.4 GB per checkpoint).

Target: 0 steps lost, 0 duplicated, 0 loss difference, every corruption detected and survived.

Run:  python scripts/chaos_train.py   (defaults: --runs 3 --kills 4 --steps 40 --checkpoint-every 5 --seed 0)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# bench_host: scripts/ is on sys.path
from bench_host import background_cores, cpu_model, cpu_snapshot, machine, parse_sections, write_results  # noqa: E402

SECTIONS = ("kills", "corruption", "overhead")
# The tests' small model (tests/conftest.py SMALL_TRAIN), async checkpoints, and a constant learning rate after
# warm-up. One process, one CPU device: the subprocesses see the default device count.
MODEL = ["--config.model.vocab_size=512", "--config.model.d_model=64", "--config.model.num_layers=2",
         "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.mlp_dim=128",
         "--config.model.max_seq_len=128", "--config.data.seq_len=64", "--config.data.batch_size=4",
         "--config.data.max_corpus_mb=0.5", "--config.train.warmup_steps=2", "--config.train.progress_bar=false",
         "--config.train.sample_tokens=0", "--config.train.eval_batches=1", "--config.train.eval_every=0",
         "--config.train.schedule=constant", "--config.train.async_checkpointing=true",
         "--config.train.keep_checkpoints=3", "--config.train.log_every=5"]
LLAMA3_8B_PARAMS = 8.03e9
LLAMA3_8B_BYTES = LLAMA3_8B_PARAMS * (4 + 8)  # fp32 weights + Adam's two fp32 moments
STARTUP_KILL_FRACTION = 0.25  # share of kills sent at a random time after launch (start-up, restore, compile)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line options."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
  p.add_argument("--runs", type=int, default=3, help="independent killed-and-resumed runs")
  p.add_argument("--kills", type=int, default=4, help="SIGKILLs per run")
  p.add_argument("--steps", type=int, default=40, help="train.steps of every run")
  p.add_argument("--checkpoint-every", type=int, default=5, help="train.checkpoint_every")
  p.add_argument("--seed", type=int, default=0, help="seed of the kill moments and the damage")
  p.add_argument("--timeout", type=float, default=600, help="seconds one launch may take")
  p.add_argument("--overhead-reps", type=int, default=5, help="saves / restores timed per mode (median reported)")
  p.add_argument("--hash-mib", type=int, default=256, help="MiB hashed for the throughput figure")
  p.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory, removed)")
  p.add_argument("--out", default="bench_results/chaos_train.json", help="JSON results path")
  p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write a PNG next to the JSON")
  args = p.parse_args(argv)
  args.section_list = parse_sections(p, args.sections, SECTIONS)
  return args


# ---- launching and reading runs ------------------------------------------------------------------------------------


def train_cmd(workdir: Path, args: argparse.Namespace) -> list[str]:
  return [sys.executable, "-m", "maxlm.cli", "train", f"--workdir={workdir}", *MODEL,
          f"--config.train.steps={args.steps}", f"--config.train.checkpoint_every={args.checkpoint_every}"]


def losses(workdir: Path) -> list[tuple[int, float]]:
  """(step, loss) of every training record of metrics.jsonl in file order (torn last line ignored)."""
  out = []
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return out
  for line in path.read_text().split("\n")[:-1]:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if "loss" in record:
      out.append((record["step"], record["loss"]))
  return out


def committed_steps(workdir: Path) -> list[int]:
  ckpt = workdir / "checkpoints"
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def saving_now(workdir: Path, since: float) -> bool:
  """Whether a checkpoint is being written: an orbax temporary step directory changed after `since` (time.time()),
  not one left behind by an earlier kill."""
  ckpt = workdir / "checkpoints"
  if not ckpt.is_dir():
    return False
  for p in ckpt.iterdir():
    try:
      if ".orbax-checkpoint-tmp" in p.name and max(f.stat().st_mtime for f in [p, *p.rglob("*")]) > since:
        return True
    except OSError:  # renamed into place while we looked: it was being written
      return True
  return False


def launch(workdir: Path, args: argparse.Namespace, log_path: Path) -> subprocess.Popen:
  log = open(log_path, "w")  # noqa: SIM115 - closed with the process in finish()
  proc = subprocess.Popen(train_cmd(workdir, args), stdout=log, stderr=subprocess.STDOUT)
  proc.log_file = log
  return proc


def finish(proc: subprocess.Popen, timeout: float) -> int:
  try:
    rc = proc.wait(timeout=timeout)
  finally:
    proc.log_file.close()
  return rc


def resumed_from(log_path: Path) -> int | None:
  m = re.search(r"resumed from step (\d+)", log_path.read_text())
  return int(m.group(1)) if m else None


def compare(got: list[tuple[int, float]], reference: dict[int, float], steps: int) -> dict:
  """Steps lost and duplicated in a final metrics.jsonl, and the largest loss difference to the reference."""
  seen: dict[int, int] = {}
  for step, _ in got:
    seen[step] = seen.get(step, 0) + 1
  diffs = [abs(loss - reference[step]) for step, loss in got if step in reference]
  return {"lost": [s for s in range(1, steps + 1) if s not in seen],
          "duplicated": sorted(s for s, n in seen.items() if n > 1),
          "max_abs_loss_diff": max(diffs) if diffs else float("nan"),
          "steps_differing": sum(d != 0 for d in diffs)}


def reference_run(root: Path, args: argparse.Namespace) -> tuple[Path, dict[int, float]]:
  """One uninterrupted run."""
  workdir = root / "reference"
  t0 = time.perf_counter()
  proc = launch(workdir, args, root / "reference.log")
  rc = finish(proc, args.timeout)
  if rc != 0:
    raise SystemExit(f"the uninterrupted run failed (exit {rc}); see {root / 'reference.log'}")
  ref = dict(losses(workdir))
  print(f"uninterrupted run: {len(ref)} steps in {time.perf_counter() - t0:.1f}s, final loss {ref[args.steps]:.4f}")
  return workdir, ref


# ---- section: kills ------------------------------------------------------------------------------------------------


def kill_run(root: Path, run: int, args: argparse.Namespace, rng: random.Random,
             reference: dict[int, float]) -> tuple[dict, list[dict]]:
  """One run SIGKILLed args.kills times at random moments, resumed each time, then finished."""
  workdir = root / f"run{run}"
  kills: list[dict] = []
  launches = 0
  while len(kills) < args.kills:
    resume = max(committed_steps(workdir), default=0)  # where this launch will most likely resume
    log_path = root / f"run{run}-launch{launches}.log"
    launches += 1
    started = time.time()
    proc = launch(workdir, args, log_path)
    t0 = time.perf_counter()
    if rng.random() < STARTUP_KILL_FRACTION:
      mode, target = "startup", None
      delay = rng.uniform(1.0, 8.0)
      while proc.poll() is None and time.perf_counter() - t0 < delay:
        time.sleep(0.01)
    else:
      mode = "step"
      target = rng.randint(min(resume + 1, args.steps - 3), args.steps - 3)
      # metrics.jsonl still holds the killed launch's steps until this one has restored and truncated it, which it
      # has done once it logs the model line.
      while proc.poll() is None and not re.search(r"maxlm\.train: ?model: ", log_path.read_text()):
        if time.perf_counter() - t0 > args.timeout:
          break
        time.sleep(0.01)
      while proc.poll() is None and max((s for s, _ in losses(workdir)), default=0) < target:
        if time.perf_counter() - t0 > args.timeout:
          break
        time.sleep(0.005)
      time.sleep(rng.uniform(0.0, 0.05))  # somewhere inside the next step(s), or a checkpoint being written
    during_save = saving_now(workdir, started)
    proc.send_signal(signal.SIGKILL)
    rc = finish(proc, args.timeout)
    at = max((s for s, _ in losses(workdir)), default=0)
    record = {"run": run, "launch": launches - 1, "mode": mode, "target_step": target,
              "seconds_after_launch": time.perf_counter() - t0, "last_logged_step": at,
              "committed_checkpoints": committed_steps(workdir), "during_checkpoint_write": during_save,
              "killed": rc == -signal.SIGKILL, "resumed_from": resumed_from(log_path)}
    if rc != -signal.SIGKILL:  # it had finished (or failed) before the signal
      record["exit_status"] = rc
      if rc != 0:
        raise SystemExit(f"run {run} launch {launches - 1} failed (exit {rc}); see {log_path}")
      break
    kills.append(record)
    print(f"  run {run}: kill {len(kills)} ({mode}{f' after step {target}' if target else ''}) at logged step "
          f"{at}{', during a checkpoint write' if during_save else ''}; checkpoints {record['committed_checkpoints']}")
  log_path = root / f"run{run}-launch{launches}.log"
  proc = launch(workdir, args, log_path)
  rc = finish(proc, args.timeout)
  if rc != 0:
    raise SystemExit(f"run {run}: the final resume failed (exit {rc}); see {log_path}")
  result = {"run": run, "kills": len(kills), "launches": launches + 1, "final_resumed_from": resumed_from(log_path),
            "kills_during_checkpoint_write": sum(k["during_checkpoint_write"] for k in kills),
            **compare(losses(workdir), reference, args.steps)}
  return result, kills


# ---- section: corruption -------------------------------------------------------------------------------------------


def _files(step_dir: Path) -> list[Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file())


def _array_files(step_dir: Path) -> list[Path]:
  return [p for p in _files(step_dir) if p.parent.name == "d" and p.parent.parent.name.startswith("ocdbt.process_")]


def _truncate(files: list[Path]) -> None:
  for f in files:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _random_bytes(step_dir: Path, rng: random.Random) -> None:
  for f in _files(step_dir):
    f.write_bytes(rng.randbytes(f.stat().st_size))


def _bit_flips(step_dir: Path, rng: random.Random) -> None:
  """XORs three bytes at random offsets of the largest array files (one of params, one of the optimizer state)."""
  for item in ("params", "train"):
    f = max(_array_files(step_dir / item), key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    for i in rng.sample(range(len(data)), 3):
      data[i] ^= 1 << rng.randrange(8)
    f.write_bytes(bytes(data))


def _garble_json(step_dir: Path, rng: random.Random) -> None:
  path = step_dir / "data" / "metadata"
  text = bytearray(path.read_bytes())
  i = rng.randrange(len(text) - 3)
  text[i:i + 3] = b"}{,"
  path.write_bytes(bytes(text))


DAMAGE = {
  "truncated": lambda d, rng: _truncate(_files(d)),
  "random_bytes": _random_bytes,
  "truncated_arrays": lambda d, rng: _truncate(_array_files(d)),
  "bit_flips": _bit_flips,
  "garbled_iterator_json": _garble_json,
  "deleted_newest": lambda d, rng: shutil.rmtree(d),
}


def _tree_hashes(directory: Path) -> dict[str, str]:
  return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in _files(directory)}


def corruption(root: Path, ref_dir: Path, args: argparse.Namespace, rng: random.Random,
               reference: dict[int, float]) -> list[dict]:
  """Each kind of damage to the newest checkpoint of a finished run, resumed after each."""
  workdir = root / "corrupted"
  shutil.copytree(ref_dir, workdir)
  rows = []
  for kind, damage in DAMAGE.items():
    newest = committed_steps(workdir)[-1]
    step_dir = workdir / "checkpoints" / str(newest)
    before_aside = {p.name for p in (workdir / "checkpoints").iterdir() if ".corrupt-" in p.name}
    damage(step_dir, rng)
    damaged = _tree_hashes(step_dir) if step_dir.exists() else None
    log_path = root / f"corrupted-{kind}.log"
    t0 = time.perf_counter()
    rc = finish(launch(workdir, args, log_path), args.timeout)
    text = log_path.read_text()
    aside = [p for p in (workdir / "checkpoints").iterdir() if ".corrupt-" in p.name and p.name not in before_aside]
    detected = f"{step_dir} is damaged or unreadable" in text
    row = {"kind": kind, "step": newest, "exit_status": rc, "seconds": time.perf_counter() - t0,
           "detected": detected if damaged is not None else None,
           "by_checksum": "checksum verification failed" in text if damaged is not None else None,
           "moved_aside": [p.name for p in aside],
           "kept_intact": (len(aside) == 1 and _tree_hashes(aside[0]) == damaged) if damaged is not None else None,
           "resumed_from": resumed_from(log_path), **compare(losses(workdir), reference, args.steps)}
    row["survived"] = rc == 0 and not row["lost"] and not row["duplicated"] and row["max_abs_loss_diff"] == 0
    rows.append(row)
    print(f"  {kind}: step {newest} {'detected' if detected else 'not reported'}"
          f"{' (checksum)' if row['by_checksum'] else ''}, moved aside {row['moved_aside'] or '-'}, resumed from "
          f"{row['resumed_from']}, exit {rc}")
    if rc != 0:
      print(text[-3000:])
  return rows


# ---- section: overhead ---------------------------------------------------------------------------------------------


def overhead(root: Path, args: argparse.Namespace) -> dict:
  """Checksum cost on configs/tiny.py's train state, and the Llama-3-8B estimate."""
  import jax  # noqa: PLC0415  (the other sections run subprocesses only)

  from maxlm import sharding  # noqa: PLC0415
  from maxlm.config import load_config  # noqa: PLC0415
  from maxlm.train import integrity  # noqa: PLC0415
  from maxlm.train.checkpoint import Checkpointer  # noqa: PLC0415
  from maxlm.train.state import count_params, init_train_state  # noqa: PLC0415

  cfg = load_config("tiny", [])
  mesh = sharding.make_mesh(cfg.mesh)
  _, state, _, _ = init_train_state(cfg, mesh)
  n_params = count_params(state["params"])
  config = {"model": cfg.model.to_dict()}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  times: dict[str, list[float]] = {"save_plain": [], "save_checksums": [], "restore_plain": [],
                                   "restore_checksums": [], "verify": [], "manifest": []}
  ckpt_bytes = 0
  for rep in range(args.overhead_reps + 1):  # the first round warms up (orbax, jit of the finiteness check)
    for checksums in (False, True):
      d = root / "overhead" / f"{rep}-{checksums}"
      ckpt = Checkpointer(d, async_save=False, checksums=checksums)
      t0 = time.perf_counter()
      ckpt.save(1, state, {"position": rep}, config)
      save_s = time.perf_counter() - t0
      ckpt.close()
      manifest = ckpt.stats.get("save", {})
      ckpt = Checkpointer(d, async_save=False, checksums=checksums)
      t0 = time.perf_counter()
      restored = ckpt.restore_latest(abstract)
      jax.block_until_ready(restored[1])
      restore_s = time.perf_counter() - t0
      ckpt.close()
      if rep == 0:
        continue
      mode = "checksums" if checksums else "plain"
      times[f"save_{mode}"].append(save_s)
      times[f"restore_{mode}"].append(restore_s)
      if checksums:
        times["manifest"].append(manifest["seconds"])
        times["verify"].append(ckpt.stats["verify"]["seconds"])
        ckpt_bytes = manifest["bytes"]
  med = {k: statistics.median(v) for k, v in times.items()}

  # Hashing throughput: one stream, and the pool a manifest uses, on files just written (page cache: CPU-bound).
  hash_dir = root / "overhead" / "hash"
  hash_dir.mkdir(parents=True)
  chunk = os.urandom(1 << 20)
  n_files = max(1, integrity._workers()) * 2
  per_file = max(1, args.hash_mib // n_files)
  for i in range(n_files):
    with open(hash_dir / f"f{i}", "wb") as f:
      for _ in range(per_file):
        f.write(chunk)
  total = n_files * per_file * (1 << 20)
  t0 = time.perf_counter()
  integrity.file_digest(hash_dir / "f0")
  one_stream = per_file * (1 << 20) / (time.perf_counter() - t0)
  t0 = time.perf_counter()
  integrity.write_manifest(hash_dir)
  pooled = total / (time.perf_counter() - t0)
  shutil.rmtree(hash_dir)

  workers = integrity._workers()
  estimate = {"checkpoint_bytes": LLAMA3_8B_BYTES,
              "save_manifest_seconds_process0": LLAMA3_8B_BYTES / pooled,
              "save_manifest_seconds_process0_8_threads": LLAMA3_8B_BYTES / (8 * one_stream),
              "verify_seconds_per_host": {str(h): LLAMA3_8B_BYTES / h / (8 * one_stream) for h in (1, 4, 16, 64)}}
  return {"tiny_params": n_params, "tiny_checkpoint_bytes": ckpt_bytes, "reps": args.overhead_reps,
          "median_seconds": med, "save_overhead_seconds": med["save_checksums"] - med["save_plain"],
          "restore_overhead_seconds": med["restore_checksums"] - med["restore_plain"],
          "hash_bytes_per_second_one_stream": one_stream, "hash_bytes_per_second_pool": pooled,
          "hash_pool_threads": workers, "hash_test_bytes": total, "llama3_8b_estimate": estimate}


# ---- report --------------------------------------------------------------------------------------------------------


def tables(result: dict) -> str:
  """The results as markdown tables."""
  out = []
  if "runs" in result:
    out += ["| run | kills | during a checkpoint write | launches | steps lost | steps duplicated | "
            "max abs loss diff |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
      out.append(f"| {r['run']} | {r['kills']} | {r['kills_during_checkpoint_write']} | {r['launches']} | "
                 f"{len(r['lost'])} | {len(r['duplicated'])} | {r['max_abs_loss_diff']:.3g} |")
    out.append("")
  if "corruption" in result:
    out += ["| damage | step | detected | by checksum | moved aside intact | resumed from | exit | lost | duplicated | "
            "max abs loss diff | survived |", "|---|---:|---|---|---|---:|---:|---:|---:|---:|---|"]
    def yn(v: bool | None) -> str:
      return "n/a" if v is None else ("yes" if v else "NO")
    for r in result["corruption"]:
      out.append(f"| {r['kind']} | {r['step']} | {yn(r['detected'])} | {yn(r['by_checksum'])} | "
                 f"{yn(r['kept_intact'])} | {r['resumed_from']} | {r['exit_status']} | {len(r['lost'])} | "
                 f"{len(r['duplicated'])} | {r['max_abs_loss_diff']:.3g} | {yn(r['survived'])} |")
    out.append("")
  if "overhead" in result:
    o = result["overhead"]
    m, e = o["median_seconds"], o["llama3_8b_estimate"]
    out += [f"checksum overhead on configs/tiny.py ({o['tiny_params']:,} params, "
            f"{o['tiny_checkpoint_bytes'] / 1e6:.1f} MB checkpoint, median of {o['reps']}):",
            "| | without checksums | with checksums | overhead |", "|---|---:|---:|---:|",
            f"| save (sync) | {m['save_plain'] * 1e3:.0f} ms | {m['save_checksums'] * 1e3:.0f} ms | "
            f"{o['save_overhead_seconds'] * 1e3:+.0f} ms (manifest {m['manifest'] * 1e3:.1f} ms) |",
            f"| restore | {m['restore_plain'] * 1e3:.0f} ms | {m['restore_checksums'] * 1e3:.0f} ms | "
            f"{o['restore_overhead_seconds'] * 1e3:+.0f} ms (verify {m['verify'] * 1e3:.1f} ms) |", "",
            f"sha256 here: {o['hash_bytes_per_second_one_stream'] / 1e9:.2f} GB/s per stream, "
            f"{o['hash_bytes_per_second_pool'] / 1e9:.2f} GB/s with the manifest's {o['hash_pool_threads']}-thread "
            "pool (files in page cache)",
            f"Llama-3-8B ({e['checkpoint_bytes'] / 1e9:.1f} GB): manifest on process 0 "
            f"{e['save_manifest_seconds_process0']:.0f} s with this machine's pool, "
            f"{e['save_manifest_seconds_process0_8_threads']:.0f} s with 8 such threads (in the background, before the "
            "step commits); verification per host with 8 threads: " + ", ".join(
              f"{h} host(s) {s:.1f} s" for h, s in e["verify_seconds_per_host"].items())]
  return "\n".join(out)


def plot(result: dict, path: Path) -> None:
  """Loss curves of the reference and each chaos run with the kill points; the corruption outcomes."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  fig = Figure(figsize=(11, 4), layout="constrained")
  FigureCanvasAgg(fig)
  ax, bx = fig.subplots(1, 2)
  ref = result.get("reference_losses", {})
  if ref:
    steps = sorted(int(s) for s in ref)
    ax.plot(steps, [ref[str(s)] for s in steps], color="black", lw=3, alpha=0.3, label="uninterrupted")
  for r in result.get("runs", []):
    got = r["final_losses"]
    steps = sorted(int(s) for s in got)
    line, = ax.plot(steps, [got[str(s)] for s in steps], lw=1, label=f"run {r['run']} ({r['kills']} kills)")
    for k in (k for k in result.get("kills", []) if k["run"] == r["run"]):
      ax.axvline(k["last_logged_step"], color=line.get_color(), ls=":", lw=0.8)
  ax.set_xlabel("step")
  ax.set_ylabel("train loss")
  ax.set_title("killed-and-resumed runs (dotted: kills)")
  ax.legend(fontsize=8)
  rows = result.get("corruption", [])
  if rows:
    names = [r["kind"] for r in rows]
    bx.barh(names, [r["step"] for r in rows], color="#d62728", alpha=0.4, label="damaged step")
    bx.barh(names, [r["resumed_from"] or 0 for r in rows], color="#2ca02c",
            label="resumed from (then trained to the end)")
    for i, r in enumerate(rows):
      bx.text(1, i, "survived" if r["survived"] else "FAILED", va="center", fontsize=8)
    bx.set_xlabel("step")
    bx.set_title("damaged newest checkpoint")
    bx.legend(fontsize=8, loc="lower right")
  fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
  """Runs the sections, prints the tables, writes the JSON (and the PNG)."""
  args = parse_args(argv)
  rng = random.Random(args.seed)
  os.environ.setdefault("MAXLM_CACHE", str(Path(tempfile.gettempdir()) / "maxlm-chaos-cache"))
  root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="chaos-train-"))
  root.mkdir(parents=True, exist_ok=True)
  print(f"{cpu_model()}, {os.cpu_count()} CPUs; workdir {root}; cache {os.environ['MAXLM_CACHE']}")
  snap = cpu_snapshot()
  result: dict = {}
  try:
    if {"kills", "corruption"} & set(args.section_list):
      ref_dir, reference = reference_run(root, args)
      result["reference_losses"] = {str(s): v for s, v in reference.items()}
    if "kills" in args.section_list:
      result["runs"], result["kills"] = [], []
      for run in range(args.runs):
        summary, kills = kill_run(root, run, args, rng, reference)
        summary["final_losses"] = {str(s): v for s, v in losses(root / f"run{run}")}
        result["runs"].append(summary)
        result["kills"].extend(kills)
    if "corruption" in args.section_list:
      result["corruption"] = corruption(root, ref_dir, args, rng, reference)
    if "overhead" in args.section_list:
      result["overhead"] = overhead(root, args)
  finally:
    if not args.workdir:
      shutil.rmtree(root, ignore_errors=True)
  background = background_cores(snap, cpu_snapshot())

  print("\n" + tables(result))
  verdict = {}
  if "runs" in result:
    verdict["kills"] = sum(r["kills"] for r in result["runs"])
    verdict["steps_lost"] = sum(len(r["lost"]) for r in result["runs"])
    verdict["steps_duplicated"] = sum(len(r["duplicated"]) for r in result["runs"])
    verdict["max_abs_loss_diff"] = max(r["max_abs_loss_diff"] for r in result["runs"])
  if "corruption" in result:
    damaged = [r for r in result["corruption"] if r["detected"] is not None]
    verdict["corruptions_detected"] = f"{sum(r['detected'] for r in damaged)}/{len(damaged)}"
    verdict["corruptions_moved_aside_intact"] = f"{sum(bool(r['kept_intact']) for r in damaged)}/{len(damaged)}"
    verdict["corruptions_survived"] = f"{sum(r['survived'] for r in result['corruption'])}/{len(result['corruption'])}"
  ok = (verdict.get("steps_lost", 0) == 0 and verdict.get("steps_duplicated", 0) == 0
        and verdict.get("max_abs_loss_diff", 0) == 0
        and all(r["survived"] and r["detected"] in (True, None) and r["kept_intact"] in (True, None)
                for r in result.get("corruption", [])))
  verdict["meets_target"] = ok
  print("\n" + ", ".join(f"{k}: {v}" for k, v in verdict.items()))
  print(f"other processes kept {background:.2f} of {os.cpu_count()} cores busy")

  out = Path(args.out)
  import jax  # noqa: PLC0415

  meta = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
          "seed": args.seed, "runs": args.runs, "kills_per_run": args.kills, "steps": args.steps,
          "checkpoint_every": args.checkpoint_every, "config_overrides": MODEL, "cpu_model": cpu_model(),
          "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
          "jax": jax.__version__, "background_cores": background}
  write_results({"meta": meta, "machine": machine(), "verdict": verdict, **result}, out,
                (lambda png: plot(result, png)) if args.plot and ({"runs", "corruption"} & set(result)) else None)


if __name__ == "__main__":
  main()
