"""Section spec: speculative decoding with a real draft (Qwen2.5-Coder-0.5B for 1.5B by default), batch 1, greedy.

--spec-text prose: the prompts are --prompt-len tokens of the held-out Python documentation (the models continue
prose); chat: heldout.CODING_REQUESTS in the target's chat template (the coder models write code, their use).

For each target weight setting (--spec-weights TARGET/DRAFT pairs) the plain target is the baseline, timed in the
same alternation as each (draft weights, k) engine: tokens/s, speed-up, acceptance rate (proposals accepted /
proposals made), tokens per target pass, and whether every output equals the plain target's token for token.

Two speed-ups per engine: end to end (prefill and first token included, as a user waits for a whole answer) and of
the decode phase (after the first token, the per-token latency speculation changes), the latter from a second
timed workload that stops after the first token: (tokens - 1 per prompt) / (time - time to the first token).
"""

from __future__ import annotations

import argparse
import functools

from decode_bench.common import greedy, progress, timed_generate

from maxlm.serve.loading import check_draft_tokenizer
from maxlm.serve.quantize import quantize_model
from maxlm.workdir import load_workdir_config
from real_bench import heldout
from real_bench.common import TARGETS, engine, measure, median, release
from real_bench.models import load_maxlm, maxlm_overrides

_COUNTERS = ("spec_proposed_total", "spec_accepted_total", "spec_rounds_total")


def _counted(eng, prompts: list[list[int]], params, counts: dict) -> tuple[float, list[list[int]]]:
  """timed_generate that also leaves the run's speculative counters in `counts`."""
  before = {c: eng.counters[c] for c in _COUNTERS}
  out = timed_generate(eng, prompts, params)
  counts.update({c: eng.counters[c] - before[c] for c in _COUNTERS})
  return out


def _serve_cfg(workdir, *extra: str):
  """The target's batch-1 serving config plus `extra`."""
  return load_workdir_config(workdir, maxlm_overrides("serve.max_batch=1", *extra))


def _rows(tw: str, times: dict, outs: dict, counts: dict, tokens: int, prompts: int) -> list[dict]:
  """One row per engine of a target weight setting; speed-ups over its plain target, end to end and after the first
  token (times[f"{name} first"]: the same engine stopping at the first token)."""
  names = [n for n in times if not n.endswith(" first")]
  first = {n: median(times[f"{n} first"]) for n in names}
  decode = {n: (tokens - prompts) / max(median(times[n]) - first[n], 1e-9) for n in names}
  base = tokens / median(times["target"])
  rows = []
  for name in names:
    tps = tokens / median(times[name])
    proposed, accepted, rounds = (counts[name].get(c, 0) for c in _COUNTERS)
    dw, _, k = name.partition(" k=")
    rows.append({"target_weights": tw, "draft_weights": None if name == "target" else dw,
                 "k": int(k) if k else 0, "tokens_per_sec": tps, "speedup": tps / base,
                 "acceptance_rate": accepted / proposed if proposed else None,
                 "tokens_per_round": (accepted + rounds) / rounds if rounds else 1.0,
                 "first_token_s": first[name] / prompts, "decode_tokens_per_sec": decode[name],
                 "decode_speedup": decode[name] / decode["target"],
                 "identical_to_target": outs[name] == outs["target"], "times_s": times[name],
                 "first_token_times_s": times[f"{name} first"]})
    acc = f"{rows[-1]['acceptance_rate']:.1%}" if proposed else "-"
    progress(f"[spec] target {tw} {name}: {tps:.2f} tok/s ({tps / base:.2f}x; after the first token "
             f"{decode[name]:.2f} tok/s, {decode[name] / decode['target']:.2f}x), acceptance {acc}, identical to the "
             f"target: {rows[-1]['identical_to_target']}")
  return rows


def section_spec(args: argparse.Namespace, get_model) -> dict:
  """Plain target vs target + draft at each k, per target/draft weight setting.

  Each model is loaded once in float32 and quantized from that copy per setting; the float32 copies are dropped as
  soon as no later setting needs them (a 1.5B target is ~7 GB in float32).
  """
  target_m, draft_m = get_model(args.spec_target), get_model(args.spec_draft)
  target32, tcfg, tok = load_maxlm(target_m)
  draft32, _, dtok = load_maxlm(draft_m)
  check_draft_tokenizer(tok, dtok, f"draft {args.spec_draft}")
  if args.spec_text == "chat":
    prompts = heldout.chat_prompts(tok, args.spec_prompts)
  else:
    texts, _ = heldout.source()
    docs, _ = heldout.documents(tok, texts, 64 * args.prompt_len * args.spec_prompts)
    prompts = heldout.prompts(docs, args.spec_prompts, args.prompt_len)
  max_len = max(map(len, prompts)) + args.spec_max_tokens
  params, first_only = greedy(args.spec_max_tokens), greedy(1)
  group = tcfg.serve.int4_group
  settings = list(dict.fromkeys(t for t, _ in args.spec_weights))
  rows = []
  for i, tw in enumerate(settings):
    target = quantize_model(target32, tw, group=group)
    drafts = {dw: quantize_model(draft32, dw, group=group) for t, dw in args.spec_weights if t == tw}
    if i == len(settings) - 1:
      target32 = draft32 = None  # the last setting's copies exist: the float32 originals can go
      release()
    cfg = functools.partial(_serve_cfg, target_m.workdir, f"serve.max_len={max_len}", f"serve.weights={tw}")
    counts: dict[str, dict] = {"target": {}}
    engines = {"target": engine(target, cfg(), tok)}
    for dw, draft in drafts.items():
      for k in args.spec_k:
        engines[f"{dw} k={k}"] = engine(target, cfg(f"serve.speculative_k={k}"), tok, draft=draft)
    runs = {}
    for name, eng in engines.items():
      counts[name], counts[f"{name} first"] = {}, {}
      runs[name] = functools.partial(_counted, eng, prompts, params, counts[name])
      runs[f"{name} first"] = functools.partial(_counted, eng, prompts, first_only, counts[f"{name} first"])
    times, outs = measure(runs, warmup=args.warmup, repeats=args.repeats, label=f"[spec] target {tw}")
    rows += _rows(tw, times, outs, counts, len(prompts) * args.spec_max_tokens, len(prompts))
    del runs, engines, drafts, target
    release()
  return {"target": args.spec_target, "draft": args.spec_draft, "prompts": args.spec_prompts,
          "text": args.spec_text, "prompt_len": max(map(len, prompts)), "max_tokens": args.spec_max_tokens,
          "target_speedup": TARGETS["spec_speedup"], "rows": rows}
