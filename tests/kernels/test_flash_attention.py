"""Flash attention kernel: output and dq/dk/dv against the dense reference, in both formulations (TPU grid with
scratch accumulators, GPU in-kernel loop; interpreted on CPU), hypothesis-generated shapes, errors, and lowering
for real TPU (Mosaic) and GPU (Triton) targets through jax.export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas.flash_attention import DEFAULT_BLOCK_SIZES, BlockSizes, flash_attention, onchip_bytes
from kernels_pallas.lowering import CUSTOM_CALLS, export_for
from kernels_pallas.reference import attention_reference

FORMULATIONS = ("tpu", "gpu")
# Small blocks, so that short test sequences still span several blocks (skipping, padding, online softmax).
SMALL = BlockSizes(64, 64, 32, 64)

# name: (batch, seq, heads, kv_heads, head_dim, causal, packed, window, dtype)
CASES = {
  "mha-causal-d64": (2, 128, 4, 4, 64, True, False, None, jnp.float32),
  "gqa-causal-d128-ragged": (1, 200, 4, 2, 128, True, False, None, jnp.float32),
  "mqa-noncausal-ragged": (2, 96 + 7, 4, 1, 64, False, False, None, jnp.float32),
  "gqa-packed-window": (2, 160, 4, 2, 64, True, True, 40, jnp.float32),
  "mqa-noncausal-packed-window": (1, 150, 2, 1, 64, False, True, 33, jnp.float32),
  "bf16-gqa-causal-d128-ragged": (1, 176, 4, 2, 128, True, False, None, jnp.bfloat16),
  "bf16-mha-packed-window": (2, 128, 2, 2, 64, True, True, 50, jnp.bfloat16),
}


def _packed(rng: np.random.Generator, batch: int, seq: int) -> jnp.ndarray:
  """Documents of random lengths per row (crossing block boundaries), then a padding segment 0."""
  rows = []
  for _ in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, seq), size=min(3, seq - 1), replace=False))
    ids = 1 + np.searchsorted(cuts, np.arange(seq), side="right")
    ids[seq - int(rng.integers(0, seq // 4 + 1)):] = 0
    rows.append(ids)
  return jnp.asarray(np.stack(rows), jnp.int32)


def _inputs(batch, seq, heads, kv_heads, head_dim, packed, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(batch, seq, n, head_dim)), dtype) for n in (heads, kv_heads, kv_heads))
  cot = jnp.asarray(rng.normal(size=q.shape), dtype)
  return q, k, v, cot, _packed(rng, batch, seq) if packed else None


def _out_and_grads(attn, q, k, v, cot):
  out, vjp = jax.vjp(attn, q, k, v)
  return (out, *vjp(cot))


def _check(formulation, batch, seq, heads, kv_heads, head_dim, causal, packed, window, dtype, blocks=SMALL, seed=0):
  q, k, v, cot, seg = _inputs(batch, seq, heads, kv_heads, head_dim, packed, dtype, seed)
  kw = dict(causal=causal, segment_ids=seg, sliding_window=window)
  got = jax.jit(lambda *a: _out_and_grads(lambda q, k, v: flash_attention(
    q, k, v, **kw, block_sizes=blocks, backend=formulation, interpret=True), *a))(q, k, v, cot)
  want = _out_and_grads(lambda q, k, v: attention_reference(q, k, v, **kw), q, k, v, cot)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert a.dtype == b.dtype == dtype
    assert_close(a, b, dtype, "out" if name == "out" else "grad", name)


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(formulation, case):
  _check(formulation, *CASES[case])


@pytest.mark.slow  # ~30 s of random shapes; the parametrized cases stay in the default job
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_random_shapes_match_reference(data):
  kv_heads = data.draw(st.sampled_from([1, 2]), "kv_heads")
  window = data.draw(st.one_of(st.none(), st.integers(1, 80)), "window")
  blocks = BlockSizes(*(data.draw(st.sampled_from([16, 32, 64]), n) for n in ("bq", "bk", "bq_bwd", "bk_bwd")))
  _check(data.draw(st.sampled_from(FORMULATIONS), "formulation"), batch=data.draw(st.integers(1, 2), "batch"),
         seq=data.draw(st.integers(1, 130), "seq"), heads=kv_heads * data.draw(st.sampled_from([1, 2]), "group"),
         kv_heads=kv_heads, head_dim=data.draw(st.sampled_from([16, 64]), "head_dim"),
         causal=data.draw(st.booleans(), "causal"), packed=data.draw(st.booleans(), "packed"), window=window,
         dtype=jnp.float32, blocks=blocks, seed=data.draw(st.integers(0, 100), "seed"))


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_future_key_blocks_are_never_read(formulation):
  """Causal block skipping: NaN in every key/value block after the first query block leaves that block's
  output unchanged (a processed block would spread the NaN: 0 * NaN in the probabilities-times-values matmul)."""
  q, k, v, _, _ = _inputs(1, 256, 2, 2, 64, False, jnp.float32)
  run = lambda k, v: flash_attention(q, k, v, block_sizes=SMALL, backend=formulation, interpret=True)  # noqa: E731
  poisoned = run(k.at[:, 64:].set(jnp.nan), v.at[:, 64:].set(jnp.nan))
  np.testing.assert_array_equal(np.asarray(poisoned[:, :64]), np.asarray(run(k, v)[:, :64]))


@pytest.mark.parametrize("bad, match", [
  (dict(k=jnp.zeros((1, 256, 3, 64)), v=jnp.zeros((1, 256, 3, 64))), "not a multiple of 3 key/value heads"),
  (dict(k=jnp.zeros((1, 32, 2, 64)), v=jnp.zeros((1, 32, 2, 64))), "self-attention only"),
  (dict(v=jnp.zeros((1, 256, 2, 32))), r"k \(1, 256, 2, 64\) and v \(1, 256, 2, 32\)"),
  (dict(q=jnp.zeros((256, 4, 64))), "4-D"),
  (dict(segment_ids=jnp.zeros((1, 255), jnp.int32)), "segment_ids must be integer"),
  (dict(segment_ids=jnp.zeros((1, 256), jnp.float32)), "segment_ids must be integer"),
  (dict(sliding_window=0), "sliding_window=0"),
  (dict(block_sizes=BlockSizes(48, 64, 64, 64)), "powers of two"),
  (dict(block_sizes=BlockSizes(64, 64, 64, 64), backend="tpu", interpret=False), "multiples of 128"),
  (dict(block_sizes=BlockSizes(8, 16, 16, 16), backend="gpu", interpret=False), "at least 16"),
  (dict(backend="metal"), "backend='metal'"),
])
def test_bad_input_fails_early(bad, match):
  args = dict(q=jnp.zeros((1, 256, 4, 64)), k=jnp.zeros((1, 256, 2, 64)), v=jnp.zeros((1, 256, 2, 64)))
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    flash_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


# ---------------------------------------------------------------------------------------------------------------
# Real targets: Llama-3-8B attention (32 query / 8 key-value heads of 128, bf16) at 8192 tokens, packed.

REAL = [jax.ShapeDtypeStruct((1, 8192, 32, 128), jnp.bfloat16), jax.ShapeDtypeStruct((1, 8192, 8, 128), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, 8192, 8, 128), jnp.bfloat16), jax.ShapeDtypeStruct((1, 8192), jnp.int32)]


def _train_step_attention(backend):
  """Forward and all three gradients, as a training step differentiates it."""
  def loss(q, k, v, seg):
    out = flash_attention(q, k, v, segment_ids=seg, backend=backend, interpret=False)
    return jnp.sum(out.astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_lowers_for_real_targets(backend):
  text = export_for(backend, _train_step_attention(backend), REAL).mlir_module()
  # forward, dq and dk/dv kernels; no dense [8192, 8192] score matrix anywhere in the program
  assert text.count(CUSTOM_CALLS[backend]) == 3
  assert "8192x8192" not in text


def test_default_blocks_fit_on_chip():
  """Default blocks at head_dim 128 fit the scoped VMEM of every TPU generation (16 MiB) and an A100's
  164 KiB of shared memory per SM; the largest blocks that exceed them are rejected by the same estimate."""
  assert onchip_bytes(DEFAULT_BLOCK_SIZES["tpu"], 128, jnp.bfloat16, "tpu") <= 16 << 20
  assert onchip_bytes(DEFAULT_BLOCK_SIZES["gpu"], 128, jnp.bfloat16, "gpu") <= 164 << 10
  assert onchip_bytes(BlockSizes(2048, 2048, 2048, 2048), 128, jnp.bfloat16, "tpu") > 16 << 20
  assert onchip_bytes(BlockSizes(128, 128, 128, 128), 128, jnp.bfloat16, "gpu") > 164 << 10


def test_model_backend_refuses_a_split_sequence():
  """Inside the model the kernel runs per device on whole sequences; sequence parallelism is ring attention."""
  from helpers import small_config  # noqa: PLC0415

  from maxlm import sharding  # noqa: PLC0415
  from maxlm.models.attention import pallas_flash_attention  # noqa: PLC0415
  cfg = small_config("--config.mesh.data=1", "--config.mesh.sequence=2")
  q, k, v, _, _ = _inputs(1, 64, 4, 2, 16, False, jnp.float32)
  with sharding.use_mesh(sharding.make_mesh(cfg.mesh, jax.devices()[:2]), sharding.config_rules(cfg)):
    with pytest.raises(ValueError, match="use model.attention=ring"):
      pallas_flash_attention(q, k, v, None, scale=0.25, sliding_window=None, backend=None, block_sizes=None)
