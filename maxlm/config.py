"""Config files + `--config.a.b=value` overrides, validated before any work with errors naming the key."""

from __future__ import annotations

import difflib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

from ml_collections import config_dict

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "tiny"

_CHOICES = {
  "model.attention": ("xla", "dot_product", "ring", "pallas_flash"),
  "model.pallas_backend": ("auto", "tpu", "gpu", "cpu"),
  "sharding.preset": ("dp", "fsdp", "fsdp_tp", "fsdp_tp_sp"),
  "model.remat": ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"),
  "model.dtype": ("auto", "float32", "bfloat16"),
  "model.param_dtype": ("float32", "bfloat16"),
  "model.rope_scaling": ("", "llama3"),
  "train.schedule": ("cosine", "linear", "constant"),
  "curate.near_dedup.shingle_unit": ("word", "char"),
  "data.mixture_unit": ("tokens", "documents"),
  "data.curriculum": ("none", "length", "tokens_per_byte"),
  "serve.kv_layout": ("paged", "contiguous"),
  "serve.attention": ("auto", "pallas", "xla"),
  "serve.weights": ("none", "bf16", "int8", "int4"),
  "serve.kv_cache": ("auto", "bf16", "float32", "int8"),
}
_POSITIVE = ("model.vocab_size", "model.d_model", "model.num_layers", "model.num_heads", "model.num_kv_heads",
             "model.mlp_dim", "model.max_seq_len", "data.seq_len", "data.batch_size", "train.steps",
             "train.grad_accum_steps", "train.learning_rate", "train.log_every", "train.checkpoint_every",
             "train.keep_checkpoints", "train.max_nonfinite_steps", "data.num_packing_bins", "train.eval_batches",
             "model.scan_unroll", "curate.shard_docs", "curate.max_doc_mb", "curate.near_dedup.num_perm",
             "curate.near_dedup.shingle_size", "data.curriculum_stages", "tokenize.max_train_mb", "tokenize.max_doc_mb",
             "tokenize.shard_mb", "serve.devices", "serve.max_batch", "serve.page_size", "serve.prefill_chunk",
             "serve.int4_group", "serve.max_queue", "serve.speculative_k", "serve.decode_steps", "distill.temperature")


class ConfigError(ValueError):
  """A config file, key or value that cannot be used; the message names the key."""


def resolve_config_path(name: str | None) -> Path:
  """A config given as a path, or as a bare name of a file in configs/ (`tiny`, `llama3_8b`)."""
  name = name or DEFAULT_CONFIG
  path = Path(name)
  if path.is_file():
    return path
  packaged = CONFIG_DIR / (path.stem + ".py")
  if packaged.is_file():
    return packaged
  known = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
  raise ConfigError(f"--config={name}: no such file (packaged configs: {', '.join(known)})")


def load_config(name: str | None = None, overrides: Sequence[str] = ()) -> config_dict.ConfigDict:
  """Loads a config file (`get_config()` in a .py, or a saved resolved .json), applies overrides, validates."""
  path = resolve_config_path(name)
  if path.suffix == ".json":
    try:
      saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ConfigError(f"--config={path}: unreadable saved config ({e})") from None
    # A saved config describes the experiment; which processes run it is decided by this launch.
    saved.pop("distributed", None)
    return config_from_dict(saved, overrides)
  return finalize(_apply(_module_config(path), overrides))


def _module_config(path: Path) -> config_dict.ConfigDict:
  spec = importlib.util.spec_from_file_location(f"maxlm_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config={path}: the file defines no get_config()")
  return module.get_config()


def _apply(cfg: config_dict.ConfigDict, overrides: Sequence[str]) -> config_dict.ConfigDict:
  for item in overrides:
    apply_override(cfg, item)
  return cfg


def config_from_dict(d: dict, overrides: Sequence[str] = ()) -> config_dict.ConfigDict:
  """Rebuilds a saved (resolved) or partial config over the base config's types, then applies overrides."""
  cfg = _module_config(resolve_config_path("base"))
  _merge(cfg, d, "")
  return finalize(_apply(cfg, overrides))


def _merge(cfg, d: dict, prefix: str) -> None:
  for key, value in d.items():
    full = f"{prefix}{key}"
    if key not in cfg:
      raise ConfigError(f"saved config has unknown key {full!r}")
    if isinstance(value, dict):
      _merge(cfg[key], value, full + ".")
    else:
      cfg[key] = value


