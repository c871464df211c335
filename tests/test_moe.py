"""Mixture of Experts: routing and the grouped-matmul experts against a dense numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config
from flax import nnx

from maxlm import metrics, sharding
from maxlm.config import ConfigError
from maxlm.models.moe import MoE


def _moe(experts=4, k=2, seed=0):
  cfg = small_config(f"--config.model.num_experts={experts}", f"--config.model.num_experts_per_tok={k}",
                     "--config.model.init_std=0.2")
  with sharding.use_mesh(sharding.make_mesh(cfg.mesh)):
    return MoE(cfg.model, rngs=nnx.Rngs(seed)), cfg


def _numpy_reference(x, router, gate, up, down, k):
  """Every token through its top-k experts one at a time (float64), weights renormalised over the k."""
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  logits = x @ router
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.zeros_like(x)
  for t in range(len(x)):
    top = np.argsort(-probs[t], kind="stable")[:k]
    w = probs[t, top] / probs[t, top].sum()
    for e, we in zip(top, w):
      g = x[t] @ gate[e]
      h = g / (1 + np.exp(-g)) * (x[t] @ up[e])
      out[t] += we * (h @ down[e])
  return out


@pytest.mark.parametrize("experts, k", [(4, 2), (8, 1), (4, 4)])
def test_moe_matches_reference(experts, k):
  moe, cfg = _moe(experts, k)
  x = jax.random.normal(jax.random.key(1), (3, 10, cfg.model.d_model))
  params = {n: np.asarray(getattr(moe, n)[...], np.float64) for n in ("router", "gate", "up", "down")}
  ref = _numpy_reference(x, params["router"], params["gate"], params["up"], params["down"], k)
  out = np.asarray(moe(x)).reshape(ref.shape)
  np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-5)


def test_moe_gradients_match_dense_formulation():
  """Gradients through the sorted ragged_dot path equal those of computing every expert and masking."""
  moe, cfg = _moe(4, 2)
  x = jax.random.normal(jax.random.key(2), (2, 8, cfg.model.d_model))
  graphdef, state = nnx.split(moe)

  def dense(state, x):
    p = nnx.to_pure_dict(state)
    t = x.reshape(-1, x.shape[-1])
    probs = jax.nn.softmax(t @ p["router"], -1)
    w, idx = jax.lax.top_k(probs, 2)
    w = w / w.sum(-1, keepdims=True)
    gates = jnp.zeros_like(probs).at[jnp.arange(len(t))[:, None], idx].set(w)  # [t, e]
    h = jax.nn.silu(jnp.einsum("td,edf->tef", t, p["gate"])) * jnp.einsum("td,edf->tef", t, p["up"])
    y = jnp.einsum("tef,efd->ted", h, p["down"])
    return (jnp.einsum("ted,te->td", y, gates) ** 2).sum()

  def ours(state, x):
    return (nnx.merge(graphdef, state)(x) ** 2).sum()

  g_ref = jax.grad(dense, argnums=(0, 1))(state, x)
  g_out = jax.grad(ours, argnums=(0, 1))(state, x)
  for a, b in zip(jax.tree.leaves(g_out), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_moe_flops_count_active_experts_only():
  dense = small_config()
  moe = small_config("--config.model.num_experts=8", "--config.model.num_experts_per_tok=2")
  m = dense.model
  extra = m.num_layers * (3 * m.d_model * m.mlp_dim + m.d_model * 8)  # one more expert + the router
  assert metrics.matmul_params_per_token(moe.model) - metrics.matmul_params_per_token(dense.model) == extra


@pytest.mark.parametrize("override, message", [
  ("--config.model.num_experts=-1", "num_experts"),
  ("--config.model.num_experts_per_tok=5", "num_experts_per_tok=5"),
])
def test_moe_config_errors(override, message):
  with pytest.raises(ConfigError, match=message):
    small_config("--config.model.num_experts=4", override)
