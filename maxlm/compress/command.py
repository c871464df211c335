"""`maxlm quantize` and `maxlm prune`: argument checks (before any weight is read), calibration, the layer-by-layer
run with a progress bar, and the compressed workdir (`maxlm.compress.store`)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from maxlm.compress.layerwise import PRUNE_METHODS, QUANT_METHODS, Recipe

QUANT_BITS = (2, 3, 4, 8)


class CompressError(ValueError):
  """A request that cannot be carried out (named before any work)."""


def parser(command: str) -> argparse.ArgumentParser:
  """The command's arguments (config overrides, --config.*, are split off before)."""
  p = argparse.ArgumentParser(prog=f"maxlm {command}", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="the model to compress (a maxlm workdir)")
  p.add_argument("--output", required=True, help="the new workdir to write (generate, serve and eval load it)")
  if command == "quantize":
    p.add_argument("--method", default="gptq", choices=QUANT_METHODS, help="gptq (calibrated) or rtn (round to "
                   "nearest, the same format and quantizer without error compensation)")
    p.add_argument("--bits", type=int, default=4, help="bits per weight: 8, 4, 3 or 2 (default 4)")
    p.add_argument("--group", type=int, default=128,
                   help="input channels per scale and zero point (-1: one per output channel; default 128)")
    p.add_argument("--act-order", "--act_order", dest="act_order", action="store_true",
                   help="quantize inputs in decreasing order of their Hessian diagonal (GPTQ's desc_act)")
    p.add_argument("--sym", action="store_true", help="symmetric codes (zero point 2**(bits-1))")
    p.add_argument("--static-groups", "--static_groups", dest="static_groups", action="store_true",
                   help="fix every group's scale and zero point from the weights before GPTQ's updates (AutoGPTQ's "
                        "static_groups, llm-compressor's observers); default: when the sweep reaches the group")
  else:
    p.add_argument("--method", default="sparsegpt", choices=PRUNE_METHODS)
    p.add_argument("--sparsity", type=float, default=None, help="fraction of each weight set to zero, e.g. 0.5")
    p.add_argument("--pattern", default=None, help="N:M semi-structured sparsity, e.g. 2:4 (N zeros in every M)")
  p.add_argument("--calibration", nargs="*", default=[], metavar="PATH",
                 help="calibration text: text / JSONL files, dirs or globs (default: the embedded corpus)")
  p.add_argument("--calibration-tokenized", "--calibration_tokenized", dest="calibration_tokenized", default=None,
                 help="calibration from a `maxlm tokenize` directory (its train split) instead")
  p.add_argument("--text-field", "--text_field", dest="text_field", default="text", help="JSONL text field")
  p.add_argument("--samples", type=int, default=128, help="calibration sequences (default 128)")
  p.add_argument("--seq-len", "--seq_len", dest="seq_len", type=int, default=2048,
                 help="tokens per calibration sequence (default 2048, at most the model's max_seq_len)")
  p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8,
                 help="calibration sequences per forward pass")
  p.add_argument("--damp", type=float, default=0.01, help="Hessian damping, a fraction of its mean diagonal")
  p.add_argument("--block", type=int, default=128, help="rows per lazy update block (GPTQ / SparseGPT)")
  p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows' draw")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  return p


def _pattern(text: str | None) -> tuple[int, int] | None:
  if text is None:
    return None
  try:
    n, m = (int(v) for v in text.split(":"))
  except ValueError:
    raise CompressError(f"--pattern {text!r}: expected N:M, e.g. 2:4") from None
  if not 0 < n < m:
    raise CompressError(f"--pattern {text}: expected 0 < N < M")
  return n, m


