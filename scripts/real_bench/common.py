"""What the sections share: targets, engines, alternating timing, memory bandwidth."""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from decode_bench.common import progress

TARGETS = {"ppl_rel_diff": 0.001, "hf_ratio_batch1": 3.0, "spec_speedup": 1.5}

Run = Callable[[], tuple[float, list[list[int]]]]  # one timed workload: (wall seconds, generated ids)


def engine(model, cfg, tokenizer, draft=None):
  """An Engine on the first device. Over the per-layer models here (model.scan_layers=false) engines share the
  parameter arrays; a scanned model would be sliced into a copy per engine."""
  from maxlm import sharding
  from maxlm.serve.engine import Engine

  return Engine(model, cfg, tokenizer, draft=draft, mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:1]))


def measure(runs: dict[str, Run], *, warmup: int | dict[str, int], repeats: int,
            label: str) -> tuple[dict[str, list[float]], dict[str, list[list[int]]]]:
  """Times each workload `repeats` times, alternating between them after `warmup` untimed runs of each (or
  warmup[name]; compiles, caches); returns ({name: seconds per run}, {name: the last run's outputs})."""
  for name, run in runs.items():
    t0 = time.perf_counter()
    for _ in range(warmup[name] if isinstance(warmup, dict) else warmup):
      run()
    progress(f"{label} warm-up {name}: {time.perf_counter() - t0:.1f}s")
  times: dict[str, list[float]] = {name: [] for name in runs}
  outs = {}
  for r in range(repeats):
    for name, run in runs.items():
      dt, outs[name] = run()
      times[name].append(dt)
    progress(f"{label} round {r + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()))
  return times, outs


def median(values: list[float]) -> float:
  """The median (the report's statistic of repeated timings)."""
  return statistics.median(values)


def memory_bandwidth(mib: int = 512, repeats: int = 5) -> dict:
  """Read bandwidth of main memory (bytes/s): the best of `repeats` sums of a `mib` MiB float32 array (far larger
  than the caches), by XLA (its threads, as maxlm's decode uses them) and by numpy (one thread)."""
  n = mib * 2**20 // 4
  total = jax.jit(jnp.sum)
  best_xla = _best_sum(lambda a: total(a).block_until_ready(), jnp.ones((n,), jnp.float32), repeats)
  best_np = _best_sum(np.sum, np.ones(n, np.float32), repeats)
  gc.collect()
  nbytes = n * 4
  return {"array_mib": mib, "xla_bytes_per_sec": nbytes / best_xla, "numpy_bytes_per_sec": nbytes / best_np,
          "bytes_per_sec": nbytes / min(best_xla, best_np)}


def _best_sum(fn: Callable, array, repeats: int) -> float:
  """The fastest of `repeats` timed fn(array) calls, after one untimed (compiling) call."""
  fn(array)
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn(array)
    best = min(best, time.perf_counter() - t0)
  return best


def release() -> None:
  """Frees what a finished model left (Python cycles, XLA's cached buffers)."""
  gc.collect()
  jax.clear_caches()
