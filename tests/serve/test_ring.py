"""The multi-step decode loop's split K/V (old span + per-step buffer): attention equal to a numpy softmax over the
whole cache, and the engine equal to full forward passes with a sliding window and across decode_steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import make_engine, make_model, random_prompts, serve_config

from maxlm.generate import sample_tokens
from maxlm.serve import ring
from maxlm.serve.request import SamplingParams


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


@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_sliding_window_engine_equals_full_forward_across_calls(layout):
  """A model with a 7-token window, prompts longer than it, 20 tokens in calls of 8 steps: every greedy token equals
  repeated full forward passes (the window crosses both the old span and the step buffer)."""
  cfg = serve_config("--config.model.sliding_window=7")
  model = make_model(cfg, seed=3)
  graphdef, state = nnx.split(model)
  params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
  prompts = random_prompts((11, 4, 19), seed=5)
  want = [sample_tokens(graphdef, state, p, params.max_tokens, max_len=64, temperature=0) for p in prompts]
  engine = make_engine(model, "--config.model.sliding_window=7", f"--config.serve.kv_layout={layout}",
                       "--config.serve.decode_steps=8")
  assert engine.generate(prompts, params) == want
  assert jax.tree.leaves(engine.cache)[0].shape[0] == engine.cache_spec.num_pages  # the cache came back whole
