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


def abstract_params(cfg) -> dict:
  """Parameter shapes and dtypes of `cfg.model` without allocating anything (for --dry_run)."""
  mesh = sharding.make_mesh(cfg.mesh)
  with sharding.use_mesh(mesh):
    model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model))


def count_params(params) -> int:
  """Number of scalar parameters in a (possibly abstract) parameter tree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
