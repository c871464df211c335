"""Compression benchmark on real models: held-out perplexity, bytes and compression time of `maxlm quantize` (RTN,
GPTQ with and without act-order, 3-bit GPTQ) and `maxlm prune` (magnitude, Wanda, SparseGPT at 50% and 2:4), with
the papers' targets as ratios against round to nearest / magnitude pruning, and decode speed of GPTQ int4 against the
float model in the engine.

Calibration and held-out text differ: calibration is Python standard-library source (email/, http/, json/, logging/,
unittest/: code with English docstrings; --samples windows of --calib-seq tokens), held-out text is CPython's
pydoc topics (English prose, `scripts/real_bench/heldout.py`), scored by `maxlm eval --data` in windows of --eval-seq
tokens. Every configuration runs through the CLI, as a user would, in its own process.

Targets (after the GPTQ, SparseGPT and Wanda papers' tables): GPTQ int4 g128 loses at most half the perplexity RTN
int4 g128 loses; SparseGPT and Wanda at 50% lose at most a third of what magnitude pruning at 50% loses.

Run:  python scripts/bench_compress.py                               (SmolLM2-135M; ~40 minutes on 2 cores)
      python scripts/bench_compress.py --models smollm2-135m,qwen2.5-coder-0.5b --samples 128 --calib-seq 2048
The GPTQ int4 g128 and SparseGPT 50% jobs also run in llm-compressor (torch CPU, its own venv:
scripts/bench_compress_llmcompressor.py) on the same calibration windows and held-out tokens (--llmc-models).
Not here yet: AWQ (see the JSON's "not_run").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_compress_llmcompressor  # noqa: E402
import bench_host  # noqa: E402
import fetch_models  # noqa: E402

CONFIGS = {  # name -> (command, arguments)
  "RTN int4 g128": ("quantize", ["--method", "rtn", "--bits", "4", "--group", "128"]),
  "GPTQ int4 g128": ("quantize", ["--method", "gptq", "--bits", "4", "--group", "128"]),
  "GPTQ int4 g128 act-order": ("quantize", ["--method", "gptq", "--bits", "4", "--group", "128", "--act-order"]),
  "GPTQ int4 g128 static groups": ("quantize", ["--method", "gptq", "--bits", "4", "--group", "128",
                                                "--static-groups"]),
  "RTN int3 g128": ("quantize", ["--method", "rtn", "--bits", "3", "--group", "128"]),
  "GPTQ int3 g128": ("quantize", ["--method", "gptq", "--bits", "3", "--group", "128"]),
  "magnitude 50%": ("prune", ["--method", "magnitude", "--sparsity", "0.5"]),
  "Wanda 50%": ("prune", ["--method", "wanda", "--sparsity", "0.5"]),
  "SparseGPT 50%": ("prune", ["--method", "sparsegpt", "--sparsity", "0.5"]),
  "magnitude 2:4": ("prune", ["--method", "magnitude", "--pattern", "2:4"]),
  "Wanda 2:4": ("prune", ["--method", "wanda", "--pattern", "2:4"]),
  "SparseGPT 2:4": ("prune", ["--method", "sparsegpt", "--pattern", "2:4"]),
}
TARGETS = [("GPTQ int4 g128", "RTN int4 g128", 0.5), ("GPTQ int3 g128", "RTN int3 g128", 0.5),
           ("Wanda 50%", "magnitude 50%", 1 / 3), ("SparseGPT 50%", "magnitude 50%", 1 / 3),
           ("Wanda 2:4", "magnitude 2:4", 1 / 3), ("SparseGPT 2:4", "magnitude 2:4", 1 / 3)]
CALIBRATION_PACKAGES = ("email", "http", "json", "logging", "unittest")


def maxlm(*args: str) -> list[str]:
  return [sys.executable, "-m", "maxlm.cli", *args]


def run(cmd: list[str], log: Path) -> float:
  """Runs a command to the end (output to `log`); its wall seconds."""
  t0 = time.perf_counter()
  with open(log, "w") as f:
    code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
  if code:
    raise RuntimeError(f"{' '.join(cmd)} failed; see {log}:\n{log.read_text()[-3000:]}")
  return time.perf_counter() - t0


def heldout_texts(tokenizer, path: Path, tokens: int) -> list:
  """The first pydoc topics (sorted) whose scored tokens under `tokenizer` add up to `tokens`, written to `path` as
  JSONL (what `maxlm eval --data` reads); returns their token arrays (what llm-compressor's side scores)."""
  from real_bench import heldout

  texts, _ = heldout.source()
  docs, used = heldout.documents(tokenizer, texts, tokens)
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in used))
  return docs


