"""Section memory: peak host memory of importing a GGUF model, against the model's own sizes.

`maxlm convert --from-gguf` runs in a child process and its peak resident set (the kernel's ru_maxrss from
wait4, for that process alone) is read when it exits; transformers' own GGUF load (`from_pretrained(gguf_file=)`,
float32) is measured the same way as the baseline, and so are the converter's imports alone (the interpreter, jax,
orbax: what any maxlm command holds before it reads a byte of the model). RSS includes the pages of a
memory-mapped file that were read. Sizes: the GGUF file, and the float32 parameters it dequantizes to.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from decode_bench.common import progress

from real_bench.models import maxlm_cli

_HF_LOAD = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], gguf_file=sys.argv[2], dtype=torch.float32)\n"
            "print(sum(p.numel() for p in m.parameters()))\n")


_IMPORTS = ("import jax, jax.numpy as jnp, orbax.checkpoint, maxlm.cli, maxlm.convert.gguf\n"
            "jnp.zeros(1).block_until_ready()\n")


# Runs argv[2:] and writes its peak RSS (KiB, from wait4) to argv[1]. The kernel counts into a process's peak the
# resident size of the process it was forked and exec'd from, so the command is started from this small wrapper
# rather than from the benchmark (gigabytes resident after the other sections).
_WRAPPER = ("import os, subprocess, sys\np = subprocess.Popen(sys.argv[2:])\n_, status, usage = os.wait4(p.pid, 0)\n"
            "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\nsys.exit(os.waitstatus_to_exitcode(status))\n")


def _rss_tree(pid: int) -> int:
  """Resident bytes of a process's children (the wrapped command), 0 once they are gone."""
  total = 0
  try:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
      children = [int(c) for c in f.read().split()]
    for child in children:
      with open(f"/proc/{child}/status") as f:
        total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
  except (OSError, StopIteration, ValueError):
    pass
  return total


def peak_rss(cmd: list[str], log: Path, label: str) -> dict:
  """Runs cmd (output to `log`), printing its RSS every 10 s; returns its peak RSS, seconds and exit status."""
  peak_file = log.with_suffix(".peak")
  peak_file.unlink(missing_ok=True)
  t0 = shown = time.perf_counter()
  with open(log, "w") as f:
    proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, str(peak_file), *cmd], stdout=f,
                            stderr=subprocess.STDOUT)
  while proc.poll() is None:
    if time.perf_counter() - shown >= 10:
      shown = time.perf_counter()
      progress(f"[memory] {label}: {shown - t0:.0f}s, RSS {_rss_tree(proc.pid) / 2**20:,.0f} MiB")
    time.sleep(0.2)
  seconds = time.perf_counter() - t0
  if proc.returncode != 0:
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    progress(f"[memory] {label} exited {proc.returncode}:\n{tail}")
  peak = int(peak_file.read_text()) * 1024 if peak_file.is_file() else 0
  return {"peak_rss_bytes": peak, "seconds": seconds, "exit": proc.returncode, "log": str(log)}


def _float32_bytes(gguf: Path) -> int:
  from gguf import GGUFReader

  return int(sum(int(t.n_elements) * 4 for t in GGUFReader(str(gguf)).tensors))


def section_memory(args: argparse.Namespace, get_model) -> dict:
  """Peak RSS of `maxlm convert --from-gguf` (and of transformers' GGUF load) for --memory-model."""
  from fetch_models import fetch_gguf

  key = args.memory_model
  gguf = args.gguf.get(key) or Path(fetch_gguf(key))
  work = args.cache_dir / "memory"
  shutil.rmtree(work, ignore_errors=True)
  work.mkdir(parents=True)
  size, f32 = gguf.stat().st_size, _float32_bytes(gguf)
  runs = {"maxlm convert --from-gguf": [*maxlm_cli(), "convert", "--from-gguf", str(gguf), "--workdir",
                                        str(work / "workdir")],
          "its imports alone (no model)": [sys.executable, "-c", _IMPORTS]}
  if args.memory_baseline:
    runs["transformers from_pretrained(gguf_file=)"] = [sys.executable, "-c", _HF_LOAD, str(gguf.parent), gguf.name]
  rows = []
  for i, (name, cmd) in enumerate(runs.items()):
    progress(f"[memory] {name}: {' '.join(cmd[:2])} ...")
    r = peak_rss(cmd, work / f"run{i}.log", name)
    rows.append({"name": name, "command": cmd, **r, "vs_gguf": r["peak_rss_bytes"] / size,
                 "vs_float32": r["peak_rss_bytes"] / f32})
    progress(f"[memory] {name}: peak RSS {r['peak_rss_bytes'] / 2**20:,.0f} MiB ({rows[-1]['vs_float32']:.2f}x the "
             f"float32 parameters) in {r['seconds']:.0f}s")
  shutil.rmtree(work / "workdir", ignore_errors=True)
  return {"model": key, "gguf": str(gguf), "gguf_bytes": size, "param_bytes": f32, "rows": rows}
