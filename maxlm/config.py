"""Config files + `--config.a.b=value` overrides, validated before any work with errors naming the key."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from ml_collections import config_dict

from data_pipelines.mixture_spec import parse_mixture
from maxlm.errors import ConfigError
from maxlm.logical_rules import config_rules

__all__ = ["CONFIG_DIR", "DEFAULT_CONFIG", "ConfigError", "apply_override", "config_from_dict", "finalize",
           "load_config", "resolve_config_path", "to_json"]

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _configs_package() -> Path:
  """The directory of the packaged configs, importable as `maxlm.configs` (how config files import their siblings).

  Installed (a wheel, or an editable install) it is the subpackage maxlm.configs; in a bare checkout (the
  repository root on sys.path, nothing installed) configs/ beside maxlm/ is bound to that name here.
  """
  try:
    return Path(importlib.import_module("maxlm.configs").__file__).parent
  except ModuleNotFoundError as e:
    if e.name != "maxlm.configs":
      raise
  checkout = Path(__file__).resolve().parent.parent / "configs"
  spec = importlib.util.spec_from_file_location("maxlm.configs", checkout / "__init__.py",
                                                submodule_search_locations=[str(checkout)])
  module = importlib.util.module_from_spec(spec)
  sys.modules["maxlm.configs"] = module
  spec.loader.exec_module(module)
  sys.modules["maxlm"].configs = module  # as an import binds a subpackage to its parent
  return checkout


CONFIG_DIR = _configs_package()
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
  "host.malloc_tuning": ("auto", "on", "off"),
  "serve.weights": ("none", "bf16", "int8", "int4"),
  "serve.kv_cache": ("auto", "bf16", "float32", "int8"),
  "lora.base_quant": ("none", "int8", "int4", "nf4"),
  "train.objective": ("lm", "sft", "dpo"),
  "dpo.loss_type": ("sigmoid", "ipo", "hinge", "robust"),
  "dpo.reference": ("base", "precomputed", "none"),
}
# Range of every numeric key (after a check that no float anywhere is NaN or infinite), each failing with
# "KEY=VALUE: must be ...". Keys with cross-field constraints are also checked in finalize().
_POSITIVE = ("model.vocab_size", "model.d_model", "model.num_layers", "model.num_heads", "model.num_kv_heads",
             "model.mlp_dim", "model.num_experts_per_tok", "model.max_seq_len", "model.rope_theta",
             "model.rope_scaling_factor", "model.rope_low_freq_factor", "model.rope_high_freq_factor",
             "model.rope_original_max_len",
             "model.rms_norm_eps", "model.init_std", "model.scan_unroll", "distributed.initialization_timeout",
             "data.max_corpus_mb", "data.seq_len", "data.batch_size", "data.num_packing_bins", "data.curriculum_stages",
             "train.steps", "train.learning_rate", "train.eps", "train.grad_accum_steps", "train.max_nonfinite_steps",
             "train.log_every", "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
             "curate.shard_docs", "curate.max_doc_mb", "curate.near_dedup.num_perm", "curate.near_dedup.shingle_size",
             "tokenize.max_train_mb", "tokenize.max_doc_mb", "tokenize.shard_mb", "serve.devices", "serve.max_batch",
             "serve.page_size", "serve.prefill_chunk", "serve.int4_group", "serve.max_queue", "serve.speculative_k",
             "serve.decode_steps", "distill.temperature", "lora.rank", "lora.alpha", "lora.base_quant_group",
             "dpo.beta", "dpo.pairs_per_row")
# Keys where 0 has a meaning (given in the message) and a negative value none.
_NON_NEGATIVE = {
  "model.num_experts": "0 = dense MLP", "model.moe_aux_loss_coef": "0 = no balancing loss",
  "model.moe_capacity_factor": "0 = dropless", "data.loader_streams": "0 = the default stream count",
  "train.warmup_steps": "0 = no warmup", "train.weight_decay": "0 = none", "train.grad_clip": "0 disables clipping",
  "train.z_loss": "0 = off", "train.eval_every": "0 = only at the end", "train.eval_tasks_limit": "0 = all records",
  "train.eval_tasks_fewshot": "0 = zero-shot", "train.sample_tokens": "0 = no sample",
  "curate.near_dedup.bands": "0 = chosen for the threshold", "curate.near_dedup.rows": "0 = chosen for the threshold",
  "tokenize.vocab_size": "0 = model.vocab_size", "serve.max_len": "0 = model.max_seq_len",
  "serve.num_pages": "0 = enough for max_batch x max_len",
}
# Seeds: grain's shuffle takes [0, 2^32), numpy's generators only seeds >= 0; one range for all.
_SEEDS = ("data.seed", "train.seed", "curate.near_dedup.seed", "serve.seed")
_SEED_LIMIT = 2**32
_INT_LIMIT = 2**31  # every other integer
# Shares and probabilities: key -> (brackets of the interval, low, high).
_INTERVALS = {
  "data.eval_fraction": ("()", 0, 1), "tokenize.eval_fraction": ("[)", 0, 1),
  "curate.near_dedup.threshold": ("()", 0, 1), "curate.language.min_confidence": ("[]", 0, 1),
  "train.min_lr_ratio": ("[]", 0, 1), "train.b1": ("[)", 0, 1), "train.b2": ("[)", 0, 1),
  "distill.alpha": ("[]", 0, 1), "lora.dropout": ("[)", 0, 1), "dpo.label_smoothing": ("[]", 0, 0.5),
}


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
  """Validates `cfg` and fills derived fields (head_dim); raises ConfigError naming the key.

  The checks run in this order (the first failing one is reported): choices, numeric ranges, model, data,
  curation, serving, the schedule (a warning), mesh and sharding rules, multi-host settings.
  """
  _check_choices(cfg)
  _check_numbers(cfg)
  _check_flash_blocks(cfg.model)
  _derive_head_dim(cfg.model)
  _check_model_options(cfg.model)
  _check_batching(cfg)
  _check_data_sources(cfg.data)
  _check_near_dedup(cfg.curate.near_dedup)
  _check_quality_rules(cfg.curate.quality)
  _check_serve(cfg.serve, cfg.model)
  _warn_warmup(cfg.train)
  _check_mesh(cfg)
  _check_distributed(cfg.distributed)
  cfg.lock()
  return cfg


def _check_choices(cfg: config_dict.ConfigDict) -> None:
  """Every key with a fixed set of values (the `_CHOICES` table) holds one of them."""
  for key, allowed in _CHOICES.items():
    value = _get(cfg, key)
    if value not in allowed:
      raise ConfigError(f"{key}={value!r}: expected one of {list(allowed)}")


def _check_flash_blocks(m: config_dict.ConfigDict) -> None:
  """model.flash_block_sizes: '' or four powers of two."""
  if m.flash_block_sizes:
    blocks = m.flash_block_sizes.split(",")
    if len(blocks) != 4 or not all(b.strip().isdigit() and int(b) > 0 and not int(b) & (int(b) - 1) for b in blocks):
      raise ConfigError(f"model.flash_block_sizes={m.flash_block_sizes!r}: expected four powers of two "
                        "'block_q,block_kv,block_q_bwd,block_kv_bwd' or '' for the backend's defaults")


def _derive_head_dim(m: config_dict.ConfigDict) -> None:
  """Query heads group evenly over key/value heads; head_dim (d_model // num_heads unless set) is even."""
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}")
  if m.head_dim is None:
    if m.d_model % m.num_heads:
      raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
                        "set model.head_dim explicitly")
    m.head_dim = m.d_model // m.num_heads
  if m.head_dim <= 0 or m.head_dim % 2:
    raise ConfigError(f"model.head_dim={m.head_dim}: must be a positive even number (RoPE rotates pairs)")