def perplexity(workdir: Path, data: Path, seq: int, out: Path) -> dict[str, Any]:
  run(maxlm("eval", f"--workdir={workdir}", "--data", str(data), "--seq-len", str(seq), "--output", str(out),
            "--quiet"), out.with_suffix(".log"))
  return json.loads(out.read_text())["total"]


def decode_speed(workdir: Path, steps: int, log: Path) -> dict[str, Any]:
  """Steady decode tokens/s of the workdir's model in the engine (batch 1 and 8, greedy, after a warm-up run)."""
  code = f"""
import json, time
from maxlm.serve.engine import Engine
from maxlm.serve.request import SamplingParams
e = Engine.from_workdir({str(workdir)!r}, ("--config.serve.max_len=512", "--config.serve.max_batch=8"))
out = {{}}
for batch in (1, 8):
  prompts = [[1 + i, 2 + i, 3 + i, 4 + i] for i in range(batch)]
  p = SamplingParams(max_tokens={steps}, temperature=0.0, ignore_eos=True)
  e.generate(prompts, p)
  t0 = time.perf_counter(); e.generate(prompts, p); dt = time.perf_counter() - t0
  out[f"batch{{batch}}"] = batch * {steps} / dt
print(json.dumps(out))
"""
  run([sys.executable, "-c", code], log)
  return json.loads(log.read_text().strip().splitlines()[-1])


