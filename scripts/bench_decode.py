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

Run:  MAXLM_CACHE=... python scripts/bench_decode.py      (smoke run: --quick; reuse trained models with
      --target-workdir / --draft-workdir; otherwise they are trained into --workdir)
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_host import background_cores, cpu_model, cpu_snapshot, parse_sections, tune_malloc, write_results  # noqa: E402  (light; must run before jax is imported)

MALLOC_TUNED = tune_malloc()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from maxlm import sharding  # noqa: E402
from maxlm.config import load_config  # noqa: E402
from maxlm.models.transformer import Transformer  # noqa: E402
from maxlm.serve import kv_cache  # noqa: E402
from maxlm.serve.engine import Engine  # noqa: E402
from maxlm.serve.forward import forward_cached  # noqa: E402
from maxlm.serve.quantize import quantize_model, weight_bytes  # noqa: E402
from maxlm.serve.request import Request, SamplingParams  # noqa: E402
from maxlm.train.step import token_loss_sums  # noqa: E402

TARGETS = {"hf_ratio_batch1": 3.0, "hf_ratio_batch8": 2.0, "spec_speedup": 2.0, "paged_waste": 0.02}
HF_SHAPE = {"num_layers": 4, "d_model": 256, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 768, "vocab_size": 512}
KV_SHAPE = {"num_layers": 2, "d_model": 64, "num_heads": 2, "num_kv_heads": 1, "mlp_dim": 128, "vocab_size": 512}
DRAFT = ["--config.model.num_layers=1", "--config.model.d_model=128", "--config.model.num_heads=2",
         "--config.model.num_kv_heads=1", "--config.model.mlp_dim=384", "--config.model.scan_unroll=1",
         "--config.distill.alpha=1.0", "--config.distill.temperature=1.0"]  # pure KL at T=1: argmax agreement
QUANT = [("none", "auto"), ("bf16", "auto"), ("int8", "auto"), ("int4", "auto"), ("none", "int8"), ("int8", "int8")]
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


def progress(msg: str) -> None:
  """A timestamped progress line."""
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class IdTokenizer:
  """Ids as characters (enough of the tokenizer interface for the engine over a random-init model)."""

  eos_id = 1
  bos_id = None

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def encode(self, text: str) -> list[int]:
    return [2 + ord(c) % (self.vocab_size - 2) for c in text]

  def decode(self, ids) -> str:
    return "".join(chr(0x100 + i) for i in ids)


def random_model_config(shape: dict, max_len: int, overrides: tuple[str, ...] = ()):
  """The tiny config at `shape`, float32, random init; serve.* from overrides."""
  return load_config("tiny", [f"model.{k}={v}" for k, v in shape.items()] + [
    "model.dtype=float32", "model.param_dtype=float32", f"model.max_seq_len={max_len}", f"data.seq_len={max_len}",
    f"model.scan_unroll={shape['num_layers']}", "mesh.data=1", f"serve.max_len={max_len}", *overrides])


def build_random_model(cfg, seed: int) -> Transformer:
  """A random-init Transformer on one device."""
  with sharding.use_mesh(sharding.make_mesh(cfg.mesh, jax.devices()[:1])):
    return Transformer(cfg.model, rngs=nnx.Rngs(seed))


def make_engine(model, cfg, tokenizer, draft=None) -> Engine:
  """An engine on one device."""
  return Engine(model, cfg, tokenizer, draft=draft, mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:1]))


def greedy(max_tokens: int) -> SamplingParams:
  """Greedy sampling of exactly max_tokens tokens."""
  return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def timed_generate(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list[list[int]]]:
  """(wall seconds, outputs) of one engine.generate run."""
  t0 = time.perf_counter()
  out = engine.generate(prompts, params)
  return time.perf_counter() - t0, out


# ------------------------------------------------------------------------------------------- 1. vs Hugging Face