def apply_override(cfg: config_dict.ConfigDict, item: str) -> None:
  """Applies one `--config.a.b=value` (or `a.b=value`) override in place."""
  body = item[2:] if item.startswith("--") else item
  if body.startswith("config."):
    body = body[len("config."):]
  if "=" not in body:
    raise ConfigError(f"override {item!r}: expected --config.<key>=<value>")
  key, raw = body.split("=", 1)
  parts = key.split(".")
  node = cfg
  for i, part in enumerate(parts):
    if not isinstance(node, config_dict.ConfigDict) or part not in node:
      prefix = ".".join(parts[:i])
      siblings = list(node.keys()) if isinstance(node, config_dict.ConfigDict) else []
      close = difflib.get_close_matches(part, siblings, n=1)
      hint = f" (did you mean {'.'.join(parts[:i] + close)!r}?)" if close else ""
      where = f" in {prefix!r}" if prefix else ""
      raise ConfigError(f"unknown config key {key!r}: no field {part!r}{where}{hint}")
    if i < len(parts) - 1:
      node = node[part]
  leaf = parts[-1]
  if isinstance(node[leaf], config_dict.ConfigDict):
    raise ConfigError(f"config key {key!r} is a section; override one of its fields: {sorted(node[leaf])}")
  node[leaf] = _parse(key, raw, node.get_ref(leaf).get_type(), node[leaf])


def _parse(key: str, raw: str, typ: type, current):
  if raw.lower() in ("none", "null") and current is None:
    return None
  try:
    if typ is bool:
      if raw.lower() in ("true", "1", "yes"):
        return True
      if raw.lower() in ("false", "0", "no"):
        return False
      raise ValueError
    if typ is int:
      return int(raw)
    if typ is float:
      return float(raw)
    if typ in (tuple, list):
      return typ(v.strip() for v in raw.split(",") if v.strip())
    if typ is str:
      return raw
  except ValueError:
    pass
  else:
    raise ConfigError(f"config key {key!r} has unsupported type {typ.__name__}")
  raise ConfigError(f"config key {key!r} expects {typ.__name__}, got {raw!r}")


