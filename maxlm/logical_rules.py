"""Logical-axis sharding rules: the presets, `sharding.rules` overrides, and mesh-divisibility checks.

Model code names every tensor axis logically ("embed", "heads", "activation_length", ...); a rule maps a
name to zero or more mesh axes. Pure Python (no jax) so configs are checked before anything heavy loads.
"""

from __future__ import annotations

from collections.abc import Mapping

from maxlm.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")  # outermost (slowest links) to innermost

# Every logical axis name the model uses. Flax passes unknown names through as mesh axes, so each one has a
# rule, if only "replicated" (()).
LOGICAL_AXES = (
  "vocab", "embed", "mlp", "experts", "heads", "kv_heads", "head_dim", "layers", "norm",
  "activation_batch", "activation_length", "activation_embed", "activation_heads",
  "activation_kv_heads", "activation_mlp", "activation_vocab", "activation_experts", "activation_batch_no_exp",
)

Rules = tuple[tuple[str, tuple[str, ...]], ...]

_BATCH = ("data", "fsdp", "expert")  # outside the experts, expert-parallel devices split the batch too
_TENSOR = {"mlp": ("tensor",), "heads": ("tensor",), "kv_heads": ("tensor",), "vocab": ("tensor",),
           "activation_heads": ("tensor",), "activation_kv_heads": ("tensor",), "activation_mlp": ("tensor",),
           "activation_vocab": ("tensor",)}
# Inside a MoE layer the expert axis moves from the batch to the experts (an all-to-all), so the batch there is
# split over data and fsdp only.
_EXPERT = {"experts": ("expert",), "activation_experts": ("expert",), "activation_batch_no_exp": ("data", "fsdp")}

# Named presets. Each builds on the one before; a mesh axis of size 1 makes its rules no-ops, so the last
# (the default) suits every mesh, and the others exist to say plainly which parallelism a run uses.
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
  # Pure data parallelism: parameters and optimizer state replicated, the batch split.
  "dp": {"activation_batch": _BATCH, **_EXPERT},
  # FSDP / ZeRO-3: every matrix split along `embed` over fsdp; gathered per layer for compute.
  "fsdp": {"activation_batch": _BATCH, "embed": ("fsdp",), **_EXPERT},
  # FSDP + tensor parallelism (Megatron-style: heads, MLP width, vocabulary split over tensor).
  "fsdp_tp": {"activation_batch": _BATCH, "embed": ("fsdp",), **_TENSOR, **_EXPERT},
  # + sequence parallelism: activations split along the sequence (ring attention with model.attention=ring).
  "fsdp_tp_sp": {"activation_batch": _BATCH, "embed": ("fsdp",), "activation_length": ("sequence",), **_TENSOR,
                 **_EXPERT},
}
DEFAULT_PRESET = "fsdp_tp_sp"


class RulesError(ConfigError):
  """A `sharding.*` setting or mesh that cannot shard this model; the message names the key and numbers."""


def parse_overrides(text: str) -> dict[str, tuple[str, ...]]:
  """Parses `sharding.rules`: "name=axis[+axis],name=" (empty right-hand side = replicated)."""
  out: dict[str, tuple[str, ...]] = {}
  for item in (part.strip() for part in text.split(",")):
    if not item:
      continue
    if "=" not in item:
      raise RulesError(f"sharding.rules: {item!r} is not name=axis[+axis]")
    name, axes_text = (s.strip() for s in item.split("=", 1))
    if name not in LOGICAL_AXES:
      raise RulesError(f"sharding.rules: unknown logical axis {name!r} (known: {', '.join(LOGICAL_AXES)})")
    axes = tuple(a.strip() for a in axes_text.split("+") if a.strip())
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise RulesError(f"sharding.rules: {name}={axes_text}: unknown mesh axis {bad[0]!r} (mesh axes: "
                       f"{', '.join(MESH_AXES)})")
    out[name] = axes
  return out


