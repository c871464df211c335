"""llama.cpp GGUF interop: --to-gguf / --from-gguf round trips, transformers' GGUF loader as the reference reader,
dequantization against numpy decoders of the block formats, and errors that name what is unsupported.

Models are tiny maxlm models with every parameter (norm scales and biases included) drawn at random, so no mapping
error hides behind a zero or a one. Test GGUF files for the reader are built with the gguf package's own writer.
"""

import json
import math

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from helpers import byte_level_bpe_json, leaf_build_memory, small_config

from maxlm import sharding
from maxlm.cli import main as cli_main
from maxlm.convert import gguf as gguf_io
from maxlm.convert.gguf_tensors import GGUFTensorReader
from maxlm.convert.hf import write_workdir
from maxlm.train.state import abstract_params
from maxlm.workdir import load_model, load_workdir_tokenizer, restore_params

Q = gguf.GGMLQuantizationType
SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>")
TEXT = "def f(x):\n    return {'a': 1}  # Grüße, 你好 😀  1234567\n\n\t  end"
CASES = {  # arch: config overrides (llama: GQA, head_dim != d_model / heads; qwen2: biases, tied embeddings)
  "llama": ["--config.model.head_dim=32"],
  "qwen2": ["--config.model.attention_bias=true", "--config.model.tie_embeddings=true"],
}


