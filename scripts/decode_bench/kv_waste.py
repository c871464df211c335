"""Section 3: KV memory waste of paged and contiguous layouts under mixed request lengths."""

from __future__ import annotations

import argparse
import time

import numpy as np

from decode_bench.common import (
  KV_SHAPE,
  IdTokenizer,
  build_random_model,
  greedy,
  make_engine,
  progress,
  random_model_config,
)
from maxlm.serve.request import Request


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