def export_to_hf(model: Transformer, cfg):
  """transformers.LlamaForCausalLM (float32, sdpa) holding the same weights as `model`."""
  from transformers import LlamaConfig, LlamaForCausalLM

  from maxlm.convert import hf

  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  config = LlamaConfig.from_dict({k: v for k, v in hf.hf_config(cfg, "llama").items() if k != "architectures"},
                                 attn_implementation="sdpa")
  hf_model = LlamaForCausalLM(config).to(torch.float32).eval()
  tensors = {name: torch.from_numpy(a.copy()) for name, a in hf.hf_tensors(cfg, params, "llama", np.float32)}
  missing, unexpected = hf_model.load_state_dict(tensors, strict=False)
  allowed = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
  if set(missing) - allowed or unexpected:
    raise SystemExit(f"HF export: missing {missing}, unexpected {unexpected}")
  if cfg.model.tie_embeddings:
    hf_model.tie_weights()
  gen = hf_model.generation_config  # no eos: exactly max_new_tokens, no eos suppression (the engine ignores eos)
  gen.eos_token_id, gen.bos_token_id, gen.pad_token_id = None, None, 0
  return hf_model


def hf_generate(hf_model, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
  """(wall seconds, generated ids) of HF greedy generate with the KV cache."""
  ids = torch.tensor(prompts, dtype=torch.long)
  t0 = time.perf_counter()
  with torch.inference_mode():
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, use_cache=True)
  dt = time.perf_counter() - t0
  return dt, out[:, ids.shape[1]:].tolist()


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
  """(fraction of identical sequences, mean fraction of each sequence before the first difference)."""
  same = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
  prefix = []
  for x, y in zip(a, b, strict=True):
    n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
    prefix.append(n / max(len(x), 1))
  return same, float(np.mean(prefix))


def section_hf(args: argparse.Namespace) -> list[dict]:
  """Tokens/s of HF generate vs the engine at each batch size, on the same random weights."""
  max_len = args.prompt_len + args.new_tokens
  batches = [int(b) for b in args.hf_batches.split(",") if b.strip()]
  cfg = random_model_config(HF_SHAPE, max_len, ("model.init_std=0.1",))
  model = build_random_model(cfg, args.seed)
  hf_model = export_to_hf(model, cfg)
  tokenizer = IdTokenizer(HF_SHAPE["vocab_size"])
  rng = np.random.default_rng(args.seed)
  probe = rng.integers(2, HF_SHAPE["vocab_size"], (2, args.prompt_len))
  with torch.inference_mode():
    ref = hf_model(torch.from_numpy(probe).long()).logits.numpy()
  ours = np.asarray(jax.jit(lambda m, t: m(t))(model, jnp.asarray(probe)))
  logit_err = float(np.max(np.abs(ref - ours)))
  progress(f"[hf] exported {sum(p.numel() for p in hf_model.parameters()):,} parameters; forward max |logit diff| "
           f"{logit_err:.2e} (logit scale {float(np.std(ref)):.2f})")
  rows = []
  for batch in batches:
    prompts = [[int(t) for t in rng.integers(2, HF_SHAPE["vocab_size"], args.prompt_len)] for _ in range(batch)]
    bcfg = random_model_config(HF_SHAPE, max_len, ("model.init_std=0.1", f"serve.max_batch={batch}"))
    engine = make_engine(model, bcfg, tokenizer)
    params = greedy(args.new_tokens)
    warm_maxlm = sum(timed_generate(engine, prompts, params)[0] for _ in range(args.warmup))
    warm_hf = 0.0
    for threads in args.torch_threads:
      torch.set_num_threads(threads)
      warm_hf += sum(hf_generate(hf_model, prompts, args.new_tokens)[0] for _ in range(args.warmup))
    progress(f"[hf] batch {batch}: warm-up maxlm {warm_maxlm:.1f}s (incl. compilation), HF {warm_hf:.1f}s")
    times = {**{f"hf@{t}": [] for t in args.torch_threads}, "maxlm": []}
    snap = cpu_snapshot()
    for r in range(args.repeats):
      for threads in args.torch_threads:
        torch.set_num_threads(threads)
        dt, hf_out = hf_generate(hf_model, prompts, args.new_tokens)
        times[f"hf@{threads}"].append(dt)
      dt, our_out = timed_generate(engine, prompts, params)
      times["maxlm"].append(dt)
      progress(f"[hf] batch {batch} round {r + 1}/{args.repeats}: " + ", ".join(
        f"{n} {t[-1]:.2f}s" for n, t in times.items()))
    background = background_cores(snap, cpu_snapshot())
    tokens = batch * args.new_tokens
    by_threads = {t: tokens / statistics.median(times[f"hf@{t}"]) for t in args.torch_threads}
    best = max(by_threads, key=by_threads.get)
    hf_tps = by_threads[best]
    our_tps = tokens / statistics.median(times["maxlm"])
    same, prefix = agreement(hf_out, our_out)
    target = TARGETS.get(f"hf_ratio_batch{batch}")
    rows.append({"batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                 "hf_tokens_per_sec": hf_tps, "hf_threads": best, "hf_tokens_per_sec_by_threads": by_threads,
                 "maxlm_tokens_per_sec": our_tps, "ratio": our_tps / hf_tps,
                 "target_ratio": target, "identical_sequences": same, "mean_agreeing_prefix": prefix,
                 "hf_times_s": {t: times[f"hf@{t}"] for t in args.torch_threads}, "maxlm_times_s": times["maxlm"],
                 "warmup_maxlm_s": warm_maxlm,
                 "warmup_hf_s": warm_hf, "max_abs_logit_diff": logit_err, "background_cores": background,
                 "serve_max_len": max_len})
  return rows


