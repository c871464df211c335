"""The real-weights benchmark's report: markdown tables, target verdicts and the PNG."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

MIB = 2**20


def _w(weights: str | None) -> str:
  """serve.weights as the table shows it (none: the float32 weights)."""
  return {"none": "float32", None: "-"}.get(weights, weights)


def _ppl(res: dict) -> list[str]:
  s = res["ppl"]
  t = s["text"]
  out = [f"### Perplexity: {t['source']} (Python {t['python']}), float32 dequantized weights", "",
         ("| model | docs | tokens | bytes | window | maxlm ppl | transformers ppl | difference | target | maxlm "
          "bits/byte | transformers bits/byte | same tokenizer | maxlm tok/s | transformers tok/s |"),
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in s["rows"]:
    a, b = r["maxlm"], r["transformers"]
    out.append(f"| {r['model']} | {r['documents']} | {a['tokens']:,} | {r['text_bytes']:,} | {r['seq_len']} | "
               f"{a['perplexity']:.4f} | {b['perplexity']:.4f} | {r['rel_diff']:+.4%} | "
               f"<= {r['target_rel_diff']:.1%} | {a['bits_per_byte']:.4f} | {b['bits_per_byte']:.4f} | "
               f"{r['tokenizer_agreement']:.0%} | {a['tokens_per_sec']:,.0f} | {b['tokens_per_sec']:,.0f} |")
  out += ["", ("Both sides score the same token arrays (maxlm's tokenization; same tokenizer: share of the documents "
               "transformers' tokenizer encodes identically). tok/s: wall time of the whole scoring, maxlm's "
               "compilations included.")]
  return out


def _decode(res: dict) -> list[str]:
  s = res["decode"]
  bw = s["bandwidth"]
  out = [(f"### Greedy decode tokens/s (prompt {s['prompt_len']}, {s['max_tokens']} new tokens; memory read "
          f"bandwidth {bw['bytes_per_sec'] / 1e9:.1f} GB/s: XLA {bw['xla_bytes_per_sec'] / 1e9:.1f}, numpy 1 "
          f"thread {bw['numpy_bytes_per_sec'] / 1e9:.1f})"), "",
         ("| model | batch | side | weights | tok/s | vs transformers | MiB read / step | roofline tok/s | of "
          "roofline | same as transformers | same as maxlm fp32 |"),
         "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in s["rows"]:
    for side in r["sides"]:
      same_hf = f"{side['identical_to_transformers']:.0%}" if side["identical_to_transformers"] is not None else "-"
      same_ml = f"{side['identical_to_maxlm']:.0%}" if side["identical_to_maxlm"] is not None else "-"
      out.append(f"| {r['model']} | {r['batch']} | {side['side']} | {side['weights']} | "
                 f"{side['tokens_per_sec']:,.1f} | {side['vs_transformers']:.2f}x | "
                 f"{side['bytes_per_step'] / MIB:,.0f} | {side['roofline_tokens_per_sec']:,.1f} | "
                 f"{side['of_roofline']:.0%} | {same_hf} | {same_ml} |")
  out += ["", ("Weights: maxlm and transformers run the GGUF's blocks dequantized to float32 (maxlm int8: those "
               "re-quantized per output channel); llama.cpp runs the file's own blocks. MiB read / step: the weights "
               "a decode step streams (the embedding table only when it is also the output head); roofline = batch "
               "x bandwidth / that: the step time if only reading the weights took time.")]
  if s.get("llama_cpp_missing"):
    out += ["", f"llama.cpp: {s['llama_cpp_missing']}"]
  return out


def _spec(res: dict) -> list[str]:
  s = res["spec"]
  text = {"chat": "coding requests in the chat template", "prose": "held-out prose"}.get(s.get("text", "prose"))
  out = [(f"### Speculative decoding: {s['draft']} drafting for {s['target']} (batch 1, greedy, "
          f"{s['prompts']} prompts x {s['max_tokens']} tokens; {text})"), "",
         ("| target weights | draft weights | k | tok/s | speed-up | after the first token: tok/s | speed-up | "
          "first token s | acceptance | tokens / round | identical to target |"),
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  for r in s["rows"]:
    acc = f"{r['acceptance_rate']:.1%}" if r["acceptance_rate"] is not None else "-"
    out.append(f"| {_w(r['target_weights'])} | {_w(r['draft_weights'])} | {r['k'] or '-'} | "
               f"{r['tokens_per_sec']:,.2f} | {r['speedup']:.2f}x | {r['decode_tokens_per_sec']:,.2f} | "
               f"{r['decode_speedup']:.2f}x | {r['first_token_s']:.2f} | {acc} | {r['tokens_per_round']:.2f} | "
               f"{'yes' if r['identical_to_target'] else 'NO'} |")
  out += ["", ("speed-up: end to end (prefill and first token included); after the first token: the decode phase, "
               "(tokens - 1) / (time - time to the first token) per prompt, the time to the first token from runs "
               "of the same engines that stop there (the draft's prefill is in it).")]
  return out


def _quant(res: dict) -> list[str]:
  s = res["quant"]
  out = [(f"### Quantization baselines (round to nearest; {s['tokens']:,} held-out tokens in rows of {s['seq_len']} "
          "through the engine's cached forward; KV bytes per token of context)"), "",
         ("| model | weights | KV cache | weight MiB | vs float32 | KV bytes / token | vs float32 | perplexity | "
          "change |"),
         "|---|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in s["rows"]:
    out.append(f"| {r['model']} | {_w(r['weights'])} | {r['kv_cache']} ({r['kv_dtype']}) | "
               f"{r['weight_bytes'] / MIB:,.1f} | {r['weight_ratio']:.2f}x | {r['kv_bytes_per_token']:,.0f} | "
               f"{r['kv_ratio']:.2f}x | {r['perplexity']:.4f} | {r['perplexity_change']:+.2%} |")
  checks = [f"{r['model']} {math.exp(r['training_forward_nll']):.4f}" for r in s["rows"] if "training_forward_nll" in r]
  if checks:
    out += ["", "float32 perplexity of the same rows through the training forward (maxlm.eval): " + ", ".join(checks)]
  return out


def _memory(res: dict) -> list[str]:
  s = res["memory"]
  out = [(f"### Peak host memory of an import: {s['model']} (GGUF {s['gguf_bytes'] / MIB:,.0f} MiB, float32 "
          f"parameters {s['param_bytes'] / MIB:,.0f} MiB)"), "",
         "| command | peak RSS MiB | / GGUF size | / float32 size | seconds | exit |", "|---|---:|---:|---:|---:|---:|"]
  for r in s["rows"]:
    out.append(f"| {r['name']} | {r['peak_rss_bytes'] / MIB:,.0f} | {r['vs_gguf']:.2f}x | {r['vs_float32']:.2f}x | "
               f"{r['seconds']:.0f} | {r['exit']} |")
  return out


def tables(res: dict) -> str:
  """Every section present in `res` as a markdown table."""
  out: list[str] = []
  for key, fn in (("ppl", _ppl), ("decode", _decode), ("spec", _spec), ("quant", _quant), ("memory", _memory)):
    if res.get(key):
      out += [*fn(res), f"(section {key}: {res[key]['meta']['runtime_s']:.0f}s, measured "
                        f"{res[key]['meta']['machine']['measured_at']})", ""]
  return "\n".join(out)


def verdicts(res: dict) -> dict:
  """Each target: what was measured, the target, and whether it is met."""
  v = {}
  for r in res.get("ppl", {}).get("rows", []):
    v[f"ppl_match_{r['model']}"] = {"value": r["rel_diff"], "target": r["target_rel_diff"], "met": r["met"],
                                    "text": f"maxlm/transformers perplexity {r['rel_diff']:+.4%} "
                                            f"(target within {r['target_rel_diff']:.1%})"}
  for r in res.get("decode", {}).get("rows", []):
    if r.get("target_ratio"):
      side = next(s for s in r["sides"] if s["side"] == "maxlm" and s["weights"] == "float32")
      v[f"decode_vs_transformers_{r['model']}_batch{r['batch']}"] = {
        "value": side["vs_transformers"], "target": r["target_ratio"], "met": side["vs_transformers"] >=
        r["target_ratio"], "text": f"maxlm float32 {side['vs_transformers']:.2f}x transformers at batch "
                                   f"{r['batch']} (target >= {r['target_ratio']:.0f}x)"}
  spec = [r for r in res.get("spec", {}).get("rows", []) if r["k"]]
  if spec:
    best = max(spec, key=lambda r: r["speedup"])
    same = all(r["identical_to_target"] for r in spec)
    v["spec_speedup"] = {"value": best["speedup"], "target": res["spec"]["target_speedup"],
                         "met": best["speedup"] >= res["spec"]["target_speedup"] and same,
                         "text": f"best speculative speed-up end to end {best['speedup']:.2f}x (k={best['k']}, "
                                 f"{best['target_weights']}/{best['draft_weights']}; after the first token "
                                 f"{best['decode_speedup']:.2f}x), outputs identical: "
                                 f"{'all' if same else 'NOT all'} (target >= {res['spec']['target_speedup']}x)"}
  return v


def plot(res: dict, path: Path) -> None:
  """One panel per section: perplexity pairs, decode tokens/s, speculative speed-ups, quantization, peak memory."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  keys = [k for k in ("ppl", "decode", "spec", "quant", "memory") if res.get(k)]
  fig = Figure(figsize=(5 * max(len(keys), 1), 4.8), layout="constrained")
  FigureCanvasAgg(fig)
  axes = np.atleast_1d(fig.subplots(1, max(len(keys), 1)))
  panels = {"ppl": _plot_ppl, "decode": _plot_decode, "spec": _plot_spec, "quant": _plot_quant,
            "memory": _plot_memory}
  for ax, key in zip(axes, keys, strict=False):
    panels[key](ax, res[key])
  m = res.get("machine") or {}
  fig.suptitle(f"maxlm on real weights ({m.get('cpu_model', '?')}, {m.get('cores', '?')} cores)", fontsize=9)
  fig.savefig(path, dpi=100)


