"""Flash attention in Pallas: blockwise online softmax forward, dq and dk/dv backward kernels, `jax.custom_vjp`.

Memory is O(seq): the forward keeps only [block_q, block_kv] scores per step and saves the per-row log-sum-exp
(lse); the backward recomputes the probabilities block by block from q, k and lse (FlashAttention-2).

Two formulations of the same block math (`_attend`, `_block_grads`):
- "tpu" (Mosaic): the key/value (or, for dk/dv, the query) blocks are a grid axis marked "arbitrary", the
  accumulators live in VMEM scratch, and invisible blocks are skipped with `pl.when` while their index_map is
  clamped to a visible block, so the pipeline issues no DMA for them. Nothing scales with seq in VMEM.
- "gpu" (Triton): Triton has no sequential grid axes with scratch, so each program owns one output block and
  loops over the visible blocks of the other side with `lax.fori_loop`, loading them from global memory.
The "cpu" backend runs the gpu formulation in the Pallas interpreter (its in-kernel loop compiles to one XLA
while loop per program, much faster to interpret than a grid axis).

Layout follows `jax.nn.dot_product_attention`: q [batch, seq, heads, head_dim], k/v [batch, seq, kv_heads,
head_dim]. Kernels work head-major ([batch, heads, seq, head_dim]); GQA/MQA maps query head h to key/value
head h // (heads // kv_heads) in the index maps, so K/V are never repeated. Sequences are padded to a
multiple of the block sizes and padded keys are masked.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from kernels_pallas import backend as backends
from kernels_pallas import masking

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query/key rows per block: forward, and backward (shared by the dq and dk/dv kernels)."""
  block_q: int
  block_kv: int
  block_q_bwd: int
  block_kv_bwd: int

  def all(self) -> tuple[int, ...]:
    return (self.block_q, self.block_kv, self.block_q_bwd, self.block_kv_bwd)


# On-chip memory per program at head_dim 128 (bf16 in, f32 accumulators; see `onchip_bytes`):
# - TPU (VMEM 16 MiB scoped by default on v4/v5e/v5p/v6e, 64-128 MiB physical): forward 512x512 holds
#   double-buffered q/k/v/o blocks (1 MiB), the f32 accumulator (256 KiB) and scores/probabilities (2 MiB);
#   backward 256x256 about 2 MiB. Multiples of 128 keep the MXU (128x128 / 256x256) full and satisfy Mosaic's
#   (8, 128) tiling of the key segment-id blocks.
# - GPU (Triton; shared memory 164 KiB on A100, 228 KiB on H100; 64K registers per SM): 64x64 forward keeps the
#   [64, 128] f32 accumulator at 64 registers per thread over 4 warps; the dk/dv program keeps two such
#   accumulators, so its query block is 32.
# - CPU (interpreter): larger blocks mean fewer interpreted loop iterations.
DEFAULT_BLOCK_SIZES = {
  "tpu": BlockSizes(512, 512, 256, 256),
  "gpu": BlockSizes(64, 64, 32, 64),
  "cpu": BlockSizes(512, 512, 512, 512),
}


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static description of one call: hashable, so it can be a nondiff argument of the custom_vjp."""
  causal: bool
  window: int | None
  sm_scale: float
  seq_len: int  # real (unpadded) length
  padded_len: int
  group: int  # query heads per key/value head
  blocks: BlockSizes
  backend: str
  interpret: bool
  has_segments: bool


# ---------------------------------------------------------------------------------------------------------------
# Shared block math.


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  """2-D matmul contracting a's dim contract[0] with b's contract[1], accumulated in f32."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == _F32 else None
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision,
                             preferred_element_type=_F32)


