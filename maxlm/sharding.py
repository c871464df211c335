"""Device mesh and logical-axis rules: model code names axes, this module maps names to mesh axes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import NamedSharding, PartitionSpec

from maxlm.logical_rules import LOGICAL_AXES, MESH_AXES, Rules, RulesError, check_layout, config_rules, make_rules

__all__ = ["LOGICAL_AXES", "MESH_AXES", "Rules", "RulesError", "config_rules", "make_rules", "DEFAULT_RULES",
           "make_mesh", "mesh_shape", "use_mesh", "use_rules", "logical_spec", "constrain", "is_split",
           "batch_sharding", "mesh_for", "mesh_axes_of", "put_batch"]

DEFAULT_RULES: Rules = make_rules()


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Axis sizes of the `mesh` config section on `num_devices` devices, the -1 axis resolved."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]  # config.finalize allows at most one -1
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise RulesError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product {known} "
                       f"({dict(zip(MESH_AXES, sizes, strict=True))})")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise RulesError(f"mesh: axes {dict(zip(MESH_AXES, sizes, strict=True))} need {int(np.prod(sizes))} devices, "
                     f"{num_devices} are available")
  return dict(zip(MESH_AXES, sizes, strict=True))


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds the mesh named by `mesh_cfg` over `devices` (default: every device of every process)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = tuple(mesh_shape(mesh_cfg, len(devices)).values())
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(sizes), devices=devices)


def mesh_for(cfg, devices: Sequence[jax.Device] | None = None) -> tuple[jax.sharding.Mesh, Rules]:
  """(mesh, rules) of a maxlm config, checked: every mesh axis used, every sharded dimension divisible."""
  rules = config_rules(cfg)
  mesh = make_mesh(cfg.mesh, devices)
  check_layout(cfg, dict(mesh.shape), rules)
  return mesh, rules


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh, rules: Rules | None = None) -> Iterator[None]:
  """Makes `mesh` and the logical rules (default: DEFAULT_RULES) current: parameters are created sharded.

  An AbstractMesh (no devices: e.g. a 256-chip pod planned from a laptop) works for shape-only tracing.
  """
  enter = jax.sharding.use_abstract_mesh if isinstance(mesh, jax.sharding.AbstractMesh) else jax.set_mesh
  with enter(mesh), use_rules(rules or DEFAULT_RULES):
    yield


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
  """Makes the logical rules current, the mesh left as it is (e.g. inside a jitted function traced under one)."""
  with nnx.logical_axis_rules(_flax_rules(rules)):
    yield


def _flax_rules(rules: Rules) -> tuple:
  # flax wants None for "replicated" and a bare name for a single axis.
  return tuple((name, None if not axes else axes[0] if len(axes) == 1 else axes) for name, axes in rules)


def mesh_axes_of(name: str) -> tuple[str, ...]:
  """Mesh axes the logical axis `name` is split over under the current rules (() if replicated)."""
  spec = logical_spec((name,))[0]
  return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def logical_spec(names: Sequence[str | None]) -> PartitionSpec:
  """PartitionSpec for logical axis `names` under the current rules."""
  return PartitionSpec(*core_spmd.from_sharding_rules(tuple(names), core_spmd.get_logical_axis_rules()))


def is_split(name: str) -> bool:
  """True when the logical axis `name` is split over more than one device of the current mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return False
  return any(mesh.shape.get(a, 1) > 1 for a in mesh_axes_of(name))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding by logical names; a no-op outside a mesh."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(names))


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules | None = None) -> NamedSharding:
  """Sharding of a [batch, length] input batch."""
  with nnx.logical_axis_rules(_flax_rules(rules or DEFAULT_RULES)):
    return NamedSharding(mesh, logical_spec(("activation_batch", "activation_length")))


def put_batch(batch: dict, batch_sharding: NamedSharding, global_rows: int) -> dict:
  """One global batch from every process's rows (each process transfers only its own)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v, (global_rows, *v.shape[1:]))
          for k, v in batch.items()}
