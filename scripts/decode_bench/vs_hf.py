"""Section 1: the engine against Hugging Face `generate` on the same random weights (greedy tokens/s, agreement)."""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from bench_host import background_cores, cpu_snapshot
from flax import nnx

from decode_bench.common import (
  HF_SHAPE,
  TARGETS,
  IdTokenizer,
  agreement,
  build_random_model,
  greedy,
  make_engine,
  progress,
  random_model_config,
  timed_generate,
)
from maxlm.models.transformer import Transformer


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
