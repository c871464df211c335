"""Score-based pruning masks of a dense layer's weight W [k, n] = [in, out]: magnitude and Wanda (Sun et al. 2023).

A mask is bool [k, n], True = kept. The target is either `sparsity` (the fraction pruned; the count pruned is
int(size * sparsity), as the references compute it) or `pattern` (n, m): n of every m consecutive inputs pruned per
output channel (2:4 keeps 2 of each 4, the layout sparse tensor cores run).

  * magnitude: score |W_ij|; unstructured compares over the whole layer.
  * Wanda: score |W_ij| * ||X_i|| (the input channel's norm over the calibration tokens, the square root of
    `HessianStats.input_sq_norms`); unstructured compares within each output channel: every column loses
    int(k * sparsity) of its k inputs.

Ties are broken by position, deterministically: among equal scores the lower index (row-major over the layer for
magnitude's unstructured mask, the lower input row otherwise) is pruned first (a stable sort, as Wanda's code).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def check_target(k: int, sparsity: float | None, pattern: tuple[int, int] | None,
                 caller: str) -> tuple[float | None, tuple[int, int] | None]:
  """Validated (sparsity, pattern): exactly one given, 0 <= sparsity < 1, 0 < n < m with m dividing k."""
  if (sparsity is None) == (pattern is None):
    raise ValueError(f"{caller}: give exactly one of sparsity= (a fraction) or pattern= ((n, m), e.g. (2, 4))")
  if sparsity is not None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
      raise ValueError(f"{caller}: sparsity={sparsity!r}: expected a fraction in [0, 1)")
    return float(sparsity), None
  try:
    n, m = (int(v) for v in pattern)
  except (TypeError, ValueError):
    raise ValueError(f"{caller}: pattern={pattern!r}: expected (n, m), n pruned of every m inputs") from None
  if not 0 < n < m:
    raise ValueError(f"{caller}: pattern=({n}, {m}): expected 0 < n < m (n pruned of every m inputs)")
  if k % m:
    raise ValueError(f"{caller}: pattern=({n}, {m}): m={m} does not divide the input dimension k={k}")
  return None, (n, m)


def lowest(score: jax.Array, count: int, axis: int) -> jax.Array:
  """bool: True at the `count` lowest scores along `axis` (ties: the lower index first)."""
  order = jnp.argsort(score, axis=axis, stable=True)
  rank = jnp.argsort(order, axis=axis, stable=True)
  return rank < count


def nm_pruned(score: jax.Array, n: int, m: int) -> jax.Array:
  """bool [k, cols]: True at the n lowest scores of every m consecutive rows, per column (ties: lower row first)."""
  k, cols = score.shape
  return lowest(score.reshape(k // m, m, cols), n, axis=1).reshape(k, cols)


def _float(w: jax.Array) -> jax.Array:
  """w in float32, or float64 when it is (x64): no ties made by rounding the scores."""
  return w.astype(jnp.promote_types(w.dtype, jnp.float32))


def _check_weight(w: jax.Array, caller: str) -> None:
  if getattr(w, "ndim", None) != 2:
    raise ValueError(f"{caller}: w must be a 2-D [in, out] weight, got shape {getattr(w, 'shape', None)}")


def magnitude_mask(w: jax.Array, *, sparsity: float | None = None,
                   pattern: tuple[int, int] | None = None) -> jax.Array:
  """Keep-mask (bool [k, n]) pruning the smallest |w|: int(size * sparsity) over the layer, or n of m per column."""
  _check_weight(w, "magnitude_mask")
  sparsity, pattern = check_target(w.shape[0], sparsity, pattern, "magnitude_mask")
  return _mask(jnp.abs(_float(w)), sparsity=sparsity, pattern=pattern, per_column=False)


def wanda_scores(w: jax.Array, input_norms: jax.Array) -> jax.Array:
  """Wanda's importance |W_ij| * ||X_i|| [k, n] (float32, or float64 for float64 w); input_norms [k]: ||X_i||."""
  _check_weight(w, "wanda_scores")
  if getattr(input_norms, "shape", None) != (w.shape[0],):
    raise ValueError(f"wanda: input_norms must be [k]=[{w.shape[0]}] (one norm per input row of w), "
                     f"got shape {getattr(input_norms, 'shape', None)}")
  w = _float(w)
  return jnp.abs(w) * input_norms.astype(w.dtype)[:, None]


def wanda_mask(w: jax.Array, input_norms: jax.Array, *, sparsity: float | None = None,
               pattern: tuple[int, int] | None = None) -> jax.Array:
  """Wanda keep-mask (bool [k, n]): per output channel, prune the lowest |W_ij| * ||X_i|| (int(k * s), or n of m)."""
  score = wanda_scores(w, input_norms)
  sparsity, pattern = check_target(w.shape[0], sparsity, pattern, "wanda_mask")
  return _mask(score, sparsity=sparsity, pattern=pattern, per_column=True)


@functools.partial(jax.jit, static_argnames=("sparsity", "pattern", "per_column"))
def _mask(score: jax.Array, *, sparsity: float | None, pattern: tuple[int, int] | None,
          per_column: bool) -> jax.Array:
  """Keep-mask from scores: the lowest pruned per column or over the layer (sparsity), or n of every m rows."""
  if pattern is not None:
    return ~nm_pruned(score, *pattern)
  if per_column:
    return ~lowest(score, int(score.shape[0] * sparsity), axis=0)
  return ~lowest(score.reshape(-1), int(score.size * sparsity), axis=0).reshape(score.shape)
