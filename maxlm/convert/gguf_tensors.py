"""GGUF tensors <-> Hugging Face-named tensors, so hf_tensors.py's parameter mapping serves both formats.

Import: `GGUFTensorReader` presents a GGUF file as a reader with HF names whose `get` dequantizes one tensor
(float32, [out, in]) and undoes llama.cpp's Q/K row permutation for the llama architecture. Export: `plan` and
`tensors` name, permute and encode a maxlm parameter tree's tensors one at a time (F32, F16, BF16 or Q8_0).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

from maxlm.convert.gguf_config import ROPE_FREQS, rope_factors
from maxlm.convert.hf_config import UnsupportedModelError
from maxlm.convert.hf_tensors import hf_tensor_shapes, hf_tensors

Q = gguf.GGMLQuantizationType
READ_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# --to-gguf --dtype: (tensor type of matrices, general.file_type); 1-D tensors (norms, biases) stay F32.
WRITE_TYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
               "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GGUF_NAME = re.compile(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)$")
_HF_NAME = re.compile(r"(?:model\.layers\.(\d+)\.)?([\w.]+)\.(weight|bias)$")
_FROM_HF = {**{v: k for k, v in _GLOBAL.items()}, **{v: k for k, v in _LAYER.items()}}


def hf_name(name: str) -> str | None:
  """The Hugging Face name of a GGUF tensor (blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight)."""
  match = _GGUF_NAME.match(name)
  if not match:
    return None
  layer, base, kind = match.groups()
  if layer is None:
    return f"{_GLOBAL[base]}.{kind}" if base in _GLOBAL else None
  return f"model.layers.{layer}.{_LAYER[base]}.{kind}" if base in _LAYER else None


def gguf_name(name: str) -> str:
  """The GGUF name of a Hugging Face tensor name (the inverse of hf_name)."""
  match = _HF_NAME.match(name)
  base = _FROM_HF.get(match.group(2)) if match else None
  if base is None:
    raise UnsupportedModelError(f"tensor {name!r} has no GGUF name (llama/qwen2 tensors only)")
  layer, _, kind = match.groups()
  return f"blk.{layer}.{base}.{kind}" if layer is not None else f"{base}.{kind}"


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's Q/K row order for the llama architecture (convert_hf_to_gguf.py's permute): within each head,
  HF's half-split rotary pairs (i, i + d/2) become adjacent rows (2i, 2i + 1)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """The inverse of permute_qk: GGUF llama Q/K rows back to Hugging Face's order."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _qk_heads(name: str, num_heads: int, num_kv_heads: int) -> int | None:
  """The head count to (un)permute HF tensor `name` by on the llama architecture, or None."""
  if name.endswith("self_attn.q_proj.weight"):
    return num_heads
  if name.endswith("self_attn.k_proj.weight"):
    return num_kv_heads
  return None