# ------------------------------------------------------------------------------------------- trained models


def maxlm_cli() -> list[str]:
  """The `maxlm` command of this interpreter's environment."""
  exe = Path(sys.executable).with_name("maxlm")
  return [str(exe)] if exe.is_file() else [sys.executable, "-m", "maxlm.cli"]


def finished(workdir: Path, steps: int) -> bool:
  """Whether workdir holds a checkpoint of step `steps`."""
  return (workdir / "checkpoints" / str(steps)).is_dir()


def train_if_needed(workdir: Path, steps: int, extra: list[str]) -> float:
  """Trains the tiny config into workdir for `steps` steps (resuming); returns the wall seconds spent."""
  if finished(workdir, steps):
    progress(f"[train] {workdir} already has step {steps}")
    return 0.0
  cmd = [*maxlm_cli(), "train", "--workdir", str(workdir), f"--config.train.steps={steps}",
         f"--config.train.checkpoint_every={steps}", f"--config.train.eval_every={steps}", *extra]
  progress(f"[train] {' '.join(cmd)}")
  t0 = time.perf_counter()
  log = workdir.parent / f"{workdir.name}.log"
  workdir.parent.mkdir(parents=True, exist_ok=True)
  with open(log, "w") as f:
    done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
  if done.returncode != 0:
    raise SystemExit(f"training {workdir} failed (exit {done.returncode}); see {log}")
  dt = time.perf_counter() - t0
  progress(f"[train] {workdir}: {steps} steps in {dt:.0f}s (log {log})")
  return dt


def trained_models(args: argparse.Namespace, need_draft: bool) -> dict:
  """The target (and draft) workdirs, trained here unless given, with their models, configs and tokenizer."""
  from maxlm.train.loop import load_training_data
  from maxlm.workdir import load_model

  root = Path(args.workdir)
  info = {"train_s": {}}
  target = Path(args.target_workdir) if args.target_workdir else root / "target"
  if not args.target_workdir:
    info["train_s"]["target"] = train_if_needed(target, args.target_steps, [])
  draft = None
  if need_draft:
    draft = Path(args.draft_workdir) if args.draft_workdir else root / "draft"
    if not args.draft_workdir:
      info["train_s"]["draft"] = train_if_needed(draft, args.draft_steps,
                                                 [*DRAFT, f"--config.distill.teacher={target}"])
  model, cfg, step = load_model(str(target))
  # The corpus (cached under MAXLM_CACHE) gives the tokenizer the target was trained with and the held-out split;
  # reading it also serves workdirs trained before `maxlm train` copied the tokenizer into WORKDIR/tokenizer/.
  data = load_training_data(cfg)
  info.update(target=str(target), target_model=model, target_cfg=cfg, target_step=step, tokenizer=data.tokenizer,
              eval_docs=data.eval)
  if draft is not None:
    dmodel, dcfg, dstep = load_model(str(draft))
    if dcfg.model.vocab_size != cfg.model.vocab_size:
      raise SystemExit(f"draft {draft} has vocab {dcfg.model.vocab_size}, target {cfg.model.vocab_size}")
    info.update(draft=str(draft), draft_model=dmodel, draft_cfg=dcfg, draft_step=dstep)
  progress(f"[models] target {target} (step {step}, {cfg.model.num_layers}L d{cfg.model.d_model})"
           + (f", draft {draft} (step {info['draft_step']}, {info['draft_cfg'].model.num_layers}L "
              f"d{info['draft_cfg'].model.d_model})" if draft is not None else ""))
  return info