def make_rules(preset: str = DEFAULT_PRESET, overrides: str = "") -> Rules:
  """The complete rule table: the preset, `overrides` on top, replicated for every unnamed axis."""
  if preset not in PRESETS:
    raise RulesError(f"sharding.preset={preset!r}: expected one of {list(PRESETS)}")
  table = {**PRESETS[preset], **parse_overrides(overrides)}
  for name, axes in table.items():
    if len(set(axes)) != len(axes):
      raise RulesError(f"sharding rule {name} -> {'+'.join(axes)} names a mesh axis twice")
  return tuple((name, tuple(table.get(name, ()))) for name in LOGICAL_AXES)


def config_rules(cfg) -> Rules:
  """The rules of a maxlm config (its `sharding` section)."""
  return make_rules(cfg.sharding.preset, cfg.sharding.rules)


def dim_sizes(cfg) -> dict[str, tuple[str, int]]:
  """Logical axis -> (the config key that sets its size, that size), for the divisibility check."""
  m, d = cfg.model, cfg.data
  micro = d.batch_size // cfg.train.grad_accum_steps
  sizes = {
    "vocab": ("model.vocab_size", m.vocab_size), "embed": ("model.d_model", m.d_model),
    "mlp": ("model.mlp_dim", m.mlp_dim), "heads": ("model.num_heads", m.num_heads),
    "kv_heads": ("model.num_kv_heads", m.num_kv_heads), "head_dim": ("model.head_dim", m.head_dim),
    "layers": ("model.num_layers", m.num_layers), "norm": ("model.d_model", m.d_model),
    "activation_batch": ("data.batch_size / train.grad_accum_steps (the micro-batch)", micro),
    "activation_batch_no_exp": ("data.batch_size / train.grad_accum_steps (the micro-batch)", micro),
    "activation_length": ("data.seq_len", d.seq_len), "activation_embed": ("model.d_model", m.d_model),
    "activation_heads": ("model.num_heads", m.num_heads),
    "activation_kv_heads": ("model.num_kv_heads", m.num_kv_heads),
    "activation_mlp": ("model.mlp_dim", m.mlp_dim), "activation_vocab": ("model.vocab_size", m.vocab_size),
  }
  if m.num_experts:
    sizes["experts"] = sizes["activation_experts"] = ("model.num_experts", m.num_experts)
  return sizes


def check_layout(cfg, mesh_shape: Mapping[str, int], rules: Rules) -> None:
  """Raises RulesError if a mesh axis is unused or a sharded dimension does not divide by its devices."""
  used = {axis for _, axes in rules for axis in axes}
  idle = [f"mesh.{a}={n}" for a, n in mesh_shape.items() if n > 1 and a not in used]
  if idle:
    raise RulesError(f"{', '.join(idle)}: no sharding rule of preset {cfg.sharding.preset!r} uses that axis, so "
                     f"its devices would only repeat work; set it to 1 or pick a preset that uses it")
  problem = indivisible_dimension(cfg, mesh_shape, rules)
  if problem:
    raise RulesError(problem)


def indivisible_dimension(cfg, mesh_shape: Mapping[str, int], rules: Rules, skip: tuple[str, ...] = ()) -> str:
  """The first dimension a rule splits over devices that do not divide it, as a message ("" if none); `skip`
  leaves out logical axes (serving skips the training batch and sequence)."""
  sizes = dim_sizes(cfg)
  for name, axes in rules:
    if name not in sizes or not axes or name in skip:
      continue
    devices = 1
    for a in axes:
      devices *= mesh_shape.get(a, 1)
    key, size = sizes[name]
    if devices > 1 and size % devices:
      across = " x ".join(f"mesh.{a}={mesh_shape.get(a, 1)}" for a in axes)
      return (f"{key}={size} is not divisible by the {devices} devices it is split over "
              f"({across}; rule {name} -> {'+'.join(axes)})")
  return ""