def _mask(cfg: _Config, q_start, k_start, rows: int, cols: int, q_seg, k_seg) -> jax.Array | None:
  """[rows, cols] visibility of a block: causal, window, same segment, and real (unpadded) keys."""
  q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
  k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
  real = k_pos < cfg.seq_len if cfg.padded_len != cfg.seq_len else None
  # Segment ids are [rows, 1] and [1, cols] blocks.
  return masking.visible(q_pos, k_pos, causal=cfg.causal, sliding_window=cfg.window, q_segment_ids=q_seg,
                         kv_segment_ids=k_seg, kv_valid=real)


def _kv_range(cfg: _Config, q_start, rows: int, block_kv: int):
  """[lo, hi) of key blocks with any key visible from query rows q_start..q_start+rows-1."""
  k_lo, k_hi = masking.key_range(q_start, q_start + rows - 1, causal=cfg.causal, sliding_window=cfg.window,
                                 num_keys=cfg.seq_len)
  return k_lo // block_kv, k_hi // block_kv + 1


def _q_range(cfg: _Config, k_start, cols: int, block_q: int):
  """[lo, hi) of query blocks (real rows only) that see any key of k_start..k_start+cols-1."""
  q_lo, q_hi = masking.query_range(k_start, k_start + cols - 1, causal=cfg.causal, sliding_window=cfg.window,
                                   num_queries=cfg.seq_len)
  return q_lo // block_q, q_hi // block_q + 1


def _attend(cfg: _Config, q, k, v, q_seg, k_seg, q_start, k_start, m, denom, acc):
  """One online-softmax step: folds key block k/v into the running max m, denominator and output acc."""
  s = _dot(q, k, (1, 1)) * cfg.sm_scale  # [bq, bk] f32
  mask = _mask(cfg, q_start, k_start, *s.shape, q_seg, k_seg)
  if mask is not None:
    s = jnp.where(mask, s, masking.MASK_VALUE)
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  p = jnp.exp(s - m_new)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)  # rows with nothing visible yet: s - m_new = 0, so mask explicitly
  alpha = jnp.exp(m - m_new)
  denom = alpha * denom + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + _dot(p.astype(v.dtype), v, (1, 0))
  return m_new, denom, acc


def _finish(m, denom, acc, dtype):
  """Normalised output and lse; a row that saw no key outputs 0 (its lse is never used unmasked)."""
  empty = denom == 0.0
  out = acc / jnp.where(empty, 1.0, denom)
  lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, denom)))
  return out.astype(dtype), lse


def _block_grads(cfg: _Config, q, k, v, do, lse, delta, q_seg, k_seg, q_start, k_start):
  """Probabilities p and score gradients ds (both f32 [bq, bk]) of one block, recomputed from lse."""
  s = _dot(q, k, (1, 1)) * cfg.sm_scale
  p = jnp.exp(s - lse)
  mask = _mask(cfg, q_start, k_start, *s.shape, q_seg, k_seg)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dp = _dot(do, v, (1, 1))
  ds = p * (dp - delta)
  return p, ds


# ---------------------------------------------------------------------------------------------------------------
# TPU formulation: sequential grid axes, VMEM scratch accumulators.


def _seg_refs(cfg: _Config, refs: list):
  """Pops the (q_seg, k_seg) refs off the front of `refs` when the call has segment ids."""
  return (refs.pop(0), refs.pop(0)) if cfg.has_segments else (None, None)


