"""`maxlm quantize` / `maxlm prune` on a small trained model: the layer-by-layer procedure calibrates each layer on
the already-compressed layers' outputs (checked by redoing it step by step with the single-layer GPTQ), the output
workdir loads with its packed weights and computes what its dequantized weights compute, serves over HTTP, pruned
masks are stored and exact, and bad requests fail before any work."""

import asyncio
import json

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import train_tiny_base

from maxlm import cli, sharding
from maxlm.compress import gptq
from maxlm.compress.calibration import calibration_tokens
from maxlm.compress.layerwise import LAYER_MATMULS, Recipe, compress_model
from maxlm.compress.store import compression_record, read_masks
from maxlm.quant.affine import AffineWeight
from maxlm.train.checkpoint import Checkpointer
from maxlm.train.state import abstract_params
from maxlm.workdir import load_model, load_workdir_tokenizer

SAMPLES, SEQ = 8, 48
CALIB = ("--samples", str(SAMPLES), "--seq-len", str(SEQ), "--batch-size", "4")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  return train_tiny_base(tmp_path_factory.mktemp("compress") / "base")


@pytest.fixture(scope="module")
def quantized(base, tmp_path_factory):
  out = tmp_path_factory.mktemp("q") / "gptq"
  assert cli.main(["quantize", "--workdir", str(base), "--output", str(out), "--group", "32", "--act-order",
                   "--quiet", *CALIB]) == 0
  return out


def _tokens(base):
  model, cfg, _ = load_model(base, devices=jax.devices()[:1])
  return calibration_tokens(load_workdir_tokenizer(base, cfg), samples=SAMPLES, seq_len=SEQ)[0]


def test_each_layer_is_calibrated_on_the_compressed_layers_before_it(base):
  """Redo the procedure by hand: layer i's Hessian from the block inputs that the quantized layers 0..i-1 produce,
  then the single-layer GPTQ; the codes must be the run's."""
  tokens = _tokens(base)
  model, cfg, _ = load_model(base, devices=jax.devices()[:1])
  ref_model, _, _ = load_model(base, devices=jax.devices()[:1])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  recipe = Recipe("gptq", bits=4, group=32)
  compress_model(model, tokens, recipe, mesh, sharding.config_rules(cfg), batch_size=4)

  graphdef, stacked = nnx.split(ref_model.layers)
  x = jnp.asarray(ref_model.embed[...])[tokens]
  positions = jnp.broadcast_to(jnp.arange(SEQ), tokens.shape)
  for i in range(cfg.model.num_layers):
    block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
    normed = block.attn_norm(x).reshape(-1, cfg.model.d_model)
    h = 2 * normed.T @ normed / normed.shape[0]
    w = block.attn.q.get_value().reshape(cfg.model.d_model, -1)
    want = gptq.gptq_quantize(w, h, bits=4, group=32, sym=False, act_order=False)
    got = jax.tree.map(lambda a, i=i: a[i], model.layers.attn.q.get_value())
    np.testing.assert_allclose(np.asarray(got.dequantize()).reshape(w.shape), np.asarray(want.dequantize()),
                               rtol=1e-5, atol=1e-6)
    for module, name in LAYER_MATMULS:  # the next layer's input: this layer with its quantized weights
      getattr(getattr(block, module), name).set_value(jax.tree.map(
        lambda a, i=i: a[i], getattr(getattr(model.layers, module), name).get_value()))
    x, _ = block(x, positions, None)


