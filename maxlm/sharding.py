"""Device mesh and logical-axis rules: model code names axes, this module maps names to mesh axes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data",)

# Every logical axis name the model uses. Flax passes unknown names through as mesh axes, so each
# one needs a rule, even if only "replicated" (None).
LOGICAL_AXES = (
  "vocab", "embed", "mlp", "experts", "heads", "kv_heads", "head_dim", "layers", "norm",
  "activation_batch", "activation_length", "activation_embed", "activation_heads",
  "activation_kv_heads", "activation_mlp", "activation_vocab",
)

# Logical name -> mesh axis: pure data parallelism (parameters replicated, batch split over `data`).
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = tuple(
  (name, "data" if name == "activation_batch" else None) for name in LOGICAL_AXES
)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds the mesh named by `mesh_cfg` (one axis may be -1 = all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices are not divisible by the fixed axes' product {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh: axes {dict(zip(MESH_AXES, sizes))} need {int(np.prod(sizes))} devices, "
                     f"{len(devices)} are available")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(sizes),
                       devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
  """Makes `mesh` and the logical rules current, so parameters are created sharded."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    yield


def logical_spec(names: Sequence[str | None]) -> PartitionSpec:
  """PartitionSpec for logical axis `names` under the current rules."""
  return PartitionSpec(*core_spmd.from_sharding_rules(tuple(names), core_spmd.get_logical_axis_rules()))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding by logical names; a no-op outside a mesh."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(names))


def batch_sharding(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of a [batch, length] input batch."""
  with nnx.logical_axis_rules(rules):
    return NamedSharding(mesh, logical_spec(("activation_batch", "activation_length")))