def _fwd_tpu_kernel(cfg: _Config, q_ref, k_ref, v_ref, *refs):
  refs = list(refs)
  qs_ref, ks_ref = _seg_refs(cfg, refs)
  o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  bq, bk = cfg.blocks.block_q, cfg.blocks.block_kv
  i, j = pl.program_id(2), pl.program_id(3)
  lo, hi = _kv_range(cfg, i * bq, bq, bk)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, masking.MASK_VALUE, _F32)
    l_sc[...] = jnp.zeros(l_sc.shape, _F32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

  @pl.when((j >= lo) & (j < hi))
  def _step():
    q_seg = None if qs_ref is None else qs_ref[...]
    k_seg = None if ks_ref is None else ks_ref[...]
    m_sc[...], l_sc[...], acc_sc[...] = _attend(cfg, q_ref[...], k_ref[...], v_ref[...], q_seg, k_seg, i * bq,
                                                j * bk, m_sc[...], l_sc[...], acc_sc[...])

  @pl.when(j == pl.num_programs(3) - 1)
  def _done():
    o_ref[...], lse_ref[...] = _finish(m_sc[...], l_sc[...], acc_sc[...], o_ref.dtype)


def _dq_tpu_kernel(cfg: _Config, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
  refs = list(refs)
  qs_ref, ks_ref = _seg_refs(cfg, refs)
  dq_ref, dq_sc = refs
  bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_kv_bwd
  i, j = pl.program_id(2), pl.program_id(3)
  lo, hi = _kv_range(cfg, i * bq, bq, bk)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)

  @pl.when((j >= lo) & (j < hi))
  def _step():
    k = k_ref[...]
    _, ds = _block_grads(cfg, q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
                         None if qs_ref is None else qs_ref[...], None if ks_ref is None else ks_ref[...],
                         i * bq, j * bk)
    dq_sc[...] += _dot(ds.astype(k.dtype), k, (1, 0))

  @pl.when(j == pl.num_programs(3) - 1)
  def _done():
    dq_ref[...] = (dq_sc[...] * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_tpu_kernel(cfg: _Config, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
  refs = list(refs)
  qs_ref, ks_ref = _seg_refs(cfg, refs)
  dk_ref, dv_ref, dk_sc, dv_sc = refs
  bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_kv_bwd
  j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  lo, hi = _q_range(cfg, j * bk, bk, bq)

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)

  @pl.when((i >= lo) & (i < hi))
  def _step():
    q, do = q_ref[...], do_ref[...]
    p, ds = _block_grads(cfg, q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...],
                         None if qs_ref is None else qs_ref[...], None if ks_ref is None else ks_ref[...],
                         i * bq, j * bk)
    dv_sc[...] += _dot(p.astype(do.dtype), do, (0, 0))
    dk_sc[...] += _dot(ds.astype(q.dtype), q, (0, 0))

  @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
  def _done():
    dk_ref[...] = (dk_sc[...] * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _clamp(x, lo, hi):
  """x clamped into the visible block range [lo, hi): skipped steps revisit a fetched block (no new DMA)."""
  return jnp.minimum(jnp.maximum(x, lo), jnp.maximum(hi - 1, lo))


def _fwd_tpu(cfg: _Config, q, k, v, q_seg, k_seg):
  b, h, s, d = q.shape
  bq, bk = cfg.blocks.block_q, cfg.blocks.block_kv
  g = cfg.group

  def kv_block(i, j):
    return _clamp(j, *_kv_range(cfg, i * bq, bq, bk))

  in_specs = [pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0)),
              pl.BlockSpec((None, None, bk, d), lambda b_, h_, i, j: (b_, h_ // g, kv_block(i, j), 0)),
              pl.BlockSpec((None, None, bk, d), lambda b_, h_, i, j: (b_, h_ // g, kv_block(i, j), 0))]
  args = [q, k, v]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, bq, 1), lambda b_, h_, i, j: (b_, i, 0)),
                 pl.BlockSpec((None, 1, bk), lambda b_, h_, i, j: (b_, 0, kv_block(i, j)))]
    args += [q_seg, k_seg]
  return pl.pallas_call(
    functools.partial(_fwd_tpu_kernel, cfg),
    grid=(b, h, s // bq, s // bk),
    in_specs=in_specs,
    out_specs=[pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0)),
               pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i, j: (b_, h_, i, 0))],
    out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, s, 1), _F32)],
    scratch_shapes=[pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, d), _F32)],
    compiler_params=_tpu_params(4),
    interpret=cfg.interpret,
    name="flash_attention_fwd",
  )(*args)


