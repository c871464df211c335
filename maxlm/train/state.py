"""Train state: model parameters (fp32 master weights), optimizer state and step counters, built sharded.

With LoRA (`lora.base` set) the trained parameters are the adapters only (`LoRAParam` leaves); everything else of
the model (the base weights, embeddings, norms) is the frozen part, passed to the step beside the state and never
differentiated, updated or checkpointed.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from maxlm import sharding
from maxlm.config import config_from_dict
from maxlm.models.lora import LoRAParam, apply_lora
from maxlm.models.transformer import Transformer
from maxlm.quant.weights import QuantizedWeight
from maxlm.train.optim import make_optimizer, make_schedule


def lora_on(cfg) -> bool:
  """Whether `cfg` trains LoRA adapters on a frozen base (lora.base names its workdir)."""
  return bool(cfg.get("lora") and cfg.lora.base)


def _with_lora(cfg, **changes):
  """`cfg` with some lora.* keys changed (a rebuilt, validated config)."""
  return config_from_dict({**cfg.to_dict(), "lora": {**cfg.lora.to_dict(), **changes}})


def without_lora(cfg):
  """`cfg` describing the plain base model (lora.base empty): what the base workdir's checkpoints hold."""
  return _with_lora(cfg, base="")


def adapt(model: Transformer, cfg) -> list[str]:
  """Puts cfg.lora's adapters (A random from train.seed, B zero) on `model`'s projections, in place; their paths."""
  r = cfg.lora
  return apply_lora(model, rank=r.rank, alpha=r.alpha, targets=r.targets, rslora=r.rslora,
                    rngs=nnx.Rngs(cfg.train.seed + 1), base_quant=r.base_quant, group=r.base_quant_group,
                    dropout=r.dropout)


def _new_model(cfg) -> Transformer:
  model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
  if lora_on(cfg):
    adapt(model, cfg)
  return model


def _abstract_model(cfg, mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> Transformer:
  """The model of `cfg` as shapes only, its parameters annotated with their shardings under cfg's rules."""
  with sharding.use_mesh(mesh, sharding.config_rules(cfg)):
    return nnx.eval_shape(lambda: _new_model(cfg))


def split_state(model: Transformer, cfg) -> tuple[dict, dict | None]:
  """(trained, frozen) pure dicts of `model`'s state: (everything, None) without LoRA, else (adapters, the rest)."""
  if not lora_on(cfg):
    return nnx.to_pure_dict(nnx.state(model)), None
  _, adapters, rest = nnx.split(model, LoRAParam, ...)
  return nnx.to_pure_dict(adapters), nnx.to_pure_dict(rest)


def combine(params: dict, frozen: dict | None) -> dict:
  """One pure dict of the whole model from its trained and frozen parts (no copies: the leaves are shared)."""
  if frozen is None:
    return params
  out = dict(frozen)
  for k, v in params.items():
    out[k] = combine(v, out[k]) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def _init_params(cfg) -> dict:
  return split_state(_new_model(cfg), cfg)[0]


def abstract_train_state(cfg, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation) -> dict:
  """Shapes, dtypes and shardings of the whole train state, allocating nothing: a restore target.

  Optimizer moments take their parameter's sharding (ZeRO-3 under fsdp); counters are replicated.
  """
  params = abstract_params(cfg, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt = jax.eval_shape(tx.init, params)
  opt_shardings = optax.tree_map_params(
    tx, lambda _, s: s, opt, jax.tree.map(lambda x: x.sharding, params),
    transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt, opt_shardings)
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  return {"params": params, "opt_state": opt, "step": scalar, "nonfinite_streak": scalar, "nonfinite_total": scalar}


def _shardings(tree) -> object:
  return jax.tree.map(lambda x: x.sharding, tree)


def model_graphdef(cfg, mesh: jax.sharding.Mesh) -> nnx.GraphDef:
  """The model's structure (no arrays), for nnx.merge with a parameter dict inside jitted steps."""
  return nnx.graphdef(_abstract_model(cfg, mesh))


def init_train_state(cfg, mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, dict, optax.GradientTransformation,
                                                            optax.Schedule]:
  """(graphdef, state, tx, schedule): parameters and optimizer state created directly in their shardings.

  Initialisation is one jitted computation whose outputs are laid out by the logical rules, so no
  parameter is ever materialised whole on one device (a 70B model initialises on a pod this way).
  """
  tx = make_optimizer(cfg.train)
  target = abstract_train_state(cfg, mesh, tx)
  state = init_optimizer_state(init_params(cfg, mesh, target["params"]), target, tx)
  return model_graphdef(cfg, mesh), state, tx, make_schedule(cfg.train)


def init_params(cfg, mesh: jax.sharding.Mesh, target_params: dict) -> dict:
  """Freshly initialised parameters (seed train.seed), created by one jit directly in target_params' shardings."""
  with sharding.use_mesh(mesh, sharding.config_rules(cfg)):
    return jax.jit(lambda: _init_params(cfg), out_shardings=_shardings(target_params))()


def init_optimizer_state(params: dict, target: dict, tx: optax.GradientTransformation) -> dict:
  """A fresh train state around `params` (new or restored): zeroed optimizer moments and counters."""
  opt = jax.jit(tx.init, out_shardings=_shardings(target["opt_state"]))(params)
  zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), target["step"].sharding)  # noqa: E731
  return {"params": params, "opt_state": opt, "step": zero(), "nonfinite_streak": zero(), "nonfinite_total": zero()}


