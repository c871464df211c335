"""Quality and speed on real weights: SmolLM2-135M and Qwen2.5-Coder 0.5B / 1.5B GGUF files, against transformers
and llama.cpp.

Sections (--sections, default all; each replaces only its own part of an existing --out JSON):
  ppl     perplexity and bits per byte of held-out English text (the Python documentation topics shipped with
          CPython) under maxlm and transformers on identical token arrays; target: equal within 0.1%.
  decode  greedy tokens/s at batch 1 and 8: maxlm (float32 and int8 weights) against transformers `generate`
          (float32) and llama.cpp (the file's own Q4 blocks); the bytes each reads per step against the measured
          memory bandwidth (where the time goes); target: maxlm float32 >= 3x transformers at batch 1.
  spec    speculative decoding, Qwen-0.5B drafting for Qwen-1.5B (per target/draft weight setting and k): output
          identical to the target alone, acceptance rate, speed-up over the plain target; target >= 1.5x.
  quant   perplexity change and bytes of int8 / int4 (round to nearest) weights and an int8 KV cache.
  memory  peak host memory (RSS) of `maxlm convert --from-gguf` of Qwen-1.5B, against the model's sizes and
          transformers' own GGUF load.

Models come from scripts/fetch_models.py (fetch_gguf / fetch_workdir; --gguf KEY=PATH uses a local file). maxlm
and transformers run the dequantized float32 weights; llama.cpp is optional (llama-cpp-python built from source).
Timings alternate between the compared sides after warm-up runs; the report is the median.

Run:  python scripts/bench_real.py                                 (every section at default sizes)
      python scripts/bench_real.py --sections decode --max-tokens 64  (one section, merged into --out)
      python scripts/bench_real.py --quick --out /tmp/real_quick.json (smoke run: tiny sizes, SmolLM2 only)
GGUF files and converted workdirs are cached by scripts/fetch_models.py ($MAXLM_MODELS, default
~/.cache/maxlm/models), transformers' float32 copies in $MAXLM_MODELS/real_bench. Host memory: ~13 GB for spec and
memory (a 1.5B model in float32), ~7 GB otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_host import machine as host_machine  # noqa: E402
from bench_host import parse_sections, tune_malloc, write_results  # noqa: E402  (light; before jax)

MALLOC_TUNED = tune_malloc()

import jax  # noqa: E402
import torch  # noqa: E402
from decode_bench.common import progress  # noqa: E402
from fetch_models import models_root  # noqa: E402
from real_bench import models  # noqa: E402
from real_bench.report import plot, tables, verdicts  # noqa: E402

SECTIONS = ("ppl", "decode", "spec", "quant", "memory")
QUANT = "none/auto,int8/auto,int4/auto,none/int8,int8/int8"
FULL = {"models": "smollm2-135m,qwen2.5-coder-0.5b", "spec_target": "qwen2.5-coder-1.5b",
        "spec_draft": "qwen2.5-coder-0.5b", "memory_model": "qwen2.5-coder-1.5b"}
QUICK = {"models": "smollm2-135m", "spec_target": "smollm2-135m", "spec_draft": "smollm2-135m",
         "memory_model": "smollm2-135m"}


def _csv(value: str) -> list[str]:
  return [v.strip() for v in value.split(",") if v.strip()]


def _ints(p: argparse.ArgumentParser, flag: str, value: str) -> list[int]:
  try:
    out = [int(v) for v in _csv(value)]
  except ValueError:
    p.error(f"{flag} {value!r}: expected comma-separated integers")
  if not out or any(v < 1 for v in out):
    p.error(f"{flag} {value!r}: expected positive integers")
  return out


def _pairs(p: argparse.ArgumentParser, flag: str, value: str, left: tuple[str, ...], right: tuple[str, ...]):
  out = []
  for item in _csv(value):
    a, sep, b = item.partition("/")
    if not sep or a not in left or b not in right:
      p.error(f"{flag} {item!r}: expected A/B with A in {left} and B in {right}")
    out.append((a, b))
  if not out:
    p.error(f"{flag}: empty")
  return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line options (a bad value is a usage error naming the flag)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
  p.add_argument("--quick", action="store_true", help="tiny sizes, SmolLM2 only (its own draft in spec): checks that "
                 "every section runs")
  p.add_argument("--models", default=None, help="models of the ppl, decode and quant sections (default "
                 f"{FULL['models']}; known: {', '.join(models.MODELS)})")
  p.add_argument("--gguf", action="append", default=[], metavar="KEY=PATH",
                 help="use this GGUF file for KEY instead of fetching it (repeatable)")
  p.add_argument("--cache-dir", default="", help="transformers' copies of the models and converted --gguf files "
                 "(default $MAXLM_MODELS/real_bench, beside fetch_models.py's cache)")
  p.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored per model (ppl)")
  p.add_argument("--seq-len", type=int, default=512, help="scoring window (ppl, quant)")
  p.add_argument("--ppl-batch", type=int, default=2, help="windows per forward (ppl)")
  p.add_argument("--max-tokens", type=int, default=128, help="greedy tokens generated per prompt (decode)")
  p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (decode, spec)")
  p.add_argument("--batches", default="1,8", help="decode batch sizes")
  p.add_argument("--decode-weights", default="none,int8", help="maxlm weight settings timed in decode")
  p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median)")
  p.add_argument("--warmup", type=int, default=2, help="untimed runs of each workload first (compilation)")
  p.add_argument("--torch-threads", default="", help="torch thread counts to time transformers at; the fastest "
                 "is the baseline (default: the cores)")
  p.add_argument("--llama-threads", default="", help="llama.cpp thread counts to time; the fastest is reported "
                 "(default: the cores)")
  p.add_argument("--spec-target", default=None, help=f"default {FULL['spec_target']}")
  p.add_argument("--spec-draft", default=None, help=f"default {FULL['spec_draft']}")
  p.add_argument("--spec-k", default="2,4", help="speculative_k values")
  p.add_argument("--spec-weights", default="none/none,none/int8,int8/int8",
                 help="target/draft weight settings; each is compared with the plain target at its weights")
  p.add_argument("--spec-prompts", type=int, default=2, help="prompts, run one at a time (batch 1; chat: at most 4)")
  p.add_argument("--spec-text", choices=("prose", "chat"), default="chat",
                 help="spec prompts: held-out prose continued, or coding requests in the chat template")
  p.add_argument("--spec-max-tokens", type=int, default=128, help="greedy tokens generated per prompt (spec)")
  p.add_argument("--quant", default=QUANT, help="weights/kv_cache settings, the first none/auto (the baseline)")
  p.add_argument("--quant-tokens", type=int, default=4096, help="held-out tokens scored per setting (quant)")
  p.add_argument("--memory-model", default=None, help=f"default {FULL['memory_model']}")
  p.add_argument("--memory-baseline", action=argparse.BooleanOptionalAction, default=True,
                 help="also measure transformers' GGUF load (the baseline)")
  p.add_argument("--out", default="bench_results/bench_real.json", help="JSON (the PNG goes beside it)")
  p.add_argument("--fresh", action="store_true", help="start a new JSON instead of replacing sections in --out")
  p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
  args = p.parse_args(argv)
  if args.quick:
    args.tokens, args.quant_tokens, args.seq_len, args.prompt_len = 512, 512, 128, 16
    args.max_tokens, args.spec_max_tokens = 16, 16
    args.repeats, args.warmup, args.spec_k, args.spec_prompts = 1, 1, "2", 1
    args.spec_weights, args.quant = "none/none", "none/auto,int8/auto,none/int8"
  for key, value in (QUICK if args.quick else FULL).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.sections = parse_sections(p, args.sections, SECTIONS)
  args.models = _csv(args.models)
  for key in [*args.models, args.spec_target, args.spec_draft, args.memory_model]:
    if key not in models.MODELS:
      p.error(f"unknown model {key!r}; known: {', '.join(models.MODELS)}")
  try:
    args.gguf = models.parse_gguf_flags(args.gguf)
  except ValueError as e:
    p.error(str(e))
  for flag in ("tokens", "seq_len", "ppl_batch", "max_tokens", "prompt_len", "repeats", "spec_prompts",
               "spec_max_tokens", "quant_tokens"):
    if getattr(args, flag) < 1:
      p.error(f"--{flag.replace('_', '-')} must be >= 1")
  if args.warmup < 0:
    p.error("--warmup must be >= 0")
  args.batches = _ints(p, "--batches", args.batches)
  args.spec_k = _ints(p, "--spec-k", args.spec_k)
  cores = str(models.threads())
  args.torch_threads = _ints(p, "--torch-threads", args.torch_threads or cores)
  args.llama_threads = _ints(p, "--llama-threads", args.llama_threads or cores)
  weights = ("none", "bf16", "int8", "int4")
  args.decode_weights = _csv(args.decode_weights)
  if not args.decode_weights or any(w not in weights for w in args.decode_weights):
    p.error(f"--decode-weights: expected a subset of {weights}")
  args.spec_weights = _pairs(p, "--spec-weights", args.spec_weights, weights, weights)
  args.quant = _pairs(p, "--quant", args.quant, weights, ("auto", "bf16", "float32", "int8"))
  if args.quant[0] != ("none", "auto"):
    p.error("--quant: the first setting must be none/auto (the float32 baseline the others are compared with)")
  args.ppl_models = args.decode_models = args.quant_models = args.models
  args.cache_dir = Path(args.cache_dir) if args.cache_dir else models_root() / "real_bench"
  return args


def machine() -> dict:
  """Where and with what the numbers were measured: bench_host.machine() plus the threads used and llama.cpp."""
  from real_bench import llamacpp

  have, llama = llamacpp.available()
  return {**host_machine(MALLOC_TUNED), "cores": models.threads(), "platform": platform.platform(),
          "jax_backend": jax.default_backend(), "llama_cpp": llama if have else None,
          "llama_cpp_system": llamacpp.system_info() if have else None,
          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def run_section(name: str, args: argparse.Namespace, get_model) -> dict:
  """Runs one section, returning its result."""
  if name == "ppl":
    from real_bench.perplexity import section_ppl
    return section_ppl(args, get_model)
  if name == "decode":
    from real_bench.decode import section_decode
    return section_decode(args, get_model)
  if name == "spec":
    from real_bench.speculative import section_spec
    return section_spec(args, get_model)
  if name == "quant":
    from real_bench.quantization import section_quant
    return section_quant(args, get_model)
  from real_bench.memory import section_memory
  return section_memory(args, get_model)


def main(argv: list[str] | None = None) -> None:
  """Runs the sections, merges them into --out, prints the tables, writes the JSON and the PNG."""
  args = parse_args(argv)
  out = Path(args.out)
  res: dict = {}
  if out.is_file() and not args.fresh:
    try:
      res = json.loads(out.read_text())
    except (OSError, ValueError) as e:
      raise SystemExit(f"--out {out}: not a readable JSON to merge into ({e}); --fresh starts a new one") from None
    progress(f"merging into {out} (sections there: {', '.join(k for k in SECTIONS if k in res) or 'none'})")
  mach = machine()
  progress(f"{mach['cpu_model']}, {mach['cores']} cores; jax {jax.__version__}, torch {torch.__version__}, "
           f"llama.cpp {mach['llama_cpp'] or 'not installed'}; sections {','.join(args.sections)}")
  prepared: dict[str, models.RealModel] = {}

  def get_model(key: str) -> models.RealModel:
    if key not in prepared:
      prepared[key] = models.prepare(key, args.gguf, args.cache_dir)
    return prepared[key]

  command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
  for name in args.sections:
    t0 = time.perf_counter()
    progress(f"=== section {name} ===")
    res[name] = run_section(name, args, get_model)
    res[name]["meta"] = {"command": command, "runtime_s": time.perf_counter() - t0, "quick": args.quick,
                         "machine": mach, "models": {k: {"gguf": str(m.gguf), "workdir": str(m.workdir),
                                                         "workdir_source": m.workdir_source}
                                                     for k, m in prepared.items()}}
    progress(f"=== section {name}: {res[name]['meta']['runtime_s']:.0f}s ===")
    res["verdicts"] = verdicts(res)
    write_results(res, out)  # after each section: a later failure keeps what finished
  res["machine"] = mach
  res["verdicts"] = verdicts(res)
  print("\n" + tables(res) + "\n")
  for key, v in res["verdicts"].items():
    print(f"{key}: {v['text']}: {'meets' if v['met'] else 'MISSES'}")
  write_results(res, out, (lambda png: plot(res, png)) if args.plot else None)


if __name__ == "__main__":
  main()