def _check_model_options(m: config_dict.ConfigDict) -> None:
  """Experts per token within the experts, a positive sliding window, a llama3 RoPE band that is not empty."""
  if m.num_experts and not 1 <= m.num_experts_per_tok <= m.num_experts:
    raise ConfigError(f"model.num_experts_per_tok={m.num_experts_per_tok}: must be in [1, model.num_experts="
                      f"{m.num_experts}]")
  if m.sliding_window is not None and m.sliding_window <= 0:
    raise ConfigError(f"model.sliding_window={m.sliding_window}: must be > 0 or None")
  if m.rope_scaling == "llama3" and not m.rope_high_freq_factor > m.rope_low_freq_factor:
    raise ConfigError(f"model.rope_high_freq_factor={m.rope_high_freq_factor}: must exceed "
                      f"model.rope_low_freq_factor={m.rope_low_freq_factor} (llama3 scaling interpolates between)")


def _check_batching(cfg: config_dict.ConfigDict) -> None:
  """Rows fit the model's context; the batch splits evenly into micro-batches and loader streams."""
  m, d, t = cfg.model, cfg.data, cfg.train
  if d.seq_len > m.max_seq_len:
    raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
  if d.batch_size % t.grad_accum_steps:
    raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by "
                      f"train.grad_accum_steps={t.grad_accum_steps}")
  if d.loader_streams and d.batch_size % d.loader_streams:
    raise ConfigError(f"data.loader_streams={d.loader_streams}: must divide data.batch_size={d.batch_size} "
                      "(0 = the default stream count)")


