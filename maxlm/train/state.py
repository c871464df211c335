"""Train state: model parameters (fp32 master weights), optimizer state and step counters, built sharded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from maxlm import sharding
from maxlm.models.transformer import Transformer
from maxlm.train.optim import make_optimizer, make_schedule


def init_train_state(cfg, mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, dict, optax.GradientTransformation,
                                                            optax.Schedule]:
  """(graphdef, state, tx, schedule): parameters and optimizer state created directly in their shardings."""
  tx = make_optimizer(cfg.train)
  with sharding.use_mesh(mesh):
    model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_state = jax.jit(tx.init, in_shardings=(param_shardings,))(params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  scalar = lambda: jax.device_put(jnp.zeros((), jnp.int32), replicated)  # noqa: E731
  state = {"params": params, "opt_state": opt_state, "step": scalar(), "nonfinite_streak": scalar(),
           "nonfinite_total": scalar()}
  return graphdef, state, tx, make_schedule(cfg.train)


def abstract_params(cfg, mesh: jax.sharding.Mesh | None = None) -> dict:
  """Parameter shapes, dtypes and shardings on `mesh` (default: the config's), allocating nothing.

  Used for --dry_run and as the target that checkpoints and imported weights are read into.
  """
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  with sharding.use_mesh(mesh):
    model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  # eval_shape leaves carry the abstract mesh; readers need the concrete devices.
  concrete = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(  # noqa: E731
    mesh, getattr(x.sharding, "spec", jax.sharding.PartitionSpec())))
  return jax.tree.map(concrete, nnx.to_pure_dict(nnx.state(model)))


def build_model(cfg, params: dict, mesh: jax.sharding.Mesh) -> Transformer:
  """The model of `cfg` holding `params` (a pure dict, e.g. restored or imported), without initialising."""
  with sharding.use_mesh(mesh):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def count_params(params) -> int:
  """Number of scalar parameters in a (possibly abstract) parameter tree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