def finalize(cfg: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """Validates `cfg` and fills derived fields (head_dim); raises ConfigError naming the key."""
  m, d, t = cfg.model, cfg.data, cfg.train
  for key, allowed in _CHOICES.items():
    value = _get(cfg, key)
    if value not in allowed:
      raise ConfigError(f"{key}={value!r}: expected one of {list(allowed)}")
  for key in _POSITIVE:
    if not _get(cfg, key) > 0:
      raise ConfigError(f"{key}={_get(cfg, key)!r}: must be > 0")
  if m.flash_block_sizes:
    blocks = m.flash_block_sizes.split(",")
    if len(blocks) != 4 or not all(b.strip().isdigit() and int(b) > 0 and not int(b) & (int(b) - 1) for b in blocks):
      raise ConfigError(f"model.flash_block_sizes={m.flash_block_sizes!r}: expected four powers of two "
                        "'block_q,block_kv,block_q_bwd,block_kv_bwd' or '' for the backend's defaults")
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}")
  if m.head_dim is None:
    if m.d_model % m.num_heads:
      raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
                        "set model.head_dim explicitly")
    m.head_dim = m.d_model // m.num_heads
  if m.head_dim <= 0 or m.head_dim % 2:
    raise ConfigError(f"model.head_dim={m.head_dim}: must be a positive even number (RoPE rotates pairs)")
  if m.num_experts < 0:
    raise ConfigError(f"model.num_experts={m.num_experts}: must be >= 0 (0 = dense MLP)")
  if m.num_experts and not 1 <= m.num_experts_per_tok <= m.num_experts:
    raise ConfigError(f"model.num_experts_per_tok={m.num_experts_per_tok}: must be in [1, model.num_experts="
                      f"{m.num_experts}]")
  if m.moe_aux_loss_coef < 0:
    raise ConfigError(f"model.moe_aux_loss_coef={m.moe_aux_loss_coef}: must be >= 0")
  if m.moe_capacity_factor < 0:
    raise ConfigError(f"model.moe_capacity_factor={m.moe_capacity_factor}: must be >= 0 (0 = dropless)")
  if m.sliding_window is not None and m.sliding_window <= 0:
    raise ConfigError(f"model.sliding_window={m.sliding_window}: must be > 0 or None")
  if d.seq_len > m.max_seq_len:
    raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
  if d.batch_size % t.grad_accum_steps:
    raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by "
                      f"train.grad_accum_steps={t.grad_accum_steps}")
  if d.loader_streams < 0 or (d.loader_streams and d.batch_size % d.loader_streams):
    raise ConfigError(f"data.loader_streams={d.loader_streams}: must be >= 0 and divide data.batch_size="
                      f"{d.batch_size}")
  if not 0 < d.eval_fraction < 1:
    raise ConfigError(f"data.eval_fraction={d.eval_fraction}: must be in (0, 1)")
  if d.mixture and not d.tokenized:
    raise ConfigError(f"data.mixture={d.mixture!r} names sources of tokenized data: set data.tokenized to the "
                      "`maxlm tokenize` output director(ies)")
  if d.mixture:
    from data_pipelines.mixture import parse_mixture  # noqa: PLC0415
    try:
      parse_mixture(d.mixture)
    except ValueError as e:
      raise ConfigError(f"data.mixture={d.mixture!r}: {e}") from None
  if d.tokenized and d.paths:
    raise ConfigError(f"data.tokenized={d.tokenized!r} and data.paths={d.paths!r}: give one source of training data")
  nd = cfg.curate.near_dedup
  if nd.bands < 0 or nd.rows < 0 or bool(nd.bands) != bool(nd.rows):
    raise ConfigError(f"curate.near_dedup.bands={nd.bands}, rows={nd.rows}: set both (> 0) or neither (0 = chosen "
                      "for the threshold)")
  if nd.bands and nd.bands * nd.rows > nd.num_perm:
    raise ConfigError(f"curate.near_dedup.bands={nd.bands} x rows={nd.rows} exceeds num_perm={nd.num_perm}")
  if not 0 < nd.threshold < 1:
    raise ConfigError(f"curate.near_dedup.threshold={nd.threshold}: must be in (0, 1)")
  if not 0 <= cfg.tokenize.eval_fraction < 1:
    raise ConfigError(f"tokenize.eval_fraction={cfg.tokenize.eval_fraction}: must be in [0, 1)")
  if cfg.tokenize.vocab_size < 0:
    raise ConfigError(f"tokenize.vocab_size={cfg.tokenize.vocab_size}: must be >= 0 (0 = model.vocab_size)")
  sv = cfg.serve
  if sv.max_len < 0 or sv.max_len > m.max_seq_len:
    raise ConfigError(f"serve.max_len={sv.max_len}: must be in [0, model.max_seq_len={m.max_seq_len}] (0 = all)")
  if sv.num_pages < 0:
    raise ConfigError(f"serve.num_pages={sv.num_pages}: must be >= 0 (0 = enough for max_batch x max_len)")
  for key in ("page_size", "prefill_chunk"):
    if sv[key] & (sv[key] - 1):
      raise ConfigError(f"serve.{key}={sv[key]}: must be a power of two")
  if sv.kv_layout == "contiguous" and sv.attention == "pallas":
    raise ConfigError("serve.attention=pallas needs serve.kv_layout=paged (the kernel reads a page table)")
  if not 0 <= cfg.distill.alpha <= 1:
    raise ConfigError(f"distill.alpha={cfg.distill.alpha}: must be in [0, 1]")
  if t.warmup_steps < 0:
    raise ConfigError(f"train.warmup_steps={t.warmup_steps}: must be >= 0")
  if not 0 <= t.min_lr_ratio <= 1:
    raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio}: must be in [0, 1]")
  if t.grad_clip < 0:
    raise ConfigError(f"train.grad_clip={t.grad_clip}: must be >= 0 (0 disables clipping)")
  for axis, size in cfg.mesh.items():
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis}={size}: must be a positive device count or -1")
  if list(cfg.mesh.values()).count(-1) > 1:
    raise ConfigError(f"mesh: at most one axis may be -1, got {cfg.mesh.to_dict()}")
  from maxlm.logical_rules import config_rules  # noqa: PLC0415  (it imports ConfigError from here)
  config_rules(cfg)  # a bad preset or sharding.rules entry fails here, naming it
  dist = cfg.distributed
  if dist.coordinator and (":" not in dist.coordinator or not dist.coordinator.rsplit(":", 1)[1].isdigit()):
    raise ConfigError(f"distributed.coordinator={dist.coordinator!r}: expected HOST:PORT")
  if dist.num_processes < 1 or not 0 <= dist.process_id < dist.num_processes:
    raise ConfigError(f"distributed.process_id={dist.process_id} must be in [0, distributed.num_processes="
                      f"{dist.num_processes})")
  cfg.lock()
  return cfg


def _get(cfg, dotted: str):
  node = cfg
  for part in dotted.split("."):
    node = node[part]
  return node


def to_json(cfg: config_dict.ConfigDict) -> str:
  """The resolved config as JSON (saved beside every checkpoint)."""
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