def section_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
  from maxlm.compress.calibration import calibration_tokens
  from maxlm.workdir import load_workdir_tokenizer

  base = fetch_models.fetch_workdir(name)
  tokenizer = load_workdir_tokenizer(base)
  data = work / f"{name}-heldout.jsonl"
  docs = heldout_texts(tokenizer, data, args.eval_tokens)
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  paths = [str(stdlib / p) for p in CALIBRATION_PACKAGES]
  calib = ["--calibration", *paths, "--samples", str(args.samples), "--seq-len", str(args.calib_seq),
           "--batch-size", str(args.batch_size), "--quiet"]
  out: dict[str, Any] = {"workdir": str(base), "heldout_documents": len(docs),
                         "heldout_tokens": int(sum(len(d) - 1 for d in docs)), "rows": {}}
  t0 = time.perf_counter()
  out["rows"]["float32"] = {"ppl": perplexity(base, data, args.eval_seq, work / f"{name}-float.json")["perplexity"]}
  out["rows"]["float32"]["eval_seconds"] = time.perf_counter() - t0
  print(f"{name} float32: perplexity {out['rows']['float32']['ppl']:.3f}", flush=True)
  for label, (command, extra) in CONFIGS.items():
    if args.configs and label not in args.configs:
      continue
    dst = work / f"{name}-{label.replace(' ', '_').replace(':', '-').replace('%', 'pct')}"
    seconds = run(maxlm(command, f"--workdir={base}", f"--output={dst}", *extra, *calib), dst.with_suffix(".log"))
    record = json.loads((dst / "compression.json").read_text())
    ppl = perplexity(dst, data, args.eval_seq, dst.with_suffix(".eval.json"))["perplexity"]
    row = {"ppl": ppl, "compress_seconds": record["seconds"], "command_seconds": seconds,
           "bytes": record.get("bytes"), "mean_relative_error": _mean_error(record)}
    out["rows"][label] = row
    print(f"{name} {label}: perplexity {ppl:.3f}, compressed in {record['seconds']:.0f}s", flush=True)
    if label == "GPTQ int4 g128" and args.decode_steps:
      row["decode_tokens_per_sec"] = decode_speed(dst, args.decode_steps, dst.with_suffix(".decode.log"))
      out["rows"]["float32"]["decode_tokens_per_sec"] = decode_speed(base, args.decode_steps,
                                                                     work / f"{name}-float.decode.log")
  if name in args.llmc_models:  # the same windows `maxlm quantize` drew (seed 0), the same held-out tokens
    windows, _ = calibration_tokens(tokenizer, samples=args.samples, seq_len=args.calib_seq, paths=paths, seed=0)
    folder = fetch_models.fetch_transformers(name)
    out["llmcompressor"] = {}
    for method, mine in (("none", "float32"), ("gptq", "GPTQ int4 g128"), ("sparsegpt", "SparseGPT 50%")):
      row = bench_compress_llmcompressor.llmc_row(folder, windows, docs, args.eval_seq, method, work / "llmc",
                                                  bench_compress_llmcompressor.DEFAULT_ROOT)
      out["llmcompressor"][mine] = row
      if "perplexity" in row and mine in out["rows"]:
        row["maxlm_ppl_ratio"] = out["rows"][mine]["ppl"] / row["perplexity"]
        if "compress_seconds" in out["rows"][mine]:
          row["maxlm_time_ratio"] = out["rows"][mine]["compress_seconds"] / row["seconds"]
      print(f"{name} llm-compressor {mine}: {row.get('perplexity', row.get('missing'))}", flush=True)
  float_ppl = out["rows"]["float32"]["ppl"]
  out["targets"] = []
  for method, baseline, limit in TARGETS:
    if method in out["rows"] and baseline in out["rows"]:
      lost, base_lost = out["rows"][method]["ppl"] - float_ppl, out["rows"][baseline]["ppl"] - float_ppl
      ratio = lost / base_lost if base_lost > 0 else float("nan")
      out["targets"].append({"method": method, "baseline": baseline, "loss_ratio": ratio, "limit": limit,
                             "met": bool(ratio <= limit)})
  for mine, row in out.get("llmcompressor", {}).items():
    if "maxlm_ppl_ratio" in row and mine != "float32":
      out["targets"].append({"method": f"maxlm {mine}", "baseline": f"llm-compressor {mine}",
                             "ppl_ratio": row["maxlm_ppl_ratio"], "limit": 1.02,
                             "met": bool(row["maxlm_ppl_ratio"] <= 1.02)})
  return out


def _mean_error(record: dict) -> float:
  errs = [v["relative_error"] for layer in record["layers"] for v in layer.values() if isinstance(v, dict)]
  return sum(errs) / len(errs)


def print_tables(results: dict[str, Any]) -> None:
  for name, res in results["models"].items():
    print(f"\n{name}: held-out perplexity ({res['heldout_tokens']:,} tokens of {results['heldout']}, seq "
          f"{results['eval_seq']})")
    print(f"{'configuration':<28}{'perplexity':>11}{'Δ':>9}{'MiB':>8}{'time s':>8}{'layer err':>11}")
    float_ppl = res["rows"]["float32"]["ppl"]
    for label, row in res["rows"].items():
      mib = f"{row['bytes']['quantized'] / 2**20:.1f}" if row.get("bytes") else "-"
      t = f"{row['compress_seconds']:.0f}" if "compress_seconds" in row else "-"
      err = f"{row['mean_relative_error']:.4f}" if "mean_relative_error" in row else "-"
      print(f"{label:<28}{row['ppl']:>11.3f}{row['ppl'] - float_ppl:>+9.3f}{mib:>8}{t:>8}{err:>11}")
    for label, row in res.get("llmcompressor", {}).items():
      if "missing" in row:
        print(f"  llm-compressor {label}: {row['missing']}")
        continue
      extra = f", maxlm / llm-compressor perplexity {row['maxlm_ppl_ratio']:.4f}" if "maxlm_ppl_ratio" in row else ""
      extra += f", time {row['maxlm_time_ratio']:.2f}x" if "maxlm_time_ratio" in row else ""
      print(f"  llm-compressor {label}: perplexity {row['perplexity']:.3f} in {row['seconds']:.0f}s{extra}")
    for tgt in res["targets"]:
      if "loss_ratio" in tgt:
        print(f"  {tgt['method']} loses {tgt['loss_ratio']:.2f}x what {tgt['baseline']} loses (target <= "
              f"{tgt['limit']:.2f}): {'met' if tgt['met'] else 'MISSED'}")
      else:
        print(f"  {tgt['method']} perplexity / {tgt['baseline']}'s: {tgt['ppl_ratio']:.4f} (target <= "
              f"{tgt['limit']:.2f}): {'met' if tgt['met'] else 'MISSED'}")
    for label, row in res["rows"].items():
      if "decode_tokens_per_sec" in row:
        d = row["decode_tokens_per_sec"]
        print(f"  decode {label}: {d['batch1']:.1f} tok/s at batch 1, {d['batch8']:.1f} at batch 8")


