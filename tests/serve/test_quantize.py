"""Weight-only quantization (maxlm/quant, and maxlm/serve/quantize.py for a model) against numpy references.

Bounds checked: every dequantized weight is within scale/2 of the float weight (round to nearest); the fused
int8 / int4 matmuls equal x @ (numpy-dequantized weight) to float32 rounding (rtol 1e-5); the small model's
logits (random N(0, 0.02) weights, Frobenius-norm relative error) are within 2% of float with int8 weights
(measured 0.95%) and within 25% with int4 (measured 15.6%: group-wise absmax/7 steps on Gaussian weights);
matmul-weight bytes shrink 3.5-4x (int8) and 6.5-8x (int4 incl. its float32 group scales) versus float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import small_config

from maxlm import sharding
from maxlm.models.layers import dense
from maxlm.models.transformer import Transformer
from maxlm.quant.int4 import int4_group_size, pack_int4, unpack_int4
from maxlm.quant.weights import QuantizedWeight, quantize_weight
from maxlm.serve.quantize import matmul_weight_paths, quantize_model, quantize_params, weight_bytes

INT8_LOGITS_RTOL = 0.02
INT4_LOGITS_RTOL = 0.25


def _np_unpack_int4(p: np.ndarray) -> np.ndarray:
  """Independent numpy unpacking: low nibble = first half of the rows, high = second; two's complement."""
  p = p.astype(np.int32)
  lo, hi = p & 0xF, p >> 4
  lo, hi = np.where(lo >= 8, lo - 16, lo), np.where(hi >= 8, hi - 16, hi)
  return np.concatenate([lo, hi], axis=-2)


def _np_dequant(qw: QuantizedWeight) -> np.ndarray:
  """float64 dequantized weight of one layer [*layer_shape], from the stored arrays only."""
  shape, c = qw.layer_shape, qw.contract
  k, n = int(np.prod(shape[:c])), int(np.prod(shape[c:]))
  scales = np.asarray(qw.scales, np.float64)
  if qw.mode == "int8":
    w = np.asarray(qw.values, np.float64).reshape(k, n) * scales.reshape(1, n)
  else:
    w = (_np_unpack_int4(np.asarray(qw.values)) * scales[:, None, :]).reshape(k, n)
  return w.reshape(shape)


def _scale_per_element(qw: QuantizedWeight) -> np.ndarray:
  shape, c = qw.layer_shape, qw.contract
  k, n = int(np.prod(shape[:c])), int(np.prod(shape[c:]))
  s = np.asarray(qw.scales, np.float64)
  s = np.broadcast_to(s.reshape(1, n), (k, n)) if qw.mode == "int8" else np.repeat(s, qw.group, axis=0)
  return s.reshape(shape)


def test_int4_packing_round_trips_all_16_values_in_both_nibbles():
  lo, hi = np.meshgrid(np.arange(-8, 8), np.arange(-8, 8))
  q = np.stack([lo.ravel(), hi.ravel()]).astype(np.int8)  # [2, 256]: every (low, high) pair
  packed = pack_int4(jnp.asarray(q))
  assert packed.dtype == jnp.uint8 and packed.shape == (1, 256)
  assert sorted(np.asarray(packed).ravel().tolist()) == list(range(256))  # a bijection onto the bytes
  np.testing.assert_array_equal(np.asarray(unpack_int4(packed)), q)
  np.testing.assert_array_equal(_np_unpack_int4(np.asarray(packed)), q)


