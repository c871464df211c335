"""Post-training benchmark on SmolLM2-135M-Instruct: what LoRA SFT and DPO change on a task with checkable answers,
the speed and memory of full fine-tuning, LoRA and QLoRA against TRL + PEFT, and `maxlm plan` for Llama-3-8B.

Sections (--sections):
  sft    two-number sums ("What is 37 plus 48?"), train and held-out splits generated here: held-out exact match
         through `maxlm eval --chat-template` (a generate task, the first integer of the answer) before and after a
         LoRA SFT run (`train.objective=sft` on {"messages"} samples, loss on the assistant's answer only).
  dpo    the same task as preference pairs (the right sum chosen, a sum off by 1-9 rejected): held-out preference
         accuracy and log-probability margin (`maxlm eval` multiple choice between the two answers) before and after
         LoRA DPO on the instruct model, and the DPO run's reward margins.
  speed  tokens/s and peak memory (the process's max RSS) of the same job: 8 rows x 64 tokens of text per step,
         maxlm full fine-tuning, LoRA and QLoRA (int8 base), TRL's SFTTrainer with a PEFT LoRA (same rank, targets,
         batch and length) on torch CPU, and Tunix's PeftTrainer with qwix LoRA (JAX, its own venv:
         scripts/bench_posttrain_tunix.py); ratios against TRL + PEFT and against Tunix.
  plan   `maxlm plan` bytes per device for Llama-3-8B on 8 x H100 (fsdp=8): full fine-tuning, LoRA, QLoRA int8/int4.

Run:  python scripts/bench_posttrain.py                       (~25 minutes on 2 cores)
      python scripts/bench_posttrain.py --sections plan       (seconds)
Needs the dev extra plus `pip install trl` for the TRL side of `speed` (recorded as missing otherwise); the Tunix
side builds ~/.cache/maxlm/tunix-venv on first use (--no-tunix skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_host  # noqa: E402
import bench_posttrain_tunix  # noqa: E402
import fetch_models  # noqa: E402

SECTIONS = ("sft", "dpo", "speed", "plan")
QUESTION = "What is {a} plus {b}?"


def _sums(n: int, seed: int) -> list[dict[str, int]]:
  import numpy as np

  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    a, b = (int(x) for x in rng.integers(10, 90, 2))
    wrong = a + b + int(rng.choice([-1, 1])) * int(rng.integers(1, 10))
    out.append({"a": a, "b": b, "answer": str(a + b), "wrong": str(wrong)})
  return out


def _jsonl(path: Path, rows: list[dict]) -> Path:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def write_data(root: Path, n_train: int, n_test: int) -> dict[str, Path]:
  """Chat SFT samples, preference pairs, and two local eval tasks (generate, multiple choice) on held-out sums."""
  root.mkdir(parents=True, exist_ok=True)
  train, test = _sums(n_train, 0), _sums(n_test, 1)
  q = lambda r: QUESTION.format(**r)  # noqa: E731
  sft = _jsonl(root / "sft.jsonl", [{"messages": [{"role": "user", "content": q(r)},
                                                   {"role": "assistant", "content": r["answer"]}]} for r in train])
  pairs = _jsonl(root / "pairs.jsonl", [{"prompt": [{"role": "user", "content": q(r)}],
                                         "chosen": [{"role": "assistant", "content": r["answer"]}],
                                         "rejected": [{"role": "assistant", "content": r["wrong"]}]} for r in train])
  test_rows = [{**r, "choices": [r["answer"], r["wrong"]] if i % 2 else [r["wrong"], r["answer"]],
                "label": 0 if i % 2 else 1} for i, r in enumerate(test)]
  _jsonl(root / "test.jsonl", test_rows)
  (root / "sums_exact.yaml").write_text(
    "task: sums_exact\ntype: generate\ndata: test.jsonl\nprompt: \"What is {a} plus {b}?\"\ntarget: answer\n"
    "stop: [\"\\n\"]\nmax_tokens: 16\nregex: \"(-?\\\\d+)\"\n")
  (root / "sums_pref.yaml").write_text(
    "task: sums_pref\ntype: multiple_choice\ndata: test.jsonl\nprompt: \"What is {a} plus {b}?\"\n"
    "choices: choices\nanswer: label\n")
  text = [{"text": " ".join(f"{QUESTION.format(**r)} {r['answer']}." for r in train[i:i + 12])}
          for i in range(0, n_train, 4)]
  return {"sft": sft, "pairs": pairs, "exact": root / "sums_exact.yaml", "pref": root / "sums_pref.yaml",
          "text": _jsonl(root / "text.jsonl", text)}


def run(cmd: list[str], log: Path) -> dict[str, Any]:
  """Runs a command to the end (output to `log`); its wall time and peak RSS (the child's own max RSS)."""
  t0 = time.perf_counter()
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
  if os.waitstatus_to_exitcode(status) != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed; see {log}:\n{log.read_text()[-3000:]}")
  return {"seconds": time.perf_counter() - t0, "peak_rss_gib": usage.ru_maxrss / 2**20}


def maxlm(*args: str) -> list[str]:
  return [sys.executable, "-m", "maxlm.cli", *args]


def evaluate(workdir: Path, task: Path, out: Path) -> dict[str, Any]:
  """`maxlm eval --chat-template` of one task: its metrics (value and standard error), and for a multiple-choice task
  "margin", the mean log-probability of the right answer minus the wrong one's (two choices)."""
  run(maxlm("eval", f"--workdir={workdir}", "--tasks", str(task), "--chat-template", f"--output={out}", "--quiet"),
      out.with_suffix(".log"))
  report = next(iter(json.loads(out.read_text())["tasks"].values()))
  metrics = dict(report["metrics"])
  if report["type"] == "multiple_choice":
    gaps = [s["logprobs"][s["answer"]] - s["logprobs"][1 - s["answer"]] for s in report["samples"]]
    metrics["margin"] = sum(gaps) / len(gaps)
  return metrics


def _records(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]


TRAIN_COMMON = ("--config.train.progress_bar=false", "--config.train.sample_tokens=0", "--config.train.log_every=1",
                "--config.train.warmup_steps=0")


def section_sft(base: Path, data: dict, work: Path, steps: int) -> dict[str, Any]:
  before = evaluate(base, data["exact"], work / "sft_before.json")
  adapters = work / "sft"
  train = run(maxlm("train", f"--workdir={adapters}", f"--config.lora.base={base}", "--config.lora.rank=16",
                    "--config.train.objective=sft", f"--config.data.paths={data['sft']}", "--config.data.seq_len=64",
                    "--config.data.batch_size=8", f"--config.train.steps={steps}", "--config.train.learning_rate=1e-3",
                    f"--config.train.checkpoint_every={steps}", f"--config.train.eval_every={steps}",
                    "--config.data.eval_fraction=0.1", *TRAIN_COMMON), work / "sft_train.log")
  after = evaluate(adapters, data["exact"], work / "sft_after.json")
  losses = [r["loss"] for r in _records(adapters) if "loss" in r]
  return {"exact_match_before": before["exact_match"], "exact_match_after": after["exact_match"],
          "train": train, "steps": steps, "first_loss": losses[0], "last_loss": losses[-1]}


def section_dpo(base: Path, data: dict, work: Path, steps: int) -> dict[str, Any]:
  """LoRA DPO on the instruct model itself (its adapters off are the reference): held-out preference accuracy and
  log-probability margin before and after. (After the SFT run the model already ranks every pair right.)"""
  before = evaluate(base, data["pref"], work / "dpo_before.json")
  adapters = work / "dpo"
  train = run(maxlm("train", f"--workdir={adapters}", f"--config.lora.base={base}", "--config.lora.rank=16",
                    "--config.train.objective=dpo", f"--config.data.paths={data['pairs']}", "--config.data.seq_len=128",
                    "--config.dpo.pairs_per_row=1", "--config.data.batch_size=8", f"--config.train.steps={steps}",
                    "--config.train.learning_rate=5e-4", "--config.dpo.beta=0.1",
                    f"--config.train.checkpoint_every={steps}", f"--config.train.eval_every={steps}",
                    "--config.data.eval_fraction=0.1", *TRAIN_COMMON), work / "dpo_train.log")
  after = evaluate(adapters, data["pref"], work / "dpo_after.json")
  recs = [r for r in _records(adapters) if "loss" in r]
  tail = recs[-5:]
  mean = lambda k: sum(r[k] for r in tail) / len(tail)  # noqa: E731
  return {"pref_acc_before": before["acc"], "pref_acc_after": after["acc"], "margin_before": before["margin"],
          "margin_after": after["margin"], "train": train, "steps": steps, "first_loss": recs[0]["loss"],
          "last5_loss": mean("loss"), "last5_margin": mean("rewards/margins"),
          "last5_reward_acc": mean("rewards/accuracies")}


def _throughput(workdir: Path) -> float:
  rates = sorted(r["tokens_per_sec"] for r in _records(workdir) if "tokens_per_sec" in r and "compile_step" not in r)
  return rates[len(rates) // 2]


TRL_SCRIPT = r"""
import json, sys, time, torch, transformers
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer
folder, data, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
rows = [json.loads(l) for l in open(data)]
model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
tok = transformers.AutoTokenizer.from_pretrained(folder)
times = []
class Clock(transformers.TrainerCallback):
  def on_step_end(self, *a, **k):
    times.append(time.perf_counter())
cfg = SFTConfig(output_dir=out, max_length=64, packing=False, per_device_train_batch_size=8, max_steps=steps,
                learning_rate=1e-3, logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True,
                dataloader_num_workers=0, bf16=False, fp16=False)
peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                     peft_config=peft, callbacks=[Clock()])
trainer.train()
steps_s = [b - a for a, b in zip(times[1:], times[2:])]
steps_s.sort()
print(json.dumps({"step_s": steps_s[len(steps_s) // 2], "tokens_per_step": 8 * 64}))
"""


def section_speed(base: Path, folder: Path, data: dict, work: Path, steps: int, tunix: bool = True) -> dict[str, Any]:
  """The same text job in maxlm (full, LoRA, QLoRA int8), TRL + PEFT and Tunix: tokens/s and peak RSS."""
  rows: dict[str, Any] = {}
  common = ("--config.train.objective=sft", f"--config.data.paths={data['text']}", "--config.data.seq_len=64",
            "--config.data.batch_size=8", f"--config.train.steps={steps}", "--config.train.learning_rate=1e-4",
            f"--config.train.checkpoint_every={steps}", "--config.train.eval_every=0", "--config.train.eval_batches=1",
            "--config.data.eval_fraction=0.05", *TRAIN_COMMON)
  for name, extra in (("maxlm full", ()), ("maxlm LoRA", (f"--config.lora.base={base}", "--config.lora.rank=16")),
                      ("maxlm QLoRA int8", (f"--config.lora.base={base}", "--config.lora.rank=16",
                                            "--config.lora.base_quant=int8"))):
    workdir = work / f"speed_{name.split()[-1].lower()}"
    if name == "maxlm full":  # full fine-tuning continues the imported model itself: train a copy of it
      import shutil

      shutil.copytree(base, workdir)
    res = run(maxlm("train", f"--workdir={workdir}", *extra, *common), work / f"{workdir.name}.log")
    rows[name] = {"tokens_per_sec": _throughput(workdir), **res}
  try:
    import trl  # noqa: F401

    trl_out = work / "trl"
    log = work / "trl.log"
    res = run([sys.executable, "-c", TRL_SCRIPT, str(folder), str(data["text"]), str(steps), str(trl_out)], log)
    last = json.loads(log.read_text().strip().splitlines()[-1])
    rows["TRL + PEFT LoRA"] = {"tokens_per_sec": last["tokens_per_step"] / last["step_s"], **res}
  except ImportError as e:
    rows["TRL + PEFT LoRA"] = {"missing": f"trl is not installed ({e}): pip install trl"}
  if tunix:
    rows["Tunix LoRA"] = bench_posttrain_tunix.tunix_row(folder, data["text"], steps, work,
                                                         bench_posttrain_tunix.DEFAULT_ROOT)
  else:
    rows["Tunix LoRA"] = {"missing": "not run (--no-tunix)"}
  for ref_name, key in (("TRL + PEFT LoRA", "ratio_vs_trl"), ("Tunix LoRA", "ratio_vs_tunix")):
    ref = rows[ref_name].get("tokens_per_sec")
    for row in rows.values():
      if ref and "tokens_per_sec" in row:
        row[key] = row["tokens_per_sec"] / ref
  return {"rows": rows, "steps": steps}


def section_plan() -> dict[str, Any]:
  from maxlm import plan as plan_lib
  from maxlm.config import load_config

  out = {}
  common = ["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.data.batch_size=8", "--config.model.remat=full"]
  for name, extra in (("full", []), ("LoRA r16", ["--config.lora.base=base", "--config.lora.rank=16"]),
                      ("QLoRA int8 r16", ["--config.lora.base=base", "--config.lora.rank=16",
                                          "--config.lora.base_quant=int8"]),
                      ("QLoRA int4 r16", ["--config.lora.base=base", "--config.lora.rank=16",
                                          "--config.lora.base_quant=int4"])):
    p = plan_lib.plan(load_config("llama3_8b", common + extra), 8, device="h100")
    out[name] = {"total_gib": p["total_bytes"] / 2**30, **{k: v / 2**30 for k, v in p["bytes"].items()},
                 "trained_params": p["config"]["num_params"]}
  return out


def print_tables(results: dict[str, Any]) -> None:
  if "sft" in results:
    s = results["sft"]
    print(f"\nSFT (LoRA r16, {s['steps']} steps): held-out exact match {s['exact_match_before']['value']:.3f} -> "
          f"{s['exact_match_after']['value']:.3f} (loss {s['first_loss']:.3f} -> {s['last_loss']:.3f})")
  if "dpo" in results:
    d = results["dpo"]
    print(f"DPO (LoRA r16, {d['steps']} steps): held-out preference accuracy {d['pref_acc_before']['value']:.3f} -> "
          f"{d['pref_acc_after']['value']:.3f}, log-prob margin {d['margin_before']:+.3f} -> {d['margin_after']:+.3f}; "
          f"last 5 steps: loss {d['last5_loss']:.3f}, margin "
          f"{d['last5_margin']:.3f}, reward accuracy {d['last5_reward_acc']:.2f}")
  if "speed" in results:
    print(f"\n{'job (8 x 64 tokens per step)':<24}{'tokens/s':>10}{'peak RSS GiB':>14}{'vs TRL':>9}{'vs Tunix':>10}")
    for name, row in results["speed"]["rows"].items():
      if "missing" in row:
        print(f"{name:<24}  {row['missing']}")
        continue
      ratios = [f"{row[k]:.2f}x" if k in row else "-" for k in ("ratio_vs_trl", "ratio_vs_tunix")]
      print(f"{name:<24}{row['tokens_per_sec']:>10.0f}{row['peak_rss_gib']:>14.2f}{ratios[0]:>9}{ratios[1]:>10}")
  if "plan" in results:
    print(f"\n{'Llama-3-8B, 8 x H100':<18}{'trained':>14}{'frozen GiB':>12}{'Adam GiB':>10}{'total GiB':>11}")
    for name, p in results["plan"].items():
      print(f"{name:<18}{p['trained_params']:>14,}{p['frozen']:>12.2f}{p['optimizer']:>10.2f}{p['total_gib']:>11.2f}")


def plot(results: dict[str, Any], png: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  if "sft" in results and "dpo" in results:
    s, d = results["sft"], results["dpo"]
    names = ["exact match (SFT)", "preference acc (DPO)"]
    before = [s["exact_match_before"]["value"], d["pref_acc_before"]["value"]]
    after = [s["exact_match_after"]["value"], d["pref_acc_after"]["value"]]
    errs = [[s["exact_match_before"]["stderr"], d["pref_acc_before"]["stderr"]],
            [s["exact_match_after"]["stderr"], d["pref_acc_after"]["stderr"]]]
    x = range(len(names))
    axes[0].bar([i - 0.2 for i in x], before, 0.4, yerr=errs[0], label="before")
    axes[0].bar([i + 0.2 for i in x], after, 0.4, yerr=errs[1], label="after")
    axes[0].set_xticks(list(x), names)
    axes[0].set_title("held-out sums (SmolLM2-135M-Instruct)")
    axes[0].legend()
  if "speed" in results:
    rows = {k: v for k, v in results["speed"]["rows"].items() if "tokens_per_sec" in v}
    axes[1].barh(list(rows), [v["tokens_per_sec"] for v in rows.values()])
    axes[1].set_title("tokens/s (8 x 64 per step)")
    axes[2].barh(list(rows), [v["peak_rss_gib"] for v in rows.values()])
    axes[2].set_title("peak RSS (GiB)")
  fig.tight_layout()
  fig.savefig(png, dpi=110)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--sections", default=",".join(SECTIONS))
  ap.add_argument("--work", default=None, help="directory for the runs (default: a new temporary one)")
  ap.add_argument("--sft-steps", type=int, default=40)
  ap.add_argument("--dpo-steps", type=int, default=20)
  ap.add_argument("--speed-steps", type=int, default=8)
  ap.add_argument("--no-tunix", action="store_true", help="skip the Tunix row (it builds its own venv once: "
                  "~1.6 GB under ~/.cache/maxlm/tunix-venv, 2-3 minutes)")
  ap.add_argument("--out", default="bench_results/bench_posttrain.json")
  ap.add_argument("--keep-other-sections", action="store_true",
                  help="keep the sections not run now from the existing --out JSON (same tables and plot)")
  args = ap.parse_args()
  sections = bench_host.parse_sections(ap, args.sections, SECTIONS)
  work = Path(args.work or tempfile.mkdtemp(prefix="bench_posttrain-"))
  work.mkdir(parents=True, exist_ok=True)
  results: dict[str, Any] = {"machine": bench_host.machine(), "work": str(work),
                             "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
  need_model = bool(set(sections) - {"plan"})
  if need_model:
    base, folder = fetch_models.fetch_workdir("smollm2-135m"), fetch_models.fetch_transformers("smollm2-135m")
    data = write_data(work / "data", 256, 64)
  started = time.perf_counter()
  if "sft" in sections:
    results["sft"] = section_sft(base, data, work, args.sft_steps)
  if "dpo" in sections:
    results["dpo"] = section_dpo(base, data, work, args.dpo_steps)
  if "speed" in sections:
    results["speed"] = section_speed(base, folder, data, work, args.speed_steps, tunix=not args.no_tunix)
  if "plan" in sections:
    results["plan"] = section_plan()
  results["seconds"] = time.perf_counter() - started
  if args.keep_other_sections and Path(args.out).is_file():  # e.g. speed rerun on a quiet machine: sft/dpo kept
    before = json.loads(Path(args.out).read_text())
    kept = {k: before[k] for k in SECTIONS if k in before and k not in sections}
    if kept:
      results = {**results, **kept, "kept_from_earlier_run": {"sections": sorted(kept),
                                                              "command": before.get("command")}}
  print_tables(results)
  bench_host.write_results(results, args.out, lambda png: plot(results, png))


if __name__ == "__main__":
  main()