def _concrete(mesh: jax.sharding.Mesh, tree):
  # eval_shape leaves carry the abstract mesh; readers need the concrete devices.
  concrete = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(  # noqa: E731
    mesh, getattr(x.sharding, "spec", jax.sharding.PartitionSpec())))
  return jax.tree.map(concrete, tree)


def abstract_params(cfg, mesh: jax.sharding.Mesh | None = None) -> dict:
  """Shapes, dtypes and shardings on `mesh` (default: the config's) of the trained parameters (with LoRA: the
  adapters), allocating nothing. Used for --dry_run and as the target that checkpoints and imported weights are
  read into.
  """
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  return _concrete(mesh, split_state(_abstract_model(cfg, mesh), cfg)[0])


def abstract_frozen(cfg, mesh: jax.sharding.Mesh) -> dict | None:
  """Shapes and shardings of the frozen part of a LoRA model (base weights, embeddings, norms); None without LoRA.

  Traced with jax.eval_shape on the split state (nnx.eval_shape would describe a QLoRA base's QuantizedWeight by
  its float shape and dtype, not by its int values and scales).
  """
  if not lora_on(cfg):
    return None
  # The float model's frozen part carries every weight's logical sharding (a quantized base takes its weight's).
  float_cfg = _with_lora(cfg, base_quant="none")
  annotated = _concrete(mesh, split_state(_abstract_model(float_cfg, mesh), cfg)[1])
  with sharding.use_mesh(mesh, sharding.config_rules(cfg)):
    true = jax.eval_shape(lambda: split_state(_new_model(cfg), cfg)[1])
  return jax.tree.map(lambda a, t: _quantized_like(a, t) if isinstance(t, QuantizedWeight) else a, annotated, true,
                      is_leaf=lambda x: isinstance(x, QuantizedWeight))


def _quantized_like(annotated: jax.ShapeDtypeStruct, q: QuantizedWeight) -> QuantizedWeight:
  """A QLoRA base's abstract QuantizedWeight sharded as its float weight: int8 values take the weight's sharding and
  scales its leading and output axes'. int4's regrouped [*lead, groups, group/2, out] leaves shard groups as the
  single input axis and the flattened output as its first axis, where those divide (else they stay whole)."""
  spec = tuple(annotated.sharding.spec) + (None,) * (annotated.ndim - len(annotated.sharding.spec))
  mesh = annotated.sharding.mesh
  lead = q.values.ndim - len(q.layer_shape) if q.mode == "int8" else q.values.ndim - 3
  if q.mode == "int8":
    value_spec, scale_spec = spec, spec[:lead] + spec[lead + q.contract:]
  else:
    def fits(entry, size):  # a mesh-axis entry that divides `size`, else None
      axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
      return entry if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else None

    groups, n = q.values.shape[lead], q.values.shape[-1]
    g_entry = fits(spec[lead], groups) if q.contract == 1 else None
    outs = spec[lead + q.contract:]
    n_entry = fits(outs[0], n) if all(e is None for e in outs[1:]) else None
    value_spec, scale_spec = (*spec[:lead], g_entry, None, n_entry), (*spec[:lead], g_entry, n_entry)
  put = lambda x, sp: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(  # noqa: E731
    mesh, jax.sharding.PartitionSpec(*sp)))
  if q.mode == "nf4":  # double-quantized scales: int8 blocks as int4's scales, per-column scales, per-layer offsets
    scales = {"q": put(q.scales["q"], scale_spec), "scale": put(q.scales["scale"], (*spec[:lead], scale_spec[-1])),
              "offset": put(q.scales["offset"], spec[:lead])}
    return dataclasses.replace(q, values=put(q.values, value_spec), scales=scales)
  return dataclasses.replace(q, values=put(q.values, value_spec), scales=put(q.scales, scale_spec))


def lora_from_base(cfg, mesh: jax.sharding.Mesh, base_params: dict) -> tuple[dict, dict]:
  """(fresh adapters, frozen part) of cfg's LoRA model around the base model's parameters `base_params` (donated),
  in one jit laid out by the logical rules: the adapted bases move (QLoRA: quantized) under their adapters."""
  graphdef = model_graphdef(without_lora(cfg), mesh)
  targets = (_shardings(abstract_params(cfg, mesh)), _shardings(abstract_frozen(cfg, mesh)))

  def build(params):
    model = nnx.merge(graphdef, params)
    adapt(model, cfg)
    return split_state(model, cfg)

  with sharding.use_mesh(mesh, sharding.config_rules(cfg)):
    return jax.jit(build, out_shardings=targets, donate_argnums=0)(base_params)


def build_model(cfg, params: dict, mesh: jax.sharding.Mesh) -> Transformer:
  """The model of `cfg` holding `params` (a pure dict of the whole model, e.g. restored or imported, or
  combine(adapters, frozen)), without initialising."""
  graphdef, state = nnx.split(_abstract_model(cfg, mesh))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def count_params(params) -> int:
  """Number of scalar parameters in a (possibly abstract) parameter tree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
