"""Host-process knobs for CPU runs, applied before jax starts: glibc malloc tuning and extra XLA flags.

They live in the config (`host.*`) rather than in code so that a TPU or GPU host is left alone: `auto` applies
them only where no accelerator device node exists. Nothing here imports jax.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

_applied: dict[str, object] = {}


def has_accelerator() -> bool:
  """Whether this host shows a TPU or NVIDIA/AMD GPU device node, or JAX_PLATFORMS asks for one (no jax import)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").lower()
  if platforms:
    return any(p in platforms for p in ("tpu", "cuda", "gpu", "rocm"))
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or glob.glob("/dev/nvidia[0-9]*")
              or os.path.exists("/dev/kfd"))


def tune_malloc() -> bool:
  """Keeps freed heap memory mapped (glibc): no fresh page faults for XLA's per-step temp buffer.

  XLA:CPU allocates one temp buffer per execution from a worker thread; glibc serves a large one from a fresh
  mmap and unmaps it on free, so every step page-faults the whole buffer again (~25% of a small-vocabulary step
  on the 2-core machines here). No mmap and no trimming keep it resident; one arena keeps worker threads on the
  same heap (this part only holds for threads started afterwards, so call it before jax loads). False where
  glibc's mallopt is unavailable.
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  return all(libc.mallopt(param, value) == 1
             for param, value in ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)))


def apply(cfg) -> dict[str, object]:
  """Applies cfg.host (malloc tuning, XLA flags) once per process, before jax loads; returns what was done.

  XLA flags are read when jax creates its backend, so they are refused (ValueError) once jax is imported.
  """
  if _applied:
    return dict(_applied)
  host = cfg.host
  cpu_only = not has_accelerator()
  tuning = host.malloc_tuning == "on" or (host.malloc_tuning == "auto" and cpu_only)
  _applied["malloc_tuning"] = tune_malloc() if tuning else False
  flags = host.xla_flags.strip()
  if flags and cpu_only:
    if "jax" in sys.modules:
      raise ValueError("host.xla_flags must be applied before jax is imported")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
  _applied["xla_flags"] = flags if cpu_only else ""
  return dict(_applied)
