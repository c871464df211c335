"""Ring attention: outputs and gradients equal the unsharded reference on rings of 2, 4 and 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import apply, build_model, small_config

from maxlm import sharding
from maxlm.models.attention import attention_mask, xla_attention
from maxlm.models.ring_attention import ring_attention

# Everything is float32 and the reference runs at "highest" matmul precision; the ring differs only in the
# order of the softmax sums (per-block maxima merged online), i.e. float32 rounding of O(1) values summed over
# <= 64 keys. Errors seen: outputs <= 6e-7, gradients <= 1.5e-6 (they pass through the softmax backward and
# two more matmuls), so 1e-5 / 2e-5 leave >10x headroom while a wrong mask shifts values by O(0.1).
TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=2e-5, atol=2e-5)
# Model logits (|logit| <= ~1.5): float32 throughout; besides the attention sums, the sharded model reduces
# some matmuls in a different order than one device does. Seen: 2.4e-7.
MODEL_TOL = dict(rtol=1e-5, atol=1e-5)

BATCH, SEQ, HEAD_DIM = 4, 64, 16


def _mesh(data: int = 1, sequence: int = 1, tensor: int = 1):
  """(mesh, rules) over the first data * sequence * tensor devices."""
  cfg = small_config(f"--config.mesh.data={data}", f"--config.mesh.sequence={sequence}",
                     f"--config.mesh.tensor={tensor}")
  return sharding.make_mesh(cfg.mesh, jax.devices()[:data * sequence * tensor]), sharding.config_rules(cfg)


def _packed_segment_ids(rng: np.random.Generator, batch: int, seq: int) -> jnp.ndarray:
  """Several documents per row with random lengths (crossing chunk boundaries), then padding 0."""
  rows = []
  for _ in range(batch):
    pad = int(rng.integers(0, seq // 4))
    cuts = np.sort(rng.choice(np.arange(1, seq - pad), size=int(rng.integers(1, 5)), replace=False))
    ids = np.zeros(seq, np.int32)
    ids[:seq - pad] = 1 + np.searchsorted(cuts, np.arange(seq - pad), side="right")
    rows.append(ids)
  return jnp.asarray(np.stack(rows))


def _inputs(heads: int, kv_heads: int, packed: bool, seed: int = 0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(BATCH, SEQ, heads, HEAD_DIM)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(BATCH, SEQ, kv_heads, HEAD_DIM)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(BATCH, SEQ, kv_heads, HEAD_DIM)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  seg = _packed_segment_ids(rng, BATCH, SEQ) if packed else None
  return q, k, v, seg, cot


def _value_and_grads(attn, q, k, v, cot):
  """(output, d<out, cot>/d(q, k, v)) of attn(q, k, v)."""
  out, vjp = jax.vjp(attn, q, k, v)
  return out, vjp(cot)


def _reference(q, k, v, seg, cot, window):
  scale = HEAD_DIM ** -0.5
  with jax.default_matmul_precision("highest"):
    mask = attention_mask(SEQ, SEQ, seg, window)
    return jax.jit(lambda q, k, v, cot: _value_and_grads(
        lambda q, k, v: xla_attention(q, k, v, mask, scale), q, k, v, cot))(q, k, v, cot)


def _ring(q, k, v, seg, cot, window):
  scale = HEAD_DIM ** -0.5
  return jax.jit(lambda q, k, v, seg, cot: _value_and_grads(
      lambda q, k, v: ring_attention(q, k, v, seg, scale=scale, sliding_window=window), q, k, v, cot))(
          q, k, v, seg, cot)


def _assert_matches(got, want):
  (out, grads), (ref_out, ref_grads) = got, want
  assert not np.isnan(np.asarray(out)).any()
  np.testing.assert_allclose(out, ref_out, **TOL)
  for name, g, rg in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(g, rg, err_msg=f"d/d{name}", **GRAD_TOL)


# (mesh axes, heads, kv_heads, packed, window as a multiple of the chunk length or None).
CASES = [
  pytest.param(dict(sequence=2), 4, 4, False, None, id="ring2-mha-causal"),
  pytest.param(dict(sequence=4), 4, 2, True, None, id="ring4-gqa-packed"),
  pytest.param(dict(sequence=8), 4, 1, True, None, id="ring8-mqa-packed"),
  pytest.param(dict(sequence=8), 4, 2, True, 0.625, id="ring8-gqa-packed-window<chunk"),
  pytest.param(dict(sequence=4), 4, 1, False, 1.5625, id="ring4-mqa-window>chunk"),
  pytest.param(dict(sequence=8), 4, 4, True, 1.25, id="ring8-mha-packed-window>chunk"),
  pytest.param(dict(data=2, sequence=2, tensor=2), 4, 2, True, 1.5, id="dp2-ring2-tp2-gqa-packed-window>chunk"),
  pytest.param(dict(data=2, sequence=2, tensor=2), 4, 4, False, None, id="dp2-ring2-tp2-mha-causal"),
]


@pytest.mark.parametrize("axes,heads,kv_heads,packed,window", CASES)
def test_ring_matches_reference(axes, heads, kv_heads, packed, window):
  q, k, v, seg, cot = _inputs(heads, kv_heads, packed)
  chunk = SEQ // axes["sequence"]
  window = None if window is None else int(window * chunk)
  want = _reference(q, k, v, seg, cot, window)
  mesh, rules = _mesh(**axes)
  with sharding.use_mesh(mesh, rules):
    assert sharding.mesh_axes_of("activation_length") == ("sequence",)
    got = _ring(q, k, v, seg, cot, window)
  _assert_matches(got, want)


@pytest.mark.parametrize("window", [None, 5])
def test_one_block_outside_a_mesh_and_on_a_ring_of_one(window):
  q, k, v, seg, cot = _inputs(4, 2, packed=True)
  want = _reference(q, k, v, seg, cot, window)
  _assert_matches(_ring(q, k, v, seg, cot, window), want)  # no mesh at all
  with sharding.use_mesh(*_mesh(data=2, tensor=2)):  # a mesh whose sequence axis has one device
    _assert_matches(_ring(q, k, v, seg, cot, window), want)


def test_sequence_not_divisible_by_ring_size_raises():
  q = jnp.zeros((2, 60, 4, HEAD_DIM), jnp.float32)
  k = jnp.zeros((2, 60, 2, HEAD_DIM), jnp.float32)
  with sharding.use_mesh(*_mesh(sequence=8)):
    with pytest.raises(ValueError, match=r"sequence length 60 is not divisible by the ring size 8"):
      jax.jit(lambda q, k: ring_attention(q, k, k, None, scale=1.0))(q, k)


def test_transformer_with_ring_attention_matches_xla_on_one_device():
  # Packed rows (positions restarting per document) and a window (24) longer than a chunk (16) but shorter than
  # the longest document, so causality, segments and the window are all checked through the config plumbing.
  window = "--config.model.sliding_window=24"
  ring_cfg = small_config("--config.model.attention=ring", "--config.mesh.data=2", "--config.mesh.sequence=4", window)
  xla_cfg = small_config("--config.model.attention=xla", window)
  graphdef, params = build_model(ring_cfg)
  xla_graphdef, _ = build_model(xla_cfg)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 512, (2, 64)), jnp.int32)
  seg = _packed_segment_ids(rng, 2, 64)
  # Positions restart at every document, as packing produces them; masking must not use them.
  starts = np.maximum.accumulate(np.where(np.diff(np.asarray(seg), prepend=-1, axis=1) != 0,
                                          np.arange(64), 0), axis=1)
  positions = jnp.asarray(np.arange(64) - starts, jnp.int32)

  with jax.default_matmul_precision("highest"):
    one = jax.device_put(params, jax.devices()[0])
    want = jax.jit(lambda p, t, pos, s: apply(xla_graphdef, p, t, pos, s))(one, tokens, positions, seg)
  mesh, rules = sharding.mesh_for(ring_cfg)
  with sharding.use_mesh(mesh, rules):
    assert dict(mesh.shape)["sequence"] == 4
    run = jax.jit(lambda p, t, pos, s: apply(graphdef, p, t, pos, s))
    assert "ppermute" in str(run.trace(params, tokens, positions, seg).jaxpr)  # the ring really ran
    got = run(params, tokens, positions, seg)
  np.testing.assert_allclose(got, want, **MODEL_TOL)