@pytest.mark.parametrize("mode,shape,contract,group", [
  ("int8", (32, 4, 8), 1, 0),  # q-like: [embed, heads, head_dim]
  ("int8", (4, 8, 32), 2, 0),  # o-like: two contracted axes
  ("int4", (96, 40), 1, 64),  # 96 is not divisible by 64: the group is 48, the largest even divisor <= 64
  ("int4", (4, 16, 24), 2, 128),  # K = 64 < group: one group
])
def test_quantized_matmul_matches_numpy_dequantized_weight(mode, shape, contract, group):
  rng = np.random.default_rng(0)
  w = rng.normal(size=shape).astype(np.float32)
  w[..., 0] = 0.0  # an all-zero output channel quantizes to exactly zero
  qw = quantize_weight(jnp.asarray(w), mode, contract=contract, group=group or 128)
  k = int(np.prod(shape[:contract]))
  if mode == "int4":
    assert qw.group == int4_group_size(k, group) and k % qw.group == 0 and qw.values.dtype == jnp.uint8
    assert qw.values.size * 2 == w.size  # two values per byte
    assert np.abs(_np_unpack_int4(np.asarray(qw.values))).max() <= 7
  else:
    np.testing.assert_allclose(np.asarray(qw.scales)[..., 1:],
                               np.abs(w).reshape(k, -1).max(0).reshape(shape[contract:])[..., 1:] / 127, rtol=1e-6)
  deq = _np_dequant(qw)
  assert np.all(np.abs(w - deq) <= _scale_per_element(qw) / 2 * (1 + 1e-5) + 1e-7)  # round to nearest
  np.testing.assert_allclose(np.asarray(qw.dequantize()), deq, rtol=1e-6, atol=1e-7)
  assert np.all(deq[..., 0] == 0)
  x = rng.normal(size=(2, 3, *shape[:contract])).astype(np.float32)
  ref = np.tensordot(x.astype(np.float64), deq, axes=contract)
  out = jax.jit(lambda x, q: dense(x, q, contract=contract))(jnp.asarray(x), qw)
  assert out.shape == ref.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  # Against the original float weight, the error is bounded by the rounding error of the weight.
  bound = np.tensordot(np.abs(x).astype(np.float64), _scale_per_element(qw) / 2, axes=contract)
  assert np.all(np.abs(np.asarray(out) - np.tensordot(x, w, axes=contract)) <= bound * (1 + 1e-4) + 1e-4)
  # astype changes the compute dtype only.
  assert dense(jnp.asarray(x, jnp.bfloat16), qw.astype(jnp.bfloat16), contract=contract).dtype == jnp.bfloat16


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_stacked_weight_is_quantized_per_layer_and_slices_under_scan(mode):
  w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 64, 16)), jnp.float32)  # [layers, in, out]
  qw = quantize_weight(w, mode, group=32, layer_ndim=2)
  assert qw.lead_shape == (3,) and qw.shape == (3, 64, 16) and qw.layer_shape == (64, 16)
  x = jnp.ones((2, 64))
  _, ys = jax.lax.scan(lambda c, q: (c, dense(x, q)), 0, qw)
  for i in range(3):
    one = quantize_weight(w[i], mode, group=32)
    sliced = jax.tree.map(lambda a, i=i: a[i], qw)
    np.testing.assert_array_equal(np.asarray(sliced.values), np.asarray(one.values))
    np.testing.assert_array_equal(np.asarray(sliced.scales), np.asarray(one.scales))
    np.testing.assert_allclose(np.asarray(ys[i]), np.asarray(dense(x, one)), rtol=1e-6)


def _rel(a, b) -> float:
  return float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))


def _matmul_bytes(state) -> int:
  """Bytes of the weights quantize_params converts, as stored."""
  wanted = set(matmul_weight_paths(state))
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  keep = [v for p, v in flat if "/".join(str(getattr(k, "key", k)) for k in p) in wanted]
  assert len(keep) == len(wanted)
  return weight_bytes(keep)


def _random_model(overrides: tuple[str, ...], scan: bool, pure: dict | None = None):
  """(graphdef, nnx.State) of the small model with numpy-drawn weights (std 0.02, norm scales 1): no init compile.

  With `pure` (the scan_layers=True weights as a pure dict) and scan=False: the same weights, unstacked.
  """
  cfg = small_config(*overrides, f"--config.model.scan_layers={scan}")
  with sharding.use_mesh(sharding.make_mesh(cfg.mesh)):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
  if pure is None:
    rng = np.random.default_rng(0)
    pure = jax.tree_util.tree_map_with_path(
      lambda p, x: np.ones(x.shape, np.float32) if p[-1].key == "scale" else
      (0.02 * rng.standard_normal(x.shape)).astype(np.float32), nnx.to_pure_dict(state))
  else:
    layers = {i: jax.tree.map(lambda a, i=i: a[i], pure["layers"]) for i in range(cfg.model.num_layers)}
    pure = dict(pure, layers=layers)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  return cfg, graphdef, state


