"""Decode-time fused projections: q|k|v and gate|up as one matmul each give the blocks' own outputs, leave the
model untouched, and are skipped for quantized weights."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from helpers import make_model, serve_config

from maxlm.serve import fused
from maxlm.serve.forward import Decoder, blocks
from maxlm.serve.quantize import quantize_model


def _biased_model():
  """The serving test model (scanned layers) with random nonzero q/k/v biases."""
  model = make_model(serve_config("--config.model.attention_bias=true"))
  rng = np.random.default_rng(0)
  for name in ("q_bias", "k_bias", "v_bias"):
    p = getattr(model.layers.attn, name)
    p[...] = jnp.asarray(rng.normal(size=p.shape), p.dtype)
  return model


def test_fused_block_outputs_equal_the_blocks_own_and_numpy():
  """v and the MLP against numpy; q and k (after RoPE) against Attention.project_qkv; the model keeps its weights."""
  model = _biased_model()
  block = blocks(model)[0]
  fused_block = fused.fuse(block)
  assert fused_block.attn.q is None and fused_block.mlp.gate is None  # replaced, not duplicated
  assert isinstance(block.attn.q[...], jax.Array) and isinstance(block.mlp.gate[...], jax.Array)  # source intact
  rng = np.random.default_rng(1)
  d = block.attn.q.shape[0]
  x = jnp.asarray(rng.normal(size=(3, 5, d)), jnp.float32)
  pos = jnp.asarray(rng.integers(0, 50, (3, 5)), jnp.int32)
  q, k, v = fused.project_qkv(fused_block, x, pos)
  rq, rk, _ = block.attn.project_qkv(x, pos)
  np.testing.assert_allclose(np.asarray(q), np.asarray(rq), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(k), np.asarray(rk), rtol=1e-5, atol=1e-5)
  xn = np.asarray(x, np.float64)
  want_v = np.einsum("bsd,dkh->bskh", xn, np.asarray(block.attn.v[...], np.float64)) + np.asarray(
    block.attn.v_bias[...], np.float64)
  np.testing.assert_allclose(np.asarray(v), want_v, rtol=1e-4, atol=1e-4)
  g, u, dn = (np.asarray(w[...], np.float64) for w in (block.mlp.gate, block.mlp.up, block.mlp.down))
  a = xn @ g
  want_mlp = (a / (1 + np.exp(-a)) * (xn @ u)) @ dn
  got = fused.mlp(fused_block, x, jnp.ones((3, 5), bool))
  np.testing.assert_allclose(np.asarray(got), want_mlp, rtol=1e-4, atol=1e-4)


def test_decoder_fuses_float_blocks_and_keeps_quantized_ones():
  model = make_model(serve_config())
  decoder = Decoder(model)
  assert all(b.qkv is not None and b.gate_up is not None for b in decoder.blocks)
  unfused = Decoder(model, fuse_projections=False)
  assert all(getattr(b, "qkv", None) is None for b in unfused.blocks)
  quantized = Decoder(quantize_model(model, "int8"))
  assert all(getattr(b, "qkv", None) is None for b in quantized.blocks)
  # the fused decoder holds no more weight bytes than the unfused one (the concatenations replace the originals)
  size = lambda dec: sum(x.size for x in jax.tree.leaves(nnx.state(dec, nnx.Param)))  # noqa: E731
  assert size(decoder) == size(unfused)
