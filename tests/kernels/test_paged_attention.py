"""Paged attention kernels (TPU and GPU formulations, interpreted) against the dense reference, plus export."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas.lowering import CUSTOM_CALLS, export_for
from kernels_pallas.paged_attention import default_pages_per_block, paged_attention, pages_read
from kernels_pallas.reference import paged_attention_reference

FORMULATIONS = ["tpu", "gpu"]
_reference = jax.jit(paged_attention_reference)  # one compile per shape instead of op-by-op dispatch


def make_case(seed, *, batch=3, q_len=1, heads=4, kv_heads=2, head_dim=64, page_size=8, max_pages=4,
              lengths=None, dtype=jnp.float32, int8=False, shared_prefix=1, extra_pages=3):
  """Random q/pages and a shuffled page table whose sequences share their first `shared_prefix` pages."""
  rng = np.random.default_rng(seed)
  own = batch * (max_pages - shared_prefix)
  num_pages = shared_prefix + own + extra_pages  # extra pages belong to nobody
  perm = rng.permutation(num_pages)
  prefix = perm[:shared_prefix]
  rest = perm[shared_prefix:shared_prefix + own].reshape(batch, max_pages - shared_prefix)
  page_table = np.concatenate([np.broadcast_to(prefix, (batch, shared_prefix)), rest], axis=1)
  if lengths is None:
    lengths = rng.integers(q_len, max_pages * page_size + 1, size=batch)
  q = jnp.asarray(rng.normal(size=(batch, q_len, heads, head_dim)), dtype)
  shape = (num_pages, page_size, kv_heads, head_dim)
  if int8:
    k_pages = jnp.asarray(rng.integers(-127, 128, size=shape), jnp.int8)
    v_pages = jnp.asarray(rng.integers(-127, 128, size=shape), jnp.int8)
    scales = {"k_scales": jnp.asarray(rng.uniform(0.5, 2.0, (num_pages, kv_heads)) / 127, jnp.float32),
              "v_scales": jnp.asarray(rng.uniform(0.5, 2.0, (num_pages, kv_heads)) / 127, jnp.float32)}
  else:
    k_pages = jnp.asarray(rng.normal(size=shape), dtype)
    v_pages = jnp.asarray(rng.normal(size=shape), dtype)
    scales = {}
  return (q, k_pages, v_pages, jnp.asarray(page_table, jnp.int32), jnp.asarray(lengths, jnp.int32)), scales


def check(args, scales, backend, name, **kwargs):
  """Kernel (interpreted) vs reference; returns the kernel output."""
  out = paged_attention(*args, **scales, backend=backend, interpret=True, **kwargs)
  expected = _reference(*args, **scales)
  assert out.shape == args[0].shape and out.dtype == args[0].dtype
  assert_close(out, expected, args[0].dtype, name=name)
  return out


@pytest.mark.parametrize("backend", FORMULATIONS)
@pytest.mark.parametrize("q_len,heads,kv_heads", [(1, 4, 4), (4, 4, 2), (1, 4, 1), (4, 4, 1)],
                         ids=["mha-decode", "gqa-verify", "mqa-decode", "mqa-verify"])
def test_matches_reference_fp32(backend, q_len, heads, kv_heads):
  # Lengths: shortest allowed, on a page boundary, mid-page, and the whole table.
  page_size, max_pages = 8, 4
  lengths = [q_len, 2 * page_size, 2 * page_size + 3, max_pages * page_size]
  args, scales = make_case(q_len * 10 + kv_heads, batch=4, q_len=q_len, heads=heads, kv_heads=kv_heads,
                           page_size=page_size, max_pages=max_pages, lengths=lengths)
  check(args, scales, backend, f"{backend} q_len={q_len} {heads}/{kv_heads}", pages_per_block=2)


@pytest.mark.parametrize("backend,q_len", [("tpu", 1), ("tpu", 4), ("gpu", 4)])
def test_matches_reference_bf16(backend, q_len):
  args, scales = make_case(7 + q_len, q_len=q_len, heads=8, kv_heads=2, head_dim=128, page_size=16,
                           dtype=jnp.bfloat16, lengths=[q_len, 16, 64])
  check(args, scales, backend, f"{backend} bf16 q_len={q_len}")


@pytest.mark.parametrize("backend,dtype", [("tpu", jnp.bfloat16), ("tpu", jnp.float32), ("gpu", jnp.bfloat16)],
                         ids=["tpu-bf16", "tpu-f32", "gpu-bf16"])
def test_int8_pages(backend, dtype):
  args, scales = make_case(3, q_len=4, heads=4, kv_heads=2, int8=True, dtype=dtype, lengths=[4, 9, 32])
  check(args, scales, backend, f"{backend} int8 {jnp.dtype(dtype).name}", pages_per_block=2)


# 3 does not divide max_pages 4 (the table is padded); 8 > max_pages. 1 and 2 are covered above.
@pytest.mark.parametrize("backend,pages_per_block", [("tpu", 3), ("tpu", 8), ("gpu", 3)])
def test_pages_per_block(backend, pages_per_block):
  args, scales = make_case(5, q_len=4, lengths=[5, 17, 32])
  check(args, scales, backend, f"{backend} ppb={pages_per_block}", pages_per_block=pages_per_block)


@pytest.mark.parametrize("backend,pages_per_block", [("tpu", 3), ("gpu", 2)])
def test_unowned_pages_do_not_matter(backend, pages_per_block):
  """NaN in pages nobody owns, in page-table slots past the length and in the last page's tail: same output."""
  page_size = 8
  (q, k_pages, v_pages, page_table, lengths), _ = make_case(11, q_len=4, page_size=page_size, max_pages=4,
                                                            lengths=[4, 13, 32], shared_prefix=0)
  pt = np.asarray(page_table)
  owned_slots = -(-np.asarray(lengths) // page_size)
  owned = {int(pt[b, i]) for b in range(pt.shape[0]) for i in range(owned_slots[b])}
  unowned = np.array(sorted(set(range(k_pages.shape[0])) - owned))
  k_bad = k_pages.at[unowned].set(jnp.nan)
  v_bad = v_pages.at[unowned].set(jnp.nan)
  # Tails past `lengths` inside each sequence's last owned page.
  for b, length in enumerate(np.asarray(lengths)):
    if length % page_size:
      last = int(pt[b, owned_slots[b] - 1])
      k_bad = k_bad.at[last, length % page_size:].set(jnp.nan)
      v_bad = v_bad.at[last, length % page_size:].set(jnp.nan)
  # Slots past the owned pages point at the NaN pages (or out of range).
  pt_bad = pt.copy()
  for b in range(pt.shape[0]):
    pt_bad[b, owned_slots[b]:] = unowned[b % len(unowned)] if b % 2 else 10**6
  run = jax.jit(lambda *a: paged_attention(*a, backend=backend, interpret=True, pages_per_block=pages_per_block))
  clean = run(q, k_pages, v_pages, page_table, lengths)
  out = run(q, k_bad, v_bad, jnp.asarray(pt_bad), lengths)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_array_equal(np.asarray(out), np.asarray(clean))


def test_rows_that_see_nothing_are_zero():
  """lengths < q_len puts early queries before position 0: they see no key and output zeros, as the reference."""
  args, scales = make_case(2, q_len=4, lengths=[2, 32, 1])
  for backend in FORMULATIONS:
    out = check(args, scales, backend, f"{backend} short")
    assert not np.asarray(out[0, :2]).any()


@pytest.mark.slow  # random shapes; the parametrized cases stay in the default job
@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_property_random_shapes(data):
  backend = data.draw(st.sampled_from(FORMULATIONS), "backend")
  kv_heads = data.draw(st.sampled_from([1, 2]), "kv_heads")
  group = data.draw(st.sampled_from([1, 2, 4]), "group")
  q_len = data.draw(st.integers(1, 5), "q_len")
  page_size = data.draw(st.sampled_from([8, 16]), "page_size")
  max_pages = data.draw(st.integers(1, 5), "max_pages")
  batch = data.draw(st.integers(1, 3), "batch")
  lengths = data.draw(st.lists(st.integers(q_len, max_pages * page_size), min_size=batch, max_size=batch),
                      "lengths")
  ppb = data.draw(st.sampled_from([None, 1, 2]), "pages_per_block")
  int8 = data.draw(st.booleans(), "int8")
  args, scales = make_case(data.draw(st.integers(0, 2**16), "seed"), batch=batch, q_len=q_len,
                           heads=kv_heads * group, kv_heads=kv_heads, page_size=page_size, max_pages=max_pages,
                           lengths=lengths, int8=int8, shared_prefix=data.draw(st.integers(0, max_pages)))
  check(args, scales, backend, f"{backend} {data}", pages_per_block=ppb)


def test_pages_read():
  page_table = np.zeros((3, 8), np.int32)
  assert pages_read(page_table, np.array([1, 16, 17]), 16) == (1 + 1 + 2, 24)
  assert pages_read(page_table, np.array([128, 0, 200]), 16) == (8 + 0 + 8, 24)


def test_default_pages_per_block():
  assert default_pages_per_block("tpu", 16, 512) == 32  # 512 tokens per grid step
  assert default_pages_per_block("tpu", 64, 128) == 8
  assert default_pages_per_block("cpu", 16, 4) == 4  # never more than the table
  assert default_pages_per_block("gpu", 16, 512) == 4


def _case_arrays(**kw):
  (q, k, v, pt, lengths), scales = make_case(0, **kw)
  return dict(q=q, k_pages=k, v_pages=v, page_table=pt, lengths=lengths, **scales)


@pytest.mark.parametrize("change,match", [
  (lambda a: a.update(q=a["q"][0]), "q must be"),
  (lambda a: a.update(k_pages=a["k_pages"][0]), "k_pages must be"),
  (lambda a: a.update(v_pages=a["v_pages"][:, :, :1]), "k_pages .* and v_pages .* same shape"),
  (lambda a: a.update(q=jnp.zeros((3, 1, 3, 64))), "multiple of kv_heads"),
  (lambda a: a.update(q=jnp.zeros((3, 1, 4, 32))), "head_dim mismatch"),
  (lambda a: a.update(page_table=a["page_table"][:2]), "page_table must be"),
  (lambda a: a.update(lengths=a["lengths"][:2]), "lengths must be"),
  (lambda a: a.update(k_scales=jnp.ones((1, 2))), "only for int8"),
  (lambda a: a.update(k_pages=a["k_pages"].astype(jnp.int8), v_pages=a["v_pages"].astype(jnp.int8)),
   "need both k_scales and v_scales"),
  (lambda a: a.update(k_pages=a["k_pages"].astype(jnp.int8), v_pages=a["v_pages"].astype(jnp.int8),
                      k_scales=jnp.ones((2, 2)), v_scales=jnp.ones((2, 2))), "k_scales must be"),
  (lambda a: a.update(pages_per_block=0), "pages_per_block"),
])
def test_errors(change, match):
  args = _case_arrays()
  change(args)
  ppb = args.pop("pages_per_block", None)
  with pytest.raises(ValueError, match=match):
    paged_attention(**args, pages_per_block=ppb, backend="cpu")


def test_gpu_page_size_limits():
  with pytest.raises(ValueError, match="power-of-two page_size"):  # Triton blocks; the interpreter accepts 12
    paged_attention(**_case_arrays(page_size=12), backend="gpu", interpret=False)
  with pytest.raises(ValueError, match="page_size >= 16"):  # compiled Triton only; interpret accepts 8
    paged_attention(**_case_arrays(page_size=8), backend="gpu", interpret=False)


# ------------------------------------------------------------------- lowering for real targets (jax.export)

# Real shapes: batch 8, 32 q heads / 8 kv heads, head_dim 128, bf16, room for 8192 tokens per sequence.
EXPORT_CASES = [(16, 1, False), (16, 5, False), (64, 1, False), (64, 5, False), (16, 5, True), (64, 1, True)]


def _export_args(page_size, q_len, int8, batch=8, heads=32, kv_heads=8, head_dim=128, tokens=8192):
  max_pages = tokens // page_size
  num_pages = batch * max_pages
  page_dtype = jnp.int8 if int8 else jnp.bfloat16
  sds = jax.ShapeDtypeStruct
  args = [sds((batch, q_len, heads, head_dim), jnp.bfloat16),
          sds((num_pages, page_size, kv_heads, head_dim), page_dtype),
          sds((num_pages, page_size, kv_heads, head_dim), page_dtype),
          sds((batch, max_pages), jnp.int32), sds((batch,), jnp.int32)]
  if int8:
    args += [sds((num_pages, kv_heads), jnp.float32)] * 2
  return args


def _fn(backend):
  def fn(q, k_pages, v_pages, page_table, lengths, k_scales=None, v_scales=None):
    return paged_attention(q, k_pages, v_pages, page_table, lengths, k_scales=k_scales, v_scales=v_scales,
                           backend=backend, interpret=False)
  return fn


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("page_size,q_len,int8", EXPORT_CASES)
def test_lowers_for_real_targets(backend, page_size, q_len, int8):
  text = export_for(backend, jax.jit(_fn(backend)), _export_args(page_size, q_len, int8)).mlir_module()
  assert text.count(CUSTOM_CALLS[backend]) == 1
