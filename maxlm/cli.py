"""`maxlm` command line: train | convert | config | plan | curate | tokenize | generate | serve | eval | quantize |
prune.

Overrides: `--config.<section>.<key>=<value>`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from maxlm.config import ConfigError, load_config, to_json
from maxlm.extras import MissingExtra, require

USAGE = """maxlm <command> [options]

commands:
  train    train a model (default config: configs/tiny.py on the embedded corpus); resumes from --workdir,
           whose saved config.json is used when --config is not given
  convert  import a Hugging Face model or a llama.cpp GGUF file into a workdir (--from-hf HF_DIR | --from-gguf
           FILE.gguf, --workdir DIR), or export one (--to-hf --workdir DIR --output HF_DIR [--dtype
           bfloat16|float16|float32] | --to-gguf --workdir DIR --output FILE.gguf [--dtype f32|f16|bf16|q8_0]), or
           fold a LoRA workdir's adapters into its base (--merge-lora --workdir ADAPTERS --output DIR), or move
           adapters to / from PEFT (--to-peft --workdir ADAPTERS --output DIR | --from-peft DIR --base WORKDIR
           --workdir NEW)
  config   print the resolved config after overrides, without running anything
  plan     per-device memory plan (params, Adam, grads, activations, temporaries) and FITS / DOES NOT FIT, for
           --num-devices N on --device KIND (or --device-memory-gib G), without allocating [--json PATH];
           exit 3 if it does not fit
  curate   text files / dirs / globs / JSONL -> curated JSONL shards + stats.json + stats.png in --output DIR
           (normalize, exact + MinHash near-dup removal, language and quality filters, PII); resumable
  tokenize [NAME=]CURATED... -> ArrayRecord token shards per named source + manifest.json + tokenizer/ in
           --output DIR (trains an exactly round-tripping sentencepiece BPE unless tokenize.tokenizer is set);
           train on them with --config.data.tokenized=DIR --config.data.mixture=NAME=WEIGHT,...
  generate print a completion of --prompt TEXT by --workdir DIR, or the model's answer to --chat QUESTION [--system
           TEXT] through its chat template (the serving engine: KV cache, --draft-workdir D for speculative
           decoding) [--max-tokens N --temperature T --top-k K --top-p P --seed S --stop STR];
           serving options: --config.serve.* (e.g. weights=int8, kv_cache=int8)
  serve    serve --workdir DIR over HTTP, OpenAI-style (POST /v1/completions, GET /v1/models, /health, /metrics)
           [--draft-workdir D for speculative decoding] [--host H] [--port P]; serving options: --config.serve.*
  quantize --workdir SRC --output DST [--method gptq|rtn --bits 8|4|3|2 --group 128 --act-order --sym]
           [--calibration PATHS | --calibration-tokenized DIR] [--samples 128 --seq-len 2048]: GPTQ (layer by
           layer on calibration text) into a workdir that generate, serve and eval load
  prune    --workdir SRC --output DST [--method sparsegpt|wanda|magnitude] (--sparsity 0.5 | --pattern 2:4),
           calibrated as quantize is; the pruned weights are exact zeros and their masks are stored
  eval     perplexity and bits per byte of --workdir DIR's model on --data [NAME=]PATH... (text files, JSONL)
           and/or --tokenized DIR [--split eval], in rolling windows [--seq-len N --stride N --batch-size B
           --limit N --output FILE.json]; or --tasks TASK... (multiple choice, generation, perplexity task files)
           [--num-fewshot K --chat-template --limit N --output FILE.json]

