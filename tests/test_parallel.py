"""Scale-out on 8 simulated devices: every preset trains like 1 device, shardings follow the rules,
checkpoints restore across mesh shapes, and meshes that do not divide the model fail early."""

import jax
import numpy as np
import pytest
from helpers import small_config

from maxlm import sharding
from maxlm.config import ConfigError
from maxlm.metrics import read_metrics
from maxlm.train import loop
from maxlm.train.optim import make_optimizer
from maxlm.train.state import abstract_train_state, init_train_state

# batch 8 so that 8-way batch splits divide it; loader_streams fixed so the data never depends on the mesh; a
# constant learning rate after warmup so that runs of different lengths (and resumed runs) share a schedule.
BASE = ("--config.train.schedule=constant", "--config.data.batch_size=8", "--config.train.eval_every=0",
        "--config.train.checkpoint_every=100", "--config.data.loader_streams=1",
        "--config.train.async_checkpointing=false")
MOE = ("--config.model.num_experts=4", "--config.model.num_experts_per_tok=2",
       "--config.model.moe_capacity_factor=2.0")
MESH_1 = ("--config.mesh.data=1",)
PRESETS = {
  "dp": ("--config.sharding.preset=dp", "--config.mesh.data=8"),
  "fsdp": ("--config.sharding.preset=fsdp", "--config.mesh.data=2", "--config.mesh.fsdp=4"),
  "fsdp_tp": ("--config.sharding.preset=fsdp_tp", "--config.mesh.data=1", "--config.mesh.fsdp=4",
              "--config.mesh.tensor=2"),
  "fsdp_tp_sp": ("--config.sharding.preset=fsdp_tp_sp", "--config.mesh.data=1", "--config.mesh.fsdp=2",
                 "--config.mesh.sequence=2", "--config.mesh.tensor=2"),
  # sequence parallelism with ring attention (K/V rotate over the sequence axis instead of being all-gathered)
  "fsdp_tp_sp+ring": ("--config.sharding.preset=fsdp_tp_sp", "--config.model.attention=ring", "--config.mesh.data=1",
                      "--config.mesh.fsdp=2", "--config.mesh.sequence=2", "--config.mesh.tensor=2"),
  # the Pallas flash kernel (interpreted on CPU) under shard_map over batch and heads; custom_vjp backward
  "fsdp_tp+pallas_flash": ("--config.sharding.preset=fsdp_tp", "--config.model.attention=pallas_flash",
                           "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"),
}
STEPS = 6
# fp32 everywhere; sharded runs sum the same numbers in a different order (per-shard partial sums, then
# all-reduce), which moves a loss by ~1e-7 relative per step. Adam then feeds those differences back; over
# 6 steps they stay below 1e-5 relative, so 5e-5 is tight enough to catch any real layout bug (a wrong
# reduction or a missing shard changes the loss at the 1e-2 level).
RTOL = 5e-5


def _train(tmp_path, name, *overrides, steps=STEPS, devices=8):
  cfg = small_config(*BASE, f"--config.train.steps={steps}", *overrides)
  workdir = tmp_path / name
  loop.train(cfg, workdir, devices=jax.devices()[:devices])
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}, workdir


@pytest.fixture(scope="module")
def dense_reference(tmp_path_factory):
  return _train(tmp_path_factory.mktemp("dense1"), "ref", *MESH_1, steps=9, devices=1)[0]


# Two layouts in the default job (data; fsdp x tensor x sequence); the rest in the slow job.
_DEFAULT_PRESETS = ("fsdp_tp_sp",)  # the others run in the slow job (the default suite is near its budget)


@pytest.mark.parametrize("preset", [p if p in _DEFAULT_PRESETS else pytest.param(p, marks=pytest.mark.slow)
                                    for p in PRESETS])
def test_each_preset_trains_like_one_device(tmp_path, dense_reference, preset):
  losses, _ = _train(tmp_path, preset, *PRESETS[preset])
  assert sorted(losses) == list(range(1, STEPS + 1))
  for step, loss in losses.items():
    np.testing.assert_allclose(loss, dense_reference[step], rtol=RTOL, err_msg=f"{preset} step {step}")


@pytest.mark.slow  # ~25 s; tests/test_moe.py checks expert parallelism against one device in the default job
def test_moe_with_expert_parallelism_trains_like_one_device(tmp_path):
  ref, _ = _train(tmp_path, "moe1", *MOE, *MESH_1, devices=1)
  losses, _ = _train(tmp_path, "moe8", *MOE, "--config.mesh.data=2", "--config.mesh.expert=4")
  for step in range(1, STEPS + 1):
    np.testing.assert_allclose(losses[step], ref[step], rtol=RTOL, err_msg=f"MoE step {step}")


