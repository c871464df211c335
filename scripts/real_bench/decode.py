"""Section decode: greedy tokens/s of maxlm, transformers `generate` and llama.cpp on the same prompts.

Each model's prompts are --prompt-len tokens of the held-out text (different documents per row); every side
generates exactly --max-tokens tokens per prompt (eos ignored), prefill included in the time. maxlm runs the engine
(serve.max_batch = the batch) over the float32 dequantized weights and over int8 weights (serve.weights);
transformers runs the float32 dequantized weights; llama.cpp runs the GGUF file's own quantized blocks.

Where the time goes: at these batch sizes a decode step streams every weight from memory once (the KV cache of a
few hundred tokens is ~1% of that), so bytes read per step / measured read bandwidth bounds the step time from
below; "of roofline" is how close each side gets to that bound.
"""

from __future__ import annotations

import argparse
import functools

import torch
from decode_bench.common import agreement, greedy, progress, timed_generate
from decode_bench.vs_hf import hf_generate
from flax import nnx

from maxlm.serve.quantize import quantize_model, weight_bytes
from maxlm.workdir import load_workdir_config
from real_bench import heldout, llamacpp
from real_bench.common import TARGETS, engine, measure, median, memory_bandwidth, release
from real_bench.models import gguf_summary, load_hf, load_maxlm, maxlm_overrides

WEIGHT_LABELS = {"none": "float32"}  # serve.weights=none: the model's own float32 weights


def step_bytes(model) -> int:
  """Weight bytes a decode step reads: every parameter but the embedding table, which only gives the batch's rows,
  unless it is also the (tied) output head."""
  total = weight_bytes(nnx.state(model, nnx.Param))
  embed = model.embed[...]
  return total - (0 if model.tie_embeddings else embed.size * embed.dtype.itemsize)


def gguf_step_bytes(summary: dict) -> int:
  """The same for llama.cpp: the file's tensor bytes, less token_embd when the file has its own output.weight."""
  return summary["tensor_bytes"] - (summary["token_embd_bytes"] if summary["has_output"] else 0)


def section_decode(args: argparse.Namespace, get_model) -> dict:
  """Tokens/s of every side at each batch size, for each --models model."""
  bw = memory_bandwidth()
  progress(f"[decode] memory read bandwidth {bw['bytes_per_sec'] / 1e9:.1f} GB/s (XLA "
           f"{bw['xla_bytes_per_sec'] / 1e9:.1f}, numpy {bw['numpy_bytes_per_sec'] / 1e9:.1f})")
  have_llama, llama_note = llamacpp.available()
  texts, _ = heldout.source()
  max_len = args.prompt_len + args.max_tokens
  rows = []
  for key in args.decode_models:
    m = get_model(key)
    model, cfg, tok = load_maxlm(m)
    docs, _ = heldout.documents(tok, texts, 64 * args.prompt_len * max(args.batches))
    prompts = heldout.prompts(docs, max(args.batches), args.prompt_len)
    served, nbytes = {}, {}
    for w in args.decode_weights:
      served[w] = quantize_model(model, w, group=cfg.serve.int4_group)
      nbytes[w] = step_bytes(served[w])
    nbytes["transformers"] = step_bytes(model)
    del model
    release()
    hf = load_hf(m)
    summary = gguf_summary(m.gguf)
    nbytes["llama.cpp"] = gguf_step_bytes(summary)
    llama = llamacpp.LlamaCppDecoder(m.gguf, max_len=max_len, max_batch=max(args.batches),
                                     threads=args.llama_threads[0]) if have_llama else None
    progress(f"[decode] {key}: bytes per step " + ", ".join(f"{k} {v / 2**20:,.0f} MiB" for k, v in nbytes.items()))
    for batch in args.batches:
      batch_prompts = prompts[:batch]
      runs = {}
      for w in args.decode_weights:
        bcfg = load_workdir_config(m.workdir, maxlm_overrides(f"serve.max_batch={batch}", f"serve.max_len={max_len}",
                                                              f"serve.weights={w}"))
        runs[f"maxlm {w}"] = functools.partial(timed_generate, engine(served[w], bcfg, tok), batch_prompts,
                                               greedy(args.max_tokens))
      for t in args.torch_threads:
        runs[f"transformers@{t}"] = functools.partial(_with_torch_threads, t, hf, batch_prompts, args.max_tokens)
      for t in args.llama_threads if llama is not None else []:
        runs[f"llama.cpp@{t}"] = functools.partial(_llama, llama, t, batch_prompts, args.max_tokens)
      # the engine's second run still compiles (bench_decode's note); transformers and llama.cpp need one
      warmup = {name: args.warmup if name.startswith("maxlm") else min(args.warmup, 1) for name in runs}
      times, outs = measure(runs, warmup=warmup, repeats=args.repeats, label=f"[decode] {key} batch {batch}")
      tokens = batch * args.max_tokens
      tps = {name: tokens / median(t) for name, t in times.items()}
      hf_name = max((n for n in tps if n.startswith("transformers@")), key=tps.get)
      ref_hf, ref_ml = outs[hf_name], outs.get("maxlm none")
      groups = [("maxlm", WEIGHT_LABELS.get(w, w), nbytes[w], [f"maxlm {w}"]) for w in args.decode_weights]
      groups.append(("transformers", "float32", nbytes["transformers"], [n for n in tps if n.startswith("trans")]))
      if llama is not None:
        groups.append(("llama.cpp", summary["quantization"], nbytes["llama.cpp"],
                       [n for n in tps if n.startswith("llama.cpp")]))
      sides = []
      for side, weights, b, names in groups:
        best = max(names, key=tps.get)
        roof = batch * bw["bytes_per_sec"] / b
        same_hf, prefix_hf = agreement(ref_hf, outs[best])
        sides.append({"side": side, "weights": weights, "threads": best.partition("@")[2] or None,
                      "tokens_per_sec": tps[best], "tokens_per_sec_by_run": {n: tps[n] for n in names},
                      "vs_transformers": tps[best] / tps[hf_name], "bytes_per_step": b,
                      "roofline_tokens_per_sec": roof, "of_roofline": tps[best] / roof,
                      "identical_to_transformers": None if side == "transformers" else same_hf,
                      "agreeing_prefix_vs_transformers": prefix_hf,
                      "identical_to_maxlm": None if ref_ml is None or best == "maxlm none"
                      else agreement(ref_ml, outs[best])[0], "times_s": times[best]})
      rows.append({"model": key, "batch": batch, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
                   "target_ratio": TARGETS.get(f"hf_ratio_batch{batch}"), "sides": sides,
                   "gguf": summary})
      progress(f"[decode] {key} batch {batch}: " + ", ".join(f"{s['side']} {s['weights']} {s['tokens_per_sec']:.1f} "
                                                             f"tok/s" for s in sides))
      del runs
      release()
    if llama is not None:
      llama.close()
    del hf, served
    release()
  return {"bandwidth": bw, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "rows": rows,
          "llama_cpp_missing": None if have_llama else llama_note,
          "timing": "median wall time of --repeats runs of the whole workload (prefill included) after --warmup "
                    "untimed runs, the sides alternating"}


def _with_torch_threads(threads: int, hf, prompts: list[list[int]], new_tokens: int):
  torch.set_num_threads(threads)
  return hf_generate(hf, prompts, new_tokens)


def _llama(decoder: llamacpp.LlamaCppDecoder, threads: int, prompts: list[list[int]], new_tokens: int):
  decoder.set_threads(threads)
  return llamacpp.timed(decoder, prompts, new_tokens)
