"""The multi-step decode loop's K/V buffers: the aligned layout's columns and mask, the split layout's attention
against numpy, and the engine equal to full forward passes with a sliding window across decode calls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import make_engine, make_model, random_prompts, serve_config

from maxlm.generate import sample_tokens
from maxlm.serve import kv_cache, ring
from maxlm.serve.request import SamplingParams


@pytest.mark.parametrize("window", [None, 3, 6])
def test_aligned_buffers_and_mask_hold_exactly_each_rows_tokens(window):
  """Rows with different cached lengths in a paged cache: column c of row r holds position pos[r] - span + c, and
  the mask shows a step's query exactly the positions a causal (windowed) mask over the sequence would."""
  rng = np.random.default_rng(0)
  b, kv, d, page, span, steps = 3, 2, 4, 4, 16, 5
  pos = np.array([3, 9, 16])
  spec = kv_cache.CacheSpec(layers=1, kv_heads=kv, head_dim=d, page_size=page, num_pages=13, max_pages=4,
                            dtype="float32")
  table = jnp.asarray(np.arange(1, 13, dtype=np.int32).reshape(b, 4)[:, ::-1].copy())  # pages out of order
  values = rng.normal(size=(b, span, kv, d)).astype(np.float32)
  positions = np.broadcast_to(np.arange(span), (b, span))
  layer = kv_cache.write_kv(kv_cache.init_cache(spec)[0], jnp.asarray(values), jnp.asarray(values),
                            jnp.asarray(positions), jnp.asarray(positions < pos[:, None]), table, jnp.asarray(pos))
  (k, v), = ring.aligned_buffers([layer], table, jnp.asarray(pos), span, steps)
  assert k.shape == (b, kv, span + steps, d)
  for r in range(b):
    for p in range(pos[r]):
      np.testing.assert_array_equal(np.asarray(k[r, :, span - pos[r] + p]), values[r, p])
      np.testing.assert_array_equal(np.asarray(v[r, :, span - pos[r] + p]), values[r, p])
    assert not np.any(np.asarray(k[r, :, span:]))  # the step columns start empty
  for step in range(steps):
    mask = np.asarray(ring.aligned_mask(jnp.asarray(pos), span, steps, jnp.int32(step), window))[:, 0]
    for r in range(b):
      key = pos[r] - span + np.arange(span + steps)  # each column's position
      query = pos[r] + step
      want = (key >= 0) & (key <= query)
      if window is not None:
        want &= query - key < window
      np.testing.assert_array_equal(mask[r], want)


def numpy_attention(q, k, v, q_pos, k_pos, k_ok, scale, window):
  """Softmax attention of q [h, d] over keys k, v [t, kv, d] at k_pos [t] (usable where k_ok), one query position."""
  h, d = q.shape
  kv = k.shape[1]
  out = np.zeros((h, d))
  for head in range(h):
    g = head // (h // kv)
    see = k_ok & (k_pos <= q_pos)
    if window is not None:
      see &= q_pos - k_pos < window
    s = np.where(see, k[:, g] @ q[head] * scale, -np.inf)
    p = np.exp(s - s.max())
    out[head] = (p / p.sum()) @ v[:, g]
  return out


@pytest.mark.parametrize("window", [None, 3, 6])
def test_split_attention_equals_attention_over_the_whole_cache(window):
  """Rows with different cached lengths, at several steps: the old span (with stale entries past each row's length)
  plus the step buffer (with stale columns past `step`) give numpy's attention over the real keys only."""
  rng = np.random.default_rng(0)
  b, h, kv, d, span, steps = 3, 4, 2, 8, 16, 5
  old_len = np.array([3, 9, 0])
  k_old, v_old = rng.normal(size=(2, b, kv, span, d)).astype(np.float32)
  k_new, v_new = rng.normal(size=(2, b, kv, steps, d)).astype(np.float32)
  for step in range(steps):
    q = rng.normal(size=(b, 1, h, d)).astype(np.float32)
    got = ring.split_attention(jnp.asarray(q), jnp.asarray(k_old), jnp.asarray(v_old), jnp.asarray(k_new),
                               jnp.asarray(v_new), jnp.asarray(old_len), jnp.int32(step), 0.3, window)
    for row in range(b):
      n = old_len[row]
      keys = np.concatenate([k_old[row, :, :n], k_new[row]], axis=1).transpose(1, 0, 2)  # [t, kv, d]
      vals = np.concatenate([v_old[row, :, :n], v_new[row]], axis=1).transpose(1, 0, 2)
      k_pos = np.concatenate([np.arange(n), n + np.arange(steps)])
      k_ok = np.concatenate([np.ones(n, bool), np.arange(steps) <= step])
      want = numpy_attention(q[row, 0], keys, vals, n + step, k_pos, k_ok, 0.3, window)
      np.testing.assert_allclose(np.asarray(got[row, 0]), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("layout,batch", [("paged", 4), ("contiguous", 4), ("paged", 1)])
def test_sliding_window_engine_equals_full_forward_across_calls(layout, batch):
  """A model with a 7-token window, prompts longer than it, 20 tokens in calls of 8 steps: every greedy token equals
  repeated full forward passes (the window crosses the span cached before a call and the call's own steps; batch 1
  takes the split layout, larger batches the aligned one)."""
  cfg = serve_config("--config.model.sliding_window=7")
  model = make_model(cfg, seed=3)
  graphdef, state = nnx.split(model)
  params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
  prompts = random_prompts((11, 4, 19), seed=5)
  want = [sample_tokens(graphdef, state, p, params.max_tokens, max_len=64, temperature=0) for p in prompts]
  engine = make_engine(model, "--config.model.sliding_window=7", f"--config.serve.kv_layout={layout}",
                       "--config.serve.decode_steps=8", f"--config.serve.max_batch={batch}")
  assert engine.generate(prompts, params) == want
  assert jax.tree.leaves(engine.cache)[0].shape[0] == engine.cache_spec.num_pages  # the cache came back whole
