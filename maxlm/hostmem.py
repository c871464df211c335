"""Host-memory tuning for XLA:CPU runs (benchmarks); imports nothing heavy, so it can run before jax loads."""

from __future__ import annotations

import ctypes


def tune_malloc() -> bool:
  """Keeps freed heap memory mapped (glibc): no fresh page faults for XLA's per-step temp buffer.

  XLA:CPU allocates one temp buffer per execution with posix_memalign from a worker thread; glibc serves a
  large one from a fresh mmap and unmaps it on free, so every step page-faults the whole buffer again (~25%
  of a small-vocabulary step here). One arena, no mmap and no trimming keep it resident. Must run before any
  thread allocates, i.e. before jax (and torch) are imported. False where glibc's mallopt is unavailable.
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  return all(libc.mallopt(param, value) == 1
             for param, value in ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)))
