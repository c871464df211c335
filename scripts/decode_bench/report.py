"""The serving benchmark's report: markdown tables, target verdicts and the PNG."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

from decode_bench.common import TARGETS


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
