"""Section quant: what round-to-nearest int8 / int4 weights and an int8 KV cache cost in perplexity, and save in
bytes, on real models: the baselines a better compression method must beat.

Every setting (--quant WEIGHTS/KV pairs, serve.weights / serve.kv_cache) scores the same rows of held-out text
(--seq-len + 1 consecutive tokens each, --quant-tokens in all) through the engine's cached forward, so the KV cache
format is exercised (decode_bench.quantization.cached_nll); the float32 setting is cross-checked against the
training forward (maxlm.eval) on the same rows. Bytes: every parameter as stored (scales included), and the KV
cache per token of context (scales included).
"""

from __future__ import annotations

import argparse
import math

from decode_bench.common import progress
from decode_bench.quantization import cached_nll, model_nll

from maxlm.serve.quantize import quantize_model, weight_bytes
from maxlm.workdir import load_workdir_config
from real_bench import heldout
from real_bench.common import engine, release
from real_bench.models import load_maxlm, maxlm_overrides


def section_quant(args: argparse.Namespace, get_model) -> dict:
  """Weight bytes, KV bytes per token and held-out perplexity of each setting, per --models model."""
  from flax import nnx

  texts, _ = heldout.source()
  count = max(1, args.quant_tokens // args.seq_len)
  out = []
  for key in args.quant_models:
    m = get_model(key)
    model, cfg, tok = load_maxlm(m)
    docs, _ = heldout.documents(tok, texts, count * (args.seq_len + 1) + 1)
    rows = heldout.rows(docs, args.seq_len, count)
    ref = model_nll(model, cfg, rows)
    progress(f"[quant] {key}: {count} rows of {args.seq_len} tokens; training-forward NLL {ref:.4f}")
    base = None
    for weights in dict.fromkeys(w for w, _ in args.quant):
      q = quantize_model(model, weights, group=cfg.serve.int4_group)
      wbytes = weight_bytes(nnx.state(q, nnx.Param))
      for kv in [k for w, k in args.quant if w == weights]:
        qcfg = load_workdir_config(m.workdir, maxlm_overrides("serve.max_batch=2", f"serve.max_len={args.seq_len}",
                                                              f"serve.weights={weights}", f"serve.kv_cache={kv}"))
        eng = engine(q, qcfg, tok)
        nll = cached_nll(eng, rows)
        spec = eng.cache_spec
        row = {"model": key, "weights": weights, "kv_cache": kv, "kv_dtype": spec.dtype, "weight_bytes": wbytes,
               "kv_bytes_per_token": spec.bytes() / (spec.num_pages * spec.page_size), "nll": nll,
               "perplexity": math.exp(nll), "tokens": int(rows.shape[0] * (rows.shape[1] - 1))}
        base = base if base is not None and base["model"] == key else row
        row.update(perplexity_change=row["perplexity"] / base["perplexity"] - 1,
                   weight_ratio=wbytes / base["weight_bytes"],
                   kv_ratio=row["kv_bytes_per_token"] / base["kv_bytes_per_token"])
        if row is base:
          row["training_forward_nll"] = ref  # the same rows through maxlm.eval: checks the cached path
        out.append(row)
        progress(f"[quant] {key} {weights}/{kv}: perplexity {row['perplexity']:.4f} "
                 f"({row['perplexity_change']:+.2%}), weights {wbytes / 2**20:,.0f} MiB")
        del eng
      del q
      release()
    del model
    release()
  return {"tokens": count * args.seq_len, "seq_len": args.seq_len, "rows": out}