def _check_data_sources(d: config_dict.ConfigDict) -> None:
  """One source of training data; a mixture names tokenized sources and parses."""
  if d.mixture and not d.tokenized:
    raise ConfigError(f"data.mixture={d.mixture!r} names sources of tokenized data: set data.tokenized to the "
                      "`maxlm tokenize` output director(ies)")
  if d.mixture:
    try:
      parse_mixture(d.mixture)
    except ValueError as e:
      raise ConfigError(f"data.mixture={d.mixture!r}: {e}") from None
  if d.tokenized and d.paths:
    raise ConfigError(f"data.tokenized={d.tokenized!r} and data.paths={d.paths!r}: give one source of training data")


def _check_near_dedup(nd: config_dict.ConfigDict) -> None:
  """curate.near_dedup: LSH bands and rows set together, and within the permutations."""
  if bool(nd.bands) != bool(nd.rows):
    raise ConfigError(f"curate.near_dedup.bands={nd.bands}, rows={nd.rows}: set both (> 0) or neither (0 = chosen "
                      "for the threshold)")
  if nd.bands and nd.bands * nd.rows > nd.num_perm:
    raise ConfigError(f"curate.near_dedup.bands={nd.bands} x rows={nd.rows} exceeds num_perm={nd.num_perm}")


def _check_serve(sv: config_dict.ConfigDict, m: config_dict.ConfigDict) -> None:
  """serve: length within the model's context, a usable page pool, power-of-two blocks, a layout the kernel reads."""
  if sv.max_len > m.max_seq_len:
    raise ConfigError(f"serve.max_len={sv.max_len}: must be in [0, model.max_seq_len={m.max_seq_len}] (0 = all)")
  if sv.num_pages == 1:
    raise ConfigError("serve.num_pages=1: must be 0 (enough for max_batch x max_len) or >= 2 (one page is scratch)")
  for key in ("page_size", "prefill_chunk"):
    if sv[key] & (sv[key] - 1):
      raise ConfigError(f"serve.{key}={sv[key]}: must be a power of two")
  if sv.kv_layout == "contiguous" and sv.attention == "pallas":
    raise ConfigError("serve.attention=pallas needs serve.kv_layout=paged (the kernel reads a page table)")


def _warn_warmup(t: config_dict.ConfigDict) -> None:
  """A warning (not an error) when the warmup outlasts the run: the peak learning rate is never reached."""
  if t.warmup_steps > t.steps:
    _warn_once(f"train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}: the learning rate never reaches "
               f"train.learning_rate={t.learning_rate} (it ends at {t.steps / t.warmup_steps:.0%} of it) and never "
               "decays")