def _plot_ppl(ax, s: dict) -> None:
  rows = s["rows"]
  x = np.arange(len(rows))
  for off, side in ((-0.2, "maxlm"), (0.2, "transformers")):
    bars = ax.bar(x + off, [r[side]["perplexity"] for r in rows], 0.4, label=side)
    ax.bar_label(bars, fmt="{:.3f}", fontsize=7)
  ax.set_xticks(x, [f"{r['model']}\n{r['rel_diff']:+.3%}" for r in rows], fontsize=8)
  ax.set_ylabel("perplexity")
  ax.set_title(f"held-out perplexity (Python {s['text']['python']} docs)", fontsize=9)
  ax.legend(fontsize=8)


def _plot_decode(ax, s: dict) -> None:
  labels, groups = [], []
  for r in s["rows"]:
    labels.append(f"{r['model']}\nbatch {r['batch']}")
    groups.append({f"{x['side']} {x['weights']}": x["tokens_per_sec"] for x in r["sides"]})
  names = list(dict.fromkeys(n for g in groups for n in g))
  x = np.arange(len(groups))
  width = 0.8 / max(len(names), 1)
  for i, name in enumerate(names):
    ax.bar(x + (i - (len(names) - 1) / 2) * width, [g.get(name, 0) for g in groups], width, label=name)
  ax.set_xticks(x, labels, fontsize=7)
  ax.set_yscale("log")
  ax.set_ylabel("tokens/s (log)")
  ax.set_title("greedy decode", fontsize=9)
  ax.legend(fontsize=7)


