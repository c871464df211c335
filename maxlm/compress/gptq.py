"""GPTQ (Frantar et al. 2022): quantize a dense layer's inputs one at a time, folding each one's error into the rest.

W is [k, n] = [in, out] (y = x @ W), so GPTQ's columns (input channels) are our rows. Input rows are quantized in
order (act_order: by decreasing diag(H), the busiest inputs first); row i's error e = (w_i - q_i) / U[i, i] is
subtracted from every later row j as e * U[i, j], U the upper Cholesky factor of the damped H⁻¹ (`hessian`), which is
the optimal (OBS) compensation of the still-unquantized weights. Updates are applied eagerly inside a block of rows
and to the rows after the block in one matmul at its end (the paper's lazy batch update).

Quantizer (the IST-DASLab reference's): per output channel and per group of `group` consecutive rows in processing
order, asymmetric min/max with 0 inside the range, or symmetric around zero point (maxq + 1) / 2; codes
q = clip(round(w / scale) + zero, 0, maxq), value scale * (q - zero). A group's parameters are computed when its
first row is reached, from the group's current weights (every earlier row's update applied).

Deviation from the reference: it takes those parameters from its lazily updated copy of W, which lacks the updates
of the current block's earlier rows when a group starts inside a block (group < block), so its result depends on
the block size. Here the block only batches updates: it is rounded to align with the groups (a multiple of group
dividing k, or a divisor of group) and does not change the result beyond float rounding. The result is the
reference's when its block divides the group (every group starts a block: e.g. group = block = 128); with group 32
and block 128 most codes differ (neither is consistently the lower error). Per-channel parameters (group -1) are
computed after dead rows are zeroed (the reference computes them from the weights before that).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from maxlm.compress.hessian import HIGHEST, check_layer, compute_dtype, factor, factor_ok

BITS = (2, 3, 4, 8)


@functools.partial(jax.tree_util.register_dataclass, data_fields=("codes", "scales", "zeros", "g_idx", "perm"),
                   meta_fields=("bits", "group", "sym"))
@dataclasses.dataclass(frozen=True)
class GPTQResult:
  """A quantized [k, n] weight: w[r] = scales[g_idx[r]] * (codes[r] - zeros[g_idx[r]]).

  codes uint8 [k, n] in the original row order; scales (compute dtype) and zeros int32 [ceil(k / group), n] in group
  order (processing order); g_idx int32 [k] = row's position in processing order // group; perm int32 [k] (the
  processing order, act_order) or None.
  """

  codes: jax.Array
  scales: jax.Array
  zeros: jax.Array
  g_idx: jax.Array
  perm: jax.Array | None
  bits: int
  group: int
  sym: bool

  def dequantize(self) -> jax.Array:
    """The float [k, n] weight the codes stand for, in the original row order and the scales' dtype."""
    scale, zero = self.scales[self.g_idx], self.zeros[self.g_idx].astype(self.scales.dtype)
    return scale * (self.codes.astype(self.scales.dtype) - zero)