def test_quantized_model_logits_and_bytes():
  overrides = ("--config.model.tie_embeddings=false",)
  cfg, graphdef, state = _random_model(overrides, scan=True)
  _, loop_graphdef, loop_state = _random_model(overrides, scan=False, pure=nnx.to_pure_dict(state))
  per_layer = ["attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down"]
  assert sorted(matmul_weight_paths(state)) == sorted(["lm_head"] + [f"layers/{p}" for p in per_layer])
  assert len(matmul_weight_paths(loop_state)) == 1 + len(per_layer) * cfg.model.num_layers
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 16)), jnp.int32)
  logits = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))
  loop_logits = jax.jit(lambda st, t: nnx.merge(loop_graphdef, st)(t))
  ref = logits(state, tokens)
  assert quantize_params(state, "none") is state

  bf16 = quantize_params(state, "bf16")
  assert bf16["embed"].get_value().dtype == jnp.float32  # the embedding table is left as it is
  assert _matmul_bytes(bf16) * 2 == _matmul_bytes(state)

  float_bytes, other = _matmul_bytes(state), weight_bytes(state) - _matmul_bytes(state)
  for mode, rtol, lo, hi in [("int8", INT8_LOGITS_RTOL, 3.5, 4.0), ("int4", INT4_LOGITS_RTOL, 6.5, 8.0)]:
    q = quantize_params(state, mode)
    assert isinstance(q["lm_head"].get_value(), QuantizedWeight)
    assert weight_bytes(q) - _matmul_bytes(q) == other  # everything else untouched
    assert lo < float_bytes / _matmul_bytes(q) < hi, (mode, float_bytes / _matmul_bytes(q))
    out = logits(q, tokens)
    assert _rel(out, ref) < rtol, (mode, _rel(out, ref))
    # scan_layers=False: each layer quantized on its own gives the same model as the stacked quantization.
    np.testing.assert_allclose(loop_logits(quantize_params(loop_state, mode), tokens), out, rtol=1e-4, atol=1e-5)
    # quantize_model: the same, on a model.
    model = quantize_model(nnx.merge(graphdef, state), mode)
    assert isinstance(model.layers.attn.q[...], QuantizedWeight)
    np.testing.assert_array_equal(logits(nnx.state(model), tokens), out)
    # A pure params dict gets the same QuantizedWeights.
    pure, var = quantize_params(nnx.to_pure_dict(state), mode)["layers"]["attn"]["o"], q["layers"]["attn"]["o"]
    assert jax.tree.structure(pure) == jax.tree.structure(var.get_value())
    jax.tree.map(np.testing.assert_array_equal, pure, var.get_value())


def test_moe_experts_router_and_tied_embeddings_are_left_alone():
  cfg = small_config("--config.model.num_experts=4", "--config.model.num_experts_per_tok=2")
  with sharding.use_mesh(sharding.make_mesh(cfg.mesh)):
    state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
  assert cfg.model.tie_embeddings
  assert sorted(matmul_weight_paths(state)) == ["layers/attn/k", "layers/attn/o", "layers/attn/q", "layers/attn/v"]


def test_bad_mode_and_group_raise_value_error():
  w = jnp.ones((64, 8))
  with pytest.raises(ValueError, match="serve.weights='int3'"):
    quantize_params({"lm_head": w}, "int3")
  for group in (0, 1, -4, 2.5, "128"):
    with pytest.raises(ValueError, match="group"):
      quantize_params({"lm_head": w}, "int4", group=group)
  with pytest.raises(ValueError, match="even input dimension"):
    quantize_weight(jnp.ones((63, 8)), "int4")
  with pytest.raises(ValueError, match="mode"):
    quantize_weight(w, "fp8")
  with pytest.raises(ValueError, match="contract"):
    quantize_weight(w, "int8").matmul(jnp.ones((2, 64)), contract=2)
