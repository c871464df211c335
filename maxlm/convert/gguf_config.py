"""GGUF metadata <-> a Hugging Face-style config dict, so the config mapping stays in hf_config.py.

Import reads `{arch}.*` keys into the config.json fields `hf_config.maxlm_config` maps (refusing, by name, any
key whose meaning maxlm cannot represent); export writes the keys llama.cpp reads for a maxlm config. Llama-3.1
RoPE scaling travels as llama.cpp writes it: a `rope_freqs.weight` tensor of per-frequency divisors.
"""

from __future__ import annotations

import math
from typing import Any

import gguf
import numpy as np

from maxlm.convert.hf_config import UnsupportedModelError
from maxlm.models.layers import rope_inv_freq

ARCHITECTURES = ("llama", "qwen2", "mistral")  # general.architecture values read ("mistral": llama's layout)
ROPE_FREQS = "rope_freqs.weight"
# {arch}.* keys read; any other is refused by name. Values are checked in hf_config_from_gguf.
_REQUIRED = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
             "attention.layer_norm_rms_epsilon")
_OPTIONAL = ("attention.head_count_kv", "rope.freq_base", "rope.dimension_count", "attention.key_length",
             "attention.value_length", "vocab_size", "rope.scaling.type", "rope.scaling.factor",
             "rope.scaling.original_context_length", "rope.scaling.finetuned", "expert_count", "expert_used_count",
             "tensor_data_layout")
# llama3 RoPE factors: llama.cpp stores only the frequency divisors; Meta's low/high factors where they leave
# the parameters underdetermined (the result is checked against the divisors on import).
_LLAMA3_LOW_FREQ_FACTOR, _LLAMA3_HIGH_FREQ_FACTOR = 1.0, 4.0


def field(reader: gguf.GGUFReader, key: str) -> Any:
  """The value of metadata `key` (None if absent); float32 values as the shortest decimal that round-trips."""
  f = reader.get_field(key)
  if f is None:
    return None
  value = f.contents()
  if f.types and f.types[0] == gguf.GGUFValueType.FLOAT32:
    return float(str(np.float32(value)))
  return value


