"""Model properties: causality, GQA == MHA with repeated K/V, RoPE, windows, scan == loop, backends."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import apply, build_model, small_config

from maxlm.models.attention import Attention, attention_mask, xla_attention
from maxlm.models.layers import apply_rope, rope_inv_freq
from maxlm.train.step import batch_loss_sums

TOL = dict(rtol=2e-5, atol=2e-5)


def _tokens(shape, vocab=512, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@pytest.mark.parametrize("attention", ["xla", "dot_product"])
@pytest.mark.parametrize("scan", [True, False])
def test_changing_future_tokens_leaves_past_logits_unchanged(attention, scan):
  cfg = small_config(f"--config.model.attention={attention}", f"--config.model.scan_layers={scan}")
  graphdef, params = build_model(cfg)
  a = _tokens((2, 32))
  b = a.at[:, 20:].set(_tokens((2, 12), seed=1))
  la, lb = apply(graphdef, params, a), apply(graphdef, params, b)
  np.testing.assert_allclose(la[:, :20], lb[:, :20], **TOL)
  assert not np.allclose(la[:, 20:], lb[:, 20:], atol=1e-3)  # the future did change


@pytest.mark.parametrize("attention", ["xla", "dot_product"])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_kv(attention, kv_heads):
  gqa_cfg = small_config(f"--config.model.num_kv_heads={kv_heads}", f"--config.model.attention={attention}")
  mha_cfg = small_config("--config.model.num_kv_heads=4", f"--config.model.attention={attention}")
  graphdef, params = build_model(gqa_cfg)
  mha_graphdef, mha_params = build_model(mha_cfg)
  group = 4 // kv_heads
  attn = dict(params["layers"]["attn"])
  # Query head h reads kv head h // group, so each kv head is repeated (not tiled) group times.
  attn["k"] = jnp.repeat(attn["k"], group, axis=2)  # [layers, embed, kv_heads, head_dim]
  attn["v"] = jnp.repeat(attn["v"], group, axis=2)
  mha_params = jax.tree.map(lambda x: x, params)
  mha_params["layers"]["attn"] = attn
  tokens = _tokens((2, 24))
  np.testing.assert_allclose(apply(graphdef, params, tokens), apply(mha_graphdef, mha_params, tokens), **TOL)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 64)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 64)), jnp.float32)
  inv = rope_inv_freq(64, 10000.0)

  def score(m, n):
    qm = apply_rope(q, jnp.array([[m]]), inv)
    kn = apply_rope(k, jnp.array([[n]]), inv)
    return float(jnp.sum(qm * kn))

  base = score(7, 3)
  for shift in (1, 50, 1000):
    assert score(7 + shift, 3 + shift) == pytest.approx(base, rel=1e-4, abs=1e-4)
  assert score(8, 3) != pytest.approx(base, rel=1e-3)
  # Rotation preserves norms.
  np.testing.assert_allclose(jnp.linalg.norm(apply_rope(q, jnp.array([[123]]), inv)), jnp.linalg.norm(q), rtol=1e-5)


def test_llama3_rope_scaling_matches_transformers():
  from transformers import LlamaConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  hf = LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=131072, rope_parameters={
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
  expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
  ours = rope_inv_freq(128, 500000.0, "llama3", 8.0, 1.0, 4.0, 8192)
  np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)
  assert not np.allclose(ours, rope_inv_freq(128, 500000.0))  # the scaling did something


def _numpy_attention(q, k, v, mask):
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  s = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(q.shape[-1])
  s = np.where(mask[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhst,bthd->bshd", p, v)


@pytest.mark.parametrize("window", [None, 1, 5])
def test_attention_matches_numpy_reference_with_segments_and_window(window):
  rng = np.random.default_rng(1)
  b, s, h, kv, d = 2, 16, 4, 2, 8
  q, k, v = (rng.normal(size=shape).astype(np.float32) for shape in [(b, s, h, d), (b, s, kv, d), (b, s, kv, d)])
  seg = np.array([[1] * 6 + [2] * 7 + [0] * 3, [1] * 16])
  i, j = np.arange(s)[:, None], np.arange(s)[None, :]
  mask = (i >= j) & (seg[:, :, None] == seg[:, None, :])
  if window:
    mask &= (i - j < window)
  expected = _numpy_attention(q, k, v, mask)
  got = xla_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                      attention_mask(s, s, jnp.asarray(seg), window), d ** -0.5)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # the slow job of .ci/run
def test_sliding_window_limits_receptive_field():
  cfg = small_config("--config.model.num_layers=1", "--config.model.sliding_window=4")
  graphdef, params = build_model(cfg)
  a = _tokens((1, 16))
  b = a.at[:, 5].set((a[0, 5] + 1) % 512)
  la, lb = apply(graphdef, params, a), apply(graphdef, params, b)
  # One layer, window 4: position t sees t-3..t, so a change at 5 reaches exactly positions 5..8.
  np.testing.assert_allclose(la[:, 9:], lb[:, 9:], **TOL)
  np.testing.assert_allclose(la[:, :5], lb[:, :5], **TOL)
  assert not np.allclose(la[:, 8], lb[:, 8], atol=1e-4)


def _reference_attention(self, x, positions, segment_ids, mask=None):
  """Attention.__call__ for one unpacked sequence, masked by a numpy causal-window mask (no maxlm mask code)."""
  assert segment_ids is None and mask is None
  q, k, v = self.project_qkv(x, positions)
  i, j = np.arange(x.shape[1])[:, None], np.arange(x.shape[1])[None, :]
  mask = (i >= j) & (i - j < self.sliding_window)
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  scores = jnp.einsum("bshd,bthd->bhst", q, k, precision="highest") * self.scale
  probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
  out = jnp.einsum("bhst,bthd->bshd", probs, v, precision="highest")
  return self.project_out(out.astype(x.dtype))


@pytest.mark.parametrize("attention", ["xla", "dot_product", "ring", "pallas_flash"])
def test_backends_agree_on_packed_rows(attention, monkeypatch):
  # Each backend on packed rows (segments, restarting positions, a window, padding) against every document run
  # alone through the same weights with the attention above as the reference.
  cfg = small_config(f"--config.model.attention={attention}", "--config.model.sliding_window=6")
  graphdef, params = build_model(cfg)
  tokens = _tokens((2, 20))
  docs = [(0, 0, 8), (0, 8, 20), (1, 0, 15)]  # (row, start, end); row 1 ends in 5 padding tokens (segment 0)
  seg = jnp.asarray([[1] * 8 + [2] * 12, [1] * 15 + [0] * 5], jnp.int32)
  pos = jnp.asarray([list(range(8)) + list(range(12)), list(range(15)) + [0] * 5], jnp.int32)
  packed = np.asarray(apply(graphdef, params, tokens, pos, seg))
  # One row per document, at its start (positions from 0); what follows it cannot reach it under a causal mask.
  alone_tokens = jnp.stack([jnp.pad(tokens[row, start:end], (0, 20 - (end - start))) for row, start, end in docs])
  with monkeypatch.context() as m:
    m.setattr(Attention, "__call__", _reference_attention)
    alone = np.asarray(apply(graphdef, params, alone_tokens))
  for n, (row, start, end) in enumerate(docs):
    np.testing.assert_allclose(packed[row, start:end], alone[n, :end - start], err_msg=f"document {n}", **TOL)


def test_scan_equals_unrolled_layers():
  scan_cfg = small_config("--config.model.scan_layers=true")
  loop_cfg = small_config("--config.model.scan_layers=false")
  graphdef, params = build_model(scan_cfg)
  loop_graphdef, loop_params = build_model(loop_cfg)
  num_layers = scan_cfg.model.num_layers
  assert sorted(loop_params["layers"]) == list(range(num_layers))
  loop_params = dict(loop_params, layers={i: jax.tree.map(lambda x, i=i: x[i], params["layers"])
                                          for i in range(num_layers)})
  tokens = _tokens((2, 16))
  np.testing.assert_allclose(apply(graphdef, params, tokens), apply(loop_graphdef, loop_params, tokens), **TOL)


@pytest.mark.parametrize("attention", ["xla", "dot_product"])
def test_packed_loss_equals_separate_documents(attention):
  cfg = small_config(f"--config.model.attention={attention}")
  graphdef, params = build_model(cfg)
  doc_a, doc_b = np.asarray(_tokens((1, 11), seed=2))[0], np.asarray(_tokens((1, 7), seed=3))[0]
  L = 24

  def row(docs):
    inputs, targets, seg, pos = (np.zeros(L, np.int32) for _ in range(4))
    at = 0
    for n, doc in enumerate(docs, 1):
      m = len(doc) - 1
      inputs[at:at + m], targets[at:at + m] = doc[:-1], doc[1:]
      seg[at:at + m], pos[at:at + m] = n, np.arange(m)
      at += m
    return {k: jnp.asarray(v)[None] for k, v in dict(inputs=inputs, targets=targets, segment_ids=seg,
                                                     positions=pos).items()}

  _, (packed_nll, _, packed_count) = batch_loss_sums(params, graphdef, row([doc_a, doc_b]), 0.0)
  sep = [batch_loss_sums(params, graphdef, row([d]), 0.0)[1] for d in (doc_a, doc_b)]
  assert float(packed_count) == len(doc_a) - 1 + len(doc_b) - 1
  np.testing.assert_allclose(float(packed_nll), sum(float(s[0]) for s in sep), rtol=1e-5)


@pytest.mark.slow  # the slow job of .ci/run
def test_remat_policies_give_the_same_gradients():
  tokens = _tokens((2, 16))
  batch = dict(inputs=tokens, targets=jnp.roll(tokens, -1, axis=1), segment_ids=jnp.ones_like(tokens),
               positions=jnp.broadcast_to(jnp.arange(16), tokens.shape))
  grads = []
  for remat in ("none", "full", "dots_saveable"):
    graphdef, params = build_model(small_config(f"--config.model.remat={remat}"))
    grads.append(jax.grad(lambda p, graphdef=graphdef: batch_loss_sums(p, graphdef, batch, 1e-4)[0])(params))
  # Recomputation reorders float32 sums: an entry near zero in a gradient whose entries reach ~2 may differ by a
  # rounding step of its neighbours (1.5e-7 was seen), so atol is a few float32 epsilons of the array's scale.
  for g in grads[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=4 * np.finfo(np.float32).eps * float(np.max(np.abs(a)))), grads[0], g)


def test_tied_and_untied_embeddings_have_the_expected_parameters():
  _, tied = build_model(small_config("--config.model.tie_embeddings=true"))
  _, untied = build_model(small_config("--config.model.tie_embeddings=false"))
  assert "lm_head" not in tied and untied["lm_head"].shape == (64, 512)
  assert tied["embed"].shape == (512, 64)


def test_bfloat16_compute_tracks_float32():
  graphdef32, params = build_model(small_config("--config.model.dtype=float32"))
  graphdef16, params16 = build_model(small_config("--config.model.dtype=bfloat16"))
  assert jax.tree.leaves(params16)[0].dtype == jnp.float32  # master weights stay fp32
  tokens = _tokens((2, 16))
  l32, l16 = apply(graphdef32, params, tokens), apply(graphdef16, params, tokens)
  assert l16.dtype == jnp.bfloat16
  p32, p16 = jax.nn.softmax(l32), jax.nn.softmax(l16.astype(jnp.float32))
  assert float(jnp.max(jnp.abs(p32 - p16))) < 2e-2  # bf16 keeps ~3 significant digits
