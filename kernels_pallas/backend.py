"""Which backend a kernel is built for, and whether it runs in the Pallas interpreter.

Kernels take `backend` ("tpu", "gpu" or "cpu") explicitly so that they can be lowered for a target other than
the machine they are traced on (jax.export from a CPU host). None means the default jax backend.
"""

from __future__ import annotations

import jax

BACKENDS = ("tpu", "gpu", "cpu")


def resolve(backend: str | None) -> str:
  """The kernel formulation to build: "tpu" (Mosaic), "gpu" (Triton) or "cpu" (the GPU formulation, interpreted).

  On "cpu" the kernels run their GPU (Triton-style, in-kernel loop) formulation in the Pallas interpreter: its loop
  interprets as one XLA while loop per program, far faster than interpreting the TPU formulation's grid.
  """
  if backend is None:
    backend = jax.default_backend()
  backend = {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend)
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
  return backend


def interpret_default(backend: str, interpret: bool | None) -> bool:
  """`interpret` as given, else True exactly when the kernel would run on CPU (no Pallas compiler there)."""
  return backend == "cpu" if interpret is None else interpret
