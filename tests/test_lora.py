"""LoRA adapters (maxlm.models.lora) against their definition: y = x W + scale * (x A) B with B zero at the start,
gradients equal to those of the dense reparameterization W + scale * A B, merging, and the frozen base."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import small_config

from maxlm import sharding
from maxlm.models.lora import LoRA, LoRABase, LoRAMatmul, LoRAParam, apply_lora, lora_scale, merge_lora
from maxlm.models.transformer import Transformer


def _model(scan: str):
  cfg = small_config(f"--config.model.scan_layers={scan}")
  with sharding.use_mesh(sharding.make_mesh(cfg.mesh)):
    return Transformer(cfg.model, rngs=nnx.Rngs(0)), cfg


def _tokens(cfg, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.model.vocab_size, (2, 12)), jnp.int32)


def _adapted(model):
  return {path: m for path, m in nnx.iter_modules(model) if isinstance(m, LoRA)}


@pytest.mark.parametrize("scan", ["true", "false"])
def test_step_zero_equals_the_base_exactly_and_only_adapters_are_params(scan):
  model, cfg = _model(scan)
  tokens = _tokens(cfg)
  base_logits = np.asarray(model(tokens))
  with sharding.use_mesh(sharding.make_mesh(cfg.mesh)):
    paths = apply_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  layers = 1 if scan == "true" else cfg.model.num_layers
  assert len(paths) == 7 * layers and all(p.startswith("layers.") for p in paths)
  np.testing.assert_array_equal(np.asarray(model(tokens)), base_logits)
  params = nnx.state(model, nnx.Param)
  adapter_leaves = jax.tree.leaves(nnx.state(model, LoRAParam))
  assert len(adapter_leaves) == 2 * len(paths)
  assert not jax.tree.leaves(nnx.state(params, LoRABase))  # bases are not parameters
  assert len(jax.tree.leaves(nnx.state(model, LoRABase))) == len(paths)
  for module in _adapted(model).values():
    assert not np.any(np.asarray(module.b[...]))
    a = np.asarray(module.a[...])
    fan_in = np.prod(a.shape[a.ndim - 1 - module.contract:-1])
    assert np.abs(a).max() <= 1 / np.sqrt(fan_in) and np.abs(a).max() > 0.5 / np.sqrt(fan_in)


def test_targets_select_projections_and_bad_settings_are_named():
  model, cfg = _model("false")
  with sharding.use_mesh(sharding.make_mesh(cfg.mesh)):
    paths = apply_lora(model, rank=2, alpha=2.0, targets=r"layers\.1\.attn\.(q|v)", rngs=nnx.Rngs(0))
    assert paths == ["layers.1.attn.q", "layers.1.attn.v"]
    with pytest.raises(ValueError, match="matches none of the model's projections"):
      apply_lora(model, rank=2, alpha=2.0, targets=r"nothing", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="lora.rank must be >= 1"):
      apply_lora(model, rank=0, alpha=2.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not a regular expression"):
      apply_lora(model, rank=2, alpha=2.0, targets="(", rngs=nnx.Rngs(0))


def test_scale_follows_lora_and_rslora():
  assert lora_scale(16.0, 4, False) == 4.0 and lora_scale(16.0, 4, True) == 8.0


def _randomize_b(model, seed=3):
  rng = np.random.default_rng(seed)
  for module in _adapted(model).values():
    module.b[...] = jnp.asarray(rng.normal(0, 0.5, module.b[...].shape), module.b[...].dtype)


@pytest.mark.parametrize("scan,rslora", [("true", False), ("false", True)])
def test_gradients_equal_the_dense_reparameterization(scan, rslora):
  """d loss / d(A, B) through the adapted model equals d loss / d(A, B) of the base model whose weights are set to
  W + scale * A B (formed here with numpy-style einsum, no maxlm LoRA code in the reference)."""
  model, cfg = _model(scan)
  base_graphdef, base_state = nnx.split(model)
  base_params = nnx.to_pure_dict(base_state)
  tokens = _tokens(cfg, 1)
  with sharding.use_mesh(sharding.make_mesh(cfg.mesh)):
    apply_lora(model, rank=3, alpha=6.0, rslora=rslora, rngs=nnx.Rngs(2))
  _randomize_b(model)
  scale = lora_scale(6.0, 3, rslora)
  adapted = _adapted(model)

  def loss_of(logits):
    return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0] ** 2)

  graphdef, adapters, rest = nnx.split(model, LoRAParam, ...)
  ours = jax.grad(lambda ad: loss_of(nnx.merge(graphdef, ad, rest)(tokens)))(adapters)

  flat = nnx.to_pure_dict(adapters)

  def at(tree, path):
    for p in path:
      tree = tree[p]
    return tree

  def reference(ab):
    params = jax.tree.map(lambda x: x, base_params)
    for path, module in adapted.items():
      a, b = ab[path]
      lead = a.ndim - 1 - module.contract
      w = at(base_params, path[:-1])[path[-1]]
      a2 = a.reshape(*a.shape[:lead], -1, a.shape[-1])
      b2 = b.reshape(*b.shape[:lead + 1], -1)
      delta = jnp.einsum("...ir,...ro->...io", a2, b2).reshape(w.shape)
      at(params, path[:-1])[path[-1]] = w + scale * delta
    return loss_of(nnx.merge(base_graphdef, params)(tokens))

  ab = {path: (at(flat, path)["a"], at(flat, path)["b"]) for path in adapted}
  theirs = jax.grad(reference)(ab)
  ours_flat = nnx.to_pure_dict(ours)
  for path in adapted:  # float32 sums in two orders: within 1e-5 of each gradient's scale
    for i, name in enumerate(("a", "b")):
      want = np.asarray(theirs[path][i])
      assert np.abs(want).max() > 0, path
      np.testing.assert_allclose(at(ours_flat, path)[name], want, rtol=0, atol=1e-5 * np.abs(want).max(),
                                 err_msg=f"{path} {name}")


@pytest.mark.parametrize("scan", ["true", "false"])
def test_merge_gives_base_plus_scaled_product(scan):
  model, cfg = _model(scan)
  tokens = _tokens(cfg, 2)
  with sharding.use_mesh(sharding.make_mesh(cfg.mesh)):
    apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(5))
  _randomize_b(model, 7)
  before = {path: (np.asarray(m.base[...], np.float64), np.asarray(m.a[...], np.float64),
                   np.asarray(m.b[...], np.float64), m.contract) for path, m in _adapted(model).items()}
  adapted_logits = np.asarray(model(tokens))
  with sharding.use_mesh(sharding.make_mesh(cfg.mesh)):
    merged = merge_lora(model)
  assert len(merged) == len(before) and not _adapted(model)
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for path, (w, a, b, contract) in before.items():
    got = state
    for p in path:
      got = got[p]
    lead = a.ndim - 1 - contract
    want = w + 2.0 * np.einsum("...ir,...ro->...io", a.reshape(*a.shape[:lead], -1, a.shape[-1]),
                               b.reshape(*b.shape[:lead + 1], -1)).reshape(w.shape)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(model(tokens)), adapted_logits, rtol=1e-4, atol=1e-4)


def test_dropout_masks_the_adapter_input_only_and_a_zero_key_switches_it_off():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32)
  w, a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((8, 6), (8, 2), (2, 6)))
  p, scale = 0.25, 1.5
  off = LoRAMatmul(w, a, b, scale, 1, jnp.zeros(2, jnp.uint32), p)
  plain = np.asarray(x) @ np.asarray(w) + scale * (np.asarray(x) @ np.asarray(a)) @ np.asarray(b)
  np.testing.assert_allclose(np.asarray(off.matmul(x)), plain, rtol=1e-5, atol=1e-5)
  key = jnp.asarray([3, 7], jnp.uint32)
  keep = np.asarray(jax.random.bernoulli(key, 1 - p, x.shape))  # the mask the key draws (jax's definition)
  dropped = np.where(keep, np.asarray(x) / (1 - p), 0)
  want = np.asarray(x) @ np.asarray(w) + scale * (dropped @ np.asarray(a)) @ np.asarray(b)
  on = LoRAMatmul(w, a, b, scale, 1, key, p)
  np.testing.assert_allclose(np.asarray(on.matmul(x)), want, rtol=1e-5, atol=1e-5)
  assert 0.6 < keep.mean() < 0.9