def _check_mesh(cfg: config_dict.ConfigDict) -> None:
  """Mesh axes are device counts (at most one -1); the sharding preset and rules parse (naming a bad entry)."""
  for axis, size in cfg.mesh.items():
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis}={size}: must be a positive device count or -1")
  if list(cfg.mesh.values()).count(-1) > 1:
    raise ConfigError(f"mesh: at most one axis may be -1, got {cfg.mesh.to_dict()}")
  config_rules(cfg)


def _check_distributed(dist: config_dict.ConfigDict) -> None:
  """distributed: a HOST:PORT coordinator, and this process's id within the process count."""
  if dist.coordinator and (":" not in dist.coordinator or not dist.coordinator.rsplit(":", 1)[1].isdigit()):
    raise ConfigError(f"distributed.coordinator={dist.coordinator!r}: expected HOST:PORT")
  if dist.num_processes < 1 or not 0 <= dist.process_id < dist.num_processes:
    raise ConfigError(f"distributed.process_id={dist.process_id} must be in [0, distributed.num_processes="
                      f"{dist.num_processes})")


def _check_numbers(cfg: config_dict.ConfigDict) -> None:
  """No float anywhere is NaN or infinite; every numeric key is in its range (the tables above)."""
  for key, value in _leaves(cfg, ""):
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"{key}={value!r}: must be a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and key not in _SEEDS and abs(value) >= _INT_LIMIT:
      raise ConfigError(f"{key}={value!r}: must be below 2^31 in magnitude (counts and sizes become int32 on device)")
  for key in _POSITIVE:
    if not _get(cfg, key) > 0:
      raise ConfigError(f"{key}={_get(cfg, key)!r}: must be > 0")
  for key, zero in _NON_NEGATIVE.items():
    if not _get(cfg, key) >= 0:
      raise ConfigError(f"{key}={_get(cfg, key)!r}: must be >= 0 ({zero})")
  for key in _SEEDS:
    if not 0 <= _get(cfg, key) < _SEED_LIMIT:
      raise ConfigError(f"{key}={_get(cfg, key)!r}: must be in [0, 2^32)")
  for key, (brackets, low, high) in _INTERVALS.items():
    value = _get(cfg, key)
    above = value >= low if brackets[0] == "[" else value > low
    below = value <= high if brackets[1] == "]" else value < high
    if not (above and below):
      raise ConfigError(f"{key}={value!r}: must be in {brackets[0]}{low}, {high}{brackets[1]}")


def _check_quality_rules(q: config_dict.ConfigDict) -> None:
  """curate.quality: a negative threshold disables its rule; a fraction is at most 1; a min is not above its max."""
  for key, value in q.items():
    if key.endswith("_fraction") and value > 1:
      raise ConfigError(f"curate.quality.{key}={value!r}: must be <= 1 (a share of the document; < 0 disables)")
  for low, high in (("min_words", "max_words"), ("min_mean_word_length", "max_mean_word_length")):
    if q[low] >= 0 and q[high] >= 0 and q[low] > q[high]:
      raise ConfigError(f"curate.quality.{low}={q[low]!r} exceeds curate.quality.{high}={q[high]!r}: every document "
                        "would be dropped")


def _leaves(node: config_dict.ConfigDict, prefix: str):
  """(dotted key, value) of every non-section field under `node`."""
  for key, value in node.items():
    if isinstance(value, config_dict.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _warn_once(message: str) -> None:
  """Logs a config warning once per process (a config is finalized again whenever a saved one is reloaded)."""
  if message not in _warned:
    _warned.add(message)
    logger.warning(message)


def _get(cfg, dotted: str):
  node = cfg
  for part in dotted.split("."):
    node = node[part]
  return node


def to_json(cfg: config_dict.ConfigDict) -> str:
  """The resolved config as JSON (saved beside every checkpoint)."""
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
