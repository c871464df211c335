"""Section 2: speculative decoding with a distilled draft against the target alone (batch 1, greedy)."""

from __future__ import annotations

import argparse
import statistics

from decode_bench.common import agreement, greedy, make_engine, progress, timed_generate
from decode_bench.trained import eval_prompts, workdir_cfg


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
