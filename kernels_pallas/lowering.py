"""Lowering kernels for a real TPU or GPU from any host (e.g. this CPU machine) with `jax.export`.

Lowering runs the Pallas-to-Mosaic (TPU) or Pallas-to-Triton (GPU) compiler front end, so block shapes that
break a target's tiling rules, or Triton's tensor-size limits, fail here as they would there. On-chip memory
(VMEM) is only checked by the TPU back end: `scripts/check_tpu_compile.py` runs that with a compile-only libtpu.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import jax

CUSTOM_CALLS = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}


def tpu_abstract_mesh(device_kind: str = "TPU v5 lite") -> jax.sharding.AbstractMesh:
  """A one-device abstract mesh whose device is a TPU: Pallas then lowers through Mosaic without a TPU."""
  from jax._src.mesh import AbstractDevice  # noqa: PLC0415  (not public in jax 0.10)
  return jax.sharding.AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
    device_kind=device_kind, num_cores=1, platform="tpu"))


@contextlib.contextmanager
def triton() -> Iterator[None]:
  """Pallas GPU calls lower through Triton (not Mosaic GPU) inside this block."""
  old = jax.config.jax_pallas_use_mosaic_gpu
  jax.config.update("jax_pallas_use_mosaic_gpu", False)
  try:
    yield
  finally:
    jax.config.update("jax_pallas_use_mosaic_gpu", old)


def export_for(backend: str, fn: Callable, args: Sequence[jax.ShapeDtypeStruct]) -> jax.export.Exported:
  """`fn` (jitted) lowered for backend "tpu" or "gpu" at the shapes of `args`."""
  if backend == "tpu":
    with jax.sharding.use_abstract_mesh(tpu_abstract_mesh()):
      return jax.export.export(fn, platforms=["tpu"])(*args)
  if backend == "gpu":
    with triton():
      return jax.export.export(fn, platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call(CUSTOM_CALLS["gpu"])])(*args)
  raise ValueError(f"backend={backend!r}: expected 'tpu' or 'gpu'")