def plot(results: dict[str, Any], png: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models = list(results["models"])
  fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
  for ax, name in zip(axes[0], models):
    rows = results["models"][name]["rows"]
    labels = list(rows)
    ax.barh(labels, [rows[k]["ppl"] for k in labels],
            color=["gray" if k == "float32" else "tab:blue" if "int" in k else "tab:orange" for k in labels])
    ax.axvline(rows["float32"]["ppl"], color="k", lw=0.8)
    ax.set_xscale("log")  # magnitude pruning is two orders of magnitude off the rest
    for i, k in enumerate(labels):
      ax.text(rows[k]["ppl"], i, f" {rows[k]['ppl']:.1f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_title(f"{name}: held-out perplexity (log scale, lower is better)")
  fig.tight_layout()
  fig.savefig(png, dpi=110)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--models", default="smollm2-135m")
  ap.add_argument("--configs", default="", help="comma-separated configuration names (default: all)")
  ap.add_argument("--samples", type=int, default=32, help="calibration windows")
  ap.add_argument("--calib-seq", type=int, default=512, help="tokens per calibration window")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--eval-seq", type=int, default=2048)
  ap.add_argument("--eval-tokens", type=int, default=30_000, help="held-out tokens scored per model")
  ap.add_argument("--llmc-models", default="smollm2-135m",
                  help="models whose GPTQ int4 and SparseGPT 50%% jobs also run in llm-compressor ('' for none)")
  ap.add_argument("--decode-steps", type=int, default=32, help="0 skips the decode comparison")
  ap.add_argument("--work", default=None)
  ap.add_argument("--out", default="bench_results/bench_compress.json")
  args = ap.parse_args()
  args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
  args.llmc_models = [m.strip() for m in args.llmc_models.split(",") if m.strip()]
  unknown = [c for c in args.configs if c not in CONFIGS]
  if unknown:
    ap.error(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")
  work = Path(args.work or tempfile.mkdtemp(prefix="bench_compress-"))
  work.mkdir(parents=True, exist_ok=True)
  results: dict[str, Any] = {"machine": bench_host.machine(), "work": str(work), "eval_seq": args.eval_seq,
                             "calibration": {"packages": CALIBRATION_PACKAGES, "samples": args.samples,
                                             "seq_len": args.calib_seq},
                             "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                             "heldout": "pydoc_data.topics (CPython's pydoc topics, sorted), the first --eval-tokens",
                             "models": {}, "not_run": {"AWQ": "not implemented yet"}}
  os.environ.setdefault("TQDM_DISABLE", "1")
  started = time.perf_counter()
  for name in [m.strip() for m in args.models.split(",") if m.strip()]:
    results["models"][name] = section_model(name, args, work)
  results["seconds"] = time.perf_counter() - started
  print_tables(results)
  bench_host.write_results(results, args.out, lambda png: plot(results, png))


if __name__ == "__main__":
  main()