config: --config=FILE (or a name in configs/; generate, serve, eval and convert read the workdir's or the imported
  model's instead) and any number of --config.<section>.<key>=<value> overrides; every key is documented, with its
  default, in configs/base.py. `maxlm <command> --help` lists a command's options.

examples:
  maxlm train                                   # tiny default, workdir runs/tiny
  maxlm train --config=configs/tiny.py --workdir=runs/t1 --config.train.steps=50
  maxlm train --config=configs/llama3_8b.py --dry_run
  maxlm convert --from-hf ~/models/Llama-3.2-1B --workdir runs/llama1b
  maxlm train --workdir runs/llama1b --config.train.steps=100 --config.data.paths=my.jsonl   # fine-tune it
  maxlm convert --to-hf --workdir runs/llama1b --output exported/llama1b
  maxlm convert --from-gguf SmolLM2-135M-Instruct.Q4_1.gguf --workdir runs/smol    # dequantized to float32
  maxlm convert --to-gguf --workdir runs/smol --output smol-tuned.gguf --dtype q8_0  # for llama.cpp
  maxlm config --config=configs/tiny.py --config.model.num_layers=8
  maxlm curate --output curated/ --config.curate.language.keep=en,de raw/*.jsonl docs/
  maxlm tokenize --output tok/ web=curated/web/ code=curated/code/
  maxlm train --config.data.tokenized=tok/ --config.data.mixture=web=0.7,code=0.3
  maxlm plan --config=llama3_8b --config.mesh.data=1 --config.mesh.fsdp=256 --num-devices 256 --device tpu-v5p
  maxlm generate --workdir runs/tiny --prompt "Once upon a time" --max-tokens 64 --config.serve.weights=int8
  maxlm generate --workdir runs/smollm2 --chat "What is the GPL?" --system "Answer in one sentence."
  maxlm serve --workdir runs/tiny --port 8000 --config.serve.max_batch=16
  maxlm eval --workdir runs/tiny --data held_out.jsonl --stride 512 --output eval.json
  maxlm eval --workdir runs/smollm2 --tasks maxlm/eval/local_tasks/ --num-fewshot 3 --output tasks.json
"""


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` overrides (also `--config.a.b v`) from the other arguments."""
  overrides, rest = [], []
  it = iter(argv)
  for arg in it:
    if arg.startswith("--config."):
      if "=" not in arg:
        value = next(it, None)
        if value is None:
          raise ConfigError(f"{arg}: missing value (use {arg}=VALUE)")
        arg = f"{arg}={value}"
      overrides.append(arg)
    else:
      rest.append(arg)
  return overrides, rest


# Commands whose config is the one saved in --workdir (or read from a Hugging Face model): --config=FILE is refused.
_SAVED_CONFIG = ("convert", "generate", "serve", "eval")
COMMANDS = ("train", "config", "convert", "plan", "curate", "tokenize", "generate", "serve", "eval", "quantize",
            "prune")

_OVERRIDES_EPILOG = """config overrides (any number, anywhere after the command):
  --config.<section>.<key>=<value>   e.g. --config.train.steps=50 --config.model.num_layers=8
                                     (also --config.<section>.<key> <value>; lists are comma-separated)
  Every key is documented, with its default, in configs/base.py; print a resolved config with
  `maxlm config [--config=FILE] [--config.<section>.<key>=<value> ...]`."""

_EPILOGS = {
  "generate": """config: the workdir's saved WORKDIR/config.json (--config=FILE is not accepted); overrides apply to
  it. Serving options:
  --config.serve.<key>=<value>       e.g. --config.serve.weights=int8 --config.serve.kv_cache=int8
  Every key is documented, with its default, in configs/base.py; print the workdir's config with
  `maxlm config --config=WORKDIR/config.json`.""",
  "convert": """config: --from-hf reads the Hugging Face config.json, --from-gguf the GGUF metadata (--config=FILE is
  not accepted); overrides apply to the result: --config.<section>.<key>=<value>, e.g.
  --config.model.max_seq_len=4096. --to-hf and --to-gguf export the workdir's model as saved and take no overrides.
  --from-gguf reads llama, mistral and qwen2 files (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K
  tensors), dequantized to float32. --to-gguf --dtype: f32, f16, bf16 or q8_0 (default: the imported model's
  f32/f16/bf16, else f32). Every key is documented in configs/base.py; print a workdir's config
  with `maxlm config --config=WORKDIR/config.json`.""",
}
_EPILOGS["serve"] = _EPILOGS["generate"].replace("weights=int8 --config.serve.kv_cache=int8", "max_batch=16")
_EPILOGS["eval"] = """config: the workdir's saved WORKDIR/config.json (--config=FILE is not accepted); overrides apply
  to it:
  --config.<section>.<key>=<value>   e.g. --config.mesh.data=1 --config.mesh.tensor=2 (the model's layout)
  Every key is documented, with its default, in configs/base.py; print the workdir's config with
  `maxlm config --config=WORKDIR/config.json`."""


def _parser(command: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f"maxlm {command}", epilog=_EPILOGS.get(command, _OVERRIDES_EPILOG),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  if command in _SAVED_CONFIG:
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)  # refused in main(), with the reason
  else:
    default = "WORKDIR/config.json if --workdir has one, else tiny" if command == "train" else "tiny"
    p.add_argument("--config", default=None, help=f"config file or name in configs/ (default: {default})")
  if command == "tokenize":
    p.add_argument("inputs", nargs="+", metavar="[NAME=]CURATED",
                   help="curated JSONL shards, text files, dirs or globs; each argument is a named source of the "
                        "mixture (NAME= or the file / directory name)")
    p.add_argument("--output", required=True, help="directory for the ArrayRecord shards, manifest.json, tokenizer/")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
  if command == "curate":
    p.add_argument("inputs", nargs="+", help="text files, directories, globs or JSONL files (field curate.text_field)")
    p.add_argument("--output", required=True, help="directory for part-*.jsonl shards, stats.json and stats.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
  if command == "convert":
    p.add_argument("--from-hf", "--from_hf", dest="from_hf", default=None, help="Hugging Face model directory")
    p.add_argument("--from-gguf", "--from_gguf", dest="from_gguf", default=None, help="llama.cpp GGUF model file")
    p.add_argument("--to-hf", "--to_hf", dest="to_hf", action="store_true", help="export --workdir to --output")
    p.add_argument("--to-peft", "--to_peft", dest="to_peft", action="store_true",
                   help="write --workdir's LoRA adapters as a PEFT adapter directory (--output)")
    p.add_argument("--from-peft", "--from_peft", dest="from_peft", default=None,
                   help="a PEFT LoRA adapter directory to import onto --base as the adapter workdir --workdir")
    p.add_argument("--base", default=None, help="--from-peft: the maxlm workdir of the adapter's base model")
    p.add_argument("--merge-lora", "--merge_lora", dest="merge_lora", action="store_true",
                   help="fold --workdir's LoRA adapters into its base and write a plain workdir to --output")
    p.add_argument("--to-gguf", "--to_gguf", dest="to_gguf", action="store_true",
                   help="export --workdir to the GGUF file --output")
    p.add_argument("--workdir", required=True, help="the maxlm workdir to write (import) or read (export)")
    p.add_argument("--output", default=None, help="export: the Hugging Face directory (or GGUF file) to write")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16", "f32", "f16", "bf16", "q8_0"),
                   help="export: tensor dtype, float32|bfloat16|float16 (--to-hf), f32|f16|bf16|q8_0 (--to-gguf) "
                        "(default: the imported model's, else float32)")
    p.add_argument("--model-type", "--model_type", dest="model_type", default=None,
                   choices=("llama", "mistral", "qwen2", "mixtral"), help="export: HF family (default: inferred)")
    p.add_argument("--step", type=int, default=None, help="export: checkpoint step (default: newest)")
    p.add_argument("--format", default=None, choices=("gptq",),
                   help="--to-hf of a `maxlm quantize` workdir: write its projections as GPTQ tensors (qweight, "
                        "qzeros, scales, g_idx) for transformers / vLLM (default: dequantized float tensors)")
  if command == "plan":
    from maxlm.hardware import DEVICE_MEMORY_GIB  # noqa: PLC0415  (light: no jax import)
    p.add_argument("--num-devices", "--num_devices", dest="num_devices", type=int, default=None,
                   help="devices to plan for (default: the mesh's product, or the devices present if an axis is -1)")
    p.add_argument("--device-memory-gib", "--device_memory_gib", dest="device_memory_gib", type=float, default=None,
                   help="memory per device in GiB (wins over --device)")
    p.add_argument("--device", default=None, choices=tuple(DEVICE_MEMORY_GIB),
                   help="device kind, for its memory: " + ", ".join(f"{k} {v:g}" for k, v in DEVICE_MEMORY_GIB.items())
                   + " GiB (default: the local device's memory_stats(), else host RAM / devices)")
    p.add_argument("--json", default=None, help="also write the plan's numbers to this JSON file")
  if command in ("serve", "generate"):
    p.add_argument("--workdir", required=True, help="the trained (or imported) workdir to serve")
    p.add_argument("--draft-workdir", "--draft_workdir", dest="draft_workdir", default=None,
                   help="a smaller model with the same tokenizer, for speculative decoding")
  if command == "generate":
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text to complete (encoded as the model's tokenizer does)")
    what.add_argument("--chat", metavar="QUESTION",
                      help="ask the model a question through its chat template; prints only the answer")
    p.add_argument("--system", default=None, metavar="TEXT", help="--chat: a system message before the question")
    p.add_argument("--max-tokens", "--max_tokens", dest="max_tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  if command == "serve":
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
  if command == "eval":
    p.add_argument("--workdir", required=True, help="the trained (or imported) workdir whose model is scored")
    p.add_argument("--data", nargs="+", default=[], metavar="[NAME=]PATH",
                   help="text files (one document each), JSONL (one per line), dirs or globs; each argument is a "
                        "source of the report")
    p.add_argument("--text-field", "--text_field", dest="text_field", default="text", help="JSONL text field")
    p.add_argument("--tokenized", default=None, help="a `maxlm tokenize` output directory: every source's --split")
    p.add_argument("--split", default="eval", help="split of --tokenized (default: eval)")
    p.add_argument("--seq-len", "--seq_len", dest="seq_len", type=int, default=None,
                   help="input tokens per window (default and maximum: the model's max_seq_len)")
    p.add_argument("--stride", type=int, default=None,
                   help="targets scored per window after a document's first (default: --seq-len); smaller gives "
                        "each token more context, seq_len - stride + 1 tokens at least")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None,
                   help="windows per batch (default: 8, rounded up to a multiple of the batch-parallel devices)")
    p.add_argument("--tasks", nargs="+", default=[], metavar="TASK",
                   help="evaluation tasks: YAML / JSON task descriptions (multiple_choice, generate, perplexity) or "
                        "directories of them (see docs/evaluation.md); instead of --data / --tokenized")
    p.add_argument("--num-fewshot", "--num_fewshot", dest="num_fewshot", type=int, default=0,
                   help="--tasks: solved examples before each prompt, drawn from the task's fewshot_data")
    p.add_argument("--chat-template", "--chat_template", dest="chat_template", action="store_true",
                   help="--tasks: render each prompt as a user turn of the model's chat template")
    p.add_argument("--seed", type=int, default=1234, help="--tasks: seed of the few-shot draws")
    p.add_argument("--limit", type=int, default=None, help="at most N documents per source (N records per task)")
    p.add_argument("--output", default=None,
                   help="also write the report as JSON (per-source or per-task metrics, per-sample records with "
                        "--tasks, the machine); --tasks also writes a bar chart beside it (.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
  if command == "train":
    p.add_argument("--workdir", default=None, help="checkpoints, metrics and plots (default: runs/<config>)")
    p.add_argument("--dry_run", "--dry-run", action="store_true",
                   help="build the model abstractly, print its size, and exit")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one `maxlm` command; returns its exit status. A missing optional dependency is a one-line message."""
  try:
    return _main(argv)
  except MissingExtra as e:
    command = (list(sys.argv[1:] if argv is None else argv) or ["?"])[0]
    print(f"maxlm {command}: {e}", file=sys.stderr)
    return 1


def _main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv:
    print(USAGE, file=sys.stderr)
    return 2
  if argv[0] in ("-h", "--help", "help"):
    print(USAGE)
    return 0
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS:
    print(f"maxlm: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2
  try:
    overrides, rest = _split_overrides(rest)
    if command in ("quantize", "prune"):  # its own arguments (maxlm.compress.command)
      from maxlm.compress import command as compress_command  # noqa: PLC0415

      args = compress_command.parser(command).parse_args(rest)
      _apply_host(_workdir_config(args.workdir, overrides))
      return compress_command.run(command, args, overrides)
    args = _parser(command).parse_args(rest)
    refused = _refused_config(command, args, overrides)
    if refused:
      print(f"maxlm {command}: {refused}", file=sys.stderr)
      return 2
    if command == "convert":
      return _convert(args, overrides)
    if command in ("serve", "generate", "eval"):
      _apply_host(_workdir_config(args.workdir, overrides))
    if command == "serve":
      return _serve(args, overrides)
    if command == "generate":
      return _generate(args, overrides)
    if command == "eval":
      return _eval(args, overrides)
    config = args.config
    workdir = getattr(args, "workdir", None)  # only `train` has one
    if config is None and workdir and (Path(workdir) / "config.json").is_file():
      config = str(Path(workdir) / "config.json")  # continue (or fine-tune) the run in --workdir with its own config
    cfg = load_config(config, overrides)
  except ConfigError as e:
    print(f"maxlm {command}: config error: {e}", file=sys.stderr)
    return 2

  if command == "config":
    print(to_json(cfg))
    return 0
  if command == "plan":
    return _plan(cfg, args)
  if command == "curate":
    return _curate(cfg, args)
  if command == "tokenize":
    return _tokenize(cfg, args)

  _apply_host(cfg)
  from maxlm.train import loop  # heavy imports only once the config is known to be good
  if args.dry_run:
    loop.dry_run(cfg)
    return 0
  workdir = args.workdir or f"runs/{Path(args.config or 'tiny').stem}"
  try:
    result = loop.train(cfg, workdir)
  except loop.DataError as e:
    print(f"maxlm train: data error: {e}", file=sys.stderr)
    return 1
  except (ConfigError, loop.TrainingDiverged, loop.NoReadableCheckpoint) as e:
    print(f"maxlm train: {e}", file=sys.stderr)
    return 1
  import jax  # noqa: PLC0415  (already loaded by the training loop)
  if jax.process_index() == 0:  # one report per job, not one per host
    summary = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
    sample = ", sample.txt" if cfg.train.sample_tokens and jax.process_count() == 1 else ""
    print(f"done: {summary}\noutputs in {workdir}: metrics.jsonl, loss.png, tensorboard/, checkpoints/{sample}")
  return 0


def _refused_config(command: str, args: argparse.Namespace, overrides: list[str]) -> str | None:
  """Why the config arguments given cannot be honoured by `command` (they would be ignored), or None."""
  if command in _SAVED_CONFIG and args.config is not None:
    if command == "convert":
      source = ("the Hugging Face config.json (--from-hf; override single keys with "
                "--config.<section>.<key>=<value>) or WORKDIR/config.json (--to-hf)")
    else:
      source = ("WORKDIR/config.json, the config the model was trained with (override single keys with "
                "--config.<section>.<key>=<value>, e.g. --config.serve.max_batch=16)")
    return f"--config={args.config} is not accepted: the config comes from {source}"
  if command == "convert" and (args.to_hf or args.to_gguf or args.merge_lora or args.to_peft or args.from_peft) \
      and overrides:
    flag = ("--to-hf" if args.to_hf else "--to-gguf" if args.to_gguf else "--merge-lora" if args.merge_lora
            else "--to-peft" if args.to_peft else "--from-peft")
    return f"{flag} writes the workdir's model as saved; {overrides[0]} would be ignored"
  return None


def _print_import(source: str, workdir: str, cfg, detail: str) -> None:
  """The one-line summary of an import (--from-hf / --from-gguf) and how to fine-tune it."""
  m = cfg.model
  print(f"imported {source} -> {workdir}: {m.num_layers} layers, d_model {m.d_model}, vocab {m.vocab_size}{detail}; "
        f"tokenizer {cfg.data.tokenizer or 'none'}\nfine-tune: maxlm train --workdir {workdir}")


def _convert(args: argparse.Namespace, overrides: list[str]) -> int:
  """maxlm convert: --from-hf / --from-gguf (import into a workdir) or --to-hf / --to-gguf (export a workdir)."""
  modes = (args.from_hf, args.to_hf, args.from_gguf, args.to_gguf, args.merge_lora, args.to_peft, args.from_peft)
  if sum(map(bool, modes)) != 1:
    print("maxlm convert: give exactly one of --from-hf HF_DIR, --from-gguf FILE, --from-peft DIR, --to-hf, "
          "--to-gguf, --to-peft or --merge-lora", file=sys.stderr)
    return 2
  if args.from_peft and not args.base:
    print("maxlm convert --from-peft: --base WORKDIR (the adapter's base model, a maxlm workdir) is required",
          file=sys.stderr)
    return 2
  export = ("--to-hf" if args.to_hf else "--to-gguf" if args.to_gguf else "--merge-lora" if args.merge_lora
            else "--to-peft" if args.to_peft else None)
  if export and not args.output:
    what = {"--to-hf": "HF_DIR", "--to-gguf": "FILE.gguf", "--merge-lora": "WORKDIR", "--to-peft": "DIR"}[export]
    print(f"maxlm convert {export}: --output {what} is required", file=sys.stderr)
    return 2
  if args.format and export != "--to-hf":
    print(f"maxlm convert: --format {args.format} goes with --to-hf", file=sys.stderr)
    return 2
  allowed = {"--to-hf": ("float32", "bfloat16", "float16"), "--to-gguf": ("f32", "f16", "bf16", "q8_0")}
  if args.dtype and args.dtype not in allowed.get(export, ()):
    print(f"maxlm convert: --dtype {args.dtype} needs " + (
      f"one of {', '.join(allowed[export])} with {export}" if export else "--to-hf or --to-gguf"), file=sys.stderr)
    return 2
  from maxlm.convert import (  # heavy imports only once the arguments are known to be good
    gguf,
    hf,
  )
  try:
    if args.from_gguf:
      cfg = gguf.convert_from_gguf(args.from_gguf, args.workdir, overrides)
      _print_import(args.from_gguf, args.workdir, cfg, " (weights dequantized to float32)")
    elif args.to_gguf:
      out = gguf.convert_to_gguf(args.workdir, args.output, dtype=args.dtype, step=args.step)
      print(f"exported {args.workdir} -> {out} (run it with llama.cpp: llama-cli -m {out})")
    elif args.to_peft:
      from maxlm.convert.peft import export_peft

      out, n = export_peft(args.workdir, args.output, step=args.step)
      print(f"exported {n} adapted projections of {args.workdir} -> {out} (load with "
            "peft.PeftModel.from_pretrained(model, DIR) on the base's transformers model)")
    elif args.from_peft:
      from maxlm.convert.peft import import_peft

      kinds, layers = import_peft(args.from_peft, args.base, args.workdir)
      print(f"imported {args.from_peft} ({kinds} kinds of projection over {layers} layers) onto {args.base} -> "
            f"{args.workdir} (generate, serve, eval, merge or train it like any adapter workdir)")
    elif args.merge_lora:
      from maxlm.convert.lora_merge import merge_lora_workdir

      paths, base_quant = merge_lora_workdir(args.workdir, args.output, step=args.step)
      into = "" if base_quant == "none" else f" (into the dequantized {base_quant} base: the adapted model exactly)"
      print(f"merged {len(paths)} adapted weights of {args.workdir}{into} -> {args.output} (serve, evaluate or "
            f"export it like any workdir)")
    elif args.from_hf:
      cfg = hf.convert_from_hf(args.from_hf, args.workdir, overrides)
      experts = cfg.model.num_experts
      _print_import(args.from_hf, args.workdir, cfg, f", {experts} experts" if experts else "")
    else:
      out = hf.convert_to_hf(args.workdir, args.output, dtype=args.dtype, model_type=args.model_type,
                             step=args.step, fmt=args.format)
      print(f"exported {args.workdir} -> {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
  except (ConfigError, ValueError, OSError) as e:  # UnsupportedModelError is a ValueError
    print(f"maxlm convert: {e}", file=sys.stderr)
    return 1
  return 0


def _workdir_config(workdir: str, overrides: list[str]):
  """The workdir's config with overrides, or None where it does not load (the command's loader then says why)."""
  try:
    return load_config(str(Path(workdir) / "config.json"), overrides)
  except ConfigError:
    return None


def _apply_host(cfg) -> None:
  """Applies the config's host.* knobs (CPU hosts: malloc tuning, XLA flags) before jax loads; a workdir that
  does not load yet gets the defaults (its loader reports the problem)."""
  from maxlm import host  # noqa: PLC0415
  host.apply(cfg if cfg is not None else load_config("base"))


def _serve(args: argparse.Namespace, overrides: list[str]) -> int:
  """maxlm serve: loads --workdir into the engine and serves it over HTTP until interrupted."""
  require("serve", "fastapi")  # MissingExtra (the pip extra to install) before any model is loaded
  require("serve", "uvicorn")
  from maxlm.serve import server  # noqa: PLC0415  (jax and the model load only once the arguments are good)
  try:
    server.serve(args.workdir, draft_workdir=args.draft_workdir, host=args.host, port=args.port,
                 overrides=tuple(overrides))
  except (ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError
    print(f"maxlm serve: {e}", file=sys.stderr)
    return 1
  return 0


def _chat_engine(args: argparse.Namespace, overrides: list[str]) -> tuple:
  """(engine, prompt ids) for --chat: the question rendered by the workdir's chat template with a generation prompt
  (checked before any weights load), and an engine that stops at the template's end-of-turn token."""
  from data_pipelines.chat_template import chat_messages, chat_prompt_ids, end_of_turn_id, template_of  # noqa: PLC0415
  from maxlm.serve.engine import Engine  # noqa: PLC0415
  from maxlm.serve.loading import load_served  # noqa: PLC0415
  from maxlm.workdir import load_workdir_config, load_workdir_tokenizer  # noqa: PLC0415
  tokenizer = load_workdir_tokenizer(args.workdir, load_workdir_config(args.workdir, tuple(overrides)))
  template = template_of(tokenizer)
  ids = chat_prompt_ids(tokenizer, template, chat_messages(args.chat, args.system))
  stop = end_of_turn_id(tokenizer, template)
  served = load_served(args.workdir, tuple(overrides), args.draft_workdir)
  tokenizer = served.tokenizer if stop in (None, served.tokenizer.eos_id) else served.tokenizer.with_eos(stop)
  return Engine(served.model, served.cfg, tokenizer, draft=served.draft, mesh=served.mesh), ids


def _generate(args: argparse.Namespace, overrides: list[str]) -> int:
  """maxlm generate: streams the engine's completion of --prompt (or its answer to --chat) to stdout."""
  from data_pipelines.tokenizer import encode_prompt  # noqa: PLC0415
  from maxlm.serve.engine import Engine  # noqa: PLC0415
  from maxlm.serve.request import Request, RequestError, SamplingParams  # noqa: PLC0415
  if args.system is not None and args.chat is None:
    print("maxlm generate: --system is the system message of a --chat question; give --chat too", file=sys.stderr)
    return 2
  try:
    if args.chat is not None:
      engine, ids = _chat_engine(args, overrides)
    else:
      engine = Engine.from_workdir(args.workdir, tuple(overrides), draft_workdir=args.draft_workdir)
      ids = encode_prompt(engine.tokenizer, args.prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    engine.add_request(Request("cli", ids, params))
  except RequestError as e:
    field = "chat" if e.field == "prompt" and args.chat is not None else e.field.replace("_", "-")
    print(f"maxlm generate: --{field}: {e}", file=sys.stderr)
    return 1
  except (ValueError, FileNotFoundError) as e:  # ConfigError and ChatTemplateError are ValueErrors
    print(f"maxlm generate: {e}", file=sys.stderr)
    return 1
  if args.chat is None:
    print(args.prompt, end="", flush=True)
  while engine.has_work():
    for out in engine.step():
      print(out.text, end="", flush=True)
  print()
  stats = engine.stats()
  if engine.spec_k:
    rate = stats["spec_accepted_total"] / max(1, stats["spec_proposed_total"])
    print(f"[speculative: {rate:.0%} of {stats['spec_proposed_total']} draft tokens accepted]", file=sys.stderr)
  return 0


def _eval(args: argparse.Namespace, overrides: list[str]) -> int:
  """maxlm eval: perplexity and bits per byte of the workdir's model; a table on stdout, JSON with --output."""
  import json  # noqa: PLC0415

  from maxlm.eval import perplexity  # noqa: PLC0415
  for flag in ("seq_len", "stride", "batch_size", "limit"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      print(f"maxlm eval: --{flag.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
      return 2
  if args.split != "eval" and not args.tokenized:
    print("maxlm eval: --split applies to --tokenized DIR only", file=sys.stderr)
    return 2
  if args.tasks:
    return _eval_tasks(args, overrides)
  if args.num_fewshot or args.chat_template:
    print("maxlm eval: --num-fewshot and --chat-template apply to --tasks only", file=sys.stderr)
    return 2
  try:
    report = perplexity.run(args.workdir, data=args.data, tokenized=args.tokenized, split=args.split,
                            seq_len=args.seq_len, stride=args.stride, batch_size=args.batch_size,
                            text_field=args.text_field, limit=args.limit, overrides=tuple(overrides),
                            progress=not args.quiet)
  except perplexity.FlagError as e:
    print(f"maxlm eval: {e}", file=sys.stderr)
    return 2
  except (ValueError, FileNotFoundError) as e:  # EvalError, ConfigError, ManifestError, BadRecordError
    print(f"maxlm eval: {e}", file=sys.stderr)
    return 1
  print(perplexity.format_table(report))
  print(f"{report['workdir']} step {report['step']}: windows of {report['seq_len']} tokens, stride {report['stride']}; "
        f"{report['total']['tokens']:,} tokens in {report['seconds']:.1f}s ({report['tokens_per_sec']:,.0f} tokens/s)")
  if args.output:
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
  return 0


def _eval_tasks(args: argparse.Namespace, overrides: list[str]) -> int:
  """maxlm eval --tasks: task metrics with standard errors; a table on stdout, JSON + PNG with --output."""
  from maxlm.eval import task_report  # noqa: PLC0415
  if args.data or args.tokenized or args.stride is not None:
    print("maxlm eval: --tasks runs task files; give --data / --tokenized / --stride in a separate run (or as a "
          "perplexity task)", file=sys.stderr)
    return 2
  try:
    report = task_report.run(args.workdir, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                             chat=args.chat_template, seed=args.seed, batch_size=args.batch_size,
                             seq_len=args.seq_len, overrides=tuple(overrides), progress=not args.quiet)
  except (ValueError, FileNotFoundError) as e:  # TaskError, ConfigError, ChatTemplateError, RequestError
    print(f"maxlm eval: {e}", file=sys.stderr)
    return 1
  print(task_report.format_table(report))
  print(f"{report['workdir']} step {report['step']}: {len(report['tasks'])} tasks in {report['seconds']:.1f}s")
  if args.output:
    for path in task_report.write(report, args.output):
      print(f"wrote {path}")
  return 0


def _curate(cfg, args: argparse.Namespace) -> int:
  import logging  # noqa: PLC0415

  from data_pipelines.curate.pipeline import curate  # noqa: PLC0415
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  try:
    stats = curate(args.inputs, args.output, cfg.curate, progress=not args.quiet)
  except (ValueError, FileNotFoundError) as e:
    print(f"maxlm curate: {e}", file=sys.stderr)
    return 2
  read = stats["stages"].get("read", {})
  docs_in = (read.get("in") or {}).get("documents", 0)
  kept = sum(v["documents"] for v in stats["languages"].values())
  drops = ", ".join(f"{stage}: {sum(v['dropped'].values())}" for stage, v in stats["stages"].items() if v["dropped"])
  print(f"curated {docs_in} records -> {kept} documents in {stats.get('shards', 0)} shard(s) in {args.output} "
        f"(dropped {drops or 'none'}); see stats.json and stats.png")
  return 0


def _tokenize(cfg, args: argparse.Namespace) -> int:
  import logging  # noqa: PLC0415

  from data_pipelines.tokenized import tokenize  # noqa: PLC0415
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  try:
    manifest = tokenize(args.inputs, args.output, cfg.tokenize, vocab_size=cfg.model.vocab_size,
                        progress=not args.quiet)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"maxlm tokenize: {e}", file=sys.stderr)
    return 2
  for name, entry in manifest["sources"].items():
    train, eval_ = entry["splits"]["train"], entry["splits"]["eval"]
    skipped = sum(entry["skipped"].values())
    print(f"{name}: {train['documents']:,} train documents / {train['tokens']:,} tokens in {len(train['shards'])} "
          f"shard(s), {eval_['documents']:,} eval documents / {eval_['tokens']:,} tokens"
          f"{f', {skipped} bad records skipped' if skipped else ''}")
  names = ",".join(f"{n}=1" for n in manifest["sources"])
  print(f"wrote {args.output}/manifest.json (tokenizer vocab {manifest['tokenizer']['vocab_size']}); train with "
        f"--config.data.tokenized={args.output} --config.data.mixture={names}")
  return 0


def _plan(cfg, args: argparse.Namespace) -> int:
  """maxlm plan: print the per-device memory table; exit 1 if the layout cannot shard, 3 if it does not fit."""
  import json  # noqa: PLC0415

  from maxlm import plan as plan_lib  # noqa: PLC0415  (jax loads only once the config is known to be good)
  mem = None if args.device_memory_gib is None else int(args.device_memory_gib * 2**30)
  try:
    result = plan_lib.plan(cfg, num_devices=args.num_devices, device_memory_bytes=mem, device=args.device)
  except ConfigError as e:
    print(f"maxlm plan: {e}", file=sys.stderr)
    return 1
  print(plan_lib.format_plan(result))
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
  return 0 if result["fits"] else 3


if __name__ == "__main__":
  sys.exit(main())