def recipe_of(command: str, args: argparse.Namespace) -> Recipe:
  """The Recipe of the arguments, checked on their own (the model's shapes are checked by `check_shapes`)."""
  common = dict(damp=args.damp, block=args.block)
  if not 0 <= args.damp < 1:
    raise CompressError(f"--damp {args.damp}: expected a fraction in [0, 1)")
  if args.block < 1:
    raise CompressError(f"--block {args.block}: expected a positive integer")
  if command == "quantize":
    if args.bits not in QUANT_BITS:
      raise CompressError(f"--bits {args.bits}: expected one of {', '.join(map(str, QUANT_BITS))}")
    if args.group != -1 and (args.group < 2 or args.group % 2):
      raise CompressError(f"--group {args.group}: expected -1 or an even number of input channels >= 2 (codes are "
                          "stored two per byte, group by group)")
    return Recipe(args.method, bits=args.bits, group=args.group, sym=args.sym, act_order=args.act_order,
                  static_groups=args.static_groups, **common)
  if (args.sparsity is None) == (args.pattern is None):
    raise CompressError("give one of --sparsity FRACTION (unstructured) or --pattern N:M (semi-structured)")
  if args.sparsity is not None and not 0 < args.sparsity < 1:
    raise CompressError(f"--sparsity {args.sparsity}: expected a fraction strictly between 0 and 1")
  return Recipe(args.method, sparsity=args.sparsity, pattern=_pattern(args.pattern), **common)


def check_shapes(cfg, recipe: Recipe) -> None:
  """CompressError if a weight of cfg's model cannot take the recipe (group, N:M pattern, sequence length)."""
  m = cfg.model
  if m.num_experts:
    raise CompressError("compressing a mixture-of-experts model is not supported (its experts are not `dense` "
                        "weights)")
  inputs = {"q/k/v/gate/up": m.d_model, "o": m.num_heads * m.head_dim, "down": m.mlp_dim}
  for name, k in inputs.items():
    if recipe.quantizes:
      group = k if recipe.group == -1 else min(recipe.group, k)
      if group % 2:
        raise CompressError(f"--group {recipe.group}: the {name} weights have {k} input channels, whose groups "
                            "would be odd")
    elif recipe.pattern and k % recipe.pattern[1]:
      raise CompressError(f"--pattern {recipe.pattern[0]}:{recipe.pattern[1]}: the {name} weights have {k} input "
                          f"channels, not a multiple of {recipe.pattern[1]}")


def check_source(src: Path, dst: Path, cfg, command: str) -> dict[str, Any]:
  """The source's import record; CompressError for adapters, an already quantized source, or an existing DST."""
  from maxlm.compress.store import compression_record
  from maxlm.convert.hf import IMPORT_RECORD

  if cfg.lora.base:
    raise CompressError(f"{src} holds LoRA adapters: merge them first (maxlm convert --merge-lora --workdir {src} "
                        "--output MERGED) and compress the merged workdir")
  record = compression_record(src)
  if record and record.get("quantized"):
    raise CompressError(f"{src} is already quantized ({record['method']}, {record['bits']} bits): {command} the "
                        "float workdir it came from")
  if dst.resolve() == src.resolve():
    raise CompressError("--output must be a new workdir, not --workdir itself")
  if dst.exists() and any(dst.iterdir()):
    raise CompressError(f"--output {dst} exists and is not empty: give a new directory")
  path = src / IMPORT_RECORD
  return json.loads(path.read_text()) if path.is_file() else {}


def _float_bytes(cfg) -> int:
  m = cfg.model
  per_layer = 2 * m.d_model * m.num_heads * m.head_dim + 2 * m.d_model * m.num_kv_heads * m.head_dim \
    + 3 * m.d_model * m.mlp_dim
  return per_layer * m.num_layers * 4


def run(command: str, args: argparse.Namespace, overrides: list[str]) -> int:
  """Runs `maxlm quantize` / `maxlm prune` (args from `parser`); the exit status (1, one line, on bad input)."""
  try:
    return _run(command, args, overrides)
  except (CompressError, ValueError, FileNotFoundError) as e:  # ConfigError / CalibrationError are ValueErrors
    print(f"maxlm {command}: {e}", file=sys.stderr)
    return 1


