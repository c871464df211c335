"""Train-step throughput: maxlm (JAX) vs Hugging Face `LlamaForCausalLM` (torch CPU) at the same shape.

Both sides run a full optimizer step (forward, backward, global-norm clipping at 1.0, AdamW) on the same
random token batch, in float32, with the same model: 4 layers, d_model 256, SwiGLU 1024, 4 query / 2 KV
heads, untied embeddings, no biases, RMSNorm eps 1e-5, RoPE theta 10000. HF uses attn_implementation="sdpa"
(torch's fastest CPU attention). Steps are timed alternately (k maxlm steps, then k torch steps, per round)
after a warm-up that covers compilation; the report is the median step time.

Run:  python scripts/bench_train.py   (defaults: --vocab 512,32000 --rounds 10 --steps-per-round 2 --attention xla)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# bench_host: light; must run before jax is imported
from bench_host import background_cores, cpu_model, cpu_snapshot, machine, tune_malloc  # noqa: E402

MALLOC_TUNED = "--no-malloc-tuning" not in sys.argv[1:] and tune_malloc()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from maxlm import metrics as metrics_lib  # noqa: E402
from maxlm import sharding  # noqa: E402
from maxlm.config import load_config  # noqa: E402
from maxlm.train.state import count_params, init_train_state  # noqa: E402
from maxlm.train.step import make_train_step  # noqa: E402

TARGET_RATIO = 1.1  # the goal: maxlm tokens/s >= 1.1x torch at every vocab size
SHAPE = {"num_layers": 4, "d_model": 256, "mlp_dim": 1024, "num_heads": 4, "num_kv_heads": 2}
LR, B1, B2, EPS, WD, CLIP, RMS_EPS, ROPE_THETA = 3e-4, 0.9, 0.95, 1e-8, 0.1, 1.0, 1e-5, 10000.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line options."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--vocab", default="512,32000", help="comma-separated vocabulary sizes")
  p.add_argument("--attention", default="xla",
                 help="comma-separated maxlm attention backends to time: xla, dot_product (within noise of each "
                      "other on this CPU; xla is the config default)")
  p.add_argument("--scan-unroll", type=int, default=SHAPE["num_layers"],
                 help="maxlm model.scan_unroll; the default unrolls all layers, as configs/tiny.py does for CPU "
                      "(the base config's rolled scan, 1, is ~10-20%% slower on XLA:CPU)")
  p.add_argument("--rounds", type=int, default=10, help="alternating measurement rounds per vocab size")
  p.add_argument("--steps-per-round", type=int, default=2,
                 help="timed steps per framework per round (short rounds: both see the same background load)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps per framework before timing")
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="bench_results/bench_train.json", help="JSON results path")
  p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                 help="write a PNG bar chart next to the JSON")
  p.add_argument("--malloc-tuning", action=argparse.BooleanOptionalAction, default=True,
                 help="glibc mallopt for the whole process (both frameworks): keep freed memory mapped; "
                      "applied at import, before jax/torch start threads")
  return p.parse_args(argv)


def maxlm_config(vocab: int, attention: str, seq_len: int, batch_size: int, scan_unroll: int = SHAPE["num_layers"]):
  """The maxlm config of the benchmarked shape: constant lr, no warmup, fp32, one device."""
  overrides = [f"model.{k}={v}" for k, v in SHAPE.items()] + [
    f"model.vocab_size={vocab}", f"model.max_seq_len={seq_len}", "model.tie_embeddings=false",
    "model.attention_bias=false", f"model.attention={attention}", "model.dtype=float32",
    "model.param_dtype=float32", f"model.rms_norm_eps={RMS_EPS}", f"model.rope_theta={ROPE_THETA}",
    "model.scan_layers=true", f"model.scan_unroll={scan_unroll}",
    f"data.seq_len={seq_len}", f"data.batch_size={batch_size}", "train.grad_accum_steps=1",
    f"train.learning_rate={LR}", "train.schedule=constant", "train.warmup_steps=0", f"train.b1={B1}",
    f"train.b2={B2}", f"train.eps={EPS}", f"train.weight_decay={WD}", f"train.grad_clip={CLIP}",
    "train.z_loss=0.0", "mesh.data=1",
  ]
  return load_config("base", overrides)


class MaxlmRunner:
  """A jitted, donated maxlm train step on a fixed batch (as in maxlm.train.loop)."""

  def __init__(self, cfg, batch: dict[str, np.ndarray]):
    mesh = sharding.make_mesh(cfg.mesh)
    graphdef, self.state, tx, schedule = init_train_state(cfg, mesh)
    self.num_params = count_params(self.state["params"])
    batch_sharding = sharding.batch_sharding(mesh)
    state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
    self.step_fn = jax.jit(make_train_step(graphdef, tx, schedule, z_loss=0.0, accum_steps=1),
                           in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
                           donate_argnums=0)
    self.batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
    self.loss = math.nan

  def step(self) -> float:
    """One synchronised optimizer step; returns its wall time in seconds."""
    t0 = time.perf_counter()
    self.state, metrics = self.step_fn(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    dt = time.perf_counter() - t0
    self.loss = float(metrics["loss"])
    return dt


class TorchRunner:
  """HF LlamaForCausalLM (sdpa attention) + clip_grad_norm_ + torch.optim.AdamW on a fixed batch."""

  def __init__(self, vocab: int, seq_len: int, batch: dict[str, np.ndarray], seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
      vocab_size=vocab, hidden_size=SHAPE["d_model"], intermediate_size=SHAPE["mlp_dim"],
      num_hidden_layers=SHAPE["num_layers"], num_attention_heads=SHAPE["num_heads"],
      num_key_value_heads=SHAPE["num_kv_heads"], max_position_embeddings=seq_len, rms_norm_eps=RMS_EPS,
      rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, tie_word_embeddings=False,
      attention_bias=False, mlp_bias=False, attention_dropout=0.0, use_cache=False, hidden_act="silu",
      attn_implementation="sdpa")
    self.model = LlamaForCausalLM(config).to(torch.float32).train()
    self.attn_impl = self.model.config._attn_implementation
    self.num_params = sum(p.numel() for p in self.model.parameters())
    decay = [p for n, p in self.model.named_parameters() if "norm" not in n]  # maxlm: no decay on norm scales
    no_decay = [p for n, p in self.model.named_parameters() if "norm" in n]
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                                 lr=LR, betas=(B1, B2), eps=EPS)
    self.inputs = torch.from_numpy(batch["inputs"]).long()
    self.targets = torch.from_numpy(batch["targets"]).long()
    self.positions = torch.from_numpy(batch["positions"]).long()
    self.loss = math.nan

  def step(self) -> float:
    """One optimizer step (torch CPU is synchronous); returns its wall time in seconds."""
    t0 = time.perf_counter()
    self.opt.zero_grad(set_to_none=True)
    logits = self.model(input_ids=self.inputs, position_ids=self.positions).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
    self.opt.step()
    dt = time.perf_counter() - t0
    self.loss = float(loss.detach())
    return dt


def make_batch(vocab: int, batch_size: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
  """A random token batch without padding: one segment per row, positions 0..L-1."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, size=(batch_size, seq_len + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1].copy(), "targets": tokens[:, 1:].copy(),
          "segment_ids": np.ones((batch_size, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy()}


def bench_vocab(vocab: int, attentions: list[str], args: argparse.Namespace, peak: float) -> list[dict]:
  """Times every maxlm backend and torch alternately at one vocabulary size; one result row each."""
  batch = make_batch(vocab, args.batch_size, args.seq_len, args.seed)
  runners: dict[str, MaxlmRunner | TorchRunner] = {}
  for attention in attentions:
    cfg = maxlm_config(vocab, attention, args.seq_len, args.batch_size, args.scan_unroll)
    runners[f"maxlm/{attention}"] = MaxlmRunner(cfg, batch)
  runners["torch"] = TorchRunner(vocab, args.seq_len, batch, args.seed)
  counts = {name: r.num_params for name, r in runners.items()}
  print(f"\nvocab {vocab}: parameters {', '.join(f'{n} {c:,}' for n, c in counts.items())}")
  if len(set(counts.values())) != 1:
    raise SystemExit(f"parameter counts differ: {counts}; the two models do not have the same shape")
  if runners["torch"].attn_impl != "sdpa":
    raise SystemExit(f"HF attention implementation is {runners['torch'].attn_impl!r}, expected 'sdpa'")

  compile_s = {}
  for name, runner in runners.items():
    t0 = time.perf_counter()
    for _ in range(args.warmup):
      runner.step()
    compile_s[name] = time.perf_counter() - t0
  print("warm-up (incl. compilation): " + ", ".join(f"{n} {s:.1f}s" for n, s in compile_s.items()))

  times: dict[str, list[float]] = {name: [] for name in runners}
  snap = cpu_snapshot()
  for r in range(args.rounds):
    for name, runner in runners.items():
      times[name].extend(runner.step() for _ in range(args.steps_per_round))
    print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
      f"{n} {statistics.median(t[-args.steps_per_round:]) * 1e3:.0f} ms" for n, t in times.items()))

  background = background_cores(snap, cpu_snapshot())
  print(f"  other processes kept {background:.2f} of {os.cpu_count()} cores busy while timing"
        + (" -- a shared machine: torch's OpenMP suffers more than XLA, treat the ratio with care"
           if background > 0.2 else ""))
  cfg = maxlm_config(vocab, attentions[0], args.seq_len, args.batch_size, args.scan_unroll)
  flops_per_token = metrics_lib.model_flops_per_token(cfg.model, args.seq_len)
  tokens = args.batch_size * args.seq_len
  torch_tps = tokens / statistics.median(times["torch"])
  rows = []
  for name, runner in runners.items():
    step_s = statistics.median(times[name])
    tps = tokens / step_s
    framework, _, attention = name.partition("/")
    rows.append({
      "vocab": vocab, "framework": framework, "attention": attention or runners["torch"].attn_impl,
      "params": counts[name], "median_step_ms": step_s * 1e3, "min_step_ms": min(times[name]) * 1e3,
      "tokens_per_sec": tps, "ratio_vs_torch": tps / torch_tps,
      "mfu": metrics_lib.mfu(flops_per_token, tps, peak), "flops_per_token": flops_per_token,
      "warmup_s": compile_s[name], "final_loss": runner.loss, "background_cores": background,
      "step_times_ms": [t * 1e3 for t in times[name]],
    })
  return rows


