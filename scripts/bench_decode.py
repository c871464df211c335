"""Serving benchmark: the maxlm engine against Hugging Face generate, speculative decoding, KV waste, quantization.

1. vs Hugging Face: one random-init model (4 layers, d_model 256, 4 / 2 heads, SwiGLU 768, vocab 512, float32 on
   CPU) exported with the same weights to `transformers.LlamaForCausalLM`; greedy generation of --new-tokens from
   --prompt-len-token prompts at batch 1 and 8: tokens/s of HF `generate` (KV cache, inference mode, sdpa) and of
   the engine (serve.max_batch = batch), their ratio, and how many greedy sequences agree token for token.
   HF is timed at each --torch-threads count and the fastest is the baseline.
2. Speculative decoding on a trained tiny target with a distilled 1-layer draft (trained here unless given):
   batch-1 greedy tokens/s of the target alone and with the draft at each speculative_k, acceptance rate, a check
   that the outputs are identical, and a round's cost against a plain step's (the speed-up if all were accepted).
3. KV memory waste under mixed request lengths (paged at two page sizes, contiguous): 1 - tokens held / token
   slots reserved, sampled after every engine step.
4. Quantization of the trained target (weights none / bf16 / int8 / int4, KV cache int8): weight and KV bytes,
   held-out perplexity through the engine's cached forward (teacher forcing), and decode tokens/s.

Every engine configuration runs its timed workload --warmup times untimed first (compiles are per shape, and
the second run still compiles once); HF is warmed up the same way. Timed runs alternate between the compared
sides and the report is the median.

The sections live in scripts/decode_bench/ (one module each); this script parses the flags, runs them and writes
the report.

Run:  MAXLM_CACHE=... python scripts/bench_decode.py      (smoke run: --quick; reuse trained models with
      --target-workdir / --draft-workdir; otherwise they are trained into --workdir)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# bench_host: light; must run before jax is imported
from bench_host import cpu_model, machine, parse_sections, tune_malloc, write_results  # noqa: E402

MALLOC_TUNED = tune_malloc()

import jax  # noqa: E402
import torch  # noqa: E402
from decode_bench.common import HF_SHAPE, KV_SHAPE, QUANT, TARGETS, progress  # noqa: E402
from decode_bench.kv_waste import section_kv  # noqa: E402
from decode_bench.quantization import section_quant  # noqa: E402
from decode_bench.report import plot, tables, verdicts  # noqa: E402
from decode_bench.speculative import section_spec  # noqa: E402
from decode_bench.trained import trained_models  # noqa: E402
from decode_bench.vs_hf import section_hf  # noqa: E402

SECTIONS = ("hf", "spec", "kv", "quant")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line options."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="small sizes and short training, for a smoke run")
  p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
  p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (sections 1, 2, 4)")
  p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated per prompt (sections 1, 2)")
  p.add_argument("--hf-batches", default="1,8", help="batch sizes of the Hugging Face comparison")
  p.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (median)")
  p.add_argument("--warmup", type=int, default=2,
                 help="untimed runs of each workload first (the engine's second run still compiles: the prefill "
                      "program is retraced for the cache the decode step hands back)")
  p.add_argument("--spec-k", default="2,4,6,8", help="speculative_k values to time")
  p.add_argument("--spec-prompts", type=int, default=4, help="prompts (run one at a time) of the speculative section")
  p.add_argument("--workdir", default="runs/bench_decode", help="where the target and draft are trained if needed")
  p.add_argument("--target-workdir", default="", help="a trained target (default: train WORKDIR/target)")
  p.add_argument("--draft-workdir", default="", help="a draft distilled from the target (default: WORKDIR/draft)")
  p.add_argument("--target-steps", type=int, default=300, help="training steps of a target trained here")
  p.add_argument("--draft-steps", type=int, default=1000, help="training steps of a draft trained here")
  p.add_argument("--kv-requests", type=int, default=32, help="requests of the KV-waste workload")
  p.add_argument("--kv-max-len", type=int, default=1024, help="serve.max_len of the KV-waste workload")
  p.add_argument("--kv-longest", type=int, default=900, help="request lengths (prompt + completion) are U[16, this]")
  p.add_argument("--kv-page-sizes", default="16,8", help="paged layouts' page sizes (contiguous is always run)")
  p.add_argument("--eval-rows", type=int, default=16, help="held-out rows of --eval-len tokens for perplexity")
  p.add_argument("--eval-len", type=int, default=256)
  p.add_argument("--quant-new-tokens", type=int, default=64, help="tokens per prompt of the quantized decode timing")
  p.add_argument("--quant", default=",".join(f"{w}/{k}" for w, k in QUANT),
                 help="comma-separated weights/kv_cache settings of the quantization section")
  p.add_argument("--torch-threads", default="1,2",
                 help="comma-separated torch intra-op thread counts HF is timed at; the fastest is the baseline (on a "
                      "shared 2-core machine 2 OpenMP threads can be 10x slower than 1)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="JSON path (default bench_results/bench_decode[_quick].json)")
  p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write a PNG next to the JSON")
  args = p.parse_args(argv)
  if args.quick:
    args.new_tokens, args.repeats, args.spec_k, args.spec_prompts = 32, 1, "2", 2
    args.target_steps, args.draft_steps = min(args.target_steps, 20), min(args.draft_steps, 20)
    args.kv_requests, args.kv_max_len, args.kv_longest, args.kv_page_sizes = 8, 256, 200, "16"
    args.eval_rows, args.eval_len, args.quant_new_tokens, args.quant = 4, 64, 16, "none/auto,int8/auto,none/int8"
    if args.workdir == "runs/bench_decode":
      args.workdir = "runs/bench_decode_quick"
  args.out = args.out or f"bench_results/bench_decode{'_quick' if args.quick else ''}.json"
  args.sections = parse_sections(p, args.sections, SECTIONS)
  args.quant = [tuple(q.strip().split("/")) for q in args.quant.split(",") if q.strip()]
  args.torch_threads = [int(t) for t in args.torch_threads.split(",") if t.strip()]
  if not args.quant or args.quant[0] != ("none", "auto") or any(len(q) != 2 for q in args.quant):
    p.error("--quant: weights/kv_cache pairs, starting with none/auto (the baseline)")
  return args


def main(argv: list[str] | None = None) -> None:
  """Runs the sections, prints the tables, writes the JSON (and the PNG)."""
  t_start = time.perf_counter()
  args = parse_args(argv)
  progress(f"{cpu_model()}; jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} (threads "
           f"{','.join(map(str, args.torch_threads))}), {os.cpu_count()} CPUs; sections {','.join(args.sections)}; "
           f"malloc tuning {'on' if MALLOC_TUNED else 'off'}")
  res: dict = {}
  if "hf" in args.sections:
    res["hf"] = section_hf(args)
  info = None
  if "spec" in args.sections or "quant" in args.sections:
    info = trained_models(args, need_draft="spec" in args.sections)
  if "spec" in args.sections:
    res["spec"] = section_spec(args, info)
  if "kv" in args.sections:
    res["kv"] = section_kv(args)
  if "quant" in args.sections:
    res["quant"] = section_quant(args, info)
  runtime = time.perf_counter() - t_start
  res["meta"] = {
    "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    "quick": args.quick, "sections": args.sections, "hf_shape": HF_SHAPE, "kv_shape": KV_SHAPE, "dtype": "float32",
    "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
    "kv_longest": args.kv_longest, "targets": TARGETS, "jax": jax.__version__, "torch": torch.__version__,
    "torch_threads": args.torch_threads, "cpu_count": os.cpu_count(), "machine": platform.machine(),
    "cpu_model": cpu_model(),
    "malloc_tuning": MALLOC_TUNED, "runtime_s": runtime,
    "timing": "median wall time of --repeats runs of the whole workload (prefill included) after --warmup "
              "untimed runs", "warmup_runs": args.warmup,
  }
  if info is not None:
    res["meta"].update(target_workdir=info["target"], target_step=info["target_step"], train_s=info["train_s"],
                       draft_workdir=info.get("draft"), draft_step=info.get("draft_step"),
                       draft_model={k: info["draft_cfg"].model[k] for k in ("num_layers", "d_model", "num_heads",
                                                                           "num_kv_heads", "mlp_dim")}
                       if "draft_cfg" in info else None)
  res["machine"] = machine(MALLOC_TUNED)
  res["verdicts"] = verdicts(res)
  print("\n" + tables(res) + "\n")
  for name, v in res["verdicts"].items():
    comparison = "<" if name.startswith("paged_waste") else ">="
    print(f"{name}: {v['value']:.4g} (target {comparison} {v['target']}): {'meets' if v['met'] else 'MISSES'}")
  print(f"total runtime {runtime:.0f}s")
  write_results(res, args.out, (lambda png: plot(res, png)) if args.plot else None)


if __name__ == "__main__":
  main()
