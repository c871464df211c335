"""SparseGPT (Frantar & Alistarh 2023): prune a dense layer's weights, compensating each pruned input in the rest.

The same OBS sweep as GPTQ (`gptq`; W [k, n] = [in, out], input rows processed in order, row i's error
(w_i - q_i) / U[i, i] subtracted from later rows j as err * U[i, j], U the upper Cholesky factor of the damped H⁻¹),
where "quantizing" a row means zeroing its pruned entries. Which entries, as the IST-DASLab reference chooses them,
by the OBS score w² / U[i, i]² on the current (already compensated) weights:
  * unstructured `sparsity`: at the start of each block of `block` rows, one threshold over the whole block
    [block, n]: the sorted scores' element at index int(numel * sparsity); every score <= it is pruned, so a block
    loses int(numel * sparsity) + 1 entries (more only on exact ties). The last block may be shorter (numel is its
    own). The mask depends on `block`.
  * `pattern` (n, m): at every m-th row, per output channel, the n lowest scores of the next m rows (ties: the lower
    row first; the reference's torch.topk leaves ties unspecified). `block` must be a multiple of m.
The result is exactly sparse: pruned entries are 0, kept ones carry the compensation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from maxlm.compress.hessian import HIGHEST, check_layer, compute_dtype, factor, factor_ok
from maxlm.compress.pruning_scores import check_target, nm_pruned


def sparsegpt_prune(w: jax.Array, h: jax.Array, *, sparsity: float | None = None,
                    pattern: tuple[int, int] | None = None, damp: float = 0.01,
                    block: int = 128) -> tuple[jax.Array, jax.Array]:
  """(pruned w [k, n], keep-mask bool [k, n]) of w [k, n] (in, out) given the layer's h [k, k] (`hessian`).

  Computes (and returns w) in float32, or float64 for float64 inputs under x64.
  """
  check_layer(w, h, "sparsegpt_prune")
  k, n = w.shape
  sparsity, pattern = check_target(k, sparsity, pattern, "sparsegpt_prune")
  if sparsity == 0:
    raise ValueError("sparsegpt_prune: sparsity=0 would still prune one entry per block (the reference's threshold "
                     "is inclusive): skip the layer instead")
  if not isinstance(block, int) or isinstance(block, bool) or block < 1:
    raise ValueError(f"sparsegpt_prune: block={block!r}: expected a positive integer")
  if pattern is not None and block % pattern[1]:
    raise ValueError(f"sparsegpt_prune: block={block} must be a multiple of the pattern's m={pattern[1]}")
  if not damp >= 0:
    raise ValueError(f"sparsegpt_prune: damp={damp!r} must be >= 0")
  dt = compute_dtype(w, h)
  # Each block's threshold index, int(numel * sparsity) over its real rows (the last block may be short).
  starts = range(0, k, block)
  thresh_idx = jnp.asarray([int(min(block, k - s) * n * sparsity) if sparsity else 0 for s in starts], jnp.int32)
  w, u, _, ok = factor(w.astype(dt), h.astype(dt), jnp.asarray(damp, dt))
  factor_ok(ok, damp, "sparsegpt_prune")
  out, pruned = _sweep(w, u, thresh_idx, b=block, pattern=pattern)
  return out, ~pruned


@functools.partial(jax.jit, static_argnames=("b", "pattern"))
def _sweep(w: jax.Array, hinv: jax.Array, thresh_idx: jax.Array, *, b: int,
           pattern: tuple[int, int] | None) -> tuple[jax.Array, jax.Array]:
  """(pruned w, pruned-mask) given the inverse factor (`factor`); rows padded to whole blocks with decoupled zero
  rows, cut after."""
  k, n = w.shape
  big = thresh_idx.shape[0] * b
  w = jnp.pad(w, ((0, big - k), (0, 0)))
  hinv_p = jnp.eye(big, dtype=w.dtype).at[:k, :k].set(hinv)  # padding rows: U = I, no coupling, zero error
  cols, rows_b = jnp.arange(big), jnp.arange(b)
  seg = b if pattern is None else pattern[1]  # rows whose pruning is decided together

  def block_step(w, xs):
    i1, t_idx = xs
    w1 = jax.lax.dynamic_slice_in_dim(w, i1, b)
    hinv1 = jax.lax.dynamic_slice(hinv_p, (i1, i1), (b, b))
    d = jnp.diagonal(hinv1)
    if pattern is None:
      score = w1**2 / (d**2)[:, None]
      score = jnp.where((i1 + rows_b < k)[:, None], score, jnp.inf)  # padding never sets the threshold
      block_pruned = score <= jnp.sort(score.reshape(-1))[t_idx]

    def segment(si, state):
      w1, err1, out1, pruned1 = state
      if pattern is None:
        seg_pruned = block_pruned
      else:  # n of the next m rows per output channel, on the current weights
        x = jax.lax.dynamic_slice_in_dim(w1, si * seg, seg)
        dd = jax.lax.dynamic_slice_in_dim(d, si * seg, seg)
        seg_pruned = jax.lax.dynamic_update_slice_in_dim(pruned1, nm_pruned(x**2 / (dd**2)[:, None], *pattern),
                                                         si * seg, axis=0)

      def row(r, st):
        w1, err1, out1 = st
        i = si * seg + r
        x = w1[i]
        q = jnp.where(seg_pruned[i], 0, x)
        err = (x - q) / hinv1[i, i]
        w1 = w1 - jnp.where(rows_b > i, hinv1[i], 0)[:, None] * err[None, :]
        return w1, err1.at[i].set(err), out1.at[i].set(q)

      w1, err1, out1 = jax.lax.fori_loop(0, seg, row, (w1, err1, out1))
      return w1, err1, out1, seg_pruned

    init = (w1, jnp.zeros_like(w1), jnp.zeros_like(w1), jnp.zeros((b, n), bool))
    _, err1, out1, pruned1 = jax.lax.fori_loop(0, b // seg, segment, init)
    later = jnp.where(cols[None, :] >= i1 + b, jax.lax.dynamic_slice_in_dim(hinv_p, i1, b, axis=0), 0)  # [b, big]
    w = w - jnp.matmul(later.T, err1, precision=HIGHEST)
    return w, (out1, pruned1)

  _, (out, pruned) = jax.lax.scan(block_step, w, (jnp.arange(0, big, b), thresh_idx))
  return out.reshape(big, n)[:k], pruned.reshape(big, n)[:k]