def _dequantize(data: np.ndarray, qtype: gguf.GGMLQuantizationType, chunk_bytes: int = 16 << 20) -> np.ndarray:
  """gguf.quants.dequantize into one preallocated float32 array, a few MB of rows at a time (the library builds a
  list of pieces and then concatenates them: twice the tensor)."""
  if qtype == Q.F32 or data.ndim < 2:
    return gguf.quants.dequantize(data, qtype)
  rows = data.reshape(-1, data.shape[-1])
  step = max(1, chunk_bytes // max(1, rows[0].nbytes))
  first = gguf.quants.dequantize(rows[:step], qtype)
  out = np.empty((rows.shape[0], first.shape[-1]), np.float32)
  out[:len(first)] = first
  for start in range(step, rows.shape[0], step):
    out[start:start + step] = gguf.quants.dequantize(rows[start:start + step], qtype)
  return out.reshape(*data.shape[:-1], first.shape[-1])


class GGUFTensorReader:
  """A GGUF file's tensors under Hugging Face names (a hf_tensors.TensorReader), dequantized on `get`.

  Tensors llama.cpp adds beyond HF's (e.g. rope_freqs.weight) keep their GGUF name unless listed in `consumed`
  (read elsewhere), so load_params names them as unused. Every tensor `get` returns stays cached until
  `release()`, which load_params calls after each parameter: the device shards of one parameter then decode each
  tensor once, and host memory holds at most one parameter's float32 tensors.
  """

  def __init__(self, reader: gguf.GGUFReader, path: str | Path, arch: str, num_heads: int, num_kv_heads: int,
               consumed: tuple[str, ...] = ()):
    self.path = Path(path)
    self.permute = arch == "llama"  # convert_hf_to_gguf.py permutes Q/K rows for llama only
    self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
    self._tensors = {}
    for t in reader.tensors:
      if t.name in consumed:
        continue
      if t.tensor_type not in READ_TYPES:
        raise UnsupportedModelError(f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, which is not "
                                    f"supported ({', '.join(q.name for q in READ_TYPES)})")
      self._tensors[hf_name(t.name) or t.name] = t
    self._cache: dict[str, np.ndarray] = {}

  def keys(self) -> list[str]:
    return sorted(self._tensors)

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def shape(self, name: str) -> tuple[int, ...]:
    """The tensor's shape in numpy ([out, in]) order."""
    return tuple(int(d) for d in reversed(self._tensors[name].shape))

  def source_name(self, name: str) -> str:
    """The GGUF name of HF tensor `name` (for error messages)."""
    try:
      return gguf_name(name)
    except UnsupportedModelError:
      return name

  def ggml_type(self, name: str) -> str:
    return self._tensors[name].tensor_type.name

  def get(self, name: str) -> np.ndarray:
    """Tensor `name` as float32 [out, in] in Hugging Face's row order."""
    if name not in self._tensors:
      raise KeyError(f"{self.path}: no tensor {name!r}")
    if name not in self._cache:
      t = self._tensors[name]
      value = _dequantize(t.data, t.tensor_type).reshape(self.shape(name))
      heads = _qk_heads(name, self.num_heads, self.num_kv_heads) if self.permute else None
      self._cache[name] = unpermute_qk(value, heads) if heads else value
    return self._cache[name]

  def release(self) -> None:
    """Drops the decoded tensors."""
    self._cache.clear()


def tensor_type(shape: tuple[int, ...], dtype: str) -> gguf.GGMLQuantizationType:
  """The GGUF type one tensor is written as for --dtype: F32 for 1-D tensors, F16 for matrices whose rows do not
  fill whole quantization blocks (as convert_hf_to_gguf.py does), else dtype's."""
  qtype = WRITE_TYPES[dtype][0]
  if len(shape) <= 1:
    return Q.F32
  block = gguf.GGML_QUANT_SIZES[qtype][0]
  return qtype if shape[-1] % block == 0 else Q.F16


def encoded_bytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
  """Bytes a tensor of `shape` takes when encoded as qtype."""
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  return int(np.prod(shape)) // block * size


def encode(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
  """The bytes (or float array) a tensor is stored as in a GGUF file of type qtype."""
  if qtype == Q.F32:
    return np.ascontiguousarray(array, dtype=np.float32)
  if qtype == Q.F16:
    return np.ascontiguousarray(array, dtype=np.float16)
  return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def plan(cfg, params: dict, model_type: str) -> list[tuple[str, tuple[int, ...]]]:
  """(GGUF name, shape) of every tensor `tensors` yields, in its order, from the parameters' shapes alone."""
  out = [(gguf_name(n), shape) for n, shape in hf_tensor_shapes(cfg, params, model_type)]
  factors = rope_factors(cfg)
  return out + ([(ROPE_FREQS, factors.shape)] if factors is not None else [])


def tensors(cfg, params: dict, model_type: str, arch: str) -> Iterator[tuple[str, np.ndarray]]:
  """(GGUF name, float32 array) of a maxlm parameter tree, one tensor at a time, in llama.cpp's layout."""
  m = cfg.model
  for name, array in hf_tensors(cfg, params, model_type, np.dtype(np.float32)):
    heads = _qk_heads(name, m.num_heads, m.num_kv_heads) if arch == "llama" else None
    yield gguf_name(name), (permute_qk(array, heads) if heads else array)
  factors = rope_factors(cfg)
  if factors is not None:
    yield ROPE_FREQS, factors
