"""Per-device memory plan of a training run, computed from shapes and logical axis names before launch.

Nothing is allocated and nothing is compiled: parameters come from an `nnx.eval_shape` of the model on an
abstract mesh (each leaf's shard shape under the config's rules), the optimizer state from `jax.eval_shape`
of the real optax chain, and the activations saved for backward from tracing one decoder block (and the
loss head) at per-device shapes under the configured remat policy and reading off its residuals.

Categories, all bytes per device (tokens T = micro-batch x seq_len / (batch devices x sequence devices)):
  parameters      sum over leaves of prod(shard shape) x param dtype bytes
  optimizer       the optax state (Adam mu + nu like the params, plus int32 counts), same sharding
  gradients       one gradient per parameter (param dtype), same sharding; + an fp32 accumulator if accum > 1
  activations     per layer: the residuals of one traced block (scan keeps every layer's input carry, even
                  under full remat) x num_layers, + loop-invariant residuals once, + the loss head's residuals
  temporaries     max(loss head: T x local vocab x (fp32 gradient + compute-dtype copy),
                      one layer's backward: all-gathered weights + unreduced gradient under FSDP
                      + its rematerialised forward + max(fp32 score gradient, MoE dispatch buffers))
It is an estimate: XLA fuses, reuses and schedules buffers (tests/test_plan.py states the measured accuracy).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jex_core
from ml_collections import config_dict

from maxlm import sharding
from maxlm.config import ConfigError, config_from_dict
from maxlm.hardware import DEVICE_MEMORY_GIB
from maxlm.logical_rules import MESH_AXES, check_layout, config_rules

GIB = 2**30
MIB = 2**20

# `--device NAME` picks one of these memory sizes per device (maxlm/hardware.py holds the table).
_GPU_KINDS = tuple(name for name in DEVICE_MEMORY_GIB if not name.startswith("tpu"))
_FLASH_BLOCK = 512  # key block of a fused (flash) attention kernel, for its score tile

ROWS = (("parameters", "parameters (trained)"), ("frozen", "frozen weights (LoRA base)"),
        ("optimizer", "optimizer state"), ("gradients", "gradients"),
        ("grad_accumulator", "gradient accumulator"), ("activations", "activations (saved for backward)"),
        ("temporaries", "largest temporaries"))


def plan(cfg, num_devices: int | None = None, device_memory_bytes: int | None = None,
         device: str | None = None, suggest: bool = True) -> dict:
  """Per-device memory plan of training `cfg` on `num_devices`, as a JSON-ready dict; allocates nothing.

  num_devices defaults to the mesh config's product (or the devices present if an axis is -1). Raises
  ConfigError (RulesError) naming the numbers when the mesh or a sharded dimension does not fit.
  """
  if device is not None and device not in DEVICE_MEMORY_GIB:
    raise ConfigError(f"--device {device!r}: expected one of {', '.join(DEVICE_MEMORY_GIB)}")
  sizes = [int(cfg.mesh[a]) for a in MESH_AXES]
  if num_devices is None:
    num_devices = int(np.prod(sizes)) if -1 not in sizes else jax.device_count()
  shape = sharding.mesh_shape(cfg.mesh, num_devices)
  rules = config_rules(cfg)
  check_layout(cfg, shape, rules)
  mem_bytes, mem_source = _device_memory(device_memory_bytes, device)
  accelerator = device is not None or jax.default_backend() != "cpu"
  dtype = _compute_dtype(cfg.model.dtype, accelerator)
  m, t = cfg.model, cfg.train
  micro = cfg.data.batch_size // t.grad_accum_steps
  div = {name: math.prod(shape[a] for a in axes) for name, axes in rules}

  abstract_mesh = jax.sharding.AbstractMesh(tuple(shape.values()), MESH_AXES,
                                            axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
  from maxlm.train.state import abstract_frozen, abstract_params  # noqa: PLC0415  (keep plan light)
  params = abstract_params(cfg, abstract_mesh)  # with LoRA (lora.base set): the adapters only
  frozen = abstract_frozen(cfg, abstract_mesh) or {}  # the base under them (QLoRA: quantized)
  frozen_local = {path: _shard_elems(x) for path, x in _leaves(frozen)}
  frozen_bytes = sum(n * x.dtype.itemsize for (_, x), n in zip(_leaves(frozen), frozen_local.values()))
  local = {path: _shard_elems(x) for path, x in _leaves(params)}
  pbytes = {path: n * params_leaf.dtype.itemsize for (path, params_leaf), n in zip(_leaves(params), local.values())}
  param_bytes = sum(pbytes.values())
  n_params = int(sum(math.prod(x.shape) for _, x in _leaves(params)))
  opt_bytes = _optimizer_bytes(cfg, params, local)
  grad_bytes = param_bytes  # jax.grad of each leaf has the leaf's dtype and sharding
  accum_bytes = 4 * sum(local.values()) if t.grad_accum_steps > 1 else 0  # fp32 zeros, summed into per micro

  b_loc = micro // div["activation_batch"]
  s_loc = cfg.data.seq_len // div["activation_length"]
  tokens = b_loc * s_loc
  # Attention scores per device: local queries x the keys one step sees (all of them unless a kernel tiles).
  heads_loc, seq_kv = m.num_heads // div["activation_heads"], cfg.data.seq_len
  # Fused kernels: the Pallas flash kernel anywhere, cuDNN's behind dot_product on GPUs; elsewhere XLA's einsums.
  flash = m.attention == "pallas_flash" or (m.attention == "dot_product" and device in _GPU_KINDS)
  if m.attention == "ring":
    kv_block = s_loc  # one rotating K/V block at a time
  elif flash:
    kv_block = min(_FLASH_BLOCK, seq_kv)
  else:
    kv_block = seq_kv
  # Saved scores/probabilities: a fused kernel keeps none; otherwise every query keeps all keys' (ring: one
  # block per ring step, as jax differentiates its loop).
  acts = _activation_bytes(cfg, dtype, div, b_loc, s_loc, params, local,
                           score_scale=0 if flash else seq_kv // s_loc)

  # Temporaries: the loss head's, and one layer's backward (the largest of which bounds the peak).
  vocab_loc = m.vocab_size // div["activation_vocab"]
  loss_tmp = tokens * vocab_loc * (4 + dtype.itemsize)  # fp32 d(logits) and its compute-dtype cast
  # The gradient of one score block in fp32 (the forward scores are in the saved or recomputed residuals; a
  # fused kernel recomputes its tile, so both live).
  attn_tmp = (2 if flash else 1) * b_loc * heads_loc * s_loc * kv_block * 4
  moe_tmp = 0
  if m.num_experts:
    slots = tokens * m.num_experts_per_tok * max(m.moe_capacity_factor, 1.0)
    moe_tmp = int(slots * (2 * m.d_model + 3 * (m.mlp_dim // div["activation_mlp"])) * dtype.itemsize)
  gather_tmp = (_fsdp_gather_bytes(cfg, params, local, dtype, shape)
                + _fsdp_gather_bytes(cfg, frozen, frozen_local, dtype, shape, grad=False))
  recompute = max(acts["per_layer_none"] - acts["per_layer"], 0)
  layer_tmp = gather_tmp + recompute + max(attn_tmp, moe_tmp)
  temporaries = max(loss_tmp, layer_tmp)

  bytes_ = {"parameters": param_bytes, "frozen": frozen_bytes, "optimizer": opt_bytes, "gradients": grad_bytes,
            "grad_accumulator": accum_bytes, "activations": acts["total"], "temporaries": temporaries}
  total = sum(bytes_.values())
  result = {
    "config": {"num_params": n_params, "num_frozen": _count(frozen),
               "lora_rank": cfg.lora.rank if cfg.lora.base else 0, "lora_base_quant": cfg.lora.base_quant,
               "mesh": shape, "sharding_preset": cfg.sharding.preset,
               "remat": m.remat, "attention": m.attention, "scan_layers": m.scan_layers,
               "param_dtype": str(jnp.dtype(m.param_dtype)), "compute_dtype": str(dtype),
               "micro_batch": micro, "grad_accum_steps": t.grad_accum_steps, "seq_len": cfg.data.seq_len,
               "tokens_per_device": tokens, "batch_per_device": b_loc, "seq_per_device": s_loc},
    "num_devices": num_devices,
    "device": device,
    "device_memory_bytes": mem_bytes,
    "device_memory_source": mem_source,
    "bytes": bytes_,
    "total_bytes": total,
    "detail": {
      "activations_per_layer": acts["per_layer"], "activations_per_layer_no_remat": acts["per_layer_none"],
      "activations_weight_copies_per_layer": acts["per_layer_weights"],
      "activations_loop_invariant": acts["invariant"], "activations_head": acts["head"],
      "temp_loss_head": loss_tmp, "temp_attention": attn_tmp, "temp_moe_dispatch": moe_tmp,
      "temp_fsdp_gather": gather_tmp, "temp_remat_recompute": recompute, "temp_layer_backward": layer_tmp,
    },
    "fits": total <= mem_bytes,
    "headroom_bytes": mem_bytes - total,
    "suggestions": [],
  }
  if suggest and total > mem_bytes:
    result["suggestions"] = _suggestions(cfg, num_devices, mem_bytes, device)
  return result


def format_plan(p: Mapping) -> str:
  """The plan as a readable table: bytes per device per category, % of device memory, FITS / DOES NOT FIT."""
  c, mem = p["config"], p["device_memory_bytes"]
  mesh = " ".join(f"{a}={n}" for a, n in c["mesh"].items() if n > 1) or "1 device"
  lines = [
    f"maxlm plan: {c['num_params']:,} parameters" + (
      f" trained (LoRA rank {c['lora_rank']} on {c['num_frozen']:,} frozen, base {c['lora_base_quant']})"
      if c.get("lora_rank") else "") + f" on {p['num_devices']} device(s) ({mesh}; preset {c['sharding_preset']})",
    f"  remat {c['remat']}, attention {c['attention']}, params {c['param_dtype']}, compute {c['compute_dtype']}; "
    f"micro-batch {c['micro_batch']} x seq {c['seq_len']} -> {c['tokens_per_device']:,} tokens per device "
    f"({c['batch_per_device']} x {c['seq_per_device']})",
    f"  device memory {_fmt(mem)} ({p['device_memory_source']})",
    "",
    f"  {'category':<34}{'per device':>12}{'% of device':>13}",
    f"  {'-' * 59}",
  ]
  for key, label in ROWS:
    n = p["bytes"].get(key, 0)
    if key in ("grad_accumulator", "frozen") and not n:
      continue
    lines.append(f"  {label:<34}{_fmt(n):>12}{100 * n / mem:>12.1f}%")
  lines.append(f"  {'-' * 59}")
  lines.append(f"  {'total':<34}{_fmt(p['total_bytes']):>12}{100 * p['total_bytes'] / mem:>12.1f}%")
  lines.append(f"  {'device memory':<34}{_fmt(mem):>12}")
  d = p["detail"]
  lines.append("")
  lines.append(f"  activations: {_fmt(d['activations_per_layer'])} per layer (no remat: "
               f"{_fmt(d['activations_per_layer_no_remat'])}), head {_fmt(d['activations_head'])}")
  lines.append(f"  temporaries: loss head {_fmt(d['temp_loss_head'])}; one layer's backward "
               f"{_fmt(d['temp_layer_backward'])} = FSDP gather {_fmt(d['temp_fsdp_gather'])} + remat recompute "
               f"{_fmt(d['temp_remat_recompute'])} + max(score gradient {_fmt(d['temp_attention'])}, MoE "
               f"{_fmt(d['temp_moe_dispatch'])})")
  lines.append("")
  head = p["headroom_bytes"]
  if p["fits"]:
    lines.append(f"FITS: {_fmt(p['total_bytes'])} of {_fmt(mem)} per device, headroom {_fmt(head)} "
                 f"({100 * head / mem:.1f}%)")
  else:
    lines.append(f"DOES NOT FIT: {_fmt(p['total_bytes'])} of {_fmt(mem)} per device, short by {_fmt(-head)}")
    for s in p["suggestions"]:
      verdict = "fits" if s["fits"] else "still does not fit"
      lines.append(f"  try {s['override']}: total {_fmt(s['total_bytes'])} ({verdict}; {s['why']})")
    if not p["suggestions"]:
      lines.append("  no single knob (remat, more fsdp, smaller micro-batch) applies; add devices")
  return "\n".join(lines)


def _fmt(n: float) -> str:
  return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / MIB:.1f} MiB"


def _compute_dtype(name: str, accelerator: bool) -> jnp.dtype:
  if name == "auto":
    return jnp.dtype(jnp.bfloat16 if accelerator else jnp.float32)
  return jnp.dtype(name)


def _device_memory(explicit: int | None, device: str | None) -> tuple[int, str]:
  """(bytes per device, where that number came from): explicit > --device table > memory_stats > host RAM."""
  if explicit is not None:
    return int(explicit), "--device-memory-gib"
  if device is not None:
    return int(DEVICE_MEMORY_GIB[device] * GIB), f"--device {device} ({DEVICE_MEMORY_GIB[device]:g} GiB table)"
  local = jax.local_devices()
  stats = local[0].memory_stats() if hasattr(local[0], "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{local[0].device_kind} memory_stats()['bytes_limit']"
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return ram // len(local), f"host RAM {_fmt(ram)} / {len(local)} local {jax.default_backend()} device(s)"


def _count(tree) -> int:
  """Scalar weights of a (frozen) tree, a quantized weight counted as the float weight it stands for."""
  from maxlm.quant.weights import QuantizedWeight  # noqa: PLC0415

  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QuantizedWeight))
  return int(sum(math.prod(x.shape) for x in leaves))


def _leaves(tree) -> list:
  return [(tuple(str(getattr(k, "key", k)) for k in path), x) for path, x in jax.tree_util.tree_leaves_with_path(tree)]


def _shard_elems(x) -> int:
  return math.prod(x.sharding.shard_shape(x.shape))


def _optimizer_bytes(cfg, params: dict, local: Mapping) -> int:
  """Bytes per device of the real optax state: leaves mirroring a parameter take its sharding."""
  from maxlm.train.optim import make_optimizer  # noqa: PLC0415
  plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  state = jax.eval_shape(make_optimizer(cfg.train).init, plain)
  total = 0
  for path, x in _leaves(state):
    match = next((local[path[i:]] for i in range(len(path)) if path[i:] in local), None)
    total += (match if match is not None and x.ndim else math.prod(x.shape)) * x.dtype.itemsize
  return total


def _fsdp_gather_bytes(cfg, params: dict, local: Mapping, dtype, shape: Mapping[str, int], grad: bool = True) -> int:
  """One layer's weights all-gathered over the batch axes (compute dtype) plus, for trained ones, its unreduced
  fp32 gradient."""
  total = 0
  for path, x in _leaves(params):
    if path[0] != "layers":
      continue
    spec = x.sharding.spec
    gathered = 1
    for entry in spec:
      for axis in (entry,) if isinstance(entry, str) else (entry or ()):
        if axis in ("data", "fsdp"):
          gathered *= shape[axis]
    if gathered > 1:
      per_layer = local[path] * gathered // (cfg.model.num_layers if cfg.model.scan_layers else 1)
      total += per_layer * (dtype.itemsize + (4 if grad else 0))
  return total


def _local_model_cfg(cfg, dtype, div: Mapping[str, int]) -> config_dict.ConfigDict:
  """The model section with per-device widths: heads, KV heads and MLP width divided by their devices."""
  m = config_dict.ConfigDict(cfg.model.to_dict())
  m.num_heads //= div["activation_heads"]
  m.num_kv_heads //= div["activation_kv_heads"]
  m.mlp_dim //= div["activation_mlp"]
  m.dtype = str(dtype)
  if m.attention == "ring":
    m.attention = "xla"  # per-device math of ring attention is blockwise xla attention; its K/V span the sequence
  return m


def _activation_bytes(cfg, dtype, div: Mapping[str, int], b: int, s: int, params: dict,
                      local: Mapping, score_scale: int) -> dict:
  """Activations saved for backward per device, from the residuals of one block traced at per-device shapes."""
  from maxlm.models.layers import model_inv_freq  # noqa: PLC0415
  from maxlm.models.transformer import REMAT_POLICIES, Block  # noqa: PLC0415
  m = cfg.model
  mcfg = _local_model_cfg(cfg, dtype, div)
  inv_freq = model_inv_freq(m)
  trivial = jax.sharding.AbstractMesh((1,) * len(MESH_AXES), MESH_AXES,
                                      axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
  with sharding.use_mesh(trivial, config_rules(cfg)):
    block = nnx.eval_shape(lambda: Block(mcfg, rngs=nnx.Rngs(0), inv_freq=inv_freq))
  graphdef, state = nnx.split(block)
  wparams = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
  x = jax.ShapeDtypeStruct((b, s, m.d_model), dtype)
  ids = jax.ShapeDtypeStruct((b, s), jnp.int32)

  def block_fn(w, x, positions, segment_ids):
    return nnx.merge(graphdef, w)(x, positions, segment_ids)

  def per_layer(policy: str) -> tuple[int, int, int]:
    fn = block_fn if policy == "none" else jax.checkpoint(block_fn, policy=REMAT_POLICIES[policy])
    res = _classified_residuals(fn, (wparams, x, ids, ids), ("w", "x", "c", "c"))
    act = sum(_nbytes(a, s, score_scale) for a, k in res if k == "x")
    if not any(k == "x" and a.shape == x.shape for a, k in res):
      act += math.prod(x.shape) * dtype.itemsize  # the scan carry (layer input) is always kept
    weights = sum(_nbytes(a, s, 1) for a, k in res if k == "w")
    invariant = sum(_nbytes(a, s, score_scale) for a, k in res if k == "c")
    return act, weights, invariant

  act, weights, invariant = per_layer(m.remat)
  act_none = act if m.remat == "none" else per_layer("none")[0]
  # Weight-derived residuals (e.g. bf16 casts) were traced at tensor-split but not FSDP-split sizes.
  layer_local = sum(n * params_leaf.dtype.itemsize for (path, params_leaf), n in zip(_leaves(params), local.values())
                    if path[0] == "layers") / m.num_layers
  traced = sum(math.prod(v.shape) * v.dtype.itemsize for v in jax.tree.leaves(wparams))
  weights = int(weights * layer_local / traced) if traced else 0
  head = _head_residual_bytes(cfg, dtype, div, b, s)
  total = m.num_layers * (act + weights) + invariant + head
  return {"total": total, "per_layer": act, "per_layer_none": act_none, "per_layer_weights": weights,
          "invariant": invariant, "head": head}


def _head_residual_bytes(cfg, dtype, div: Mapping[str, int], b: int, s: int) -> int:
  """Residuals of final norm + output projection + loss over the local vocabulary shard."""
  from maxlm.models.layers import dense  # noqa: PLC0415
  from maxlm.train.step import token_loss_sums  # noqa: PLC0415
  m = cfg.model
  vocab = m.vocab_size // div["activation_vocab"]
  eps = m.rms_norm_eps

  def head_fn(w, x, targets, weights):
    scale, proj = w
    xf = x.astype(jnp.float32)
    y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps) * scale).astype(x.dtype)
    logits = dense(y, proj.astype(x.dtype))
    return token_loss_sums(logits, targets, weights, cfg.train.z_loss)[0]

  w = (jax.ShapeDtypeStruct((m.d_model,), jnp.dtype(m.param_dtype)),
       jax.ShapeDtypeStruct((m.d_model, vocab), jnp.dtype(m.param_dtype)))
  args = (w, jax.ShapeDtypeStruct((b, s, m.d_model), dtype), jax.ShapeDtypeStruct((b, s), jnp.int32),
          jax.ShapeDtypeStruct((b, s), jnp.float32))
  res = _classified_residuals(head_fn, args, ("w", "x", "c", "c"))
  return sum(_nbytes(a, s, 1) for a, k in res if k == "x")


def _nbytes(aval, s: int, score_scale: int) -> int:
  """Bytes of a residual traced at per-device shapes; [.., s, s] attention scores scaled to the keys kept."""
  n = math.prod(aval.shape) * aval.dtype.itemsize
  if score_scale != 1 and len(aval.shape) >= 2 and aval.shape[-1] == aval.shape[-2] == s:
    n *= score_scale
  return n


def _classified_residuals(fn, args: tuple, kinds: tuple[str, ...]) -> list[tuple[object, str]]:
  """Residuals that jax.vjp of fn saves, each labelled by what it depends on.

  "x": the activation input (saved per layer), "w": only the weights (per layer, like the weights),
  "c": only positions/segment ids/constants (loop-invariant: jax's scan hoists those out of the loop).
  Arguments that are weights are left out (already counted as parameters).
  """
  leaves, tree = jax.tree.flatten(args)
  arg_kind = [k for a, k in zip(args, kinds) for _ in jax.tree.leaves(a)]
  closed, out_shape = jax.make_jaxpr(lambda *a: jax.vjp(lambda *b: fn(*jax.tree.unflatten(tree, b)), *a),
                                     return_shape=True)(*leaves)
  jaxpr = closed.jaxpr
  num_res = len(jax.tree.leaves(out_shape[1]))
  res_vars = jaxpr.outvars[len(jaxpr.outvars) - num_res:]
  deps: dict = {v: frozenset({k}) for v, k in zip(jaxpr.invars, arg_kind)}
  _propagate(jaxpr, deps)
  out, seen = [], set()
  for v in res_vars:
    if not _is_var(v) or v in seen:  # literals, duplicates
      continue
    seen.add(v)
    d = deps.get(v, frozenset())
    if (v in jaxpr.invars and "w" in d) or not d:
      continue  # weights are counted as parameters; pure constants (broadcast scalars) XLA never materialises
    kind = "x" if "x" in d else "w" if "w" in d else "c"
    out.append((v.aval, kind))
  return out


def _is_var(v) -> bool:
  return not isinstance(v, jex_core.Literal)


def _propagate(jaxpr, deps: dict) -> None:
  """Forward dependency labels through `jaxpr`, looking inside nested jaxprs (jit, remat, custom_jvp)."""
  for eqn in jaxpr.eqns:
    ins = [deps.get(v, frozenset()) if _is_var(v) else frozenset() for v in eqn.invars]
    inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
    inner = getattr(inner, "jaxpr", inner)
    if inner is not None and hasattr(inner, "eqns") and len(inner.invars) == len(eqn.invars) \
        and len(inner.outvars) == len(eqn.outvars):
      sub = dict(zip(inner.invars, ins))
      _propagate(inner, sub)
      for o, io in zip(eqn.outvars, inner.outvars):
        deps[o] = sub.get(io, frozenset()) if _is_var(io) else frozenset()
      continue
    union = frozenset().union(*ins)
    for o in eqn.outvars:
      deps[o] = union


def _suggestions(cfg, num_devices: int, mem_bytes: int, device: str | None) -> list[dict]:
  """The knobs worth turning when the plan does not fit, each re-planned: remat, more fsdp, smaller micro-batch."""
  m, t = cfg.model, cfg.train
  candidates = []
  order = ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "full")
  for policy in order[order.index(m.remat) + 1:]:
    candidates.append(([f"model.remat={policy}"], "saves fewer activations, recomputes the rest"))
  if cfg.mesh.data != 1:
    fsdp = cfg.mesh.fsdp * cfg.mesh.data if cfg.mesh.data > 0 else -1
    preset = [] if cfg.sharding.preset != "dp" else ["sharding.preset=fsdp"]
    candidates.append((["mesh.data=1", f"mesh.fsdp={fsdp}", *preset],
                       "shards parameters, gradients and Adam state over the data devices too"))
  accum = t.grad_accum_steps * 2
  if cfg.data.batch_size % accum == 0:
    candidates.append(([f"train.grad_accum_steps={accum}"], "halves the micro-batch: fewer activations"))
  out = []
  for overrides, why in candidates:
    try:
      alt = plan(config_from_dict(cfg.to_dict(), overrides), num_devices, mem_bytes, device, suggest=False)
    except ConfigError:
      continue
    out.append({"override": " ".join(f"--config.{o}" for o in overrides), "total_bytes": alt["total_bytes"],
                "fits": alt["fits"], "why": why})
  return out
