"""Paged attention for decode and speculative verification: q_len new queries against a paged KV cache.

The cache is a pool of pages `[num_pages, page_size, kv_heads, head_dim]`; sequence b owns the pages
`page_table[b, :ceil(lengths[b] / page_size)]`, in order. `lengths` counts every token including the q_len new
ones (their K/V already written), so query i sits at position `lengths - q_len + i` and sees keys at positions
<= its own (causal among the new tokens). Semantics equal `reference.paged_attention_reference`.

What is read, and why: decode attention is bound by reading the cache, so each kernel reads exactly the pages a
sequence owns, once, and never the rest of the pool or the unused page-table slots (a dense gather reads
`batch * max_pages` pages; see `pages_read`). K/V are read once per kv head and shared by the `heads // kv_heads`
query heads of its group (GQA/MQA): the group's q rows (group * q_len of them) form the M dimension of one
matmul against that kv head's keys, so repeated K/V are never materialised. int8 pages are dequantised per page
inside the kernel (value = int8 * scale[page, kv_head]), so HBM traffic is the int8 bytes.

Two formulations share the reference and the tests:

* "tpu" (Mosaic): `pltpu.PrefetchScalarGridSpec` with the (flattened) page table and the lengths as the two
  scalar-prefetch operands in SMEM. Grid (batch, page blocks); a block is `pages_per_block` pages, each page its
  own BlockSpec operand whose index_map reads the page id from the page table, so the pipeline DMAs precisely
  the owned pages. Past the last owned page the index_map is clamped to it: the block index does not change
  between steps, so the pipeline issues no DMA, and `pl.when` skips the compute. Page blocks are full
  `[page_size, kv_heads, head_dim]` (the last two dims equal the array's, as Mosaic tiling requires), so one step
  serves all kv heads; an online softmax (m, l, acc in VMEM scratch) carries across the "arbitrary" block axis.
* "gpu" (Triton): no scalar prefetch, so page_table and lengths are ordinary operands. Grid (batch, kv_heads); a
  `fori_loop` over the sequence's owned pages (`pages_per_block` per iteration, unrolled) loads each page id
  from the page-table ref, then that page's `[page_size, head_dim]` slice for the kv head by dynamic indexing.
  Block dims are powers of two: the group's q rows are padded to >= 16 (tl.dot's minimum) and sliced off.
* "cpu": the GPU formulation in the Pallas interpreter (no Pallas compiler for CPU). Its in-kernel loop
  interprets as one XLA while loop per program: 13 ms for a 16-sequence decode step where the interpreted TPU
  grid (one interpreted step per page block, per-page block copies) took 90 s.

Tails of the last owned page past `lengths` are masked in both K (scores) and V (rows zeroed), so stale data or
NaN there cannot leak into the output.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import backend as backend_lib
from kernels_pallas import masking

# Default pages per grid step / loop iteration, by formulation. Real shapes: head_dim 128, bf16, 32 q heads over 8
# kv heads, page_size 16-64.
# TPU: one step holds pages_per_block pages of K and V for all 8 kv heads, double-buffered by the pipeline:
#   2 (K,V) x 2 (buffers) x ppb x page_size x 8 x 128 x 2 B = ppb * page_size * 8 KiB; at 512 tokens per step
#   (ppb * page_size = 512) that is 4 MiB, inside the 16 MiB scoped-VMEM default on v5e (32 MiB on v6e) with
#   room for the f32 dequantised copies (512 x 128 x 4 B = 256 KiB per head) and scores. 512 tokens per step
#   amortise the ~0.35 us per-grid-step overhead over ~1 MiB of DMA, yet short sequences waste little (at most
#   one partly-filled block is computed; clamped pages are never re-fetched).
_TPU_TOKENS_PER_BLOCK = 512
# GPU: one program (one kv head of one sequence) holds a page of K and V in registers/shared memory per unrolled
#   page: page_size x 128 x 2 B = 16 KiB at page_size 64. Four pages in flight (64 KiB at page_size 64, 16 KiB at
#   16) keeps loads overlapped without spilling registers at 4 warps; beyond that occupancy drops.
_GPU_PAGES_PER_BLOCK = 4


def default_pages_per_block(backend: str, page_size: int, max_pages: int) -> int:
  """Pages per grid step (TPU) or loop iteration (GPU) when not given; see the memory reasoning above."""
  if backend_lib.resolve(backend) != "tpu":  # "cpu" runs the GPU formulation
    ppb = _GPU_PAGES_PER_BLOCK
  else:
    ppb = max(1, _TPU_TOKENS_PER_BLOCK // page_size)
  return max(1, min(ppb, max_pages))


def pages_read(page_table: jax.Array, lengths: jax.Array, page_size: int) -> tuple[int, int]:
  """(pages the kernel reads, pages a dense gather reads): sum of ceil(length / page_size) vs batch * max_pages."""
  lengths = np.asarray(lengths)
  batch, max_pages = np.shape(page_table)
  owned = np.minimum(-(-lengths // page_size), max_pages)
  return int(owned.sum()), int(batch * max_pages)


def _validate(q, k_pages, v_pages, page_table, lengths, k_scales, v_scales):
  """Raises ValueError naming the offending argument when shapes/dtypes do not fit together."""
  if q.ndim != 4:
    raise ValueError(f"q must be [batch, q_len, heads, head_dim], got shape {q.shape}")
  for name, pages in (("k_pages", k_pages), ("v_pages", v_pages)):
    if pages.ndim != 4:
      raise ValueError(f"{name} must be [num_pages, page_size, kv_heads, head_dim], got shape {pages.shape}")
  if k_pages.shape != v_pages.shape:
    raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} must have the same shape")
  if k_pages.dtype != v_pages.dtype:
    raise ValueError(f"k_pages ({k_pages.dtype}) and v_pages ({v_pages.dtype}) must have the same dtype")
  batch, _, heads, head_dim = q.shape
  num_pages, _, kv_heads, page_head_dim = k_pages.shape
  if page_head_dim != head_dim:
    raise ValueError(f"head_dim mismatch: q {q.shape} has {head_dim}, k_pages {k_pages.shape} has {page_head_dim}")
  if heads % kv_heads:
    raise ValueError(f"q heads ({heads}, q {q.shape}) must be a multiple of kv_heads ({kv_heads}, "
                     f"k_pages {k_pages.shape})")
  if page_table.ndim != 2 or page_table.shape[0] != batch:
    raise ValueError(f"page_table must be [batch={batch}, max_pages], got shape {page_table.shape}")
  if not jnp.issubdtype(page_table.dtype, jnp.integer):
    raise ValueError(f"page_table must be integer, got {page_table.dtype}")
  if lengths.shape != (batch,):
    raise ValueError(f"lengths must be [batch={batch}], got shape {lengths.shape}")
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be integer, got {lengths.dtype}")
  quantized = k_pages.dtype == jnp.int8
  if quantized and (k_scales is None or v_scales is None):
    raise ValueError(f"int8 k_pages/v_pages {k_pages.shape} need both k_scales and v_scales [num_pages, kv_heads]")
  if not quantized and (k_scales is not None or v_scales is not None):
    raise ValueError(f"k_scales/v_scales are only for int8 pages, got k_pages dtype {k_pages.dtype}")
  if not quantized and not jnp.issubdtype(k_pages.dtype, jnp.floating):
    raise ValueError(f"k_pages/v_pages must be floating or int8, got {k_pages.dtype}")
  for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
    if scales is not None and scales.shape != (num_pages, kv_heads):
      raise ValueError(f"{name} must be [num_pages={num_pages}, kv_heads={kv_heads}], got shape {scales.shape}")


def _online_update(m_prev, l_prev, acc_prev, s, visible, v, compute_dtype):
  """One online-softmax step: scores s [rows, t] (masked by `visible`) and values v [t, d] into (m, l, acc)."""
  s = jnp.where(visible, s, -jnp.inf)
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that have seen no key yet: keep everything at 0
  alpha = jnp.exp(m_prev - m_safe)
  p = jnp.exp(s - m_safe)
  l_new = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
  pv = jax.lax.dot_general(p.astype(compute_dtype), v, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32, precision=_precision(compute_dtype))
  return m_new, l_new, alpha * acc_prev + pv


def _precision(compute_dtype):
  """HIGHEST for float32 so a float32 kernel matches the float32 reference; native MXU passes for bf16."""
  return jax.lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None


def _scores(q, k, compute_dtype):
  """q [rows, d] @ k [t, d]^T in float32."""
  return jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                             precision=_precision(compute_dtype))


# ------------------------------------------------------------------------------------------------ TPU (Mosaic)


def _tpu_kernel(pt_ref, len_ref, q_ref, *refs, pages_per_block, page_size, q_len, kv_heads,
                quantized, sm_scale, compute_dtype):
  """One (sequence, page block) step: all kv heads, `pages_per_block` pages, online softmax into VMEM scratch."""
  del pt_ref
  n = pages_per_block
  k_refs, v_refs = refs[:n], refs[n:2 * n]
  refs = refs[2 * n:]
  if quantized:
    ks_refs, vs_refs = refs[:n], refs[n:2 * n]
    refs = refs[2 * n:]
  o_ref, m_ref, l_ref, acc_ref = refs
  b, blk = pl.program_id(0), pl.program_id(1)
  length = len_ref[b]
  rows = q_ref.shape[1]
  tokens = n * page_size
  start = blk * tokens

  @pl.when(blk == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(start < length)
  def _compute():
    # Rows are (group member, query index); query index -> absolute position.
    row = jax.lax.broadcasted_iota(jnp.int32, (rows, tokens), 0)
    q_pos = length - q_len + jax.lax.rem(row, q_len)
    k_pos = start + jax.lax.broadcasted_iota(jnp.int32, (rows, tokens), 1)
    # q_pos < length, so causality also drops the tail past `length`.
    visible = masking.visible(q_pos, k_pos, causal=True, sliding_window=None)
    v_valid = start + jax.lax.broadcasted_iota(jnp.int32, (tokens, 1), 0) < length

    for g in range(kv_heads):
      def page_rows(page_refs, scale_refs, g=g):
        parts = []
        for j in range(n):
          x = page_refs[j][:, g, :].astype(jnp.float32)  # [page_size, d] of kv head g
          if scale_refs is not None:
            x = x * scale_refs[j][:, g:g + 1]  # [1, 1] per-page, per-head scale
          parts.append(x)
        return parts[0] if n == 1 else jnp.concatenate(parts, axis=0)

      k = page_rows(k_refs, ks_refs if quantized else None).astype(compute_dtype)
      v = page_rows(v_refs, vs_refs if quantized else None)
      v = jnp.where(v_valid, v, 0.0).astype(compute_dtype)
      q = (q_ref[g].astype(jnp.float32) * sm_scale).astype(compute_dtype)
      s = _scores(q, k, compute_dtype)
      m, denom, acc = _online_update(m_ref[g][:, :1], l_ref[g][:, :1], acc_ref[g], s, visible, v, compute_dtype)
      m_ref[g] = jnp.broadcast_to(m, m_ref.shape[1:])
      l_ref[g] = jnp.broadcast_to(denom, l_ref.shape[1:])
      acc_ref[g] = acc

  @pl.when(blk == pl.num_programs(1) - 1)
  def _finish():
    for g in range(kv_heads):
      denom = l_ref[g][:, :1]
      o_ref[g] = (acc_ref[g] / jnp.where(denom == 0.0, 1.0, denom)).astype(o_ref.dtype)


def _paged_tpu(qg, k_pages, v_pages, page_table, lengths, k_scales, v_scales, *, q_len, sm_scale,
               pages_per_block, interpret):
  """qg [batch, kv_heads, rows, d] -> same shape, via the scalar-prefetch (Mosaic) formulation."""
  batch, kv_heads, rows, head_dim = qg.shape
  _, page_size, _, _ = k_pages.shape
  max_pages = page_table.shape[1]
  n = pages_per_block
  num_blocks = max_pages // n
  quantized = k_scales is not None

  def page_index_map(j):
    def index_map(b, blk, pt, lens):
      last = jnp.clip((lens[b] + page_size - 1) // page_size - 1, 0, max_pages - 1)  # last owned page slot
      return pt[b * max_pages + jnp.minimum(blk * n + j, last)], 0, 0, 0
    return index_map

  def scale_index_map(j):
    page_map = page_index_map(j)
    return lambda b, blk, pt, lens: page_map(b, blk, pt, lens)[:3]

  page_block = (None, page_size, kv_heads, head_dim)
  in_specs = [pl.BlockSpec((None, kv_heads, rows, head_dim), lambda b, blk, pt, lens: (b, 0, 0, 0))]
  in_specs += [pl.BlockSpec(page_block, page_index_map(j)) for j in range(n)] * 2
  operands = [qg] + [k_pages] * n + [v_pages] * n
  if quantized:
    # [num_pages, 1, kv_heads]: a per-page block (1, kv_heads) then equals the array's last two dims.
    in_specs += [pl.BlockSpec((None, 1, kv_heads), scale_index_map(j)) for j in range(n)] * 2
    operands += [k_scales.astype(jnp.float32)[:, None, :]] * n + [v_scales.astype(jnp.float32)[:, None, :]] * n

  compute_dtype = jnp.float32 if qg.dtype == jnp.float32 else qg.dtype
  kernel = functools.partial(_tpu_kernel, pages_per_block=n, page_size=page_size, q_len=q_len, kv_heads=kv_heads,
                             quantized=quantized, sm_scale=sm_scale, compute_dtype=compute_dtype)
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=2,
    grid=(batch, num_blocks),
    in_specs=in_specs,
    out_specs=pl.BlockSpec((None, kv_heads, rows, head_dim), lambda b, blk, pt, lens: (b, 0, 0, 0)),
    scratch_shapes=[pltpu.VMEM((kv_heads, rows, 128), jnp.float32),  # m, lane-broadcast
                    pltpu.VMEM((kv_heads, rows, 128), jnp.float32),  # l, lane-broadcast
                    pltpu.VMEM((kv_heads, rows, head_dim), jnp.float32)],  # acc
  )
  return pl.pallas_call(
    kernel,
    grid_spec=grid_spec,
    out_shape=jax.ShapeDtypeStruct(qg.shape, qg.dtype),
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
    interpret=interpret,
    name="paged_attention_tpu",
  )(page_table.reshape(-1), lengths, *operands)


# ------------------------------------------------------------------------------------------------ GPU (Triton)


def _gpu_kernel(q_ref, k_ref, v_ref, pt_ref, len_ref, *refs, pages_per_block, page_size, max_pages, q_len,
                rows_used, quantized, sm_scale, compute_dtype):
  """One (sequence, kv head) program: loop over the owned pages, `pages_per_block` per iteration."""
  if quantized:
    ks_ref, vs_ref, o_ref = refs
  else:
    (o_ref,) = refs
  b, g = pl.program_id(0), pl.program_id(1)
  rows, head_dim = q_ref.shape
  length = len_ref[b]
  owned = jnp.minimum((length + page_size - 1) // page_size, max_pages)

  row = jnp.arange(rows)[:, None]
  q_pos = jnp.where(row < rows_used, length - q_len + row % q_len, -1)  # padded rows see nothing
  col = jnp.arange(page_size)
  q = (q_ref[...].astype(jnp.float32) * sm_scale).astype(compute_dtype)

  def body(it, carry):
    m, denom, acc = carry
    for j in range(pages_per_block):
      slot = it * pages_per_block + j
      page = pt_ref[b, jnp.minimum(slot, owned - 1)]
      k = k_ref[page, :, g, :].astype(jnp.float32)
      v = v_ref[page, :, g, :].astype(jnp.float32)
      if quantized:
        k = k * ks_ref[page, g]
        v = v * vs_ref[page, g]
      k_pos = slot * page_size + col
      v = jnp.where((k_pos < length)[:, None], v, 0.0)
      s = _scores(q, k.astype(compute_dtype), compute_dtype)
      visible = masking.visible(q_pos, k_pos[None, :], causal=True, sliding_window=None)
      m, denom, acc = _online_update(m, denom, acc, s, visible, v.astype(compute_dtype), compute_dtype)
    return m, denom, acc

  init = (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
          jnp.zeros((rows, head_dim), jnp.float32))
  _, denom, acc = jax.lax.fori_loop(0, (owned + pages_per_block - 1) // pages_per_block, body, init)
  o_ref[...] = (acc / jnp.where(denom == 0.0, 1.0, denom)).astype(o_ref.dtype)


def _paged_gpu(qg, k_pages, v_pages, page_table, lengths, k_scales, v_scales, *, q_len, sm_scale,
               pages_per_block, interpret):
  """qg [batch, kv_heads, rows, d] -> same shape, via the page-table-in-kernel (Triton) formulation."""
  batch, kv_heads, rows_used, head_dim = qg.shape
  page_size = k_pages.shape[1]
  for name, size in (("head_dim", head_dim), ("page_size", page_size)):
    if not interpret and size & (size - 1):
      raise ValueError(f"backend='gpu' needs a power-of-two {name}, got {size} (k_pages {k_pages.shape})")
  if not interpret and page_size < 16:
    raise ValueError(f"backend='gpu' needs page_size >= 16 (tl.dot's minimum block), got {page_size}")
  rows = max(16, pl.next_power_of_2(rows_used))
  qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - rows_used), (0, 0)))
  quantized = k_scales is not None
  operands = [qg, k_pages, v_pages, page_table, lengths]
  whole = lambda x: pl.BlockSpec(x.shape, lambda b, g: (0,) * x.ndim)  # noqa: E731 - read by dynamic indexing
  if quantized:
    operands += [k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)]
  in_specs = [pl.BlockSpec((None, None, rows, head_dim), lambda b, g: (b, g, 0, 0))]
  in_specs += [whole(x) for x in operands[1:]]
  compute_dtype = jnp.float32 if qg.dtype == jnp.float32 else qg.dtype
  kernel = functools.partial(_gpu_kernel, pages_per_block=pages_per_block, page_size=page_size,
                             max_pages=page_table.shape[1], q_len=q_len, rows_used=rows_used,
                             quantized=quantized, sm_scale=sm_scale, compute_dtype=compute_dtype)
  out = pl.pallas_call(
    kernel,
    grid=(batch, kv_heads),
    in_specs=in_specs,
    out_specs=pl.BlockSpec((None, None, rows, head_dim), lambda b, g: (b, g, 0, 0)),
    out_shape=jax.ShapeDtypeStruct(qg.shape, qg.dtype),
    interpret=interpret,
    name="paged_attention_gpu",
  )(*operands)
  return out[:, :, :rows_used]


# ------------------------------------------------------------------------------------------------ public API


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                    lengths: jax.Array, *, k_scales: jax.Array | None = None, v_scales: jax.Array | None = None,
                    sm_scale: float | None = None, pages_per_block: int | None = None, backend: str | None = None,
                    interpret: bool | None = None) -> jax.Array:
  """Attention of q [batch, q_len, heads, d] over each sequence's owned pages -> [batch, q_len, heads, d].

  Reads only ceil(lengths / page_size) pages per sequence. `pages_per_block` that does not divide max_pages is
  handled by padding the page table (padded slots are never owned, so never read). Lengths must not exceed
  max_pages * page_size.
  """
  _validate(q, k_pages, v_pages, page_table, lengths, k_scales, v_scales)
  resolved = backend_lib.resolve(backend)
  interpret = backend_lib.interpret_default(resolved, interpret)
  batch, q_len, heads, head_dim = q.shape
  _, page_size, kv_heads, _ = k_pages.shape
  max_pages = page_table.shape[1]
  if pages_per_block is None:
    pages_per_block = default_pages_per_block(resolved, page_size, max_pages)
  if not isinstance(pages_per_block, int) or pages_per_block < 1:
    raise ValueError(f"pages_per_block must be a positive int, got {pages_per_block!r}")
  padded = math.ceil(max_pages / pages_per_block) * pages_per_block
  page_table = page_table.astype(jnp.int32)
  if padded != max_pages:
    page_table = jnp.pad(page_table, ((0, 0), (0, padded - max_pages)))
  sm_scale = head_dim ** -0.5 if sm_scale is None else float(sm_scale)

  # [b, q_len, kv, group, d] -> [b, kv, group * q_len, d]: a kv head's query rows, (member, query index) order.
  group = heads // kv_heads
  qg = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
  qg = qg.reshape(batch, kv_heads, group * q_len, head_dim)
  impl = _paged_tpu if resolved == "tpu" else _paged_gpu
  out = impl(qg, k_pages, v_pages, page_table, lengths.astype(jnp.int32), k_scales, v_scales, q_len=q_len,
             sm_scale=sm_scale, pages_per_block=pages_per_block, interpret=interpret)
  out = out.reshape(batch, kv_heads, group, q_len, head_dim).transpose(0, 3, 1, 2, 4)
  return out.reshape(batch, q_len, heads, head_dim)