def test_quantized_workdir_loads_packed_weights_that_compute_its_dequantized_model(base, quantized):
  record = compression_record(quantized)
  assert record["method"] == "gptq" and record["bits"] == 4 and record["act_order"]
  assert len(record["quantized"]) == 7 and len(record["layers"]) == 2
  assert record["bytes"]["quantized"] < record["bytes"]["float32"] / 5  # 4-bit codes, group 32 scales / zeros
  model, cfg, _ = load_model(quantized, devices=jax.devices()[:1])
  q = model.layers.attn.q.get_value()
  assert isinstance(q, AffineWeight) and q.perm is not None
  # The checkpoint's float weights (what --to-hf exports) are the codes' values: the same model, computed densely.
  ckpt = Checkpointer(quantized / "checkpoints", async_save=False)
  _, params = ckpt.restore_params(abstract_params(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1])))
  ckpt.close()
  np.testing.assert_allclose(np.asarray(params["layers"]["attn"]["q"]), np.asarray(q.dequantize()), atol=1e-6)
  float_model, _, _ = load_model(base, devices=jax.devices()[:1])
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 24)).astype(np.int32)
  from maxlm.train.state import build_model

  dense = build_model(cfg, params, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  got, want, orig = (np.asarray(m(tokens)) for m in (model, dense, float_model))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  assert np.abs(got - orig).max() > 1e-4  # quantization did change the model


def test_quantized_workdir_serves_over_http(quantized):
  from maxlm.serve.app import make_app
  from maxlm.serve.bridge import EngineLoop
  from maxlm.serve.engine import Engine

  engine = Engine.from_workdir(str(quantized), ("--config.serve.max_len=64", "--config.serve.max_batch=2"))
  packed = [x for x in jax.tree.leaves(engine.state, is_leaf=lambda x: isinstance(x, AffineWeight))
            if isinstance(x, AffineWeight)]
  assert packed and len(packed) % 7 == 0  # the engine decodes with the packed weights (stacked or per layer)
  with EngineLoop(engine) as loop:
    app = make_app(loop)

    async def go():
      async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
        return await c.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 6, "temperature": 0})

    r = asyncio.run(go())
  assert r.status_code == 200, r.text
  body = r.json()
  assert body["usage"]["completion_tokens"] >= 1 and isinstance(body["choices"][0]["text"], str)


@pytest.mark.parametrize("args", [("--method", "sparsegpt", "--pattern", "2:4"),
                                  ("--method", "wanda", "--sparsity", "0.5")])
def test_pruned_workdir_is_exactly_sparse_and_stores_its_masks(base, tmp_path, args):
  out = tmp_path / "pruned"
  assert cli.main(["prune", "--workdir", str(base), "--output", str(out), "--quiet", *CALIB, *args]) == 0
  model, cfg, _ = load_model(out, devices=jax.devices()[:1])
  masks = read_masks(out)
  assert len(masks) == 7
  for module, name in LAYER_MATMULS:
    w = np.asarray(getattr(getattr(model.layers, module), name).get_value())
    keep = np.unpackbits(masks[f"layers.{module}.{name}"])[:w.size].reshape(w.shape).astype(bool)
    np.testing.assert_array_equal(keep, w != 0)
    contract = LAYER_MATMULS[(module, name)][1]
    per_out = w.reshape(w.shape[0], -1, *w.shape[1 + contract:]) if contract == 2 else w
    per_out = per_out.reshape(w.shape[0], int(np.prod(w.shape[1:1 + contract])), -1)  # [layers, k, n]
    if "--pattern" in args:
      groups = (per_out != 0).reshape(per_out.shape[0], -1, 4, per_out.shape[-1]).sum(2)
      assert groups.max() <= 2, f"{module}.{name}: a group of 4 inputs keeps more than 2"
    else:
      assert abs((per_out == 0).mean() - 0.5) < 0.01
  assert compression_record(out)["method"] == args[1]


@pytest.mark.parametrize("argv, message", [
  (("quantize", "--bits", "5"), "--bits 5"),
  (("quantize", "--group", "31"), "--group 31"),
  (("prune", "--pattern", "2:3"), "not a multiple of 3"),
  (("prune",), "give one of --sparsity"),
  (("quantize", "--seq-len", "100000"), "max_seq_len"),
  (("quantize", "--calibration", "{short}"), "holds"),
])
def test_bad_requests_fail_before_any_work(base, tmp_path, capsys, argv, message):
  short = tmp_path / "short.txt"
  short.write_text("a few words only.")
  out = tmp_path / "out"
  argv = [a.format(short=short) for a in argv]
  assert cli.main([argv[0], "--workdir", str(base), "--output", str(out), *CALIB, *argv[1:]]) == 1
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err
  assert not out.exists()