def _randomized(cfg, seed: int) -> dict:
  """A maxlm parameter tree for cfg with every leaf random: matrices N(0, 0.3), norm scales 1 + N(0, 0.2)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    scale = "scale" in jax.tree_util.keystr(path)
    value = (1 + 0.2 * rng.standard_normal(leaf.shape)) if scale else 0.3 * rng.standard_normal(leaf.shape)
    return jax.device_put(value.astype(np.float32), leaf.sharding)

  return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg, sharding.make_mesh(cfg.mesh)))


def _leaves(params: dict) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
  """(arch, workdir, cfg, params as numpy leaves, f32 GGUF path) of a random tiny model exported with --to-gguf."""
  arch = request.param
  root = tmp_path_factory.mktemp(f"gguf-{arch}")
  cfg = small_config("--config.model.dtype=float32", *CASES[arch])
  params = _randomized(cfg, seed=len(arch))
  write_workdir(root / "work", cfg, params, {})
  tok = root / "work" / "tokenizer"  # a byte-level BPE, as --from-hf of a Llama-3 / Qwen2 model leaves it
  tok.mkdir()
  (tok / "tokenizer.json").write_text(byte_level_bpe_json(list(SPECIALS), True, vocab_size=cfg.model.vocab_size))
  (tok / "tokenizer_config.json").write_text(json.dumps({"bos_token": SPECIALS[0], "eos_token": SPECIALS[1]}))
  out = root / f"{arch}.gguf"
  assert cli_main(["convert", "--to-gguf", "--workdir", str(root / "work"), "--output", str(out)]) == 0
  return arch, root / "work", cfg, _leaves(params), out


def test_export_metadata_and_tensor_types(exported):
  arch, _, cfg, _, path = exported
  reader = gguf.GGUFReader(path)
  meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
  m = cfg.model
  assert meta["general.architecture"] == arch
  assert {k: meta[f"{arch}.{k}"] for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                                           "attention.head_count", "attention.head_count_kv",
                                           "rope.dimension_count", "vocab_size")} == {
    "context_length": m.max_seq_len, "embedding_length": m.d_model, "block_count": m.num_layers,
    "feed_forward_length": m.mlp_dim, "attention.head_count": m.num_heads,
    "attention.head_count_kv": m.num_kv_heads, "rope.dimension_count": m.head_dim, "vocab_size": m.vocab_size}
  assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(m.rms_norm_eps, rel=1e-6)
  assert meta[f"{arch}.rope.freq_base"] == pytest.approx(m.rope_theta, rel=1e-6)
  assert meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
  assert meta["general.quantization_version"] == gguf.GGML_QUANT_VERSION
  names = {t.name for t in reader.tensors}
  assert ("output.weight" in names) == (not m.tie_embeddings)
  assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")
  assert len(names) == 2 + (not m.tie_embeddings) + m.num_layers * (9 + 3 * (arch == "qwen2"))
  assert {t.tensor_type for t in reader.tensors} == {Q.F32}


def test_f32_round_trip_is_exact(exported, tmp_path):
  arch, workdir, cfg, params, path = exported
  assert cli_main(["convert", "--from-gguf", str(path), "--workdir", str(tmp_path / "back")]) == 0
  loaded_cfg = json.loads((tmp_path / "back" / "config.json").read_text())["model"]
  for key in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
              "max_seq_len", "tie_embeddings", "attention_bias", "rope_theta"):
    assert loaded_cfg[key] == cfg.model[key], key
  assert loaded_cfg["rms_norm_eps"] == pytest.approx(cfg.model.rms_norm_eps, rel=1e-6)
  _, restored = restore_params(tmp_path / "back", cfg)
  got = _leaves(restored)
  assert got.keys() == params.keys()
  for key, value in params.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  record = json.loads((tmp_path / "back" / "hf_import.json").read_text())
  assert record["format"] == "gguf" and record["model_type"] == arch and record["dtype"] == "float32"
  assert record["tensor_types"] == {"F32": len(gguf.GGUFReader(path).tensors)}
  # The tokenizer travelled through the file's tokenizer.ggml.* metadata and back into WORKDIR/tokenizer/.
  original, again = load_workdir_tokenizer(workdir), load_workdir_tokenizer(tmp_path / "back")
  assert again.encode(TEXT) == original.encode(TEXT) and again.decode(again.encode(TEXT)) == TEXT
  assert (again.bos_id, again.eos_id) == (original.bos_id, original.eos_id) == (0, 1)


def test_transformers_gguf_loader_gives_the_same_logits(exported):
  """transformers un-permutes Q/K and maps the metadata with its own code: an independent reader of our file."""
  _, workdir, cfg, _, path = exported
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                dtype=torch.float32)
  assert ref_model.config.num_key_value_heads == cfg.model.num_kv_heads
  ours, _, _ = load_model(workdir)
  ref_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  assert ref_tokenizer.encode(TEXT, add_special_tokens=False) == load_workdir_tokenizer(workdir).encode(TEXT)
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 24))
  with torch.no_grad():
    ref = ref_model(torch.tensor(tokens)).logits.numpy()
  out = np.asarray(ours(jax.numpy.asarray(tokens)))
  scale = np.abs(ref).max()
  assert scale > 1.0  # logits are not trivially small
  np.testing.assert_allclose(out, ref, atol=1e-4 * scale, rtol=1e-4)


# Per-element error bound of each lossy dtype, from the value and the largest |value| in its tensor:
# f16/bf16 round to nearest (2^-11, 2^-8 relative); q8_0 stores round(x / d) * f16(d) with d = amax(block) / 127.
BOUNDS = {
  "f16": lambda x, amax: np.abs(x) * 2.0 ** -11 + 2.0 ** -24,
  "bf16": lambda x, amax: np.abs(x) * 2.0 ** -8 + 1e-38,
  "q8_0": lambda x, amax: np.full_like(x, amax / 127 * (0.5 + 127 * 2.0 ** -11) * (1 + 1e-6)),
}
TYPES = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}


@pytest.mark.parametrize("dtype", list(BOUNDS))
def test_lossy_dtypes_round_trip_within_the_format_bound(exported, dtype, tmp_path):
  _, workdir, cfg, params, _ = exported
  out = gguf_io.convert_to_gguf(workdir, tmp_path / f"{dtype}.gguf", dtype=dtype)
  reader = gguf.GGUFReader(out)
  for t in reader.tensors:
    expected = Q.F32 if len(t.shape) == 1 else TYPES[dtype]
    assert t.tensor_type == expected, (t.name, t.tensor_type)
  assert reader.get_field("general.file_type").contents() == {"f16": 1, "bf16": 32, "q8_0": 7}[dtype]
  gguf_io.convert_from_gguf(out, tmp_path / "back")
  _, restored = restore_params(tmp_path / "back", cfg)
  got = _leaves(restored)
  for key, value in params.items():
    err = np.abs(got[key] - value)
    if "scale" in key or "bias" in key:  # 1-D tensors stay float32
      np.testing.assert_array_equal(got[key], value, err_msg=key)
      continue
    bound = BOUNDS[dtype](value, np.abs(value).max())
    assert (err <= bound).all(), (key, float((err - bound).max()))
    assert err.max() > 0, key  # really encoded


# ---- dequantization of each block format against numpy decoders written from ggml's block layouts ----


def _f16(b: np.ndarray) -> np.ndarray:
  return b.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
  """[blocks, 16] bytes -> [blocks, 32] 4-bit values: low nibbles are elements 0..15, high nibbles 16..31."""
  return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
  """[blocks, 4] bytes (a little-endian uint32) -> [blocks, 32] bit j of it, for element j."""
  bits = qh.copy().view("<u4").astype(np.int64)
  return ((bits >> np.arange(32)) & 1).astype(np.int32)


def reference_dequantize(raw: np.ndarray, qtype: Q) -> np.ndarray:
  """Decodes [rows, bytes] of one ggml block type to float32 [rows, elements]."""
  rows = raw.shape[0]
  size = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20, Q.Q5_0: 22, Q.Q5_1: 24}[qtype]
  b = raw.reshape(-1, size)
  if qtype == Q.Q8_0:  # f16 d, 32 x int8
    out = _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)
  elif qtype == Q.Q4_0:  # f16 d, 16 bytes of nibbles; x = (q - 8) d
    out = _f16(b[:, :2]) * (_nibbles(b[:, 2:]) - 8)
  elif qtype == Q.Q4_1:  # f16 d, f16 m; x = q d + m
    out = _f16(b[:, :2]) * _nibbles(b[:, 4:]) + _f16(b[:, 2:4])
  elif qtype == Q.Q5_0:  # f16 d, u32 high bits, nibbles; x = (q | h << 4) - 16) d
    out = _f16(b[:, :2]) * ((_nibbles(b[:, 6:]) | (_fifth_bits(b[:, 2:6]) << 4)) - 16)
  else:  # Q5_1: f16 d, f16 m, u32 high bits, nibbles; x = (q | h << 4) d + m
    out = _f16(b[:, :2]) * (_nibbles(b[:, 8:]) | (_fifth_bits(b[:, 4:8]) << 4)) + _f16(b[:, 2:4])
  return out.reshape(rows, -1).astype(np.float32)


QUANTIZED = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
PLAIN = (Q.F32, Q.F16, Q.BF16)


@pytest.fixture(scope="module")
def typed_file(tmp_path_factory):
  """A GGUF holding one [8, 64] tensor per type the gguf package can encode: (path, {type: (name, x, raw)})."""
  path = tmp_path_factory.mktemp("types") / "types.gguf"
  writer = gguf.GGUFWriter(path, "qwen2")
  rng = np.random.default_rng(7)
  tensors = {}
  for i, qtype in enumerate(PLAIN + QUANTIZED):
    x = rng.standard_normal((8, 64)).astype(np.float32) * (i + 1) + 0.1 * i
    if qtype == Q.F32:
      raw = x
    elif qtype == Q.F16:
      raw = x.astype(np.float16)
    else:
      raw = gguf.quants.quantize(x, qtype)
    writer.add_tensor(f"blk.{i}.ffn_up.weight", raw, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    tensors[qtype] = (f"model.layers.{i}.mlp.up_proj.weight", x, raw)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path, tensors


@pytest.mark.parametrize("qtype", PLAIN + QUANTIZED, ids=lambda q: q.name)
def test_dequantization_matches_reference_decoders(typed_file, qtype):
  path, tensors = typed_file
  reader = GGUFTensorReader(gguf.GGUFReader(path), path, "qwen2", num_heads=4, num_kv_heads=2)
  name, x, raw = tensors[qtype]
  assert reader.ggml_type(name) == qtype.name and reader.shape(name) == (8, 64)
  got = reader.get(name)
  assert got.dtype == np.float32 and got.shape == (8, 64)
  if qtype == Q.F32:
    np.testing.assert_array_equal(got, x)
  elif qtype == Q.F16:
    np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
  elif qtype == Q.BF16:
    np.testing.assert_array_equal(got, x.astype(ml_dtypes.bfloat16).astype(np.float32))
  else:
    np.testing.assert_array_equal(got, reference_dequantize(raw, qtype))
    bits = {Q.Q8_0: 8, Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5}[qtype]
    block_range = np.abs(x).reshape(-1, 32).max(axis=1, keepdims=True) * 2
    assert (np.abs(got - x).reshape(-1, 32) <= block_range / 2 ** (bits - 1) + 1e-6).all()  # a sane encoding


def test_llama_qk_rows_are_restored_to_hf_order(tmp_path):
  """llama.cpp's permutation (convert_hf_to_gguf.py, written out here) is undone on read; qwen2 is not permuted."""
  heads, head_dim, d = 4, 8, 16
  w = np.arange(heads * head_dim * d, dtype=np.float32).reshape(heads * head_dim, d)
  permuted = w.reshape(heads, 2, head_dim // 2, d).swapaxes(1, 2).reshape(w.shape)
  for arch, expected in (("llama", w), ("qwen2", permuted)):
    path = tmp_path / f"{arch}.gguf"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_tensor("blk.0.attn_q.weight", permuted)
    writer.add_tensor("blk.0.attn_k.weight", permuted[: 2 * head_dim])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = GGUFTensorReader(gguf.GGUFReader(path), path, arch, num_heads=heads, num_kv_heads=2)
    np.testing.assert_array_equal(reader.get("model.layers.0.self_attn.q_proj.weight"), expected)
    kv = w[: 2 * head_dim] if arch == "llama" else permuted[: 2 * head_dim]  # permuted within each kv head
    np.testing.assert_array_equal(reader.get("model.layers.0.self_attn.k_proj.weight"), kv)


# K-quants (256-element super-blocks): the gguf package cannot encode them, so blocks of random bytes (with finite
# f16 scales) are decoded by the reader and by these decoders of ggml's dequantize_row_q{4,5,6}_K.


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[blocks, 12] packed 6-bit (scale, min) of 8 sub-blocks -> two [blocks, 8] arrays (ggml's get_scale_min_k4)."""
  q = scales.astype(np.int32)
  sc, mn = np.empty((len(q), 8), np.int32), np.empty((len(q), 8), np.int32)
  for j in range(8):
    if j < 4:
      sc[:, j], mn[:, j] = q[:, j] & 63, q[:, j + 4] & 63
    else:
      sc[:, j] = (q[:, j + 4] & 0xF) | ((q[:, j - 4] >> 6) << 4)
      mn[:, j] = (q[:, j + 4] >> 4) | ((q[:, j] >> 6) << 4)
  return sc, mn


def reference_dequantize_k(raw: np.ndarray, qtype: Q) -> np.ndarray:
  """Decodes [rows, bytes] of Q4_K / Q5_K / Q6_K to float32 [rows, elements], 32 (Q6_K: 16) values at a time."""
  rows = raw.shape[0]
  size = {Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}[qtype]
  out = []
  for b in raw.reshape(-1, size):
    y = np.empty(256, np.float64)
    if qtype in (Q.Q4_K, Q.Q5_K):
      d, dmin = _f16(b[0:2])[0], _f16(b[2:4])[0]
      sc, mn = (a[0] for a in _k_scales(b[None, 4:16]))
      qh = b[16:48].astype(np.int32) if qtype == Q.Q5_K else np.zeros(32, np.int32)
      qs = b[48:176] if qtype == Q.Q5_K else b[16:144]
      for j in range(4):  # 64 values per step: low nibbles (sub-block 2j), then high nibbles (2j + 1)
        ql = qs[32 * j:32 * j + 32].astype(np.int32)
        high_lo = ((qh >> (2 * j)) & 1) * 16
        high_hi = ((qh >> (2 * j + 1)) & 1) * 16
        y[64 * j:64 * j + 32] = d * sc[2 * j] * ((ql & 0xF) + high_lo) - dmin * mn[2 * j]
        y[64 * j + 32:64 * j + 64] = d * sc[2 * j + 1] * ((ql >> 4) + high_hi) - dmin * mn[2 * j + 1]
    else:
      ql, qh, sc, d = b[:128].astype(np.int32), b[128:192].astype(np.int32), b[192:208].view(np.int8), _f16(b[208:])[0]
      for n in range(2):  # 128 values per step
        lo, hi, s = ql[64 * n:64 * n + 64], qh[32 * n:32 * n + 32], sc[8 * n:8 * n + 8].astype(np.float64)
        for i in range(32):
          q = [((lo[i] & 0xF) | (((hi[i] >> 0) & 3) << 4)) - 32, ((lo[i + 32] & 0xF) | (((hi[i] >> 2) & 3) << 4)) - 32,
               ((lo[i] >> 4) | (((hi[i] >> 4) & 3) << 4)) - 32, ((lo[i + 32] >> 4) | (((hi[i] >> 6) & 3) << 4)) - 32]
          for k in range(4):
            y[128 * n + i + 32 * k] = d * s[i // 16 + 2 * k] * q[k]
    out.append(y)
  return np.concatenate(out).reshape(rows, -1).astype(np.float32)


def _random_k_blocks(qtype: Q, rows: int, blocks: int, rng: np.random.Generator) -> np.ndarray:
  """[rows, blocks * size] random bytes with finite, modest f16 super-block scales."""
  size = gguf.GGML_QUANT_SIZES[qtype][1]
  raw = rng.integers(0, 256, (rows * blocks, size), dtype=np.uint8)
  scale = rng.uniform(1e-3, 2e-2, (rows * blocks, 2)).astype(np.float16).view(np.uint8)
  if qtype == Q.Q6_K:
    raw[:, 208:210] = scale[:, :2]
  else:
    raw[:, 0:4] = scale
  return raw.reshape(rows, blocks * size)


@pytest.mark.parametrize("qtype", (Q.Q4_K, Q.Q5_K, Q.Q6_K), ids=lambda q: q.name)
def test_k_quant_dequantization_matches_reference_decoders(tmp_path, qtype):
  raw = _random_k_blocks(qtype, rows=3, blocks=2, rng=np.random.default_rng(int(qtype)))
  path = tmp_path / "k.gguf"
  writer = gguf.GGUFWriter(path, "qwen2")
  writer.add_tensor("blk.0.ffn_down.weight", raw, raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  reader = GGUFTensorReader(gguf.GGUFReader(path), path, "qwen2", num_heads=4, num_kv_heads=2)
  got = reader.get("model.layers.0.mlp.down_proj.weight")
  assert got.shape == (3, 512)
  np.testing.assert_allclose(got, reference_dequantize_k(raw, qtype), rtol=1e-6, atol=1e-7)


# ---- a GGUF file written here as llama.cpp lays it out: import parity with transformers, and errors ----

TINY = {"context_length": 64, "embedding_length": 32, "block_count": 2, "feed_forward_length": 64,
        "attention.head_count": 4, "attention.head_count_kv": 2, "attention.layer_norm_rms_epsilon": 1e-5,
        "rope.freq_base": 10000.0, "vocab_size": 40}
TINY_VOCAB = 40


def tiny_gguf(path, arch: str = "llama", edit: dict | None = None, types: dict | None = None, drop=(),
              extra: dict | None = None, name: str = "tiny"):
  """A random 2-layer GGUF model: metadata TINY (edit: key -> value, None removes it), Q8_0 matrices unless
  `types` names another type for a tensor (random bytes for types the gguf package cannot encode)."""
  rng = np.random.default_rng(11)
  writer = gguf.GGUFWriter(path, arch)
  writer.add_name(name)
  meta = {**TINY, **(edit or {})}
  for key, value in meta.items():
    if value is None:
      continue
    add = writer.add_string if isinstance(value, str) else writer.add_float32 if isinstance(
      value, float) else writer.add_uint32
    add(f"{arch}.{key}", value)
  d, f, kv = TINY["embedding_length"], TINY["feed_forward_length"], 16
  shapes = {"token_embd.weight": (TINY_VOCAB, d), "output_norm.weight": (d,), "output.weight": (TINY_VOCAB, d)}
  for i in range(TINY["block_count"]):
    shapes.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.ffn_norm.weight": (d,),
                   f"blk.{i}.attn_q.weight": (d, d), f"blk.{i}.attn_k.weight": (kv, d),
                   f"blk.{i}.attn_v.weight": (kv, d), f"blk.{i}.attn_output.weight": (d, d),
                   f"blk.{i}.ffn_gate.weight": (f, d), f"blk.{i}.ffn_up.weight": (f, d),
                   f"blk.{i}.ffn_down.weight": (d, f)})
  shapes.update(extra or {})
  for tensor, shape in shapes.items():
    if tensor in drop:
      continue
    qtype = (types or {}).get(tensor, Q.F32 if len(shape) == 1 else Q.Q8_0)
    x = (1 + 0.2 * rng.standard_normal(shape) if len(shape) == 1 else 0.3 * rng.standard_normal(shape))
    if qtype == Q.F32:
      writer.add_tensor(tensor, x.astype(np.float32))
    elif qtype in gguf.quants._type_traits and qtype != Q.Q2_K:
      writer.add_tensor(tensor, gguf.quants.quantize(x.astype(np.float32), qtype), raw_dtype=qtype)
    else:
      block, size = gguf.GGML_QUANT_SIZES[qtype]
      raw = rng.integers(0, 256, (shape[0], shape[1] // block * size), dtype=np.uint8)
      writer.add_tensor(tensor, raw, raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_import_matches_transformers_on_a_quantized_file(tmp_path):
  path = tiny_gguf(tmp_path / "tiny.gguf", name="Tiny Mistral v1")
  ours, cfg = gguf_io.from_gguf(path)
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
  assert (cfg.model.vocab_size, cfg.model.num_kv_heads, cfg.model.tie_embeddings) == (TINY_VOCAB, 2, False)
  tokens = np.random.default_rng(2).integers(0, TINY_VOCAB, (2, 16))
  with torch.no_grad():
    ref = ref_model(torch.tensor(tokens)).logits.numpy()
  out = np.asarray(ours(jax.numpy.asarray(tokens)))
  np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max(), rtol=1e-4)
  gguf_io.convert_from_gguf(path, tmp_path / "work")
  record = json.loads((tmp_path / "work" / "hf_import.json").read_text())
  assert record["model_type"] == "mistral" and record["tensor_types"] == {"F32": 5, "Q8_0": 16}


ERRORS = {  # name: (tiny_gguf arguments, what the message must name)
  "architecture": (dict(arch="gpt2"), "general.architecture='gpt2'"),
  "tensor type": (dict(types={"blk.1.ffn_up.weight": Q.Q2_K}), "'blk.1.ffn_up.weight' has type Q2_K"),
  "missing key": (dict(edit={"block_count": None}), "llama.block_count is missing"),
  "unknown key": (dict(edit={"attention.sliding_window": 8}), "llama.attention.sliding_window=8"),
  "rope scaling": (dict(edit={"rope.scaling.type": "yarn"}), "llama.rope.scaling.type='yarn'"),
  "partial rotary": (dict(edit={"rope.dimension_count": 4}), "llama.rope.dimension_count=4"),
  "missing tensor": (dict(drop=("blk.1.ffn_up.weight",)), "'blk.1.ffn_up.weight' is missing"),
  "extra tensor": (dict(extra={"blk.0.attn_q.bias": (32,)}), "'blk.0.attn_q.bias'"),
  "wrong shape": (dict(extra={"blk.0.attn_k.weight": (8, 32)}), "'blk.0.attn_k.weight': (8, 32)"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_unsupported_files_fail_naming_the_problem(tmp_path, capsys, case):
  kwargs, message = ERRORS[case]
  path = tiny_gguf(tmp_path / "bad.gguf", **kwargs)
  work = tmp_path / "work"
  assert cli_main(["convert", "--from-gguf", str(path), "--workdir", str(work)]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("maxlm convert: ") and message in err, err
  assert not work.exists()  # nothing written


def test_not_a_gguf_file_and_argument_errors(tmp_path, capsys):
  (tmp_path / "x.gguf").write_bytes(b"GGML" + bytes(60))
  assert cli_main(["convert", "--from-gguf", str(tmp_path / "x.gguf"), "--workdir", str(tmp_path / "w")]) == 1
  assert "not a readable GGUF file" in capsys.readouterr().err
  assert cli_main(["convert", "--from-gguf", str(tmp_path / "nope.gguf"), "--workdir", str(tmp_path / "w")]) == 1
  assert "no such file" in capsys.readouterr().err
  assert cli_main(["convert", "--to-gguf", "--workdir", str(tmp_path)]) == 2
  assert "--output FILE.gguf is required" in capsys.readouterr().err
  assert cli_main(["convert", "--to-gguf", "--workdir", str(tmp_path), "--output", "x", "--dtype", "float16"]) == 2
  assert "f32, f16, bf16, q8_0" in capsys.readouterr().err
  assert cli_main(["convert", "--to-hf", "--workdir", str(tmp_path), "--output", "x", "--dtype", "q8_0"]) == 2
  assert cli_main(["convert", "--from-gguf", "a", "--to-gguf", "--workdir", str(tmp_path)]) == 2
  assert "exactly one of" in capsys.readouterr().err
  assert cli_main(["convert", "--to-gguf", "--workdir", str(tmp_path), "--output", "x",
                   "--config.model.num_layers=2"]) == 2
  assert "would be ignored" in capsys.readouterr().err


def test_export_refuses_what_gguf_cannot_hold(tmp_path):
  cfg = small_config("--config.model.sliding_window=8")
  write_workdir(tmp_path / "work", cfg, _randomized(cfg, 0), {})
  with pytest.raises(gguf_io.UnsupportedModelError, match="sliding_window=8"):
    gguf_io.convert_to_gguf(tmp_path / "work", tmp_path / "out.gguf")
  assert not list(tmp_path.glob("*.gguf*"))


def test_llama3_rope_scaling_travels_as_rope_freqs(tmp_path):
  rope = ["--config.model.rope_scaling=llama3", "--config.model.rope_scaling_factor=8.0",
          "--config.model.rope_original_max_len=32", "--config.model.rope_theta=10000.0"]
  cfg = small_config("--config.model.dtype=float32", *rope)
  write_workdir(tmp_path / "work", cfg, _randomized(cfg, 3), {})
  out = gguf_io.convert_to_gguf(tmp_path / "work", tmp_path / "out.gguf")
  # llama.cpp's divisors, as convert_hf_to_gguf.py computes them for rope_type llama3.
  dim, factor, old, lo, hi = cfg.model.head_dim, 8.0, 32, 1.0, 4.0
  expected = []
  for freq in 1.0 / (10000.0 ** (np.arange(0, dim, 2) / dim)):
    wavelen = 2 * math.pi / freq
    if wavelen < old / hi:
      expected.append(1.0)
    elif wavelen > old / lo:
      expected.append(factor)
    else:
      smooth = (old / wavelen - lo) / (hi - lo)
      expected.append(1 / ((1 - smooth) / factor + smooth))
  assert 1.0 < sorted(expected)[len(expected) // 2] or any(1 < e < factor for e in expected)  # the band is hit
  freqs = next(t for t in gguf.GGUFReader(out).tensors if t.name == "rope_freqs.weight")
  np.testing.assert_allclose(np.asarray(freqs.data), expected, rtol=1e-5)
  back = gguf_io.convert_from_gguf(out, tmp_path / "back")
  for key in ("rope_scaling", "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
              "rope_original_max_len", "rope_theta"):
    assert back.model[key] == cfg.model[key], key


def test_import_streams_one_parameter_at_a_time(tmp_path, monkeypatch):
  """While each parameter is built from a quantized file, host allocations stay within ~2.6x that parameter in
  float32 (its decoded tensors, the shards, decoding temporaries): never the model. (tracemalloc per leaf.)"""
  cfg = small_config("--config.model.dtype=float32", "--config.model.d_model=128", "--config.model.mlp_dim=256",
                     "--config.model.num_layers=4")
  write_workdir(tmp_path / "work", cfg, _randomized(cfg, 5), {})
  path = gguf_io.convert_to_gguf(tmp_path / "work", tmp_path / "m.gguf", dtype="q8_0")
  measured_leaves = leaf_build_memory(monkeypatch, lambda: gguf_io.from_gguf(path))
  total = sum(leaf for leaf, _ in measured_leaves)
  assert len(measured_leaves) == 11
  for leaf, peak in measured_leaves:
    assert peak <= 2.6 * leaf + (64 << 10), (leaf, peak)
  assert max(peak for _, peak in measured_leaves) < 0.6 * total


# ---- the real files (scripts/fetch_models.py): every block type they hold, against independent references ----


def _raw_rows(path, name: str, rows: int) -> tuple[np.ndarray, Q]:
  """The first `rows` rows of GGUF tensor `name` as raw bytes, and its type."""
  t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
  return np.asarray(t.data[:rows]).view(np.uint8).reshape(rows, -1), t.tensor_type


def _decode(raw: np.ndarray, qtype: Q) -> np.ndarray:
  if qtype == Q.F32:
    return raw.view(np.float32)
  return reference_dequantize_k(raw, qtype) if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else reference_dequantize(raw, qtype)


@pytest.mark.slow  # reads the real SmolLM2 (Q4_1, Q8_0) and Qwen2.5-Coder-1.5B (Q4_K, Q6_K) files
@pytest.mark.parametrize("key, arch, names", [
  ("smollm2-135m", "llama", ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
                             "blk.29.ffn_down.weight", "output_norm.weight"]),
  ("qwen2.5-coder-1.5b", "qwen2", ["blk.0.attn_q.weight", "blk.0.attn_q.bias", "blk.0.ffn_down.weight",
                                   "blk.1.attn_v.weight", "token_embd.weight"]),
])
def test_real_files_decode_like_the_reference_decoders(key, arch, names):
  from helpers import fetch_models

  path = fetch_models().fetch_gguf(key)
  gguf_reader = gguf.GGUFReader(path)
  heads = gguf_reader.get_field(f"{arch}.attention.head_count").contents()
  kv_heads = gguf_reader.get_field(f"{arch}.attention.head_count_kv").contents()
  reader = GGUFTensorReader(gguf_reader, path, arch, heads, kv_heads)
  seen = set()
  for name in names:
    hf = next(n for n in reader.keys() if reader.source_name(n) == name)
    got = reader.get(hf)
    n_heads = heads if ".attn_q." in name else kv_heads
    rows = got.shape[0] if ".attn_" in name and arch == "llama" else min(64, got.shape[0])
    raw, qtype = _raw_rows(path, name, rows)
    expected = _decode(raw, qtype).reshape(rows, *got.shape[1:])
    if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):  # convert_hf_to_gguf.py's permute, undone
      expected = expected.reshape(n_heads, -1, 2, expected.shape[-1]).swapaxes(1, 2).reshape(expected.shape)
    np.testing.assert_allclose(got[:rows], expected, rtol=1e-6, atol=1e-7, err_msg=name)
    seen.add(qtype)
    reader.release()
  assert seen >= ({Q.Q4_1, Q.Q8_0, Q.F32} if arch == "llama" else {Q.Q4_K, Q.Q6_K, Q.F32}), seen


@pytest.mark.slow  # converts SmolLM2 and loads it in transformers (~1 min)
def test_smollm2_matches_transformers_state_dict_and_exports_back(tmp_path):
  """transformers' GGUF loader (its own name mapping and Q/K un-permutation) reads the same weights; --to-gguf of
  the import carries the tokenizer and the metadata llama.cpp reads."""
  from helpers import fetch_models

  path = fetch_models().fetch_gguf("smollm2-135m")
  ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                          dtype=torch.float32).state_dict()
  reader = GGUFTensorReader(gguf.GGUFReader(path), path, "llama", 9, 3)
  for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
               "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
    np.testing.assert_array_equal(reader.get(name), ref[name].numpy(), err_msg=name)
  assert cli_main(["convert", "--from-gguf", str(path), "--workdir", str(tmp_path / "work")]) == 0
  assert cli_main(["convert", "--to-gguf", "--workdir", str(tmp_path / "work"), "--output",
                   str(tmp_path / "out.gguf"), "--dtype", "q8_0"]) == 0
  original, exported = gguf.GGUFReader(path), gguf.GGUFReader(tmp_path / "out.gguf")
  for key in ("llama.block_count", "llama.embedding_length", "llama.attention.head_count_kv",
              "llama.rope.freq_base", "llama.context_length", "tokenizer.ggml.model", "tokenizer.ggml.pre",
              "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
              "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
    assert exported.get_field(key).contents() == original.get_field(key).contents(), key
  tok_original = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  tok_exported = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="out.gguf")
  assert tok_exported.encode(TEXT) == tok_original.encode(TEXT)