def _run(command: str, args: argparse.Namespace, overrides: list[str]) -> int:
  from maxlm.workdir import load_workdir_config

  src, dst = Path(args.workdir), Path(args.output)
  cfg = load_workdir_config(src, tuple(overrides))
  recipe = recipe_of(command, args)
  check_shapes(cfg, recipe)
  import_record = check_source(src, dst, cfg, command)
  if not 2 <= args.seq_len <= cfg.model.max_seq_len:
    raise CompressError(f"--seq-len {args.seq_len}: expected 2 .. the model's max_seq_len {cfg.model.max_seq_len}")
  if args.samples < 1 or args.batch_size < 1:
    raise CompressError("--samples and --batch-size must be positive")

  import jax  # heavy imports only once the request is known to be good
  from tqdm import tqdm

  from maxlm import sharding
  from maxlm.compress.calibration import calibration_tokens
  from maxlm.compress.layerwise import compress_model
  from maxlm.compress.store import float_params, write_compressed
  from maxlm.convert.hf import write_workdir
  from maxlm.workdir import TOKENIZER_DIR, load_model, load_workdir_tokenizer

  tokenizer = load_workdir_tokenizer(src, cfg)
  tokens, calib = calibration_tokens(tokenizer, samples=args.samples, seq_len=args.seq_len, paths=args.calibration,
                                     tokenized=args.calibration_tokenized, vocab_size=cfg.model.vocab_size,
                                     text_field=args.text_field, seed=args.seed)
  t0 = time.perf_counter()
  model, cfg, step = load_model(src, tuple(overrides))
  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.config_rules(cfg)
  bar = tqdm(total=cfg.model.num_layers, desc=f"{command} {recipe.method}", unit="layer", disable=args.quiet,
             dynamic_ncols=True)

  def progress(done: int, total: int, layer: dict) -> None:
    errs = [v["relative_error"] for v in layer.values() if isinstance(v, dict)]
    bar.set_postfix_str(f"layer {done}/{total}: mean relative error {sum(errs) / len(errs):.4f}")
    bar.update(1)

  par = mesh.shape["data"] * mesh.shape["fsdp"]  # calibration rows are split over the batch-parallel devices
  if args.samples % par:
    raise CompressError(f"--samples {args.samples}: not a multiple of the mesh's {par} batch-parallel devices")
  batch = -(-args.batch_size // par) * par
  report = compress_model(model, tokens, recipe, mesh, rules, batch_size=batch, progress=progress)
  bar.close()
  seconds = time.perf_counter() - t0
  record = {"command": command, "method": recipe.method, "source": str(src.resolve()), "source_step": step,
            "calibration": calib, "seconds": seconds, "machine_cpus": jax.device_count(), **{
              k: v for k, v in vars(recipe).items() if v is not None}, **report}
  if recipe.quantizes:
    from maxlm.quant.affine import AffineWeight

    leaves = jax.tree.leaves(jax.tree.map(lambda x: x.nbytes if isinstance(x, AffineWeight) else 0,
                                          _matmul_values(model), is_leaf=lambda x: isinstance(x, AffineWeight)))
    record["bytes"] = {"float32": _float_bytes(cfg), "quantized": int(sum(leaves))}
  write_workdir(dst, cfg, float_params(model), import_record)  # config.json and the float checkpoint first
  write_compressed(dst, model, record)
  if (src / TOKENIZER_DIR).is_dir():
    shutil.copytree(src / TOKENIZER_DIR, dst / TOKENIZER_DIR, dirs_exist_ok=True)
  errs = [v["relative_error"] for layer in report["layers"] for v in layer.values() if isinstance(v, dict)]
  what = (f"{recipe.bits}-bit, group {recipe.group}{', act-order' if recipe.act_order else ''}"
          f"{', symmetric' if recipe.sym else ''}" if recipe.quantizes else
          f"{recipe.sparsity:.0%} sparse" if recipe.sparsity else f"{recipe.pattern[0]}:{recipe.pattern[1]} sparse")
  size = ""
  if "bytes" in record:
    size = f"; matmul weights {record['bytes']['float32'] / 2**20:.1f} MiB (float32) -> " \
           f"{record['bytes']['quantized'] / 2**20:.1f} MiB"
  print(f"{command} {recipe.method} ({what}) of {src} -> {dst} in {seconds:.0f}s: {len(report['layers'])} layers, "
        f"mean relative layer error {sum(errs) / len(errs):.4g}, worst {max(errs):.4g}{size}\n"
        f"calibration: {calib}\nuse it: maxlm generate --workdir {dst} --prompt ...  |  maxlm eval --workdir {dst} "
        f"--data ...")
  return 0


def _matmul_values(model) -> list:
  from maxlm.compress.store import matmul_variables  # noqa: PLC0415

  return [var.get_value() for _, var in matmul_variables(model)]
