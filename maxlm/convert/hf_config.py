"""Hugging Face config.json <-> the maxlm config, for Llama, Mistral, Qwen2 and Mixtral.

`model_fields` maps a config.json to maxlm's `model` section (refusing what maxlm cannot represent, naming the
field); `hf_config` writes the config.json of a maxlm config for the family that fits it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ml_collections import config_dict

from maxlm.config import ConfigError, config_from_dict

SUPPORTED = ("llama", "mistral", "qwen2", "mixtral")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "mixtral": "MixtralForCausalLM"}


class UnsupportedModelError(ValueError):
  """A Hugging Face model or option maxlm cannot represent; the message names the field."""


def read_hf_config(hf_dir: str | Path) -> dict:
  """The parsed config.json of a Hugging Face model directory."""
  path = Path(hf_dir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
  try:
    return json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable JSON ({e})") from None


def _rope(hf: dict) -> dict:
  """maxlm rope fields from transformers-5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
  params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
  where = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
  out = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
  kind = params.get("rope_type", params.get("type")) or "default"
  if kind == "default":
    out["rope_scaling"] = ""
  elif kind == "llama3":
    out.update(rope_scaling="llama3", rope_scaling_factor=float(params["factor"]),
               rope_low_freq_factor=float(params["low_freq_factor"]),
               rope_high_freq_factor=float(params["high_freq_factor"]),
               rope_original_max_len=int(params["original_max_position_embeddings"]))
  else:
    raise UnsupportedModelError(f"config.json {where}.rope_type={kind!r} is not supported (default, llama3)")
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise UnsupportedModelError(f"config.json partial_rotary_factor={partial}: only full rotary is supported")
  return out


def _sliding_window(hf: dict, model_type: str) -> int | None:
  """The one window every layer uses, or None; per-layer mixtures are refused."""
  window = hf.get("sliding_window")
  if model_type == "qwen2" and not hf.get("use_sliding_window", False):
    window = None
  layer_types = hf.get("layer_types")
  if layer_types:
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
      return None
    if kinds == {"sliding_attention"} and window:
      return int(window)
    raise UnsupportedModelError(
        f"config.json layer_types={sorted(kinds)} (max_window_layers={hf.get('max_window_layers')}): a sliding "
        "window on some layers only is not supported; maxlm applies one window to every layer")
  if model_type == "qwen2" and window:
    first = int(hf.get("max_window_layers", 0))
    if 0 < first < hf["num_hidden_layers"]:
      raise UnsupportedModelError(f"config.json max_window_layers={first}: a sliding window on some layers "
                                  "only is not supported")
  return int(window) if window else None


def model_fields(hf: dict) -> dict:
  """The maxlm `model` section for a Hugging Face config dict (raises UnsupportedModelError naming a field)."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED:
    raise UnsupportedModelError(f"config.json model_type={model_type!r} is not supported ({', '.join(SUPPORTED)})")
  act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
  if act != "silu":
    raise UnsupportedModelError(f"config.json hidden_act={act!r}: only silu (SwiGLU) is supported")
  if hf.get("mlp_bias"):
    raise UnsupportedModelError("config.json mlp_bias=true is not supported")
  if model_type == "llama" and hf.get("attention_bias"):
    raise UnsupportedModelError("config.json attention_bias=true (Llama: biases on q/k/v and o) is not supported")
  for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
    if not isinstance(hf.get(key), int):
      raise UnsupportedModelError(f"config.json {key}={hf.get(key)!r}: expected an integer")
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  fields = {
    "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"], "num_layers": hf["num_hidden_layers"],
    "num_heads": heads, "num_kv_heads": hf.get("num_key_value_heads") or heads, "head_dim": head_dim,
    "mlp_dim": hf["intermediate_size"], "max_seq_len": int(hf.get("max_position_embeddings", 2048)),
    "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
    "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    "sliding_window": _sliding_window(hf, model_type), "attention_bias": model_type == "qwen2",
    "init_std": float(hf.get("initializer_range", 0.02)), **_rope(hf),
  }
  if model_type == "mixtral":
    fields["num_experts"] = int(hf["num_local_experts"])
    fields["num_experts_per_tok"] = int(hf["num_experts_per_tok"])
  return fields


def maxlm_config(hf: dict, overrides: Sequence[str] = (), tokenizer: str = "") -> config_dict.ConfigDict:
  """A full maxlm config for a Hugging Face config dict: base defaults, the mapped model, then overrides."""
  model = model_fields(hf)
  data = {"tokenizer": tokenizer, "seq_len": min(512, model["max_seq_len"])}
  try:
    return config_from_dict({"model": model, "data": data}, overrides)
  except ConfigError as e:
    raise UnsupportedModelError(f"config.json maps to an invalid maxlm config: {e}") from None


def hf_config(cfg, model_type: str | None = None, dtype: str = "float32", special_ids: dict | None = None) -> dict:
  """The Hugging Face config.json for a maxlm config; model_type None picks the family that fits."""
  m = cfg.model
  if model_type is None:
    model_type = ("mixtral" if m.num_experts else "qwen2" if m.attention_bias
                  else "mistral" if m.sliding_window else "llama")
  if model_type not in SUPPORTED:
    raise UnsupportedModelError(f"model_type={model_type!r}: expected one of {SUPPORTED}")
  problems = {
    "num_experts > 0 needs model_type mixtral": bool(m.num_experts) != (model_type == "mixtral"),
    "attention_bias needs model_type qwen2": bool(m.attention_bias) != (model_type == "qwen2"),
    "sliding_window is not available in llama": bool(m.sliding_window) and model_type == "llama",
  }
  bad = [k for k, v in problems.items() if v]
  if bad:
    raise UnsupportedModelError(f"cannot export as {model_type}: model.{bad[0]}")
  rope = {"rope_type": "default", "rope_theta": m.rope_theta}
  if m.rope_scaling == "llama3":
    rope.update(rope_type="llama3", factor=m.rope_scaling_factor, low_freq_factor=m.rope_low_freq_factor,
                high_freq_factor=m.rope_high_freq_factor, original_max_position_embeddings=m.rope_original_max_len)
  out = {
    "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": m.vocab_size,
    "hidden_size": m.d_model, "intermediate_size": m.mlp_dim, "num_hidden_layers": m.num_layers,
    "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim,
    "hidden_act": "silu", "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.rms_norm_eps,
    "tie_word_embeddings": m.tie_embeddings, "rope_parameters": rope, "initializer_range": m.init_std,
    "attention_dropout": 0.0, "use_cache": True, "dtype": dtype,
  }
  if m.head_dim == m.d_model // m.num_heads and model_type in ("qwen2", "mixtral"):
    del out["head_dim"]  # these configs derive it (and do not list it) unless it differs
  if model_type == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  elif model_type == "qwen2":
    n = m.num_layers
    out.update(use_sliding_window=bool(m.sliding_window), sliding_window=m.sliding_window,
               max_window_layers=0 if m.sliding_window else n,
               layer_types=["sliding_attention" if m.sliding_window else "full_attention"] * n)
  else:
    out["sliding_window"] = m.sliding_window
  if model_type == "mixtral":
    out.update(num_local_experts=m.num_experts, num_experts_per_tok=m.num_experts_per_tok,
               output_router_logits=False, router_aux_loss_coef=0.001, router_jitter_noise=0.0)
  out.update({k: v for k, v in (special_ids or {}).items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")})
  return out
