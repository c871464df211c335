"""GPTQ checkpoint tensors (the classic AutoGPTQ "gptq" / v1 layout) <-> integer codes, scales and zero-points.

This is the layout that transformers (through optimum and gptqmodel) and vLLM (its `gptq`, `gptq_marlin` and exllama
paths) load when config.json's quantization_config has quant_method "gptq" and checkpoint_format "gptq". A quantized
Linear with k input channels and n outputs stores, under its module name (`<module>.qweight` and so on):

- `qweight` int32 [k * bits / 32, n]: the codes (0 .. 2**bits - 1) packed along the input dimension;
- `qzeros` int32 [groups, n * bits / 32]: the zero-points MINUS ONE, packed along the output dimension;
- `scales` float16 [groups, n];
- `g_idx` int32 [k]: the group of each input channel; `r // group_size` without act-order (desc_act), a permuted
  assignment with it.

The weight is w[r, c] = scales[g_idx[r], c] * (codes[r, c] - zeros[g_idx[r], c]) and a layer computes x @ w: the
[in, out] orientation of maxlm's weights (torch's Linear.weight is its transpose).

Packing: the values along the packed dimension form one little-endian bit stream cut into 32-bit words; value j sits
at stream bits [bits * j, bits * (j + 1)) and stream bit p is bit p % 32 of word p // 32 (words stored as int32, so a
word whose bit 31 is set reads negative). For 2, 4 and 8 bits a word holds 32 / bits whole values, value j of a word
at bit offset bits * j (4-bit codes 1..8 -> 0x87654321). For 3 bits 32 values fill 3 words and two values straddle a
word boundary: values 0-9 at bits 0, 3, ..., 27 of word 0, value 10 with its low 2 bits at bits 30-31 of word 0 and its
high bit at bit 0 of word 1, values 11-20 at bits 1, 4, ..., 28 of word 1, value 21 with its low bit at bit 31 of
word 1 and its high 2 bits at bits 0-1 of word 2, values 22-31 at bits 2, 5, ..., 29 of word 2 (AutoGPTQ's and
GPTQModel's pack loops, vLLM's 3-bit unpacking in its gptq kernels). The packed dimension must be a multiple of
32 / bits values (32 for 3 bits): vLLM requires it, so no padding is written.

Zero-points: v1 checkpoints store each zero-point minus one (AutoGPTQ's packer subtracts 1 before packing), and the
readers add it back per field: vLLM's gptq kernels decode `(field & maxq) + 1` unless checkpoint_format is "gptq_v2";
GPTQModel converts v1 to its internal v2 on load by adding 0x11111111 (4 bits; 0x55555555 for 2, 0x01010101 for 8)
to each whole qzeros word, and for 3 bits by decoding, adding 1 to each field modulo 8 and repacking. A zero-point
of 0 (stored field 2**bits - 1) or 2**bits is read differently by these readers (carry into the next field, or
no wrap), so `pack_gptq` only accepts zero-points in [1, 2**bits - 1]; symmetric quantization uses 2**(bits - 1), the
value that gptq_marlin assumes for sym=True without reading qzeros. `unpack_gptq` returns field + 1 as vLLM does.

Checked outside the test suite: a tiny Llama whose linears were packed here (2, 3, 4 and 8 bits, with and without
act-order, sym and asym) loads with transformers 5.25 + optimum 2.3 + gptqmodel 7.6 on CPU, and its modules compute
x @ dequantize_gptq(...) to float16 rounding.

Without desc_act, readers may ignore g_idx and use `r // group_size` (vLLM's exllama path does), so a checkpoint
whose config says desc_act=False needs `trivial_g_idx`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)
WORD_BITS = 32


def _check_bits(bits: Any) -> int:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in SUPPORTED_BITS:
    raise ValueError(f"GPTQ bits={bits!r}: expected one of {SUPPORTED_BITS}")
  return int(bits)


def values_per_block(bits: int) -> tuple[int, int]:
  """(values, int32 words) of the smallest whole packing block: (32 / bits, 1), or (32, 3) for 3 bits."""
  bits = _check_bits(bits)
  return (WORD_BITS, 3) if bits == 3 else (WORD_BITS // bits, 1)


_CHUNK = 1 << 22  # values per slice of columns: bounds the uint64 temporaries of a large matrix (32 MiB each)


def _by_columns(fn, a: np.ndarray, bits: int, rows: int, dtype: type) -> np.ndarray:
  out = np.empty((rows, a.shape[1]), dtype)
  step = max(1, _CHUNK // max(a.shape[0], rows, 1))
  for c0 in range(0, a.shape[1], step):
    out[:, c0:c0 + step] = fn(a[:, c0:c0 + step], bits)
  return out


def _pack_chunk(values: np.ndarray, bits: int) -> np.ndarray:
  per, words = values_per_block(bits)
  m, c = values.shape
  v = values.astype(np.uint64).reshape(m // per, per, c)
  out = np.zeros((m // per, words, c), np.uint64)
  for j in range(per):
    word, shift = divmod(bits * j, WORD_BITS)
    out[:, word] |= v[:, j] << np.uint64(shift)
    if shift + bits > WORD_BITS:  # 3 bits: the value's high bits start the next word
      out[:, word + 1] |= v[:, j] >> np.uint64(WORD_BITS - shift)
  return (out & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32).reshape(m // per * words, c)


def _unpack_chunk(packed: np.ndarray, bits: int) -> np.ndarray:
  per, words = values_per_block(bits)
  rows, c = packed.shape
  u = np.ascontiguousarray(packed).view(np.uint32).astype(np.uint64).reshape(rows // words, words, c)
  out = np.empty((rows // words, per, c), np.uint64)
  for j in range(per):
    word, shift = divmod(bits * j, WORD_BITS)
    val = u[:, word] >> np.uint64(shift)
    if shift + bits > WORD_BITS:
      val |= u[:, word + 1] << np.uint64(WORD_BITS - shift)
    out[:, j] = val
  return (out & np.uint64((1 << bits) - 1)).astype(np.int32).reshape(rows // words * per, c)


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
  """uint values [m, c] (m a multiple of the block) -> int32 [m * bits / 32, c], packed along axis 0."""
  per, words = values_per_block(bits)
  return _by_columns(_pack_chunk, values, bits, values.shape[0] // per * words, np.int32)


def _unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
  """Inverse of `_pack_rows`: int32 [m * bits / 32, c] -> int32 values [m, c]."""
  per, words = values_per_block(bits)
  return _by_columns(_unpack_chunk, packed, bits, packed.shape[0] // words * per, np.int32)


def _integer_array(name: str, a: Any, ndim: int) -> np.ndarray:
  a = np.asarray(a)
  if a.ndim != ndim:
    raise ValueError(f"GPTQ {name}: expected {ndim} dimensions, got shape {a.shape}")
  if not np.issubdtype(a.dtype, np.integer):
    raise ValueError(f"GPTQ {name}: expected integers, got dtype {a.dtype}")
  return a  # no widening copy: a layer's codes can be large


def _check_range(name: str, a: np.ndarray, lo: int, hi: int, why: str = "") -> None:
  if a.size and (a.min() < lo or a.max() > hi):
    bad = a[(a < lo) | (a > hi)][0]
    raise ValueError(f"GPTQ {name} must lie in [{lo}, {hi}]{why}; found {bad}")


def _check_g_idx(g_idx: np.ndarray, k: int, groups: int) -> None:
  if g_idx.shape != (k,):
    raise ValueError(f"GPTQ g_idx: expected shape ({k},) (one group per input channel), got {g_idx.shape}")
  _check_range("g_idx", g_idx, 0, groups - 1, f" (scales and zeros have {groups} groups)")


def _check_group(group_size: Any) -> int:
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or not (
      group_size == -1 or group_size > 0):
    raise ValueError(f"GPTQ group_size={group_size!r}: expected a positive integer or -1 (one group)")
  return int(group_size)


def trivial_g_idx(k: int, group_size: int) -> np.ndarray:
  """The g_idx without act-order: input channel r in group r // group_size (group_size -1: one group)."""
  group_size = _check_group(group_size)
  return (np.arange(k) // (max(k, 1) if group_size == -1 else group_size)).astype(np.int32)


def pack_gptq(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g_idx: np.ndarray,
              bits: int) -> dict[str, np.ndarray]:
  """Codes [k, n], scales/zeros [groups, n], g_idx [k] -> the v1 tensors {qweight, qzeros, scales, g_idx}."""
  bits = _check_bits(bits)
  per, _ = values_per_block(bits)
  codes = _integer_array("codes", codes, 2)
  zeros = _integer_array("zeros", zeros, 2)
  g_idx = _integer_array("g_idx", g_idx, 1)
  scales = np.asarray(scales)
  if scales.ndim != 2 or not np.issubdtype(scales.dtype, np.floating):
    raise ValueError(f"GPTQ scales: expected a float [groups, n] array, got {scales.dtype} {scales.shape}")
  k, n = codes.shape
  groups = scales.shape[0]
  if scales.shape != (groups, n) or groups == 0:
    raise ValueError(f"GPTQ scales: expected shape (groups >= 1, {n}) for codes of shape {codes.shape}, got "
                     f"{scales.shape}")
  if zeros.shape != scales.shape:
    raise ValueError(f"GPTQ zeros: expected the shape of scales {scales.shape}, got {zeros.shape}")
  _check_g_idx(g_idx, k, groups)
  if k % per or n % per:
    raise ValueError(f"GPTQ {bits}-bit packs {per} values per block: both dimensions of codes {codes.shape} "
                     f"(in, out) must be multiples of {per}")
  maxq = (1 << bits) - 1
  _check_range("codes", codes, 0, maxq)
  _check_range("zeros", zeros, 1, maxq, " (v1 checkpoints store zero - 1; 0 and 2**bits are read inconsistently)")
  with np.errstate(over="ignore"):
    scales16 = scales.astype(np.float16)
  if not np.isfinite(scales16).all():
    raise ValueError("GPTQ scales must be finite in float16 (|scale| <= 65504)")
  return {
    "qweight": _pack_rows(codes, bits),
    "qzeros": np.ascontiguousarray(_pack_rows((zeros - 1).T, bits).T),
    "scales": scales16,
    "g_idx": g_idx.astype(np.int32),
  }


def unpack_gptq(tensors: dict[str, np.ndarray], bits: int,
                group_size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The v1 tensors of one Linear -> (codes uint8 [k, n], scales float32, zeros int32 [groups, n], g_idx int32 [k]).

  A missing g_idx is rebuilt from group_size as `trivial_g_idx` does.
  """
  bits = _check_bits(bits)
  per, words = values_per_block(bits)
  missing = {"qweight", "qzeros", "scales"} - set(tensors)
  if missing:
    raise ValueError(f"GPTQ tensors lack {sorted(missing)} (have {sorted(tensors)})")
  qweight, qzeros, scales = (np.asarray(tensors[name]) for name in ("qweight", "qzeros", "scales"))
  for name, a in (("qweight", qweight), ("qzeros", qzeros)):
    if a.ndim != 2 or a.dtype.itemsize != 4 or not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"GPTQ {name}: expected a 2-dimensional int32 array, got {a.dtype} {a.shape}")
  if scales.ndim != 2 or not np.issubdtype(scales.dtype, np.floating):
    raise ValueError(f"GPTQ scales: expected a float [groups, n] array, got {scales.dtype} {scales.shape}")
  if qweight.shape[0] % words or qzeros.shape[1] % words:
    raise ValueError(f"GPTQ {bits}-bit packs {per} values in {words} words: qweight rows {qweight.shape[0]} and "
                     f"qzeros columns {qzeros.shape[1]} must be multiples of {words}")
  k, n = qweight.shape[0] // words * per, qweight.shape[1]
  groups = scales.shape[0]
  if scales.shape != (groups, n) or qzeros.shape != (groups, n // per * words) or n % per:
    raise ValueError(f"GPTQ {bits}-bit shapes disagree: qweight {qweight.shape} (k={k}, n={n}), scales {scales.shape}, "
                     f"qzeros {qzeros.shape} (expected ({groups}, {n * bits // WORD_BITS}))")
  if "g_idx" in tensors:
    g_idx = _integer_array("g_idx", tensors["g_idx"], 1)
  elif group_size is not None:
    g_idx = trivial_g_idx(k, group_size)
  else:
    raise ValueError("GPTQ tensors lack g_idx: pass group_size to rebuild it")
  _check_g_idx(g_idx, k, groups)
  codes = _unpack_rows(qweight, bits).astype(np.uint8)
  zeros = np.ascontiguousarray(_unpack_rows(np.ascontiguousarray(qzeros.T), bits).T) + 1
  return codes, scales.astype(np.float32), zeros, g_idx.astype(np.int32)


def dequantize_gptq(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g_idx: np.ndarray) -> np.ndarray:
  """The float32 weight [k, n]: w[r, c] = scales[g_idx[r], c] * (codes[r, c] - zeros[g_idx[r], c])."""
  codes = _integer_array("codes", codes, 2)
  zeros = _integer_array("zeros", zeros, 2)
  g_idx = _integer_array("g_idx", g_idx, 1)
  scales = np.asarray(scales, np.float32)
  k, n = codes.shape
  if scales.ndim != 2 or scales.shape[1] != n or scales.shape[0] == 0 or zeros.shape != scales.shape:
    raise ValueError(f"GPTQ shapes disagree: codes {codes.shape}, scales {scales.shape}, zeros {zeros.shape} "
                     "(expected scales and zeros [groups, n])")
  _check_g_idx(g_idx, k, scales.shape[0])
  return scales[g_idx] * (codes.astype(np.float32) - zeros[g_idx].astype(np.float32))


def quantization_config(bits: int, group: int, desc_act: bool, sym: bool, *, damp_percent: float = 0.01,
                        lm_head: bool = False) -> dict[str, Any]:
  """config.json's quantization_config for a v1 GPTQ checkpoint (keys read by transformers' GPTQConfig and vLLM)."""
  bits = _check_bits(bits)
  group = _check_group(group)
  if not 0 < damp_percent < 1:
    raise ValueError(f"GPTQ damp_percent={damp_percent!r}: transformers requires 0 < damp_percent < 1")
  return {
    "quant_method": "gptq",
    "bits": bits,
    "group_size": group,
    "desc_act": bool(desc_act),
    "sym": bool(sym),
    "checkpoint_format": "gptq",  # v1: zeros stored minus one (vLLM and transformers read this key)
    "format": "gptq",  # the same, under the name of transformers' GPTQConfig and GPTQModel
    "damp_percent": float(damp_percent),
    "true_sequential": True,
    "static_groups": False,
    "lm_head": bool(lm_head),
    "pack_dtype": "int32",
  }
