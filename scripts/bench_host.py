"""Host helpers shared by the benchmarks: malloc tuning, CPU-load snapshots, the machine record and --sections
parsing. Imports nothing heavy, so tune_malloc() can run before jax loads (scripts/ is on sys.path when a benchmark
runs)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def tune_malloc() -> bool:
  """maxlm.host.tune_malloc (what `maxlm train` applies on CPU hosts): call it before jax (and torch) load."""
  from maxlm.host import tune_malloc as tune  # noqa: PLC0415  (light: imports nothing heavy)
  return tune()


def cpu_snapshot() -> tuple[float, float, float]:
  """(wall s, CPU s busy on the whole machine, CPU s used by this process), for the background-load check."""
  busy = math.nan
  try:
    with open("/proc/stat") as f:
      fields = [float(v) for v in f.readline().split()[1:9]]
    busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
  except (OSError, ValueError):
    pass
  own = resource.getrusage(resource.RUSAGE_SELF)
  return time.perf_counter(), busy, own.ru_utime + own.ru_stime


_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve")  # what XLA's CPU GEMMs use
# machine()'s cpu_flags: the above plus the other extensions that change a GEMM's or a conversion's speed.
_MACHINE_FLAGS = (*_ISA_FLAGS, "avx512_vnni", "avx512_fp16", "amx_int8", "fma", "f16c")
_PACKAGES = ("jax", "jaxlib", "flax", "numpy", "torch", "transformers")  # versions machine() records
_ENV = ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")  # environment variables machine() records


def _cpuinfo() -> tuple[str, set[str]]:
  """(model name, flags) of the first CPU in /proc/cpuinfo; empty where it cannot be read (off Linux)."""
  name, flags = "", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not name:
          name = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
          flags = set(value.split())
  except OSError:
    pass
  return name, flags


def cpu_id() -> str | None:
  """The first CPU's family / model / stepping numbers (x86) or implementer / part (Arm) from /proc/cpuinfo, e.g.
  "family 25 model 17 stepping 1": virtual machines often report only "AMD EPYC", and two generations behind that
  name (double-pumped or full-width AVX-512) give different ratios. None where it cannot be read."""
  keys = ("cpu family", "model", "stepping", "CPU implementer", "CPU part")
  found: dict[str, str] = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if not key and found:
          break  # the first processor's block ends at a blank line
        if key in keys and key not in found:
          found[key] = value.strip()
  except OSError:
    return None
  parts = [f"{k.replace('cpu ', '').replace('CPU ', '').lower()} {found[k]}" for k in keys if k in found]
  return " ".join(parts) or None


def cpu_model() -> str:
  """The CPU's model name and its vector extensions, e.g. "AMD EPYC (avx2, avx512f)": benchmarks record it,
  since the same script gives different ratios on different CPUs."""
  name, flags = _cpuinfo()
  name = name or platform.processor() or platform.machine()
  isa = [f for f in _ISA_FLAGS if f in flags]
  return f"{name} ({', '.join(isa)})" if isa else name


def _version(package: str) -> str | None:
  """An installed distribution's version from its metadata (imports nothing), None where it is not installed."""
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def machine(malloc_tuned: bool | None = None) -> dict[str, Any]:
  """What a benchmark ran on and with (CPU, cores, kernel, package versions, thread/XLA environment): every
  benchmark JSON stores it under "machine", since the same script gives different ratios on different hosts.

  malloc_tuned is what the benchmark's tune_malloc() returned (None: the script does not tune malloc)."""
  _, flags = _cpuinfo()
  return {
    "cpu_model": cpu_model(), "cpu_id": cpu_id(), "cpu_flags": [f for f in _MACHINE_FLAGS if f in flags],
    "cpu_count": os.cpu_count(),
    "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    "machine": platform.machine(), "kernel": platform.release(), "python": platform.python_version(),
    **{package: _version(package) for package in _PACKAGES},
    **{name.lower(): os.environ.get(name) for name in _ENV},
    "malloc_tuning": malloc_tuned,
  }


def background_cores(start: tuple[float, float, float], end: tuple[float, float, float]) -> float:
  """Average number of cores other processes kept busy between two snapshots (NaN off Linux)."""
  wall, busy, own = (b - a for a, b in zip(start, end))
  return max(busy - own, 0.0) / wall if wall > 0 else math.nan


def parse_sections(parser: argparse.ArgumentParser, value: str, known: tuple[str, ...]) -> list[str]:
  """The comma-separated --sections value as a list; an unknown name is a usage error listing the known ones."""
  sections = [s.strip() for s in value.split(",") if s.strip()]
  unknown = [s for s in sections if s not in known]
  if unknown:
    parser.error(f"--sections: unknown {unknown}; known: {', '.join(known)}")
  return sections


def write_results(results: dict[str, Any], out: str | Path, plot: Callable[[Path], None] | None = None) -> None:
  """Writes a benchmark's JSON to `out` and, if `plot` is given, its PNG beside it (plot(png_path))."""
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2))
  print(f"wrote {out}")
  if plot is not None:
    png = out.with_suffix(".png")
    plot(png)
    print(f"wrote {png}")