def test_a_quantized_workdir_or_an_existing_output_is_refused(base, quantized, tmp_path, capsys):
  assert cli.main(["quantize", "--workdir", str(quantized), "--output", str(tmp_path / "again"), *CALIB]) == 1
  assert "already quantized" in capsys.readouterr().err
  before = json.loads((quantized / "compression.json").read_text())
  assert cli.main(["quantize", "--workdir", str(base), "--output", str(quantized), *CALIB]) == 1
  assert "not empty" in capsys.readouterr().err
  assert json.loads((quantized / "compression.json").read_text()) == before  # nothing written over


def test_gptq_export_decodes_to_the_quantized_weights(quantized, tmp_path):
  """--to-hf --format gptq, read back by the bit-level decoder written from the format's documented layout
  (tests/test_gptq_format.py): every projection's codes, zero points and g_idx give maxlm's dequantized weight."""
  from test_gptq_format import _decode

  from maxlm.convert.safetensors_io import SafetensorsReader

  out = tmp_path / "hf"
  assert cli.main(["convert", "--to-hf", "--workdir", str(quantized), "--output", str(out), "--format", "gptq"]) == 0
  config = json.loads((out / "config.json").read_text())
  q = config["quantization_config"]
  assert (q["quant_method"], q["bits"], q["group_size"], q["desc_act"]) == ("gptq", 4, 32, True)
  reader = SafetensorsReader(out)
  model, cfg, _ = load_model(quantized, devices=jax.devices()[:1])
  hf_name = {"attn": "self_attn", "mlp": "mlp"}
  for module, name in LAYER_MATMULS:
    stacked = getattr(getattr(model.layers, module), name).get_value()
    for i in range(cfg.model.num_layers):
      prefix = f"model.layers.{i}.{hf_name[module]}.{name}_proj"
      assert f"{prefix}.weight" not in reader
      tensors = {f: reader.get(f"{prefix}.{f}") for f in ("qweight", "qzeros", "scales", "g_idx")}
      _, _, g_idx, weight = _decode(tensors, 4)
      want = np.asarray(jax.tree.map(lambda a, i=i: a[i], stacked).dequantize())
      want = want.reshape(weight.shape)
      np.testing.assert_allclose(weight, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())  # float16 scales
      assert sorted(np.bincount(g_idx).tolist()) == [32] * (weight.shape[0] // 32)
  assert "model.embed_tokens.weight" in reader  # the rest stays float


def test_compressing_on_a_mesh_equals_one_device(base):
  """The calibration activations and the per-layer work sharded over 8 devices (fsdp 4 x tensor 2) give the
  one-device result: a model that trains on a mesh is compressed on it."""
  tokens = _tokens(base)
  results = {}
  for name, devices, overrides in [("one", 1, ()), ("mesh", 8, ("--config.mesh.fsdp=4", "--config.mesh.tensor=2"))]:
    model, cfg, _ = load_model(base, overrides, devices=jax.devices()[:devices])
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:devices])
    report = compress_model(model, tokens, Recipe("gptq", bits=4, group=32, act_order=True), mesh,
                            sharding.config_rules(cfg), batch_size=4)
    results[name] = ([np.asarray(getattr(getattr(model.layers, m), n).get_value().dequantize())
                      for m, n in LAYER_MATMULS], [layer["mlp.down"]["relative_error"] for layer in report["layers"]])
  for got, want in zip(results["mesh"][0], results["one"][0]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(results["mesh"][1], results["one"][1], rtol=1e-3)
