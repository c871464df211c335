"""Section ppl: perplexity and bits per byte of the held-out text, maxlm against transformers on the same tokens.

maxlm scores with maxlm.eval (WindowScorer + score_documents: rolling windows of --seq-len, every token after a
document's first scored once); transformers scores exactly the same rows (inputs, targets, weights) with its own
forward and log-softmax (torch at the first --torch-threads count). Both run the float32 dequantized weights of the
same GGUF.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from decode_bench.common import progress

from maxlm import sharding
from maxlm.eval.loglikelihood import RowScores, Scorer, WindowScorer, score_documents
from real_bench import heldout
from real_bench.common import TARGETS, release
from real_bench.models import load_hf, load_maxlm


def hf_scorer(model) -> Scorer:
  """transformers' forward as a maxlm.eval scorer: per-row sums of the weighted targets' log-probabilities."""

  def score(inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> RowScores:
    n = len(inputs)
    logprob, count, greedy = np.zeros(n), np.zeros(n), np.zeros(n, bool)
    real = np.flatnonzero(weights.sum(axis=1) > 0)  # padding rows: nothing to score
    if len(real):
      with torch.inference_mode():
        logits = model(torch.from_numpy(inputs[real]).long()).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        tgt = torch.from_numpy(targets[real]).long()
        tok = torch.gather(logp, -1, tgt[..., None])[..., 0].double().numpy()
        hit = (logits.argmax(-1) == tgt).numpy()
      w = weights[real].astype(np.float64)
      logprob[real] = (tok * w).sum(axis=1)
      count[real] = w.sum(axis=1)
      greedy[real] = np.all(hit | (w == 0), axis=1)
    return RowScores(logprob, count, greedy)

  return score


def _score(scorer: Scorer, docs: list[np.ndarray], args: argparse.Namespace, label: str) -> tuple[float, int, float]:
  """(total NLL, scored tokens, seconds) of the documents, with a progress line every ~10% of the tokens."""
  total = sum(len(d) - 1 for d in docs)
  done, shown = [0], [0.0]
  t0 = time.perf_counter()

  def on_batch(finished) -> None:
    done[0] += int(finished.tokens.sum())
    if done[0] / total >= shown[0] + 0.1 or done[0] == total:
      shown[0] = done[0] / total
      rate = done[0] / (time.perf_counter() - t0)
      progress(f"[ppl] {label}: {done[0]:,}/{total:,} tokens ({rate:,.0f} tok/s)")

  s = score_documents(scorer, docs, seq_len=args.seq_len, batch_size=args.ppl_batch, on_batch=on_batch)
  return float(s.nll.sum()), int(s.tokens.sum()), time.perf_counter() - t0


def _metrics(nll: float, tokens: int, text_bytes: int, seconds: float) -> dict:
  return {"nll": nll, "tokens": tokens, "loss": nll / tokens, "perplexity": math.exp(nll / tokens),
          "bits_per_byte": nll / math.log(2) / text_bytes, "seconds": seconds, "tokens_per_sec": tokens / seconds}


def tokenizer_agreement(hf_dir, tokenizer, texts: list[str]) -> float:
  """Share of the texts that maxlm's tokenizer and transformers' (loaded from the GGUF) encode to the same ids."""
  from transformers import AutoTokenizer

  hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
  same = [hf_tok(t, add_special_tokens=False)["input_ids"] == list(tokenizer.encode(t)) for t in texts]
  return sum(same) / len(same)


def section_ppl(args: argparse.Namespace, get_model) -> dict:
  """Perplexity and bits per byte of each --models model under maxlm and transformers."""
  texts, src = heldout.source()
  torch.set_num_threads(args.torch_threads[0])
  rows = []
  for key in args.ppl_models:
    m = get_model(key)
    model, cfg, tok = load_maxlm(m)
    docs, used = heldout.documents(tok, texts, args.tokens)
    text_bytes = sum(len(t.encode("utf-8")) for t in used)
    agree = tokenizer_agreement(m.hf_dir, tok, used)
    progress(f"[ppl] {key}: {len(docs)} documents, {sum(len(d) - 1 for d in docs):,} scored tokens, "
             f"{text_bytes:,} bytes; tokenizer = transformers' on {agree:.0%} of them")
    nll, n, sec = _score(WindowScorer(model, sharding.config_rules(cfg)), docs, args, f"{key} maxlm")
    ours = _metrics(nll, n, text_bytes, sec)
    del model
    release()
    hf = load_hf(m)
    nll, n_hf, sec = _score(hf_scorer(hf), docs, args, f"{key} transformers")
    theirs = _metrics(nll, n_hf, text_bytes, sec)
    del hf
    release()
    rel = ours["perplexity"] / theirs["perplexity"] - 1
    rows.append({"model": key, "gguf": str(m.gguf), "documents": len(docs), "text_bytes": text_bytes,
                 "seq_len": args.seq_len, "bos_prefixed": bool(tok.bos_id is not None and docs[0][0] == tok.bos_id),
                 "tokenizer_agreement": agree, "maxlm": ours, "transformers": theirs, "rel_diff": rel,
                 "target_rel_diff": TARGETS["ppl_rel_diff"], "met": abs(rel) <= TARGETS["ppl_rel_diff"]})
    progress(f"[ppl] {key}: perplexity maxlm {ours['perplexity']:.4f}, transformers {theirs['perplexity']:.4f} "
             f"({rel:+.4%}); bits/byte {ours['bits_per_byte']:.4f}")
  return {"text": src, "rows": rows}