def _bwd_tpu(cfg: _Config, q, k, v, o_res, do, lse, delta, q_seg, k_seg):
  del o_res
  b, h, s, d = q.shape
  kvh = k.shape[1]
  bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_kv_bwd
  g = cfg.group
  nq, nk = s // bq, s // bk

  # dq: one query block per program, key blocks on the sequential last axis.
  def kv_block(i, j):
    return _clamp(j, *_kv_range(cfg, i * bq, bq, bk))

  q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i, j: (b_, h_, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h_, i, j: (b_, h_ // g, kv_block(i, j), 0))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  args = [q, k, v, do, lse, delta]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, bq, 1), lambda b_, h_, i, j: (b_, i, 0)),
                 pl.BlockSpec((None, 1, bk), lambda b_, h_, i, j: (b_, 0, kv_block(i, j)))]
    args += [q_seg, k_seg]
  dq = pl.pallas_call(
    functools.partial(_dq_tpu_kernel, cfg),
    grid=(b, h, nq, nk),
    in_specs=in_specs,
    out_specs=q_spec,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    scratch_shapes=[pltpu.VMEM((bq, d), _F32)],
    compiler_params=_tpu_params(4),
    interpret=cfg.interpret,
    name="flash_attention_dq",
  )(*args)

  # dk, dv: one key block per program; the group's query heads and the query blocks are sequential axes.
  def q_block(j, i):
    return _clamp(i, *_q_range(cfg, j * bk, bk, bq))

  q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, k_, j, g_, i: (b_, k_ * g + g_, q_block(j, i), 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda b_, k_, j, g_, i: (b_, k_ * g + g_, q_block(j, i), 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, k_, j, g_, i: (b_, k_, j, 0))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, bq, 1), lambda b_, k_, j, g_, i: (b_, q_block(j, i), 0)),
                 pl.BlockSpec((None, 1, bk), lambda b_, k_, j, g_, i: (b_, 0, j))]
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_tpu_kernel, cfg),
    grid=(b, kvh, nk, g, nq),
    in_specs=in_specs,
    out_specs=[kv_spec, kv_spec],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    scratch_shapes=[pltpu.VMEM((bk, d), _F32), pltpu.VMEM((bk, d), _F32)],
    compiler_params=_tpu_params(5),
    interpret=cfg.interpret,
    name="flash_attention_dkv",
  )(*args)
  return dq, dk, dv


def _tpu_params(ndim: int) -> pltpu.CompilerParams:
  """Batch/head/output-block axes run in parallel (megacore); the reduction axes are sequential."""
  semantics = ("parallel", "parallel", "parallel") + ("arbitrary",) * (ndim - 3)
  return pltpu.CompilerParams(dimension_semantics=semantics)


# ---------------------------------------------------------------------------------------------------------------
# GPU formulation (also the CPU one): a program per output block loops over the visible blocks.


def _fwd_loop_kernel(cfg: _Config, q_ref, k_ref, v_ref, *refs):
  refs = list(refs)
  qs_ref, ks_ref = _seg_refs(cfg, refs)
  o_ref, lse_ref = refs
  bq, bk = cfg.blocks.block_q, cfg.blocks.block_kv
  i = pl.program_id(2)
  q = q_ref[...]
  q_seg = None if qs_ref is None else qs_ref[...]

  def body(j, carry):
    keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
    k_seg = None if ks_ref is None else ks_ref[:, keys]
    return _attend(cfg, q, k_ref[keys, :], v_ref[keys, :], q_seg, k_seg, i * bq, j * bk, *carry)

  init = (jnp.full((bq, 1), masking.MASK_VALUE, _F32), jnp.zeros((bq, 1), _F32), jnp.zeros(q.shape, _F32))
  lo, hi = _kv_range(cfg, i * bq, bq, bk)
  o_ref[...], lse_ref[...] = _finish(*jax.lax.fori_loop(lo, hi, body, init), o_ref.dtype)


