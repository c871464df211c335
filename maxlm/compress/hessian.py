"""A dense layer's calibration statistics, H = 2/N Σ x xᵀ, and the inverse-Hessian factor GPTQ / SparseGPT sweep with.

For y = x @ W (W [k, n]), the reconstruction error ||X W - X Ŵ||² = tr((W - Ŵ)ᵀ XᵀX (W - Ŵ)) depends on the inputs
only through XᵀX, so a layer's calibration is one [k, k] matrix. `accumulate` keeps the running mean over tokens
of 2 x xᵀ (GPTQ's H; the 2 is the derivative of the squared error, it cancels everywhere), always in float32, with
`count` the number of tokens seen (int32: up to 2**31 - 1 tokens). Wanda's per-input-channel ||X_j||² is not
stored separately: it is diag(Σ x xᵀ) = diag(h) * count / 2 (`HessianStats.input_sq_norms`).

`factor` is the set-up of the OBS sweep GPTQ and SparseGPT share (the IST-DASLab references): dead inputs
(h[i, i] == 0: the input is always 0) get h[i, i] = 1 and a zero weight row, the inputs are optionally reordered
(act_order), damp * mean(diag(h)) is added to the diagonal, and U is the upper Cholesky factor of H⁻¹
(H⁻¹ = UᵀU). Row i of U, divided by U[i, i], is the update that input i's error makes to the later inputs' weights
(Frantar et al. 2022).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST  # float32 products in full precision (no TF32 / bf16 passes on GPU / TPU)


@functools.partial(jax.tree_util.register_dataclass, data_fields=("h", "count"), meta_fields=())
@dataclasses.dataclass(frozen=True)
class HessianStats:
  """Running calibration statistics of one dense layer: h float32 [k, k] = 2/count Σ x xᵀ, count int32 [] tokens."""

  h: jax.Array
  count: jax.Array

  def input_sq_norms(self) -> jax.Array:
    """||X_j||² = Σ_tokens x_j² per input channel [k] (Wanda's statistic), recovered as diag(h) * count / 2."""
    return jnp.diagonal(self.h) * self.count.astype(jnp.float32) / 2


def zeros(k: int) -> HessianStats:
  """Empty statistics for a layer with k inputs (h = 0, count = 0): the start of `accumulate`."""
  return HessianStats(jnp.zeros((k, k), jnp.float32), jnp.zeros((), jnp.int32))


@jax.jit
def accumulate(stats: HessianStats, x: jax.Array, mask: jax.Array | None = None) -> HessianStats:
  """Adds the tokens x [..., k] (leading axes flattened; `mask` [...] False = padding, not counted) to `stats`.

  Running mean as GPTQ's reference keeps it: h <- h * c / (c + b) + 2 / (c + b) * xᵀx, in float32 whatever x's dtype.
  """
  k = stats.h.shape[0]
  if x.shape[-1] != k:
    raise ValueError(f"accumulate: x has {x.shape[-1]} input channels, the statistics {k}")
  xf = x.reshape(-1, k).astype(jnp.float32)
  if mask is None:
    b = jnp.asarray(xf.shape[0], jnp.int32)
  else:
    if mask.shape != x.shape[:-1]:
      raise ValueError(f"accumulate: mask shape {mask.shape} != x's token shape {x.shape[:-1]}")
    m = mask.reshape(-1).astype(bool)
    xf = jnp.where(m[:, None], xf, 0.0)
    b = jnp.sum(m, dtype=jnp.int32)
  total = stats.count + b
  denom = jnp.maximum(total, 1).astype(jnp.float32)  # no tokens at all: h stays 0
  xtx = jnp.matmul(xf.T, xf, precision=HIGHEST)
  h = stats.h * (stats.count.astype(jnp.float32) / denom) + (2.0 / denom) * xtx
  return HessianStats(h, total)


def check_layer(w: jax.Array, h: jax.Array, caller: str) -> None:
  """ValueError unless w is a float [k, n] weight and h a [k, k] matrix (shapes checked before any tracing)."""
  if getattr(w, "ndim", None) != 2:
    raise ValueError(f"{caller}: w must be a 2-D [in, out] weight, got shape {getattr(w, 'shape', None)}")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"{caller}: w must be floating point, got {w.dtype}")
  if getattr(h, "ndim", None) != 2 or h.shape[0] != h.shape[1]:
    raise ValueError(f"{caller}: h must be a square [k, k] matrix, got shape {getattr(h, 'shape', None)}")
  if h.shape[0] != w.shape[0]:
    raise ValueError(f"{caller}: h is [{h.shape[0]}, {h.shape[1]}] but w has {w.shape[0]} input rows (w is [in, out])")


def compute_dtype(w: jax.Array, h: jax.Array) -> jnp.dtype:
  """float32, or float64 when both inputs are float64 (only possible with jax x64 enabled)."""
  if w.dtype == jnp.float64 and h.dtype == jnp.float64:
    return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("act_order",))
def factor(w: jax.Array, h: jax.Array, damp: jax.Array, *, act_order: bool = False
           ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(w, U, perm, ok): the references' set-up of the OBS sweep, in processing order, U upper with UᵀU = H⁻¹.

  Dead inputs (h[i, i] == 0) get h[i, i] = 1 and w[i, :] = 0; act_order orders the inputs by decreasing diag(h)
  (stable); then damp * mean(diag h) is added to the diagonal. ok is False when U is not finite (the damped h is
  not positive definite; callers raise with `factor_ok`).
  """
  k = h.shape[0]
  dead = jnp.diagonal(h) == 0
  h = h + jnp.diag(dead.astype(h.dtype))
  w = jnp.where(dead[:, None], 0, w)
  perm = jnp.argsort(jnp.diagonal(h), descending=True, stable=True) if act_order else jnp.arange(k)
  w, h = w[perm], h[perm][:, perm]
  eye = jnp.eye(k, dtype=h.dtype)
  h = h + (damp * jnp.mean(jnp.diagonal(h))) * eye
  hinv = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(h), True), eye)  # cholesky, then cholesky_inverse
  hinv = (hinv + hinv.T) / 2  # exactly symmetric for the second factorization
  u = jnp.triu(jnp.linalg.cholesky(hinv).T)
  return w, u, perm.astype(jnp.int32), jnp.all(jnp.isfinite(u))


def factor_ok(ok: jax.Array, damp: float, caller: str) -> None:
  """ValueError when `ok` (all of the inverse factor finite) is False: h not positive definite even after damping."""
  if isinstance(ok, jax.core.Tracer):
    return  # inside a caller's jit: no concrete value to check
  if not bool(ok):
    raise ValueError(f"{caller}: h is not positive definite even after damping (damp={damp}): increase damp or "
                     "calibrate on more tokens")