def architecture(reader: gguf.GGUFReader) -> str:
  """general.architecture, refused unless maxlm reads it."""
  arch = field(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise UnsupportedModelError(f"GGUF general.architecture={arch!r} is not supported ({', '.join(ARCHITECTURES)})")
  return arch


def hf_config_from_gguf(reader: gguf.GGUFReader) -> dict:
  """A Hugging Face-style config dict (model_type llama/mistral/qwen2) of a GGUF file's metadata and tensors."""
  arch = architecture(reader)
  prefix = f"{arch}."
  known = set(_REQUIRED) | set(_OPTIONAL)
  unknown = sorted(k for k in reader.fields if k.startswith(prefix) and k[len(prefix):] not in known)
  if unknown:
    raise UnsupportedModelError(f"GGUF metadata {unknown[0]}={field(reader, unknown[0])!r} is not supported "
                                f"(maxlm reads {', '.join(prefix + k for k in _REQUIRED)} and the optional keys "
                                "of plain llama/qwen2 models)")
  split = field(reader, "split.count")
  if split and split > 1:
    raise UnsupportedModelError(f"GGUF split.count={split}: a model split over several files is not supported "
                                "(merge it first: llama-gguf-split --merge)")

  def get(key: str, default: Any = None, kind: type = int) -> Any:
    value = field(reader, prefix + key)
    if value is None:
      if key in _REQUIRED:
        raise UnsupportedModelError(f"GGUF metadata {prefix + key} is missing")
      return default
    if not isinstance(value, kind) or isinstance(value, bool):
      raise UnsupportedModelError(f"GGUF metadata {prefix + key}={value!r}: expected one {kind.__name__} "
                                  "(per-layer values are not supported)")
    return value

  for key in ("expert_count", "expert_used_count"):
    if get(key, 0):
      raise UnsupportedModelError(f"GGUF metadata {prefix + key}={get(key)}: mixture-of-experts GGUF files are "
                                  "not supported")
  heads, d_model = get("attention.head_count"), get("embedding_length")
  head_dim = get("attention.key_length", None)
  value_dim = get("attention.value_length", head_dim)
  if head_dim is not None and value_dim != head_dim:
    raise UnsupportedModelError(f"GGUF metadata {prefix}attention.value_length={value_dim} differs from "
                                f"attention.key_length={head_dim}: not supported")
  head_dim = head_dim or d_model // heads  # llama.cpp's n_embd_head_k
  rope_dims = get("rope.dimension_count", None)
  if rope_dims is not None and rope_dims != head_dim:
    raise UnsupportedModelError(f"GGUF metadata {prefix}rope.dimension_count={rope_dims} is not the head size "
                                f"{head_dim}: partial rotary embeddings are not supported")
  tensors = {t.name: t for t in reader.tensors}
  vocab = get("vocab_size", None)
  if vocab is None:
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else (
      int(tensors["token_embd.weight"].shape[-1]) if "token_embd.weight" in tensors else None)
  model_type = arch
  if arch == "llama" and "mistral" in str(field(reader, "general.name") or "").lower():
    model_type = "mistral"  # llama.cpp stores Mistral models as llama; --to-hf then exports a Mistral
  theta = get("rope.freq_base", 10000.0, float)
  hf = {
    "model_type": model_type, "hidden_size": d_model, "num_hidden_layers": get("block_count"),
    "intermediate_size": get("feed_forward_length"), "num_attention_heads": heads,
    "num_key_value_heads": get("attention.head_count_kv", heads), "head_dim": head_dim,
    "rms_norm_eps": get("attention.layer_norm_rms_epsilon", kind=float),
    "max_position_embeddings": get("context_length"), "vocab_size": vocab, "hidden_act": "silu",
    "tie_word_embeddings": "output.weight" not in tensors,
    "rope_parameters": _rope(reader, prefix, theta, head_dim, tensors.get(ROPE_FREQS)),
  }
  if model_type == "qwen2":
    hf["use_sliding_window"] = False
  special = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id"}
  for hf_key, key in special.items():
    if field(reader, f"tokenizer.ggml.{key}") is not None:
      hf[hf_key] = field(reader, f"tokenizer.ggml.{key}")
  return hf


def _rope(reader: gguf.GGUFReader, prefix: str, theta: float, head_dim: int, freqs) -> dict:
  """HF rope_parameters: default, or llama3 recovered from a rope_freqs tensor; other scalings are refused."""
  kind = field(reader, prefix + "rope.scaling.type")
  factor = field(reader, prefix + "rope.scaling.factor")
  if kind not in (None, "none") or (kind is None and factor not in (None, 0.0, 1.0)):
    shown = f"rope.scaling.type={kind!r}" if kind not in (None, "none") else f"rope.scaling.factor={factor}"
    raise UnsupportedModelError(f"GGUF metadata {prefix}{shown} is not supported (RoPE scaling: none, or "
                                "Llama-3.1's rope_freqs)")
  if freqs is None:
    return {"rope_type": "default", "rope_theta": theta}
  divisors = gguf.quants.dequantize(freqs.data, freqs.tensor_type).reshape(-1).astype(np.float64)
  params = _llama3_params(divisors, theta, head_dim)
  if params is None:
    raise UnsupportedModelError(f"GGUF tensor {ROPE_FREQS} (RoPE frequency factors {divisors.round(3).tolist()[:6]}"
                                "...) does not match Llama-3.1's RoPE scaling: not supported")
  return {"rope_type": "llama3", "rope_theta": theta, **params}


def _llama3_params(divisors: np.ndarray, theta: float, head_dim: int) -> dict | None:
  """Llama-3.1 scaling parameters whose frequency divisors equal `divisors`, or None.

  Only the ratios of (original length, low, high factor) shape the frequencies, so low_freq_factor is taken as 1
  (Meta's value): in the band between the unscaled and the fully scaled frequencies, 1/divisor = (1 - s)/factor + s
  with s = (L / wavelength - 1) / (high - 1), a line in 1/wavelength whose slope and intercept give L and high.
  """
  if divisors.shape != (head_dim // 2,) or divisors.min() < 1 - 1e-6:
    return None
  plain = rope_inv_freq(head_dim, theta).astype(np.float64)
  factor = float(divisors.max())
  if factor <= 1 + 1e-6:
    return None
  band = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
  wavelen = 2 * math.pi / plain
  s = (1 / divisors - 1 / factor) / (1 - 1 / factor)
  candidates = []
  if band.sum() >= 2:
    slope, intercept = np.polyfit(1 / wavelen[band], s[band], 1)
    if intercept < 0:
      candidates.append((1 - 1 / intercept, -slope / intercept))
  hi = _LLAMA3_HIGH_FREQ_FACTOR
  if band.any():
    candidates.append((hi, float(np.median(wavelen[band] * (s[band] * (hi - 1) + 1)))))
  else:  # no frequency inside the band: any L splitting the two groups the same way gives the same model
    short = wavelen[divisors <= 1 + 1e-6]
    candidates += [(hi, 8192), (hi, math.ceil(short.max() * hi) if short.size else 1)]
  for hi, original in candidates:
    params = {"factor": factor, "low_freq_factor": _LLAMA3_LOW_FREQ_FACTOR, "high_freq_factor": round(float(hi), 4),
              "original_max_position_embeddings": round(original)}
    got = plain / rope_inv_freq(head_dim, theta, "llama3", factor, 1.0, params["high_freq_factor"],
                                params["original_max_position_embeddings"]).astype(np.float64)
    if np.allclose(got, divisors, rtol=1e-4, atol=0):
      return params
  return None


def rope_factors(cfg) -> np.ndarray | None:
  """llama.cpp's rope_freqs tensor (per-frequency divisors) for a maxlm config's RoPE scaling, or None."""
  m = cfg.model
  if not m.rope_scaling:
    return None
  plain = rope_inv_freq(m.head_dim, m.rope_theta).astype(np.float64)
  scaled = rope_inv_freq(m.head_dim, m.rope_theta, m.rope_scaling, m.rope_scaling_factor, m.rope_low_freq_factor,
                         m.rope_high_freq_factor, m.rope_original_max_len).astype(np.float64)
  return (plain / scaled).astype(np.float32)


def gguf_architecture(cfg) -> str:
  """The llama.cpp architecture a maxlm config exports as (qwen2 for q/k/v biases, else llama); refuses what
  neither can represent, naming the option."""
  m = cfg.model
  arch = "qwen2" if m.attention_bias else "llama"
  problems = {
    f"model.num_experts={m.num_experts}: mixture-of-experts export to GGUF is not supported": m.num_experts,
    f"model.sliding_window={m.sliding_window}: llama.cpp's llama/qwen2 models have no sliding window":
      m.sliding_window,
    f"model.rope_scaling={m.rope_scaling!r} with attention biases: llama.cpp's qwen2 reads no RoPE factors":
      m.rope_scaling and arch == "qwen2",
  }
  bad = [k for k, v in problems.items() if v]
  if bad:
    raise UnsupportedModelError(f"cannot export as GGUF: {bad[0]}")
  return arch


def add_model_metadata(writer: gguf.GGUFWriter, cfg, name: str, file_type: int) -> None:
  """Writes the general.* and {arch}.* keys llama.cpp needs for a maxlm config into `writer` (its arch)."""
  m = cfg.model
  writer.add_type("model")
  writer.add_name(name)
  writer.add_file_type(file_type)
  writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
  writer.add_context_length(m.max_seq_len)
  writer.add_embedding_length(m.d_model)
  writer.add_block_count(m.num_layers)
  writer.add_feed_forward_length(m.mlp_dim)
  writer.add_head_count(m.num_heads)
  writer.add_head_count_kv(m.num_kv_heads)
  writer.add_layer_norm_rms_eps(m.rms_norm_eps)
  writer.add_rope_freq_base(m.rope_theta)
  writer.add_rope_dimension_count(m.head_dim)
  if m.head_dim != m.d_model // m.num_heads:
    writer.add_key_length(m.head_dim)
    writer.add_value_length(m.head_dim)
  writer.add_vocab_size(m.vocab_size)