def _dq_loop_kernel(cfg: _Config, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
  refs = list(refs)
  qs_ref, ks_ref = _seg_refs(cfg, refs)
  (dq_ref,) = refs
  bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_kv_bwd
  i = pl.program_id(2)
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_seg = None if qs_ref is None else qs_ref[...]

  def body(j, dq):
    keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
    k = k_ref[keys, :]
    _, ds = _block_grads(cfg, q, k, v_ref[keys, :], do, lse, delta, q_seg,
                         None if ks_ref is None else ks_ref[:, keys], i * bq, j * bk)
    return dq + _dot(ds.astype(k.dtype), k, (1, 0))

  lo, hi = _kv_range(cfg, i * bq, bq, bk)
  dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, _F32))
  dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_loop_kernel(cfg: _Config, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
  refs = list(refs)
  qs_ref, ks_ref = _seg_refs(cfg, refs)
  dk_ref, dv_ref = refs
  bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_kv_bwd
  j = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  k_seg = None if ks_ref is None else ks_ref[...]
  lo, hi = _q_range(cfg, j * bk, bk, bq)
  dk = jnp.zeros(k.shape, _F32)
  dv = jnp.zeros(v.shape, _F32)
  for g in range(cfg.group):  # the query heads sharing this key/value head (static: the group is small)

    def body(i, carry, g=g):
      dk, dv = carry
      rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
      q, do = q_ref[g, rows, :], do_ref[g, rows, :]
      p, ds = _block_grads(cfg, q, k, v, do, lse_ref[g, rows, :], delta_ref[g, rows, :],
                           None if qs_ref is None else qs_ref[rows, :], k_seg, i * bq, j * bk)
      return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv + _dot(p.astype(do.dtype), do, (0, 0))

    dk, dv = jax.lax.fori_loop(lo, hi, body, (dk, dv))
  dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_params(cfg: _Config, head_dim: int):
  if cfg.backend != "gpu":
    return None
  return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _fwd_loop(cfg: _Config, q, k, v, q_seg, k_seg):
  b, h, s, d = q.shape
  bq, g = cfg.blocks.block_q, cfg.group
  in_specs = [pl.BlockSpec((None, None, bq, d), lambda b_, h_, i: (b_, h_, i, 0)),
              pl.BlockSpec((None, None, s, d), lambda b_, h_, i: (b_, h_ // g, 0, 0)),
              pl.BlockSpec((None, None, s, d), lambda b_, h_, i: (b_, h_ // g, 0, 0))]
  args = [q, k, v]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, bq, 1), lambda b_, h_, i: (b_, i, 0)),
                 pl.BlockSpec((None, 1, s), lambda b_, h_, i: (b_, 0, 0))]
    args += [q_seg, k_seg]
  return pl.pallas_call(
    functools.partial(_fwd_loop_kernel, cfg),
    grid=(b, h, s // bq),
    in_specs=in_specs,
    out_specs=[pl.BlockSpec((None, None, bq, d), lambda b_, h_, i: (b_, h_, i, 0)),
               pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i: (b_, h_, i, 0))],
    out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, s, 1), _F32)],
    compiler_params=_gpu_params(cfg, d),
    interpret=cfg.interpret,
    name="flash_attention_fwd",
  )(*args)