def _plot_spec(ax, s: dict) -> None:
  rows = s["rows"]
  x = np.arange(len(rows))
  for off, key, label in ((-0.2, "speedup", "end to end"), (0.2, "decode_speedup", "after the first token")):
    bars = ax.bar(x + off, [r[key] for r in rows], 0.4, label=label)
    ax.bar_label(bars, labels=[f"{r[key]:.2f}x" for r in rows], fontsize=6)
  ax.legend(fontsize=7)
  ax.set_xticks(x, [f"{_w(r['target_weights'])}/{_w(r['draft_weights'])}\nk={r['k']}" for r in rows],
                fontsize=7)
  ax.axhline(s["target_speedup"], color="k", ls="--", lw=0.8)
  ax.set_ylabel("speed-up over the plain target")
  ax.set_title("speculative decoding (batch 1)", fontsize=9)


def _plot_quant(ax, s: dict) -> None:
  rows = s["rows"]
  for model in dict.fromkeys(r["model"] for r in rows):
    mine = [r for r in rows if r["model"] == model]
    ax.plot([r["weight_bytes"] / MIB for r in mine], [100 * r["perplexity_change"] for r in mine], "o", label=model)
    for r in mine:
      ax.annotate(f"{_w(r['weights'])}/kv {r['kv_cache']}", (r["weight_bytes"] / MIB, 100 * r["perplexity_change"]),
                  fontsize=6)
  ax.set_xlabel("weight MiB")
  ax.set_ylabel("perplexity change (%)")
  ax.set_title("quantization baselines", fontsize=9)
  ax.legend(fontsize=7)


def _plot_memory(ax, s: dict) -> None:
  rows = s["rows"]
  bars = ax.bar([textwrap.fill(r["name"], 18) for r in rows], [r["peak_rss_bytes"] / MIB for r in rows])
  ax.bar_label(bars, fmt="{:,.0f}", fontsize=7)
  ax.axhline(s["gguf_bytes"] / MIB, color="tab:orange", ls="--", lw=0.8, label="GGUF file")
  ax.axhline(s["param_bytes"] / MIB, color="k", ls="--", lw=0.8, label="float32 parameters")
  ax.tick_params(axis="x", labelsize=7)
  ax.set_ylabel("peak RSS (MiB)")
  ax.set_title(f"import peak memory ({s['model']})", fontsize=9)
  ax.legend(fontsize=7)
