"""GPTQ v1 tensors: pack_gptq's words read back by a bit-by-bit decoder written here from the documented layout (each
column of qweight, each row of qzeros, is one little-endian bit stream of `bits`-bit values cut into 32-bit words;
zeros stored minus one), hand-computed words for 2, 3, 4 and 8 bits, round trips and the errors."""

import numpy as np
import pytest

from maxlm.convert import gptq_format
from maxlm.convert.gptq_format import (
  dequantize_gptq,
  pack_gptq,
  quantization_config,
  trivial_g_idx,
  unpack_gptq,
  values_per_block,
)

BITS = (2, 3, 4, 8)


def _read_stream(words: list[int], bits: int, count: int) -> list[int]:
  """`count` values of `bits` bits from uint32 words: stream bit p is bit p % 32 of word p // 32, value j at bit
  bits * j with its least significant bit first."""
  values = []
  for j in range(count):
    v = 0
    for b in range(bits):
      p = bits * j + b
      v |= ((words[p // 32] >> (p % 32)) & 1) << b
    values.append(v)
  return values


def _decode(t: dict, bits: int):
  """(codes, zeros, g_idx, weight) from the v1 tensors with Python loops over the int32 words."""
  qweight, qzeros = t["qweight"], t["qzeros"]
  assert qweight.dtype == np.int32 and qzeros.dtype == np.int32
  assert t["scales"].dtype == np.float16 and t["g_idx"].dtype == np.int32
  k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
  groups = qzeros.shape[0]
  codes = np.zeros((k, n), np.int64)
  for c in range(n):
    codes[:, c] = _read_stream([int(w) & 0xFFFFFFFF for w in qweight[:, c]], bits, k)
  zeros = np.zeros((groups, n), np.int64)
  for g in range(groups):
    zeros[g] = [z + 1 for z in _read_stream([int(w) & 0xFFFFFFFF for w in qzeros[g]], bits, n)]
  g_idx = [int(i) for i in t["g_idx"]]
  scales = t["scales"].astype(np.float64)
  weight = np.zeros((k, n), np.float64)
  for r in range(k):
    for c in range(n):
      weight[r, c] = scales[g_idx[r], c] * (codes[r, c] - zeros[g_idx[r], c])
  return codes, zeros, np.array(g_idx), weight


def _example(bits: int, k: int = 96, n: int = 64, group: int = 32, act_order: bool = False, seed: int = 0):
  """Random codes, fp16-exact scales, zero-points in [1, 2**bits - 1] and a g_idx (act-order: shuffled)."""
  rng = np.random.default_rng(seed + bits)
  maxq = 2**bits - 1
  groups = k // group
  codes = rng.integers(0, maxq + 1, (k, n)).astype(np.uint8)
  codes[0, :] = maxq  # the top bit set: sign bits of the int32 words
  scales = rng.uniform(1e-3, 0.1, (groups, n)).astype(np.float16).astype(np.float32)
  zeros = rng.integers(1, maxq + 1, (groups, n))
  zeros[0, :4] = (1, maxq, 2 ** (bits - 1), maxq)
  if act_order:  # GPTQ's desc_act: channel perm[i] is quantized i-th, in group i // group
    perm = rng.permutation(k)
    g_idx = np.empty(k, np.int32)
    g_idx[perm] = np.arange(k) // group
  else:
    g_idx = trivial_g_idx(k, group)
  return codes, scales, zeros, g_idx


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_independent_decoder_reads_back_the_pack(bits, act_order):
  codes, scales, zeros, g_idx = _example(bits, act_order=act_order)
  t = pack_gptq(codes, scales, zeros, g_idx, bits)
  k, n = codes.shape
  assert t["qweight"].shape == (k * bits // 32, n)
  assert t["qzeros"].shape == (zeros.shape[0], n * bits // 32)
  assert t["scales"].shape == scales.shape
  got_codes, got_zeros, got_g_idx, weight = _decode(t, bits)
  np.testing.assert_array_equal(got_codes, codes)
  np.testing.assert_array_equal(got_zeros, zeros)
  np.testing.assert_array_equal(got_g_idx, g_idx)
  np.testing.assert_array_equal(t["scales"].astype(np.float32), scales)
  expected = dequantize_gptq(codes, scales, zeros, g_idx)
  assert expected.dtype == np.float32 and expected.shape == (k, n)
  np.testing.assert_array_equal(weight.astype(np.float32), expected)
  np.testing.assert_array_equal(dequantize_gptq(*unpack_gptq(t, bits)), expected)
  assert (expected < 0).any()  # codes below their zero-point: no unsigned wrap-around with uint8 inputs
  np.testing.assert_array_equal(dequantize_gptq(codes, scales, zeros.astype(np.uint8), g_idx), expected)
  t8 = pack_gptq(codes, scales, zeros.astype(np.uint8), g_idx.astype(np.int16), bits)
  for name in t:
    np.testing.assert_array_equal(t8[name], t[name])


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_round_trip(bits, act_order):
  codes, scales, zeros, g_idx = _example(bits, k=128, n=96, group=64, act_order=act_order, seed=1)
  got_codes, got_scales, got_zeros, got_g_idx = unpack_gptq(pack_gptq(codes, scales, zeros, g_idx, bits), bits)
  assert got_codes.dtype == np.uint8 and got_scales.dtype == np.float32 and got_g_idx.dtype == np.int32
  np.testing.assert_array_equal(got_codes, codes)
  np.testing.assert_array_equal(got_scales, scales)
  np.testing.assert_array_equal(got_zeros, zeros)
  np.testing.assert_array_equal(got_g_idx, g_idx)


@pytest.mark.parametrize("bits", (3, 4))
def test_column_chunks_give_the_same_words(bits, monkeypatch):
  codes, scales, zeros, g_idx = _example(bits, k=64, n=96, group=32, act_order=True, seed=2)
  whole = pack_gptq(codes, scales, zeros, g_idx, bits)
  monkeypatch.setattr(gptq_format, "_CHUNK", 100)  # a few columns per slice
  chunked = pack_gptq(codes, scales, zeros, g_idx, bits)
  for name in whole:
    np.testing.assert_array_equal(chunked[name], whole[name])
  np.testing.assert_array_equal(unpack_gptq(chunked, bits)[0], codes)


def test_missing_g_idx_rebuilt_from_group_size():
  codes, scales, zeros, g_idx = _example(4, k=64, n=32, group=16)
  t = pack_gptq(codes, scales, zeros, g_idx, 4)
  del t["g_idx"]
  np.testing.assert_array_equal(unpack_gptq(t, 4, group_size=16)[3], g_idx)
  np.testing.assert_array_equal(unpack_gptq(t, 4, group_size=-1)[3], np.zeros(64))
  with pytest.raises(ValueError, match="group_size"):
    unpack_gptq(t, 4)


def _one_column(values: list[int], bits: int) -> np.ndarray:
  """The qweight words [k * bits / 32] as uint32 of a single output column holding `values`."""
  codes = np.array(values, np.uint8)[:, None]
  zeros = np.ones((1, 1), np.int64)
  codes, zeros = np.tile(codes, (1, 32)), np.tile(zeros, (1, 32))  # n a multiple of every block
  t = pack_gptq(codes, np.ones((1, 32), np.float32), zeros, np.zeros(len(values), np.int32), bits)
  return t["qweight"][:, 0].view(np.uint32)


def test_known_words_4_2_8_bits():
  # 4 bits, value j of a word at bits 4j..4j+3: codes 1..8 read as hex digits from the right.
  assert _one_column([1, 2, 3, 4, 5, 6, 7, 8], 4).tolist() == [0x87654321]
  assert _one_column([15, 0, 0, 0, 0, 0, 0, 15], 4).tolist() == [0xF000000F]
  # 2 bits: 0, 1, 2, 3 -> 0b11_10_01_00 = 0xE4 in each byte.
  assert _one_column([0, 1, 2, 3] * 4, 2).tolist() == [0xE4E4E4E4]
  # 8 bits: one value per byte, the first in the lowest byte; two words.
  assert _one_column([0x11, 0x22, 0x33, 0x44, 0xFF, 0, 0, 0x80], 8).tolist() == [0x44332211, 0x800000FF]
  # qzeros pack along the outputs, each stored minus one: zeros 1..8 -> fields 0..7.
  zeros = np.arange(1, 9)[None, :]
  t = pack_gptq(np.zeros((8, 8), np.uint8), np.ones((1, 8), np.float32), zeros, np.zeros(8, np.int32), 4)
  assert t["qzeros"].view(np.uint32).tolist() == [[0x76543210]]
  assert t["qzeros"].dtype == np.int32 and t["qzeros"][0, 0] == 0x76543210
  # symmetric 4-bit zero-point 8 is stored as 7 in every field (the familiar 0x77777777).
  t = pack_gptq(np.zeros((8, 8), np.uint8), np.ones((1, 8), np.float32), np.full((1, 8), 8), np.zeros(8, np.int32), 4)
  assert t["qzeros"].view(np.uint32).tolist() == [[0x77777777]]


def test_known_words_3_bits():
  # 32 values in 3 words. Values 0-9 at bits 3j of word 0, value 10 split (low 2 bits at 30-31 of word 0, high bit at
  # bit 0 of word 1), values 11-20 at bits 1 + 3(j - 11) of word 1, value 21 split (low bit at bit 31 of word 1, high
  # 2 bits at bits 0-1 of word 2), values 22-31 at bits 2 + 3(j - 22) of word 2.
  def column(**at: int) -> list[int]:
    values = [0] * 32
    for j, v in at.items():
      values[int(j[1:])] = v
    return _one_column(values, 3).tolist()

  assert column(v0=0b101) == [0b101, 0, 0]
  assert column(v9=0b111) == [0b111 << 27, 0, 0]
  assert column(v10=0b101) == [0b01 << 30, 0b1, 0]  # 0x40000000, 0x1
  assert column(v10=0b110) == [0b10 << 30, 0b1, 0]
  assert column(v11=0b111) == [0, 0b111 << 1, 0]
  assert column(v20=0b100) == [0, 0b100 << 28, 0]
  assert column(v21=0b001) == [0, 1 << 31, 0]  # 0x80000000
  assert column(v21=0b110) == [0, 0, 0b11]
  assert column(v22=0b011) == [0, 0, 0b011 << 2]
  assert column(v31=0b111) == [0, 0, 0b111 << 29]
  assert _one_column([7] * 32, 3).tolist() == [0xFFFFFFFF] * 3
  # j % 8 for j = 0..31: the 3-bit fields are octal digits. Word 0: values 0..9 = octal 1076543210 and value 10 = 2
  # (0b10) at bits 30-31; word 1: value 10's high bit 0, values 11..20 (3..7, 0..4) = octal 4321076543 shifted by 1,
  # value 21 = 5 (0b101) puts its low bit at 31; word 2: value 21's high bits 0b10, values 22..31 (6, 7, 0..7) =
  # octal 7654321076 shifted by 2.
  words = [0o1076543210 | 0b10 << 30, 0o4321076543 << 1 | 1 << 31, 0o7654321076 << 2 | 0b10]
  assert words == [0x88FAC688, 0xC688FAC6, 0xFAC688FA]
  assert _one_column([j % 8 for j in range(32)], 3).tolist() == words
  # Two blocks: the second column block starts a fresh word triple.
  assert _one_column([0] * 32 + [j % 8 for j in range(32)], 3).tolist() == [0, 0, 0] + words


def test_3bit_qzeros_words():
  # zero-points (j % 7) + 1 are stored as fields j % 7 along the outputs. Word 0: fields 0..9 = octal 2106543210 and
  # field 10 = 3 (0b011): low bits 0b11 at 30-31, high bit 0 in word 1; word 1: fields 11..20 = octal 6543210654
  # shifted by 1, field 21 = 0; word 2: fields 22..31 = octal 3210654321 shifted by 2.
  zeros = np.array([[(j % 7) + 1 for j in range(32)]])
  t = pack_gptq(np.zeros((32, 32), np.uint8), np.ones((1, 32), np.float32), zeros, np.zeros(32, np.int32), 3)
  words = [0o2106543210 | 0b11 << 30, 0o6543210654 << 1, 0o3210654321 << 2]
  assert t["qzeros"].view(np.uint32).tolist() == [words]


def test_quantization_config():
  cfg = quantization_config(4, 128, desc_act=True, sym=True)
  assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq" and cfg["format"] == "gptq"
  assert (cfg["bits"], cfg["group_size"], cfg["desc_act"], cfg["sym"]) == (4, 128, True, True)
  assert 0 < cfg["damp_percent"] < 1 and cfg["lm_head"] is False
  assert quantization_config(3, -1, False, False)["group_size"] == -1
  for bad in ({"bits": 5}, {"group": 0}, {"group": -2}, {"damp_percent": 1.0}):
    kwargs = {"bits": 4, "group": 128, "desc_act": False, "sym": True} | bad
    with pytest.raises(ValueError):
      quantization_config(**kwargs)


def test_quantization_config_reads_in_transformers():
  transformers = pytest.importorskip("transformers")
  got = transformers.GPTQConfig.from_dict(quantization_config(8, 64, False, True)).to_dict()
  assert (got["bits"], got["group_size"], got["desc_act"], got["sym"]) == (8, 64, False, True)
  assert got["format"] == "gptq" and got["checkpoint_format"] == "gptq"


def test_values_per_block():
  assert [values_per_block(b) for b in BITS] == [(16, 1), (32, 3), (8, 1), (4, 1)]


def test_bad_inputs():
  codes, scales, zeros, g_idx = _example(4, k=64, n=32, group=32)

  def pack(**over):
    args = {"codes": codes, "scales": scales, "zeros": zeros, "g_idx": g_idx, "bits": 4} | over
    return pack_gptq(**args)

  for bits in (1, 5, 16, True, 4.0, "4"):
    with pytest.raises(ValueError, match="bits"):
      pack(bits=bits)
  with pytest.raises(ValueError, match="multiples of 8"):  # k not a multiple of 8 values per word
    pack(codes=codes[:60], g_idx=g_idx[:60])
  with pytest.raises(ValueError, match="multiples of 32"):  # 3 bits: n = 40 is not a whole block of outputs
    pack_gptq(np.zeros((32, 40), np.uint8), np.ones((1, 40)), np.ones((1, 40), int), np.zeros(32, int), 3)
  with pytest.raises(ValueError, match="multiples of 32"):  # 3 bits: k = 48
    pack_gptq(np.zeros((48, 32), np.uint8), np.ones((1, 32)), np.ones((1, 32), int), np.zeros(48, int), 3)
  with pytest.raises(ValueError, match="codes must lie in"):
    pack(codes=np.where(codes == 0, 16, codes))
  with pytest.raises(ValueError, match="codes must lie in"):
    pack(codes=codes.astype(np.int32) - 1)
  with pytest.raises(ValueError, match="codes must lie in"):
    pack(bits=2)  # 4-bit codes do not fit 2 bits
  with pytest.raises(ValueError, match="integers"):
    pack(codes=codes.astype(np.float32))
  with pytest.raises(ValueError, match="zeros must lie in"):
    pack(zeros=np.zeros_like(zeros))  # a zero-point of 0 cannot be written in v1
  with pytest.raises(ValueError, match="zeros must lie in"):
    pack(zeros=np.full_like(zeros, 16))
  with pytest.raises(ValueError, match="scales"):
    pack(scales=scales[:, :16])
  with pytest.raises(ValueError, match="scales"):
    pack(scales=scales[:, :, None])
  with pytest.raises(ValueError, match="zeros"):
    pack(zeros=zeros[:, :16])
  with pytest.raises(ValueError, match="g_idx"):
    pack(g_idx=g_idx[:32])
  with pytest.raises(ValueError, match="g_idx"):
    pack(g_idx=np.full_like(g_idx, zeros.shape[0]))  # a group that scales do not have
  with pytest.raises(ValueError, match="float16"):
    pack(scales=np.full_like(scales, 1e6))
  with pytest.raises(ValueError, match="dimensions"):
    pack(codes=codes[None])

  t = pack()
  with pytest.raises(ValueError, match="lack"):
    unpack_gptq({"qweight": t["qweight"], "scales": t["scales"]}, 4)
  with pytest.raises(ValueError, match="disagree"):
    unpack_gptq(t | {"qzeros": t["qzeros"][:, :2]}, 4)
  with pytest.raises(ValueError, match="disagree"):
    unpack_gptq(t | {"scales": t["scales"][:, :8]}, 4)
  with pytest.raises(ValueError, match="int32"):
    unpack_gptq(t | {"qweight": t["qweight"].astype(np.int64)}, 4)
  with pytest.raises(ValueError, match="g_idx"):
    unpack_gptq(t | {"g_idx": t["g_idx"][:8]}, 4)
  with pytest.raises(ValueError, match="multiples of 3"):
    unpack_gptq({"qweight": np.zeros((4, 32), np.int32), "qzeros": np.zeros((1, 3), np.int32),
                 "scales": np.ones((1, 32), np.float16), "g_idx": np.zeros(32, np.int32)}, 3)
  with pytest.raises(ValueError, match="bits"):
    unpack_gptq(t, 6)

  with pytest.raises(ValueError, match="disagree"):
    dequantize_gptq(codes, scales[:, :16], zeros, g_idx)
  with pytest.raises(ValueError, match="g_idx"):
    dequantize_gptq(codes, scales, zeros, g_idx[:10])
  with pytest.raises(ValueError, match="group_size"):
    trivial_g_idx(8, 0)