def _bwd_loop(cfg: _Config, q, k, v, o_res, do, lse, delta, q_seg, k_seg):
  del o_res
  b, h, s, d = q.shape
  kvh = k.shape[1]
  bq, bk, g = cfg.blocks.block_q_bwd, cfg.blocks.block_kv_bwd, cfg.group

  q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i: (b_, h_, i, 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i: (b_, h_, i, 0))
  kv_spec = pl.BlockSpec((None, None, s, d), lambda b_, h_, i: (b_, h_ // g, 0, 0))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  args = [q, k, v, do, lse, delta]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, bq, 1), lambda b_, h_, i: (b_, i, 0)),
                 pl.BlockSpec((None, 1, s), lambda b_, h_, i: (b_, 0, 0))]
    args += [q_seg, k_seg]
  dq = pl.pallas_call(
    functools.partial(_dq_loop_kernel, cfg),
    grid=(b, h, s // bq),
    in_specs=in_specs,
    out_specs=q_spec,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=_gpu_params(cfg, d),
    interpret=cfg.interpret,
    name="flash_attention_dq",
  )(*args)

  # All of a key/value head's query heads (the GQA group) are one block of g heads.
  q_spec = pl.BlockSpec((None, g, s, d), lambda b_, k_, j: (b_, k_, 0, 0))
  row_spec = pl.BlockSpec((None, g, s, 1), lambda b_, k_, j: (b_, k_, 0, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, k_, j: (b_, k_, j, 0))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, s, 1), lambda b_, k_, j: (b_, 0, 0)),
                 pl.BlockSpec((None, 1, bk), lambda b_, k_, j: (b_, 0, j))]
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_loop_kernel, cfg),
    grid=(b, kvh, s // bk),
    in_specs=in_specs,
    out_specs=[kv_spec, kv_spec],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=_gpu_params(cfg, d),
    interpret=cfg.interpret,
    name="flash_attention_dkv",
  )(*args)
  return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------
# custom_vjp over the head-major, padded operands.


def _forward(cfg: _Config, q, k, v, q_seg, k_seg):
  return (_fwd_tpu if cfg.backend == "tpu" else _fwd_loop)(cfg, q, k, v, q_seg, k_seg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, q_seg, k_seg):
  return _forward(cfg, q, k, v, q_seg, k_seg)[0]


def _flash_fwd(cfg: _Config, q, k, v, q_seg, k_seg):
  o, lse = _forward(cfg, q, k, v, q_seg, k_seg)
  return o, (q, k, v, q_seg, k_seg, o, lse)


def _flash_bwd(cfg: _Config, res, do):
  q, k, v, q_seg, k_seg, o, lse = res
  delta = jnp.sum(o.astype(_F32) * do.astype(_F32), axis=-1, keepdims=True)  # [b, h, s, 1]
  bwd = _bwd_tpu if cfg.backend == "tpu" else _bwd_loop
  dq, dk, dv = bwd(cfg, q, k, v, o, do.astype(o.dtype), lse, delta, q_seg, k_seg)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------------------------
# Public entry point.