def markdown_table(rows: list[dict]) -> str:
  """The results as a markdown table."""
  lines = ["| vocab | framework | attention | params | median step (ms) | tokens/s | vs torch | MFU |",
           "|---:|---|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['vocab']} | {r['framework']} | {r['attention']} | {r['params']:,} | "
                 f"{r['median_step_ms']:.0f} | {r['tokens_per_sec']:,.0f} | {r['ratio_vs_torch']:.2f}x | "
                 f"{r['mfu']:.1%} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
  """Bar chart of tokens/s per vocab size and framework."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  vocabs = sorted({r["vocab"] for r in rows})
  names = list(dict.fromkeys(f"{r['framework']} ({r['attention']})" for r in rows))
  fig = Figure(figsize=(7, 4), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    values = [next((r["tokens_per_sec"] for r in rows if r["vocab"] == v
                    and f"{r['framework']} ({r['attention']})" == name), 0.0) for v in vocabs]
    bars = ax.bar(np.arange(len(vocabs)) + (i - (len(names) - 1) / 2) * width, values, width, label=name)
    ax.bar_label(bars, fmt="{:,.0f}", fontsize=8)
  ax.set_xticks(np.arange(len(vocabs)), [f"vocab {v}" for v in vocabs])
  ax.set_ylabel("tokens/s (median train step)")
  ax.set_title(title)
  ax.legend()
  fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
  """Runs the benchmark, prints the table, writes the JSON (and the PNG)."""
  args = parse_args(argv)
  vocabs = [int(v) for v in args.vocab.split(",") if v.strip()]
  attentions = [a.strip() for a in args.attention.split(",") if a.strip()]
  torch.set_num_threads(os.cpu_count())
  peak, peak_source = metrics_lib.peak_flops_per_device(jax.devices()[0], dtype="float32")
  print(f"{cpu_model()}; jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs; peak {peak / 1e9:.1f} GFLOP/s ({peak_source}); "
        f"malloc tuning {'on' if MALLOC_TUNED else 'off'}")
  rows = []
  for vocab in vocabs:
    rows.extend(bench_vocab(vocab, attentions, args, peak))
  table = markdown_table(rows)
  print("\n" + table)
  verdicts = {}
  for vocab in vocabs:
    best = max((r for r in rows if r["vocab"] == vocab and r["framework"] == "maxlm"),
               key=lambda r: r["ratio_vs_torch"])
    verdicts[str(vocab)] = {"attention": best["attention"], "ratio_vs_torch": best["ratio_vs_torch"],
                            "meets_target": best["ratio_vs_torch"] >= TARGET_RATIO}
    verdict = "meets" if best["ratio_vs_torch"] >= TARGET_RATIO else "MISSES"
    print(f"vocab {vocab}: maxlm ({best['attention']}) {best['ratio_vs_torch']:.2f}x torch: {verdict} the "
          f"{TARGET_RATIO}x target")
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  meta = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
          "shape": SHAPE, "seq_len": args.seq_len, "batch_size": args.batch_size, "dtype": "float32",
          "optimizer": {"lr": LR, "b1": B1, "b2": B2, "eps": EPS, "weight_decay": WD, "grad_clip": CLIP},
          "maxlm_scan_unroll": args.scan_unroll, "rounds": args.rounds, "steps_per_round": args.steps_per_round,
          "warmup_steps": args.warmup,
          "peak_flops": peak, "peak_source": peak_source, "jax": jax.__version__, "torch": torch.__version__,
          "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
          "cpu_model": cpu_model(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "malloc_tuning": MALLOC_TUNED}
  meta["target_ratio"] = TARGET_RATIO
  out.write_text(json.dumps({"meta": meta, "machine": machine(MALLOC_TUNED), "verdicts": verdicts,
                             "results": rows}, indent=2))
  print(f"wrote {out}")
  if args.plot:
    png = out.with_suffix(".png")
    plot(rows, png, f"train step: {SHAPE['num_layers']}L d{SHAPE['d_model']} ffn{SHAPE['mlp_dim']} "
                    f"{SHAPE['num_heads']}H/{SHAPE['num_kv_heads']}KV, seq {args.seq_len} x batch {args.batch_size}, "
                    "fp32 CPU")
    print(f"wrote {png}")


if __name__ == "__main__":
  main()