def eval_prompts(docs, n: int, length: int) -> list[list[int]]:
  """The first `length` tokens of the first n held-out documents that are long enough."""
  out = [[int(t) for t in docs[i][:length]] for i in range(len(docs)) if len(docs[i]) >= length][:n]
  if len(out) < n:
    raise SystemExit(f"only {len(out)} held-out documents have {length} tokens")
  return out


def workdir_cfg(info: dict, overrides: tuple[str, ...]):
  """The target's saved config plus overrides."""
  from maxlm.workdir import load_workdir_config

  return load_workdir_config(info["target"], ("mesh.data=1", *overrides))


# ------------------------------------------------------------------------------------------- 2. speculative


def section_spec(args: argparse.Namespace, info: dict) -> list[dict]:
  """Batch-1 greedy tokens/s of the target alone vs with the draft at each speculative_k; acceptance; identity."""
  ks = [int(k) for k in args.spec_k.split(",") if k.strip()]
  prompts = eval_prompts(info["eval_docs"], args.spec_prompts, args.prompt_len)
  max_len = args.prompt_len + args.new_tokens
  params = greedy(args.new_tokens)
  base = ("serve.max_batch=1", f"serve.max_len={max_len}")
  engines = {"target": make_engine(info["target_model"], workdir_cfg(info, base), info["tokenizer"])}
  for k in ks:
    engines[f"k={k}"] = make_engine(info["target_model"], workdir_cfg(info, (*base, f"serve.speculative_k={k}")),
                                    info["tokenizer"], draft=info["draft_model"])
  warm = {}
  for name, engine in engines.items():
    warm[name] = sum(timed_generate(engine, prompts, params)[0] for _ in range(args.warmup))
    progress(f"[spec] warm-up {name}: {warm[name]:.1f}s (incl. compilation)")
  times = {name: [] for name in engines}
  outs, counts = {}, {}
  for r in range(args.repeats):
    for name, engine in engines.items():
      before = dict(engine.counters)
      dt, outs[name] = timed_generate(engine, prompts, params)
      times[name].append(dt)
      counts[name] = {c: engine.counters[c] - before[c] for c in ("spec_proposed_total", "spec_accepted_total",
                                                                            "spec_rounds_total")}
    progress(f"[spec] round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()))
  tokens = len(prompts) * args.new_tokens
  base_tps = tokens / statistics.median(times["target"])
  rows = []
  for name in engines:
    tps = tokens / statistics.median(times[name])
    proposed, accepted = counts[name]["spec_proposed_total"], counts[name]["spec_accepted_total"]
    k = int(name[2:]) if name != "target" else 0
    rounds = counts[name]["spec_rounds_total"]  # batch 1: one row, so row-rounds are rounds
    # A round's cost against a plain step's: what the speed-up would be if every proposal were accepted.
    round_s = statistics.median(times[name]) / rounds if rounds else None
    token_s = statistics.median(times["target"]) / tokens
    rows.append({"config": name, "speculative_k": k, "prompts": len(prompts),
                 "round_ms": round_s * 1e3 if round_s else None, "plain_token_ms": token_s * 1e3,
                 "speedup_if_all_accepted": (k + 1) * token_s / round_s if round_s else 1.0,
                 "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "tokens_per_sec": tps,
                 "speedup": tps / base_tps, "acceptance_rate": accepted / proposed if proposed else None,
                 "tokens_per_round": (accepted + rounds) / rounds if rounds else 1.0,
                 "identical_to_target": outs[name] == outs["target"],
                 "identical_sequences": agreement(outs["target"], outs[name])[0],
                 "times_s": times[name], "warmup_s": warm[name]})
  return rows


# ------------------------------------------------------------------------------------------- 3. KV waste


def section_kv(args: argparse.Namespace) -> list[dict]:
  """Mean KV waste (1 - held / reserved after every step) of paged and contiguous layouts on mixed lengths."""
  rng = np.random.default_rng(args.seed)
  totals = rng.integers(16, args.kv_longest + 1, args.kv_requests)
  prompt_lens = np.maximum(1, (totals * rng.uniform(0.2, 0.8, args.kv_requests)).astype(int))
  max_tokens = np.maximum(1, totals - prompt_lens)
  prompts = [[int(t) for t in rng.integers(2, KV_SHAPE["vocab_size"], n)] for n in prompt_lens]
  cfg = random_model_config(KV_SHAPE, args.kv_max_len)
  model = build_random_model(cfg, args.seed)
  tokenizer = IdTokenizer(KV_SHAPE["vocab_size"])
  layouts = [("paged", int(p)) for p in args.kv_page_sizes.split(",") if p.strip()] + [("contiguous", 0)]
  rows = []
  for layout, page in layouts:
    overrides = [f"serve.kv_layout={layout}", "serve.max_batch=8", "serve.prefix_sharing=false"]
    if page:
      overrides.append(f"serve.page_size={page}")
    engine = make_engine(model, random_model_config(KV_SHAPE, args.kv_max_len, tuple(overrides)), tokenizer)
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens, strict=True)):
      engine.add_request(Request(f"kv-{i}", prompt, greedy(int(n))))
    held, reserved, steps = [], [], 0
    t0 = time.perf_counter()
    while engine.has_work():
      engine.step()
      steps += 1
      h, r = engine.kv_tokens()
      if r:
        held.append(h)
        reserved.append(r)
    dt = time.perf_counter() - t0
    waste = [1 - h / r for h, r in zip(held, reserved, strict=True)]
    name = f"paged (page {page})" if page else f"contiguous ({engine.page_size} per slot)"
    rows.append({"layout": name, "kv_layout": layout, "page_size": engine.page_size, "requests": args.kv_requests,
                 "max_batch": 8, "max_len": args.kv_max_len, "mean_request_len": float(np.mean(totals)),
                 "steps": steps, "mean_waste": float(np.mean(waste)),
                 "aggregate_waste": 1 - sum(held) / sum(reserved), "max_waste": float(np.max(waste)),
                 "mean_reserved_tokens": float(np.mean(reserved)), "mean_held_tokens": float(np.mean(held)),
                 "kv_pool_bytes": engine.cache_spec.bytes(), "wall_s": dt})
    progress(f"[kv] {name}: {steps} steps in {dt:.0f}s, mean waste {rows[-1]['mean_waste']:.2%}")
  return rows


