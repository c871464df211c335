"""Section 4: weight and KV quantization of the trained target: bytes, held-out perplexity, decode tokens/s."""

from __future__ import annotations

import argparse
import functools
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decode_bench.common import agreement, greedy, make_engine, progress, timed_generate
from decode_bench.trained import eval_prompts, workdir_cfg
from maxlm import sharding
from maxlm.eval.loglikelihood import WindowScorer, score_documents
from maxlm.models.transformer import Transformer
from maxlm.serve import kv_cache
from maxlm.serve.engine import Engine
from maxlm.serve.forward import forward_cached
from maxlm.serve.quantize import quantize_model, weight_bytes
from maxlm.train.step import token_loss_sums


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
    with sharding.use_mesh(engine.mesh, engine.rules):
      cache = kv_cache.init_cache(engine.cache_spec)
      total += float(_cached_nll(engine.state, cache, jnp.asarray(chunk[:, :-1]), jnp.asarray(chunk[:, 1:]),
                                 jnp.asarray(table), graphdef=engine.graphdef, kv_len=per_seq * engine.page_size))
  return total / (rows.shape[0] * t)


def model_nll(model: Transformer, cfg, rows: np.ndarray) -> float:
  """Mean token NLL of rows [n, len + 1] under the model's training forward, scored by maxlm.eval (one window per
  row): the cross-check of cached_nll."""
  scorer = WindowScorer(model, sharding.config_rules(cfg))
  scores = score_documents(scorer, list(rows), seq_len=rows.shape[1] - 1, batch_size=-(-8 // scorer.row_multiple)
                           * scorer.row_multiple)
  return float(scores.nll.sum() / scores.tokens.sum())


def section_quant(args: argparse.Namespace, info: dict) -> list[dict]:
  """Weight / KV bytes, held-out perplexity and decode tokens/s of the target per quantization setting."""
  docs = info["eval_docs"]
  stream = docs.tokens
  need = args.eval_rows * (args.eval_len + 1)
  if len(stream) < need:
    raise SystemExit(f"held-out split has {len(stream)} tokens, {need} needed (lower --eval-rows / --eval-len)")
  rows = stream[:need].reshape(args.eval_rows, args.eval_len + 1).astype(np.int32)
  ref_nll = model_nll(info["target_model"], info["target_cfg"], rows)
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
