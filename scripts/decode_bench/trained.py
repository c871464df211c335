"""The trained target and distilled draft of sections 2 and 4: trained here with `maxlm train` unless given."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from decode_bench.common import DRAFT, progress


def maxlm_cli() -> list[str]:
  """The `maxlm` command of this interpreter's environment."""
  exe = Path(sys.executable).with_name("maxlm")
  return [str(exe)] if exe.is_file() else [sys.executable, "-m", "maxlm.cli"]


def finished(workdir: Path, steps: int) -> bool:
  """Whether workdir holds a checkpoint of step `steps`."""
  return (workdir / "checkpoints" / str(steps)).is_dir()


def train_if_needed(workdir: Path, steps: int, extra: list[str]) -> float:
  """Trains the tiny config into workdir for `steps` steps (resuming); returns the wall seconds spent."""
  if finished(workdir, steps):
    progress(f"[train] {workdir} already has step {steps}")
    return 0.0
  cmd = [*maxlm_cli(), "train", "--workdir", str(workdir), f"--config.train.steps={steps}",
         f"--config.train.checkpoint_every={steps}", f"--config.train.eval_every={steps}", *extra]
  progress(f"[train] {' '.join(cmd)}")
  t0 = time.perf_counter()
  log = workdir.parent / f"{workdir.name}.log"
  workdir.parent.mkdir(parents=True, exist_ok=True)
  with open(log, "w") as f:
    done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
  if done.returncode != 0:
    raise SystemExit(f"training {workdir} failed (exit {done.returncode}); see {log}")
  dt = time.perf_counter() - t0
  progress(f"[train] {workdir}: {steps} steps in {dt:.0f}s (log {log})")
  return dt


def trained_models(args: argparse.Namespace, need_draft: bool) -> dict:
  """The target (and draft) workdirs, trained here unless given, with their models, configs and tokenizer."""
  from maxlm.train.data import load_training_data
  from maxlm.workdir import load_model, load_workdir_config

  root = Path(args.workdir)
  info = {"train_s": {}}
  target = Path(args.target_workdir) if args.target_workdir else root / "target"
  if not args.target_workdir:
    info["train_s"]["target"] = train_if_needed(target, args.target_steps, [])
  draft = None
  if need_draft:
    draft = Path(args.draft_workdir) if args.draft_workdir else root / "draft"
    if not args.draft_workdir:
      info["train_s"]["draft"] = train_if_needed(draft, args.draft_steps,
                                                 [*DRAFT, f"--config.distill.teacher={target}"])
  model, cfg, step = load_model(str(target))
  # The corpus (cached under MAXLM_CACHE) gives the tokenizer the target was trained with and the held-out split;
  # reading it also serves workdirs trained before `maxlm train` copied the tokenizer into WORKDIR/tokenizer/.
  # The training loop keeps only the eval batches' worth of held-out documents; the prompts and perplexity rows
  # here need more, so ask for (up to) the whole held-out split.
  data = load_training_data(load_workdir_config(str(target)), eval_tokens=2**62)  # the whole held-out split
  info.update(target=str(target), target_model=model, target_cfg=cfg, target_step=step, tokenizer=data.tokenizer,
              eval_docs=data.eval)
  if draft is not None:
    dmodel, dcfg, dstep = load_model(str(draft))
    if dcfg.model.vocab_size != cfg.model.vocab_size:
      raise SystemExit(f"draft {draft} has vocab {dcfg.model.vocab_size}, target {cfg.model.vocab_size}")
    info.update(draft=str(draft), draft_model=dmodel, draft_cfg=dcfg, draft_step=dstep)
  progress(f"[models] target {target} (step {step}, {cfg.model.num_layers}L d{cfg.model.d_model})"
           + (f", draft {draft} (step {info['draft_step']}, {info['draft_cfg'].model.num_layers}L "
              f"d{info['draft_cfg'].model.d_model})" if draft is not None else ""))
  return info


def eval_prompts(docs, n: int, length: int) -> list[list[int]]:
  """The first `length` tokens of the first n held-out documents that are long enough."""
  out = [[int(t) for t in docs[i][:length]] for i in range(len(docs)) if len(docs[i]) >= length][:n]
  if len(out) < n:
    raise SystemExit(f"only {len(out)} held-out documents have {length} tokens")
  return out


def workdir_cfg(info: dict, overrides: tuple[str, ...]):
  """The target's saved config plus overrides."""
  from maxlm.workdir import load_workdir_config

  return load_workdir_config(info["target"], ("mesh.data=1", *overrides))