# ------------------------------------------------------------------------------------------- 4. quantization


@functools.partial(jax.jit, static_argnames=("graphdef", "kv_len"))
def _cached_nll(state, cache, tokens, targets, page_table, *, graphdef, kv_len: int):
  """Summed NLL of targets under a teacher-forced prefill through the engine's cached forward."""
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  logits, _ = forward_cached(nnx.merge(graphdef, state), cache, tokens, positions, jnp.ones((b, t), bool), page_table,
                             jnp.full((b,), t, jnp.int32), kv_len=kv_len)
  return token_loss_sums(logits, targets, jnp.ones(targets.shape, jnp.float32), 0.0)[1][0]


def cached_nll(engine: Engine, rows: np.ndarray) -> float:
  """Mean token NLL of rows [n, len + 1] through the engine's weights, KV cache format and cached forward."""
  t = rows.shape[1] - 1
  per_seq = -(-t // engine.page_size)
  total = 0.0
  for start in range(0, len(rows), engine.max_batch):
    chunk = rows[start:start + engine.max_batch]
    b = len(chunk)
    table = np.full((b, engine.max_pages), kv_cache.SCRATCH_PAGE, np.int32)
    for i in range(b):
      table[i, :per_seq] = 1 + i * per_seq + np.arange(per_seq)
    with sharding.use_mesh(engine.mesh):
      cache = kv_cache.init_cache(engine.cache_spec)
      total += float(_cached_nll(engine.state, cache, jnp.asarray(chunk[:, :-1]), jnp.asarray(chunk[:, 1:]),
                                 jnp.asarray(table), graphdef=engine.graphdef, kv_len=per_seq * engine.page_size))
  return total / (rows.shape[0] * t)


def model_nll(model: Transformer, rows: np.ndarray) -> float:
  """Mean token NLL of rows under the model's training forward (the cross-check of cached_nll)."""
  @jax.jit
  def nll(m, tokens, targets):
    return token_loss_sums(m(tokens), targets, jnp.ones(targets.shape, jnp.float32), 0.0)[1][0]

  total = sum(float(nll(model, jnp.asarray(rows[i:i + 8, :-1]), jnp.asarray(rows[i:i + 8, 1:])))
              for i in range(0, len(rows), 8))
  return total / (rows.shape[0] * (rows.shape[1] - 1))


def section_quant(args: argparse.Namespace, info: dict) -> list[dict]:
  """Weight / KV bytes, held-out perplexity and decode tokens/s of the target per quantization setting."""
  docs = info["eval_docs"]
  stream = docs.tokens
  need = args.eval_rows * (args.eval_len + 1)
  if len(stream) < need:
    raise SystemExit(f"held-out split has {len(stream)} tokens, {need} needed (lower --eval-rows / --eval-len)")
  rows = stream[:need].reshape(args.eval_rows, args.eval_len + 1).astype(np.int32)
  ref_nll = model_nll(info["target_model"], rows)
  prompts = eval_prompts(docs, 8, args.prompt_len)
  params = greedy(args.quant_new_tokens)
  group = info["target_cfg"].serve.int4_group
  engines = {}
  for weights, kv in args.quant:
    cfg = workdir_cfg(info, (f"serve.weights={weights}", f"serve.kv_cache={kv}", "serve.max_batch=8"))
    model = quantize_model(info["target_model"], weights, group=group)
    engine = make_engine(model, cfg, info["tokenizer"])
    engines[(weights, kv)] = (engine, weight_bytes(nnx.state(model)))
    warm = sum(timed_generate(engine, prompts, params)[0] for _ in range(args.warmup))
    progress(f"[quant] weights {weights}, kv {kv}: warm-up {warm:.1f}s")
  times = {key: [] for key in engines}
  outs = {}
  for r in range(args.repeats):
    for key, (engine, _) in engines.items():
      dt, outs[key] = timed_generate(engine, prompts, params)
      times[key].append(dt)
    progress(f"[quant] round {r + 1}/{args.repeats}: " + ", ".join(f"{w}/{k} {t[-1]:.2f}s"
                                                                 for (w, k), t in times.items()))
  results = []
  base = None
  for (weights, kv), (engine, wbytes) in engines.items():
    nll = cached_nll(engine, rows)
    row = {"weights": weights, "kv_cache": kv, "kv_dtype": engine.cache_spec.dtype, "weight_bytes": wbytes,
           "kv_cache_bytes": engine.cache_spec.bytes(), "kv_max_batch": engine.max_batch, "kv_max_len": engine.max_len,
           "eval_tokens": int(rows.shape[0] * (rows.shape[1] - 1)), "nll": nll, "perplexity": math.exp(nll),
           "decode_tokens_per_sec": len(prompts) * args.quant_new_tokens / statistics.median(times[(weights, kv)]),
           "times_s": times[(weights, kv)]}
    base = base or row
    row["perplexity_change"] = row["perplexity"] / base["perplexity"] - 1
    row["weight_ratio"] = wbytes / base["weight_bytes"]
    row["kv_ratio"] = row["kv_cache_bytes"] / base["kv_cache_bytes"]
    row["greedy_identical_to_none"] = agreement(outs[("none", "auto")], outs[(weights, kv)])[0]
    results.append(row)
    progress(f"[quant] {weights}/{kv}: perplexity {row['perplexity']:.3f} ({row['perplexity_change']:+.2%})")
  results[0]["model_forward_nll"] = ref_nll  # the training forward on the same rows: checks the cached path
  progress(f"[quant] cross-check: training-forward NLL {ref_nll:.4f} vs cached-forward {results[0]['nll']:.4f}")
  return results


# ------------------------------------------------------------------------------------------- report


def tables(res: dict) -> str:
  """The results as markdown tables, one per section."""
  out = []
  if res.get("hf"):
    out += ["### 1. maxlm engine vs Hugging Face generate (greedy, float32 CPU, random init)", "",
            ("| batch | prompt | new tokens | HF tok/s @ torch threads | HF baseline | maxlm tok/s | ratio | "
             "target | identical seqs | agreeing prefix |"), "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["hf"]:
      target = f">= {r['target_ratio']:.0f}x" if r["target_ratio"] else "-"
      per = ", ".join(f"{v:,.0f} @{t}" for t, v in r["hf_tokens_per_sec_by_threads"].items())
      out.append(f"| {r['batch']} | {r['prompt_len']} | {r['new_tokens']} | {per} | {r['hf_tokens_per_sec']:,.0f} | "
                 f"{r['maxlm_tokens_per_sec']:,.0f} | {r['ratio']:.2f}x | {target} | "
                 f"{r['identical_sequences']:.0%} | {r['mean_agreeing_prefix']:.0%} |")
    out.append("")
  if res.get("spec"):
    out += ["### 2. Speculative decoding (trained tiny target, distilled draft, batch 1, greedy)", "",
            ("| config | tok/s | speed-up | acceptance | tokens / target pass | ms / round (plain: / token) | "
             "speed-up if all accepted | identical to target |"), "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["spec"]:
      acc = f"{r['acceptance_rate']:.1%}" if r["acceptance_rate"] is not None else "-"
      cost = r["round_ms"] if r["round_ms"] is not None else r["plain_token_ms"]
      out.append(f"| {r['config']} | {r['tokens_per_sec']:,.0f} | {r['speedup']:.2f}x | {acc} | "
                 f"{r['tokens_per_round']:.2f} | {cost:.2f} | {r['speedup_if_all_accepted']:.2f}x | "
                 f"{'yes' if r['identical_to_target'] else 'NO'} |")
    out.append("")
  if res.get("kv"):
    r0 = res["kv"][0]
    out += [(f"### 3. KV waste: {r0['requests']} requests, lengths U[16, {res['meta']['kv_longest']}] "
             f"(mean {r0['mean_request_len']:.0f}), max_batch {r0['max_batch']}, max_len {r0['max_len']}"), "",
            "| layout | steps | mean held | mean reserved | mean waste | aggregate waste | max waste |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["kv"]:
      out.append(f"| {r['layout']} | {r['steps']} | {r['mean_held_tokens']:,.0f} | {r['mean_reserved_tokens']:,.0f} | "
                 f"{r['mean_waste']:.2%} | {r['aggregate_waste']:.2%} | {r['max_waste']:.1%} |")
    out.append("")
  if res.get("quant"):
    q0 = res["quant"][0]
    out += [(f"### 4. Quantization of the trained target ({q0['eval_tokens']:,} held-out tokens; KV bytes at "
             f"max_batch {q0['kv_max_batch']} x max_len {q0['kv_max_len']})"), "",
            ("| weights | KV cache | weight MiB | vs none | KV MiB | vs none | perplexity | change | decode tok/s | "
             "greedy = none |"), "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["quant"]:
      out.append(f"| {r['weights']} | {r['kv_cache']} ({r['kv_dtype']}) | {r['weight_bytes'] / 2**20:.2f} | "
                 f"{r['weight_ratio']:.2f}x | {r['kv_cache_bytes'] / 2**20:.1f} | {r['kv_ratio']:.2f}x | "
                 f"{r['perplexity']:.3f} | {r['perplexity_change']:+.2%} | {r['decode_tokens_per_sec']:,.0f} | "
                 f"{r['greedy_identical_to_none']:.0%} |")
  return "\n".join(out)


def verdicts(res: dict) -> dict:
  """Each target: the measured value and whether it is met."""
  v = {}
  for r in res.get("hf", []):
    if r["target_ratio"]:
      v[f"hf_ratio_batch{r['batch']}"] = {"value": r["ratio"], "target": r["target_ratio"],
                                          "met": r["ratio"] >= r["target_ratio"]}
  spec = [r for r in res.get("spec", []) if r["speculative_k"]]
  if spec:
    best = max(spec, key=lambda r: r["speedup"])
    v["spec_speedup"] = {"value": best["speedup"], "k": best["speculative_k"], "target": TARGETS["spec_speedup"],
                         "met": best["speedup"] >= TARGETS["spec_speedup"],
                         "identical": all(r["identical_to_target"] for r in spec)}
  paged = [r for r in res.get("kv", []) if r["kv_layout"] == "paged"]
  for r in paged:
    v[f"paged_waste_page{r['page_size']}"] = {"value": r["mean_waste"], "target": TARGETS["paged_waste"],
                                              "met": r["mean_waste"] < TARGETS["paged_waste"]}
  return v


def plot(res: dict, path: Path) -> None:
  """Tokens/s bars (HF vs maxlm, plain vs speculative), KV waste and quantization memory / perplexity."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(16, 4.5), layout="constrained")
  FigureCanvasAgg(fig)
  ax_hf, ax_spec, ax_kv, ax_q = fig.subplots(1, 4)
  for ax, key in ((ax_hf, "hf"), (ax_spec, "spec"), (ax_kv, "kv"), (ax_q, "quant")):
    if not res.get(key):
      ax.set_axis_off()
  if res.get("hf"):
    x = np.arange(len(res["hf"]))
    for off, key, label in ((-0.2, "hf_tokens_per_sec", "HF generate"), (0.2, "maxlm_tokens_per_sec", "maxlm")):
      bars = ax_hf.bar(x + off, [r[key] for r in res["hf"]], 0.4, label=label)
      ax_hf.bar_label(bars, fmt="{:,.0f}", fontsize=8)
    ax_hf.set_xticks(x, [f"batch {r['batch']}\n{r['ratio']:.2f}x" for r in res["hf"]])
    ax_hf.set_ylabel("tokens/s")
    ax_hf.set_title("vs Hugging Face (greedy)")
    ax_hf.legend(fontsize=8)
  if res.get("spec"):
    bars = ax_spec.bar([r["config"] for r in res["spec"]], [r["tokens_per_sec"] for r in res["spec"]],
                       color=["tab:gray"] + ["tab:green"] * (len(res["spec"]) - 1))
    ax_spec.bar_label(bars, labels=[f"{r['tokens_per_sec']:,.0f}\n{r['speedup']:.2f}x" for r in res["spec"]],
                      fontsize=8)
    ax_spec.set_ylabel("tokens/s (batch 1)")
    ax_spec.set_title("speculative decoding")
  if res.get("kv"):
    bars = ax_kv.bar([r["layout"].replace(" (", "\n(") for r in res["kv"]], [100 * r["mean_waste"] for r in res["kv"]])
    ax_kv.bar_label(bars, fmt="{:.1f}%", fontsize=8)
    ax_kv.set_ylabel("mean KV waste (% of reserved slots)")
    ax_kv.set_title("KV waste, mixed lengths")
  if res.get("quant"):
    q = res["quant"]
    x = np.arange(len(q))
    ax_q.bar(x - 0.2, [r["weight_bytes"] / 2**20 for r in q], 0.4, label="weights MiB")
    ax_q.bar(x + 0.2, [r["kv_cache_bytes"] / 2**20 for r in q], 0.4, label="KV cache MiB")
    ax_q.set_xticks(x, [f"{r['weights']}\nkv {r['kv_cache']}" for r in q], fontsize=8)
    ax_q.set_ylabel("MiB")
    twin = ax_q.twinx()
    twin.plot(x, [r["perplexity"] for r in q], "ko-", label="perplexity")
    twin.set_ylabel("held-out perplexity")
    ax_q.set_title("quantization")
    ax_q.legend(loc="upper right", fontsize=8)
  fig.suptitle(f"maxlm serving benchmark ({jax.default_backend()}, {os.cpu_count()} cores)", fontsize=9)
  fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
  """Runs the sections, prints the tables, writes the JSON (and the PNG)."""
  t_start = time.perf_counter()
  args = parse_args(argv)
  progress(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} (threads "
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
  res["verdicts"] = verdicts(res)
  print("\n" + tables(res) + "\n")
  for name, v in res["verdicts"].items():
    comparison = "<" if name.startswith("paged_waste") else ">="
    print(f"{name}: {v['value']:.4g} (target {comparison} {v['target']}): {'meets' if v['met'] else 'MISSES'}")
  print(f"total runtime {runtime:.0f}s")
  write_results(res, args.out, (lambda png: plot(res, png)) if args.plot else None)


if __name__ == "__main__":
  main()