def quant_params(x: jax.Array, maxq: int, sym: bool) -> tuple[jax.Array, jax.Array]:
  """(scale, zero) [n] of a group x [rows, n], per output channel (the reference's Quantizer.find_params)."""
  xmin = jnp.minimum(jnp.min(x, axis=0), 0)
  xmax = jnp.maximum(jnp.max(x, axis=0), 0)
  if sym:
    xmax = jnp.maximum(jnp.abs(xmin), xmax)
    xmin = jnp.where(xmin < 0, -xmax, xmin)
  empty = (xmin == 0) & (xmax == 0)
  xmin, xmax = jnp.where(empty, -1, xmin), jnp.where(empty, 1, xmax)
  scale = (xmax - xmin) / maxq
  zero = jnp.full_like(scale, (maxq + 1) // 2) if sym else jnp.round(-xmin / scale)
  return scale, zero


def quant_codes(x: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int) -> jax.Array:
  """Integer-valued float codes clip(round(x / scale) + zero, 0, maxq) (round half to even, as torch.round)."""
  return jnp.clip(jnp.round(x / scale) + zero, 0, maxq)


def _group_size(k: int, group: int, caller: str) -> int:
  """Rows per group: k for group -1 (or >= k), else group; when it does not divide k the last group is shorter
  (as in the reference: a group starts at every multiple of group)."""
  if not isinstance(group, int) or isinstance(group, bool) or (group <= 0 and group != -1):
    raise ValueError(f"{caller}: group={group!r}: expected -1 (one group per output channel) or a positive integer")
  if group == -1 or group >= k:
    return k
  return group


def _pad_rows(w: jax.Array, pad: int) -> jax.Array:
  """w with `pad` zero rows appended: a short last group padded with zeros has the same quantizer parameters (0 is
  always inside a group's range) and its zero rows quantize to exactly 0."""
  return jnp.pad(w, ((0, pad), (0, 0))) if pad else w


def _check(w: jax.Array, bits: int, group: int, caller: str) -> int:
  if bits not in BITS:
    raise ValueError(f"{caller}: bits={bits!r}: expected one of {BITS}")
  if getattr(w, "ndim", None) != 2:
    raise ValueError(f"{caller}: w must be a 2-D [in, out] weight, got shape {getattr(w, 'shape', None)}")
  return _group_size(w.shape[0], group, caller)


def _aligned_block(k: int, g: int, block: int) -> int:
  """The lazy-update block actually used: a multiple of g that divides k, or (g > block) a divisor of g."""
  if not isinstance(block, int) or isinstance(block, bool) or block < 1:
    raise ValueError(f"gptq_quantize: block={block!r}: expected a positive integer")
  if g <= block:
    return g * max(m for m in range(1, block // g + 1) if (k // g) % m == 0)
  return max(d for d in range(1, block + 1) if g % d == 0)


def gptq_quantize(w: jax.Array, h: jax.Array, *, bits: int, group: int, sym: bool, act_order: bool,
                  damp: float = 0.01, block: int = 128, static_groups: bool = False) -> GPTQResult:
  """GPTQ-quantizes w [k, n] (in, out) given the layer's h [k, k] (`hessian`): minimizes tr(ΔWᵀ H ΔW) greedily.

  group -1 (or >= k): one group per output channel. static_groups: every group's parameters are fixed beforehand
  from the weights as given, groups being consecutive input rows whatever the order (AutoGPTQ's static_groups, what
  llm-compressor's observers do); g_idx is then row // group. Computes in float32, or float64 for float64 inputs
  under x64.
  """
  g = _check(w, bits, group, "gptq_quantize")
  check_layer(w, h, "gptq_quantize")
  if not damp >= 0:
    raise ValueError(f"gptq_quantize: damp={damp!r} must be >= 0")
  dt = compute_dtype(w, h)
  k = w.shape[0]
  pad = -k % g
  b = _aligned_block(k + pad, g, block)
  wp, u, perm, ok = factor(w.astype(dt), h.astype(dt), jnp.asarray(damp, dt), act_order=bool(act_order))
  factor_ok(ok, damp, "gptq_quantize")
  inv = jnp.argsort(perm)
  static = None
  if static_groups:  # AutoGPTQ's static_groups: groups of consecutive input rows, parameters of the weights before
    # any update (dead rows zeroed); with act_order the rows are still visited by decreasing diag(h)
    groups = _pad_rows(wp[inv], pad).reshape(-1, g, w.shape[1])
    scales_s, zeros_s = jax.vmap(lambda x: quant_params(x, 2**bits - 1, bool(sym)))(groups)
    static = (scales_s, zeros_s, jnp.concatenate([perm // g, jnp.full((pad,), groups.shape[0] - 1, perm.dtype)]))
  if pad:  # a short last group (in processing order): zero rows with a unit, uncoupled factor change nothing
    wp = _pad_rows(wp, pad)
    u = jax.scipy.linalg.block_diag(u, jnp.eye(pad, dtype=u.dtype))
  codes, scales, zeros = _sweep(wp, u, static, bits=bits, g=g, sym=bool(sym), b=b)
  g_idx = (inv // g).astype(jnp.int32)
  if static_groups:
    scales, zeros, g_idx = static[0], static[1].astype(jnp.int32), (jnp.arange(k) // g).astype(jnp.int32)
  return GPTQResult(codes[:k][inv], scales, zeros, g_idx, perm if act_order else None, bits, g, bool(sym))


@functools.partial(jax.jit, static_argnames=("bits", "g", "sym", "b"))
def _sweep(w: jax.Array, hinv: jax.Array, static: tuple | None = None, *, bits: int, g: int, sym: bool, b: int
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(codes, scales, zeros) of w [k, n] in processing order, hinv its inverse factor (`factor`); b aligned with g.
  static = (scales [G, n], zeros [G, n], group of each row in processing order [k]): fixed parameters instead."""
  k, n = w.shape
  maxq = 2**bits - 1
  seg = min(g, b)  # rows quantized with one parameter computation inside a block
  cols, rows_b = jnp.arange(k), jnp.arange(b)

  def block_step(carry, i1):
    w, scale, zero = carry
    w1 = jax.lax.dynamic_slice_in_dim(w, i1, b)
    hinv1 = jax.lax.dynamic_slice(hinv, (i1, i1), (b, b))
    if g > b:  # groups start at block starts, where w is current for every later row
      new_scale, new_zero = quant_params(jax.lax.dynamic_slice_in_dim(w, i1, g), maxq, sym)
      start = i1 % g == 0
      scale, zero = jnp.where(start, new_scale, scale), jnp.where(start, new_zero, zero)

    def segment(si, state):
      w1, err1, codes1, scale, zero, seg_scale, seg_zero = state
      if g <= b:  # a group inside the block: its rows of w1 are current
        scale, zero = quant_params(jax.lax.dynamic_slice_in_dim(w1, si * seg, g), maxq, sym)

      def row(r, st):
        w1, err1, codes1 = st
        i = si * seg + r
        x = w1[i]
        s_, z_ = (scale, zero) if static is None else (static[0][static[2][i1 + i]], static[1][static[2][i1 + i]])
        c = quant_codes(x, s_, z_, maxq)
        err = (x - s_ * (c - z_)) / hinv1[i, i]
        w1 = w1 - jnp.where(rows_b > i, hinv1[i], 0)[:, None] * err[None, :]
        return w1, err1.at[i].set(err), codes1.at[i].set(c.astype(jnp.uint8))

      w1, err1, codes1 = jax.lax.fori_loop(0, seg, row, (w1, err1, codes1))
      return w1, err1, codes1, scale, zero, seg_scale.at[si].set(scale), seg_zero.at[si].set(zero)

    nseg = b // seg
    init = (w1, jnp.zeros_like(w1), jnp.zeros((b, n), jnp.uint8), scale, zero,
            jnp.zeros((nseg, n), w.dtype), jnp.zeros((nseg, n), w.dtype))
    _, err1, codes1, scale, zero, seg_scale, seg_zero = jax.lax.fori_loop(0, nseg, segment, init)
    later = jnp.where(cols[None, :] >= i1 + b, jax.lax.dynamic_slice_in_dim(hinv, i1, b, axis=0), 0)  # [b, k]
    w = w - jnp.matmul(later.T, err1, precision=HIGHEST)
    return (w, scale, zero), (codes1, seg_scale, seg_zero)

  zero_n = jnp.zeros((n,), w.dtype)
  _, (codes, scales, zeros) = jax.lax.scan(block_step, (w, zero_n, zero_n), jnp.arange(0, k, b))
  every = max(1, g // b)  # g > b: the parameters recorded per block repeat for g // b blocks
  scales, zeros = scales.reshape(-1, n)[::every], zeros.reshape(-1, n)[::every]
  return codes.reshape(k, n), scales, zeros.astype(jnp.int32)


def rtn_quantize(w: jax.Array, *, bits: int, group: int, sym: bool) -> GPTQResult:
  """Round-to-nearest baseline: GPTQ's quantizer on w [k, n] per group of consecutive rows, no error compensation."""
  g = _check(w, bits, group, "rtn_quantize")
  dt = jnp.float64 if w.dtype == jnp.float64 else jnp.float32
  k = w.shape[0]
  codes, scales, zeros = _rtn(_pad_rows(w.astype(dt), -k % g), bits=bits, g=g, sym=bool(sym))
  codes = codes[:k]
  g_idx = jnp.arange(k, dtype=jnp.int32) // g
  return GPTQResult(codes, scales, zeros, g_idx, None, bits, g, bool(sym))


@functools.partial(jax.jit, static_argnames=("bits", "g", "sym"))
def _rtn(w: jax.Array, *, bits: int, g: int, sym: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  k, n = w.shape
  maxq = 2**bits - 1
  groups = w.reshape(k // g, g, n)
  scale, zero = jax.vmap(lambda x: quant_params(x, maxq, sym))(groups)
  codes = quant_codes(groups, scale[:, None], zero[:, None], maxq)
  return codes.reshape(k, n).astype(jnp.uint8), scale, zero.astype(jnp.int32)


@jax.jit
def layer_error(w: jax.Array, wq: jax.Array, h: jax.Array) -> jax.Array:
  """tr((w - wq)ᵀ h (w - wq)): for h = 2/N XᵀX, 2/N ||X w - X wq||², the loss GPTQ and SparseGPT minimize."""
  dt = jnp.result_type(w, wq, h, jnp.float32)
  d = w.astype(dt) - wq.astype(dt)
  return jnp.sum(d * jnp.matmul(h.astype(dt), d, precision=HIGHEST))
