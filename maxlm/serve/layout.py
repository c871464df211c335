"""The serving mesh: the config's `mesh` axes over its first `serve.devices` devices, under its `sharding` rules.

Checked before anything loads: every model dimension a rule splits (heads, KV heads, MLP width, vocabulary, ...)
must divide by the devices it is split over. The batch and sequence of a serving step are not checked: their
sizes change from step to step and jit pads an uneven split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax

from maxlm import sharding
from maxlm.logical_rules import indivisible_dimension
from maxlm.sharding import Rules, RulesError

# Logical axes sized by the training batch and sequence (dim_sizes' data.* keys), not by the model.
_STEP_AXES = ("activation_batch", "activation_batch_no_exp", "activation_length")


def check_model_layout(cfg, mesh_shape: Mapping[str, int], rules: Rules, where: str = "") -> None:
  """Raises RulesError naming serve.devices, the mesh axes and the model key when a rule cannot split the model."""
  problem = indivisible_dimension(cfg, mesh_shape, rules, skip=_STEP_AXES)
  if problem:
    raise RulesError(f"{where}serve.devices={cfg.serve.devices} cannot shard the model: {problem}; choose "
                     "serve.devices and mesh.* so that it divides, or replicate it (sharding.rules)")


def serving_mesh(cfg, devices: Sequence[jax.Device] | None = None) -> tuple[jax.sharding.Mesh, Rules]:
  """(mesh, rules): cfg.mesh over the first serve.devices of `devices` (default: all), checked to shard the model."""
  available = list(jax.devices() if devices is None else devices)
  n = cfg.serve.devices
  if n > len(available):
    raise RulesError(f"serve.devices={n}: only {len(available)} devices are available")
  try:
    shape = sharding.mesh_shape(cfg.mesh, n)
  except RulesError as e:
    raise RulesError(f"serve.devices={n}: {e}") from None
  rules = sharding.config_rules(cfg)
  check_model_layout(cfg, shape, rules)
  return sharding.make_mesh(cfg.mesh, available[:n]), rules