@pytest.mark.slow  # trains twice on three meshes: ~25 s
def test_restore_across_mesh_shapes_continues_the_same_run(tmp_path, dense_reference):
  """2x2x2 (data, fsdp, tensor) for 3 steps -> 4x2 (fsdp, tensor) to step 6 -> 1 device to step 9."""
  common = ("--config.train.checkpoint_every=3", "--config.sharding.preset=fsdp_tp")
  # Each leg stops early by lowering train.steps (the constant schedule does not depend on it).
  _, workdir = _train(tmp_path, "run", *common, "--config.mesh.data=2", "--config.mesh.fsdp=2",
                      "--config.mesh.tensor=2", steps=3)
  _train(tmp_path, "run", *common, "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2", steps=6)
  losses, _ = _train(tmp_path, "run", *common, *MESH_1, steps=9, devices=1)
  assert sorted(losses) == list(range(1, 10))
  for step in range(1, 10):
    np.testing.assert_allclose(losses[step], dense_reference[step], rtol=RTOL, err_msg=f"step {step}")


def test_parameter_and_optimizer_shardings_follow_the_rules():
  cfg = small_config(*BASE, *PRESETS["fsdp_tp"][1:], "--config.sharding.preset=fsdp_tp")
  mesh, _ = sharding.mesh_for(cfg)
  _, state, _, _ = init_train_state(cfg, mesh)
  p = state["params"]
  P = jax.sharding.PartitionSpec
  # Written out from the documented rules: embed -> fsdp; heads, kv_heads, mlp, vocab -> tensor; layers,
  # head_dim and norm scales replicated. Scanned layers carry a leading (replicated) layer axis.
  expected = {
    ("embed",): P("tensor", "fsdp"),
    ("layers", "attn", "q"): P(None, "fsdp", "tensor", None),
    ("layers", "attn", "k"): P(None, "fsdp", "tensor", None),
    ("layers", "attn", "o"): P(None, "tensor", None, "fsdp"),
    ("layers", "mlp", "gate"): P(None, "fsdp", "tensor"),
    ("layers", "mlp", "down"): P(None, "tensor", "fsdp"),
    ("layers", "attn_norm", "scale"): P(None, None),
    ("final_norm", "scale"): P(None),
  }
  mu = state["opt_state"][1][0].mu
  for path, spec in expected.items():
    leaf, moment = p, mu
    for key in path:
      leaf, moment = leaf[key], moment[key]
    assert leaf.sharding.spec == spec, (path, leaf.sharding.spec)
    assert moment.sharding.spec == spec, ("adam mu", path, moment.sharding.spec)
    # Each device holds exactly its 1/N of a sharded tensor: nothing is whole on one device.
    n = int(np.prod([mesh.shape[a] for a in spec if a]))
    assert leaf.addressable_shards[0].data.size * n == leaf.size
  abstract = abstract_train_state(cfg, mesh, make_optimizer(cfg.train))
  assert jax.tree.map(lambda x: x.sharding.spec, abstract) == jax.tree.map(lambda x: x.sharding.spec, state)


@pytest.mark.parametrize("overrides, message", [
  (("--config.mesh.data=1", "--config.mesh.tensor=4", "--config.mesh.fsdp=2"),
   "model.num_kv_heads=2 is not divisible by the 4 devices"),
  (("--config.mesh.data=1", "--config.mesh.tensor=8"), "model.num_heads=4 is not divisible by the 8 devices"),
  (("--config.mesh.data=8", "--config.data.batch_size=4"), "data.batch_size / train.grad_accum_steps"),
  (("--config.mesh.data=2", "--config.mesh.sequence=4", "--config.data.seq_len=66"),
   "data.seq_len=66 is not divisible by the 4 devices"),
  (("--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.model.d_model=68", "--config.model.head_dim=16"),
   "model.d_model=68 is not divisible by the 8 devices"),
  (("--config.mesh.data=4", "--config.mesh.tensor=2", "--config.sharding.preset=fsdp"),
   "mesh.tensor=2: no sharding rule"),
  (("--config.mesh.data=3",), "need 3 devices, 8 are available"),
  (("--config.mesh.data=-1", "--config.mesh.fsdp=3"), "not divisible by the fixed axes' product 3"),
])
def test_mesh_that_does_not_divide_the_model_fails_naming_both_numbers(overrides, message):
  cfg = small_config(*BASE, *overrides)
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("/", "/")):
    sharding.mesh_for(cfg)


def test_sharding_rule_overrides_are_validated_and_applied():
  cfg = small_config("--config.sharding.rules=vocab=,embed=fsdp+data")
  rules = dict(sharding.config_rules(cfg))
  assert rules["vocab"] == () and rules["embed"] == ("fsdp", "data") and rules["mlp"] == ("tensor",)
  for bad, message in [("embeddings=fsdp", "unknown logical axis 'embeddings'"),
                       ("embed=fsd", "unknown mesh axis 'fsd'"), ("embed", "is not name=axis"),
                       ("embed=fsdp+fsdp", "names a mesh axis twice")]:
    with pytest.raises(ConfigError, match=message):
      small_config(f"--config.sharding.rules={bad}")