def _effective_blocks(blocks: BlockSizes, seq: int, backend: str, interpret: bool) -> BlockSizes:
  """Blocks no longer than the (power-of-two rounded) sequence, validated for the compiler that will see them."""
  for name, size in dataclasses.asdict(blocks).items():
    if size <= 0 or size & (size - 1):
      raise ValueError(f"block_sizes.{name}={size}: block sizes must be positive powers of two")
  cap = max(8, pl.next_power_of_2(seq))
  eff = BlockSizes(*(min(size, cap) for size in blocks.all()))
  if backend == "tpu" and not interpret:
    for name, size in dataclasses.asdict(eff).items():
      if size % 128 and size != cap:
        raise ValueError(f"block_sizes.{name}={size}: on TPU blocks must be multiples of 128 (Mosaic's lane "
                         f"tiling) unless one block covers the sequence")
  if backend == "gpu" and not interpret and min(eff.all()) < 16:
    raise ValueError(f"block sizes {eff.all()}: Triton matmuls need blocks of at least 16 rows")
  return eff


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                    segment_ids: jax.Array | None = None, sliding_window: int | None = None,
                    sm_scale: float | None = None, block_sizes: BlockSizes | None = None,
                    interpret: bool | None = None, backend: str | None = None) -> jax.Array:
  """Memory-efficient attention with gradients; layout and semantics of `jax.nn.dot_product_attention`.

  q [batch, seq, heads, head_dim]; k, v [batch, seq, kv_heads, head_dim] with heads % kv_heads == 0.
  segment_ids [batch, seq]: tokens attend only within equal ids (packed sequences). sliding_window w: a
  query sees keys less than w positions back (and ahead, when not causal). A query that sees no key gets 0.
  backend "tpu" | "gpu" | "cpu" picks the formulation and default blocks (None: jax's default backend);
  interpret defaults to True exactly on "cpu".
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"flash_attention expects 4-D q, k, v [batch, seq, heads, head_dim]; got {q.shape}, "
                     f"{k.shape}, {v.shape}")
  b, s, h, d = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape")
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
  if k.shape[1] != s:
    raise ValueError(f"self-attention only: q has {s} positions but k/v have {k.shape[1]}")
  kvh = k.shape[2]
  if h % kvh:
    raise ValueError(f"{h} query heads are not a multiple of {kvh} key/value heads")
  if segment_ids is not None and (segment_ids.shape != (b, s) or not jnp.issubdtype(segment_ids.dtype,
                                                                                     jnp.integer)):
    raise ValueError(f"segment_ids must be integer [batch, seq] = {(b, s)}; got {segment_ids.dtype} "
                     f"{segment_ids.shape}")
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f"sliding_window={sliding_window} must be >= 1")
  name = backends.resolve(backend)
  interpret = backends.interpret_default(name, interpret)
  blocks = _effective_blocks(block_sizes or DEFAULT_BLOCK_SIZES[name], s, name, interpret)
  padded = -(-s // math.lcm(*blocks.all())) * math.lcm(*blocks.all())
  cfg = _Config(causal=causal, window=sliding_window, sm_scale=d ** -0.5 if sm_scale is None else float(sm_scale),
                seq_len=s, padded_len=padded, group=h // kvh, blocks=blocks, backend=name,
                interpret=interpret, has_segments=segment_ids is not None)

  def head_major(x):
    x = x.transpose(0, 2, 1, 3)
    return x if padded == s else jnp.pad(x, ((0, 0), (0, 0), (0, padded - s), (0, 0)))

  q_seg = k_seg = None
  if segment_ids is not None:
    seg = segment_ids.astype(jnp.int32)
    if padded != s:
      seg = jnp.pad(seg, ((0, 0), (0, padded - s)), constant_values=-1)
    q_seg, k_seg = seg[:, :, None], seg[:, None, :]
  out = _flash(cfg, head_major(q), head_major(k), head_major(v), q_seg, k_seg)
  return out[:, :, :s].transpose(0, 2, 1, 3)


def onchip_bytes(blocks: BlockSizes, head_dim: int, dtype, backend: str) -> int:
  """Largest per-program on-chip footprint (bytes) of the three kernels: pipelined blocks plus f32 state.

  TPU blocks are double-buffered by the Mosaic pipeline and [rows, 1] vectors occupy full 128-lane tiles; the
  GPU figure counts the blocks a program holds at once (its shared memory / register working set).
  """
  item = jnp.dtype(dtype).itemsize
  bufs = 2 if backend == "tpu" else 1
  lane = 128 if backend == "tpu" else 1

  def program(rows: int, cols: int, row_blocks: int, col_blocks: int, accs: int) -> int:
    blocks_in = (row_blocks * rows + col_blocks * cols) * head_dim * item * bufs
    stats = 4 * rows * lane * 4 * bufs  # lse, delta, m, l rows (f32)
    return blocks_in + accs * max(rows, cols) * head_dim * 4 + 2 * rows * cols * 4 + stats

  fwd = program(blocks.block_q, blocks.block_kv, 2, 2, 1)  # q, o | k, v | acc | s, p
  dq = program(blocks.block_q_bwd, blocks.block_kv_bwd, 3, 2, 1)  # q, do, dq | k, v | dq acc | p, ds
  dkv = program(blocks.block_q_bwd, blocks.block_kv_bwd, 2, 4, 2)  # q, do | k, v, dk, dv | dk, dv acc
  return max(fwd, dq, dkv)
