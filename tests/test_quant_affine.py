"""AffineWeight (GPTQ-style codes, scales, zero points, act-order permutation): its matmul and dequantization equal
the float weight rebuilt in numpy from GPTQ's definition w[r, c] = scale[g_idx[r], c] * (code[r, c] - zero[...])."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm.models.layers import dense
from maxlm.quant.affine import AffineWeight, affine_weight, gptq_arrays, stack_layers


def _arrays(rng, k, n, bits, group, act_order):
  groups = -(-k // group)  # the last group is short when group does not divide k
  codes = rng.integers(0, 2**bits, (k, n))
  scale = rng.uniform(0.01, 0.1, (groups, n)).astype(np.float32)
  zero = rng.integers(0, 2**bits, (groups, n))
  g_idx = np.arange(k) // group
  if act_order:
    g_idx = rng.permutation(g_idx)
  return codes, scale, zero, g_idx


def _reference(codes, scale, zero, g_idx):
  return scale[g_idx] * (codes - zero[g_idx]).astype(np.float64)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("k", [64, 56])  # 56: groups of 16, 16, 16 and 8
def test_matmul_and_dequantize_equal_the_gptq_definition(bits, act_order, k):
  rng = np.random.default_rng(bits)
  n, group = 24, 16
  arrays = _arrays(rng, k, n, bits, group, act_order)
  w = affine_weight(*arrays, bits=bits, group=group, layer_shape=(k, n))
  want = _reference(*arrays)
  np.testing.assert_allclose(np.asarray(w.dequantize()), want, rtol=1e-6, atol=1e-7)
  x = rng.standard_normal((3, 5, k)).astype(np.float32)
  got = jax.jit(lambda x, w: dense(x, w))(x, w)
  np.testing.assert_allclose(np.asarray(got), x.astype(np.float64) @ want, rtol=2e-5, atol=2e-5)
  assert (w.perm is not None) == act_order
  # The arrays GPTQ's export packs come back exactly.
  for got_a, want_a in zip(gptq_arrays(w), arrays):
    np.testing.assert_array_equal(got_a, want_a)


def test_contract_two_and_stacked_layers_and_bf16():
  rng = np.random.default_rng(0)
  heads, hd, d, group = 4, 8, 12, 8  # an attention output projection [heads, head_dim, d_model]
  layers = [affine_weight(*_arrays(rng, heads * hd, d, 4, group, i == 1), bits=4, group=group,
                          layer_shape=(heads, hd, d), contract=2) for i in range(2)]
  stacked = stack_layers(layers)
  assert stacked.shape == (2, heads, hd, d) and stacked.perm.shape == (2, heads * hd)
  x = rng.standard_normal((2, 3, heads, hd)).astype(np.float32)
  for i, layer in enumerate(layers):
    sliced = jax.tree.map(lambda a, i=i: a[i], stacked)
    want = np.einsum("bthk,hkd->btd", x, np.asarray(layer.dequantize()))
    np.testing.assert_allclose(np.asarray(sliced.matmul(x, contract=2)), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(stacked.dequantize()[i]), np.asarray(layer.dequantize()))
    half = jax.jit(lambda w, x: w.astype(jnp.bfloat16).matmul(x, contract=2))(sliced, x)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), want, rtol=3e-2, atol=3e-2)
  assert isinstance(stacked, AffineWeight) and stacked.nbytes < 4 * 2 * heads * hd * d / 2


def test_bad_arrays_are_named():
  rng = np.random.default_rng(0)
  codes, scale, zero, g_idx = _arrays(rng, 32, 8, 4, 8, False)
  with pytest.raises(ValueError, match="bits=5"):
    affine_weight(codes, scale, zero, g_idx, bits=5, group=8, layer_shape=(32, 8))
  with pytest.raises(ValueError, match="outside"):
    affine_weight(codes + 16, scale, zero, g_idx, bits=4, group=8, layer_shape=(32, 8))
  with pytest.raises(ValueError, match="do not describe"):
    affine_weight(codes, scale, zero, g_idx, bits=4, group=8, layer_shape=(16, 8))
  with pytest.raises(ValueError, match="must be even"):
    affine_weight(codes, scale, zero, g_idx, bits=4, group=7, layer_shape=(32, 8))
  with pytest.raises(ValueError, match="must hold 8 rows"):
    affine_weight(codes, scale, zero, np.minimum(g_idx + 1, 3), bits=4, group=8, layer_shape=(32, 8))
  with pytest.raises(ValueError, match="contract=1"):
    affine_weight(codes, scale, zero, g_idx, bits=4, group=8, layer_shape=(32, 8)).matmul(np.ones((2, 4, 8)),
                                                                                          contract=2)
