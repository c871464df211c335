"""Compiles the Pallas kernels (and a model train step using them) for a TPU, on a host without one.

`jax.export` (tests/kernels) checks the Pallas -> Mosaic lowering; this goes one step further and runs the TPU
back end itself from a compile-only libtpu against a TPU topology description, so Mosaic's layout checks and the
VMEM budget are enforced exactly as on the chip. Each case states what should happen: real shapes with the
default blocks must compile; deliberately oversized blocks must be refused for VMEM.

Needs libtpu (not a project dependency):  pip install libtpu==0.0.42.1   (the version jax 0.10.2 pins)
Run:  python scripts/check_tpu_compile.py [--topology v5e:2x2] [--libtpu-path DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ACCELERATOR = {"v5e": "v5litepod-4", "v6e": "v6e-4", "v5p": "v5p-8", "v4": "v4-8"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--topology", default="v5e:2x2", help="TPU topology name, e.g. v5e:2x2, v6e:2x2, v5p:2x2x1")
  p.add_argument("--libtpu-path", default=None, help="directory holding the libtpu package (pip install --target)")
  p.add_argument("--out", default="bench_results/check_tpu_compile.json")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.libtpu_path:
    sys.path.insert(0, args.libtpu_path)
  # libtpu needs to be told which chip it compiles for when there is none.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", ACCELERATOR[args.topology.split(":")[0]])
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from jax.experimental import topologies  # noqa: PLC0415
  from jax.sharding import SingleDeviceSharding  # noqa: PLC0415

  from kernels_pallas.flash_attention import BlockSizes, flash_attention  # noqa: PLC0415
  from kernels_pallas.lowering import tpu_abstract_mesh  # noqa: PLC0415
  from kernels_pallas.paged_attention import paged_attention  # noqa: PLC0415
  from maxlm import sharding  # noqa: PLC0415
  from maxlm.config import load_config  # noqa: PLC0415
  from maxlm.train.state import abstract_params, model_graphdef  # noqa: PLC0415
  from maxlm.train.step import token_loss_sums  # noqa: PLC0415

  try:
    topo = topologies.get_topology_desc(topology_name=args.topology, platform="tpu")
  except Exception as e:  # noqa: BLE001  (no libtpu: say how to get it)
    raise SystemExit(f"cannot load a TPU compiler ({e}); install one with: pip install libtpu==0.0.42.1") from None
  dev = topo.devices[0]
  on_dev = SingleDeviceSharding(dev)

  def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=on_dev)

  # Llama-3-8B attention: 32 query / 8 key-value heads of 128, bf16, 8192 tokens.
  qkv = [sds((1, 8192, 32, 128), jnp.bfloat16), sds((1, 8192, 8, 128), jnp.bfloat16),
         sds((1, 8192, 8, 128), jnp.bfloat16), sds((1, 8192), jnp.int32)]

  def flash_step(blocks=None, packed=True, window=None):
    def loss(q, k, v, seg):
      out = flash_attention(q, k, v, segment_ids=seg if packed else None, sliding_window=window, backend="tpu",
                            block_sizes=blocks)
      return jnp.sum(out.astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

  def paged_case(page_size, q_len, int8, batch=8, tokens=8192):
    pages = batch * tokens // page_size
    dt = jnp.int8 if int8 else jnp.bfloat16
    a = [sds((batch, q_len, 32, 128), jnp.bfloat16), sds((pages, page_size, 8, 128), dt),
         sds((pages, page_size, 8, 128), dt), sds((batch, tokens // page_size), jnp.int32), sds((batch,), jnp.int32)]
    if int8:
      a += [sds((pages, 8), jnp.float32)] * 2
    fn = jax.jit(lambda q, kp, vp, pt, ln, *sc: paged_attention(q, kp, vp, pt, ln, k_scales=sc[0] if sc else None,
                                                                 v_scales=sc[1] if sc else None, backend="tpu"))
    return fn, a

  def model_case():
    cfg = load_config("tiny", ["--config.model.attention=pallas_flash", "--config.model.pallas_backend=tpu",
                               "--config.model.dtype=bfloat16", "--config.data.seq_len=1024",
                               "--config.model.max_seq_len=1024"])
    mesh = sharding.make_mesh(cfg.mesh, [dev])
    graphdef, params = model_graphdef(cfg, mesh), abstract_params(cfg, mesh)
    tokens = jax.ShapeDtypeStruct((8, 1024), jnp.int32, sharding=sharding.batch_sharding(mesh))

    def loss(params, tokens):  # the training objective's loss, with its hand-written backward
      logits = nnx.merge(graphdef, params)(tokens, None, None)
      return token_loss_sums(logits, tokens, jnp.ones(tokens.shape, jnp.float32), 1e-4)[0]
    # Traced under the model's own (one-TPU-device) mesh and logical rules, as the train loop does.
    return jax.jit(jax.value_and_grad(loss)), [params, tokens], sharding.use_mesh(mesh, sharding.config_rules(cfg))

  cases = [
    ("flash fwd+bwd, default blocks, packed", "compiles", flash_step(), qkv),
    ("flash fwd+bwd, default blocks, window 4096", "compiles", flash_step(packed=False, window=4096), qkv),
    ("flash fwd+bwd, blocks 1024/1024/512/512", "compiles", flash_step(BlockSizes(1024, 1024, 512, 512)), qkv),
    ("flash fwd+bwd, blocks 2048 (too big)", "VMEM OOM", flash_step(BlockSizes(2048, 2048, 2048, 2048),
                                                                   packed=False), qkv),
    ("paged decode, page 16", "compiles", *paged_case(16, 1, False)),
    ("paged verify q_len 5, page 64", "compiles", *paged_case(64, 5, False)),
    ("paged decode int8, page 16", "compiles", *paged_case(16, 1, True)),
    ("model (tiny, bf16, seq 1024) loss+grad with pallas_flash", "compiles", *model_case()),
  ]
  print(f"compiling for {args.topology} ({dev.device_kind}) with libtpu, compile only")
  rows = []
  for i, (name, expect, fn, fargs, *context) in enumerate(cases):
    t = time.perf_counter()
    try:
      with context[0] if context else jax.sharding.use_abstract_mesh(tpu_abstract_mesh(dev.device_kind)):
        lowered = fn.trace(*fargs).lower(lowering_platforms=("tpu",))
      lowered.compile()
      result, detail = "compiles", ""
    except Exception as e:  # noqa: BLE001  (report every case)
      text = str(e)
      result = "VMEM OOM" if "vmem" in text.lower() and "memory" in text.lower() else "error"
      detail = text.splitlines()[0][:300] if text else traceback.format_exc(limit=1)
    rows.append({"case": name, "expected": expect, "result": result, "ok": result == expect,
                 "seconds": time.perf_counter() - t, "detail": detail})
    print(f"[{i + 1}/{len(cases)}] {name}: {result} ({'as expected' if result == expect else 'UNEXPECTED'}) "
          f"{rows[-1]['seconds']:.1f}s {detail[:160]}", flush=True)
  print("\n| case | expected | result | ok |\n|---|---|---|---|")
  for r in rows:
    print(f"| {r['case']} | {r['expected']} | {r['result']} | {'yes' if r['ok'] else 'NO'} |")
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"topology": args.topology, "device_kind": dev.device_kind, "jax": jax.__version__,
                             "cases": rows}, indent=2))
  print(f"wrote {out}")
  if not all(r["ok"] for r in rows):
    raise SystemExit(1)


if __name__ == "__main__":
  main()
