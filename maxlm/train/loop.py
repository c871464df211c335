"""The training loop: data, sharded state, jitted step, checkpoints with resume, metrics, eval and a sample."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from data_pipelines import loader
from data_pipelines.preference import pack_pairs
from data_pipelines.tokenizer import encode_prompt, load_tokenizer
from maxlm import distributed, sharding
from maxlm import metrics as metrics_lib
from maxlm.config import ConfigError, to_json
from maxlm.convert.hf import IMPORT_RECORD
from maxlm.eval.heldout import evaluate
from maxlm.extras import MissingExtra
from maxlm.generate import sample_tokens
from maxlm.models.transformer import compute_dtype
from maxlm.train import adapters as adapters_lib
from maxlm.train import distill as distill_lib
from maxlm.train.checkpoint import Checkpointer, NoReadableCheckpoint, nonfinite_leaves
from maxlm.train.data import DataError, TrainingData, cache_dir, load_training_data, process_rows, stream_state
from maxlm.train.dpo_step import DPOSettings, make_dpo_eval_step, make_dpo_train_step, reference_logps
from maxlm.train.frozen_base import load_frozen, recorded_base_step
from maxlm.train.optim import make_optimizer, make_schedule
from maxlm.train.state import (
  abstract_params,
  abstract_train_state,
  combine,
  count_params,
  init_optimizer_state,
  init_params,
  model_graphdef,
)
from maxlm.train.step import make_eval_step, make_train_step
from maxlm.train.task_eval import TaskEval
from maxlm.workdir import TOKENIZER_DIR, local_tokenizer_dir

log = logging.getLogger("maxlm.train")

SUSPECT_STEPS = 10  # a non-finite streak starting this few steps after a restore names the checkpoint a suspect


class TrainingDiverged(RuntimeError):
  """Raised after `train.max_nonfinite_steps` consecutive steps with a non-finite loss or gradient."""


def dry_run(cfg) -> dict:
  """Builds the model abstractly (nothing allocated) and reports its size and cost per token."""
  params = abstract_params(cfg)
  n = count_params(params)
  embed = int(np.prod(params["embed"].shape))
  flops = metrics_lib.model_flops_per_token(cfg.model, cfg.data.seq_len)
  info = {"params": n, "non_embedding_params": n - embed, "param_bytes_fp32": 4 * n,
          "adam_state_bytes": 8 * n, "train_flops_per_token": flops,
          "train_flops_per_step": flops * cfg.data.batch_size * cfg.data.seq_len}
  print(f"parameters: {n:,} ({n / 1e9:.2f}B; {n - embed:,} without the input embedding)")
  print(f"fp32 weights {4 * n / 2**30:.1f} GiB + Adam moments {8 * n / 2**30:.1f} GiB; "
        f"{flops / 1e9:.1f} GFLOP per trained token, {info['train_flops_per_step'] / 1e15:.2f} PFLOP per step")
  return info


def _setup_logging(workdir: Path, is_main: bool) -> logging.Handler | None:
  """INFO to train.log and stderr on process 0; other processes print warnings and errors only. Returns the
  train.log handler it added (the caller removes it when the run ends: a later run in the same process must not
  write into this workdir's log)."""
  root = logging.getLogger()
  added = None
  if is_main:
    handler = logging.FileHandler(workdir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == handler.baseFilename for h in root.handlers):
      root.addHandler(handler)
      added = handler
    else:
      handler.close()
  if not any(type(h) is logging.StreamHandler for h in root.handlers):
    stream = logging.StreamHandler()
    prefix = "" if jax.process_count() == 1 else f"[process {jax.process_index()}] "
    stream.setFormatter(logging.Formatter(prefix + "%(levelname)s %(name)s: %(message)s"))
    root.addHandler(stream)
  root.setLevel(logging.INFO if is_main else logging.WARNING)
  for noisy in ("absl", "orbax", "jax._src", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  return added


def _log_failure(workdir: Path, error: Exception) -> None:
  """Writes the error that ends the run into train.log only (the caller reports it on stderr once)."""
  known = (ConfigError, DataError, TrainingDiverged, NoReadableCheckpoint)
  record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s: %s", (type(error).__name__, error),
                          None if isinstance(error, known) else (type(error), error, error.__traceback__))
  path = str((workdir / "train.log").absolute())
  for handler in logging.getLogger().handlers:
    if isinstance(handler, logging.FileHandler) and handler.baseFilename == path:
      handler.handle(record)


def _resume_tokenizer(cfg, workdir: Path, ckpt: Checkpointer):
  """cfg, or a copy naming WORKDIR/tokenizer when checkpoints exist and data.tokenizer / data.tokenized are empty.

  The checkpoints' embeddings number the vocabulary as WORKDIR/tokenizer does (the run copies its tokenizer there):
  a tokenizer trained afresh on other data.paths would number it differently, and the run would go on, on garbage.
  Weights imported with `maxlm convert` (an import record, or a newest checkpoint of parameters only) with no
  tokenizer in the workdir are refused, naming data.tokenizer.
  """
  d, steps = cfg.data, ckpt.steps()
  if d.tokenizer or d.tokenized or not steps:
    return cfg
  imported = (workdir / IMPORT_RECORD).is_file() or not ckpt.has_train_state(steps[0])
  local = local_tokenizer_dir(workdir)
  try:
    tok = load_tokenizer(local) if local is not None else None
  except (OSError, ValueError, RuntimeError):  # not a loadable tokenizer: refused below if the weights are imported
    tok = None
  if tok is not None and tok.vocab_size <= cfg.model.vocab_size:
    (log.warning if imported else log.info)(
      "data.tokenizer is empty: using %s, the tokenizer of the weights in %s", local, ckpt.directory / str(steps[0]))
    cfg = cfg.copy_and_resolve_references()
    cfg.data.tokenizer = str(local.absolute())
    return cfg
  if not imported:  # a workdir from before runs kept their tokenizer: trained again from the same settings
    return cfg
  raise ConfigError(f"the weights in {ckpt.directory / str(steps[0])} were imported, not trained here, and "
                    "data.tokenizer is empty: a tokenizer trained now would not match their embeddings. Pass the "
                    "model's own tokenizer with --config.data.tokenizer=PATH (its tokenizer.json, tokenizer.model "
                    f"or directory; `maxlm convert` copies it into {workdir / TOKENIZER_DIR} when the model "
                    "directory has one)")


def _check_resumable(saved: dict, cfg) -> None:
  """A workdir's checkpoints can only continue the same model; name every differing key."""
  current = cfg.model.to_dict()
  diffs = [f"model.{k}: checkpoint {saved.get(k)!r} vs config {v!r}"
           for k, v in current.items() if saved.get(k) != v]
  if diffs:
    raise ConfigError("the workdir holds checkpoints of a different model; use a new --workdir or restore "
                      "the config:\n  " + "\n  ".join(diffs))


def _check_same_adapters(saved: dict, cfg) -> None:
  """Checkpoints of adapters continue only on the same base with the same adapter shapes; name what differs."""
  if not saved.get("base") and not cfg.lora.base:
    return
  keys = ("base", "rank", "targets", "base_quant", "base_quant_group")
  diffs = [f"lora.{k}: checkpoint {saved.get(k)!r} vs config {cfg.lora[k]!r}" for k in keys
           if saved.get(k) != cfg.lora[k]]
  if diffs:
    raise ConfigError("the workdir holds checkpoints of other adapters (or of a full model); use a new --workdir or "
                      "restore the config:\n  " + "\n  ".join(diffs))


def _copy_tokenizer(src: Path, dst: Path) -> None:
  """Copies a tokenizer directory's files into dst (replacing what is there)."""
  dst.mkdir(parents=True, exist_ok=True)
  for f in src.iterdir():
    if f.is_file() and (dst / f.name).absolute() != f.absolute():
      shutil.copyfile(f, dst / f.name)


def train(cfg, workdir: str | Path, *, devices: list | None = None) -> dict:
  """Trains `cfg` in `workdir`, resuming from its newest readable checkpoint. Returns the final metrics.

  Every process of a multi-host job runs this same function (after `maxlm.distributed.initialize`); each
  feeds its own rows of the global batch. `devices` restricts the mesh (tests); default: all devices.
  """
  workdir = Path(workdir)
  distributed.initialize(cfg.distributed)  # a no-op for single-process runs
  workdir.mkdir(parents=True, exist_ok=True)
  handler = _setup_logging(workdir, jax.process_index() == 0)
  try:
    return _train(cfg, workdir, devices)
  except Exception as e:
    _log_failure(workdir, e)  # a run that stops early leaves its reason in train.log, not an empty file
    raise
  finally:
    if handler is not None:
      logging.getLogger().removeHandler(handler)
      handler.close()


@dataclasses.dataclass
class _Run:
  """What the steps of a run share: its config, workdir, processes, mesh and checkpointer."""

  cfg: Any
  workdir: Path
  mesh: jax.sharding.Mesh
  rules: Any
  ckpt: Checkpointer
  task_eval: TaskEval
  is_main: bool = dataclasses.field(default_factory=lambda: jax.process_index() == 0)
  proc: int = dataclasses.field(default_factory=jax.process_index)
  n_proc: int = dataclasses.field(default_factory=jax.process_count)


def _setup(cfg, workdir: Path, devices: list | None) -> tuple[_Run, Any]:
  """The mesh, the teacher's config (checked, when distilling) and the checkpointer; cfg names the workdir's
  tokenizer on resume. Everything here fails before any data is read. A LoRA run takes its base's model."""
  if cfg.lora.base:
    cfg = adapters_lib.base_config(cfg, workdir)
  mesh, rules = sharding.mesh_for(cfg, devices)  # checks every sharded dimension divides, naming both numbers
  if cfg.lora.base:
    adapters_lib.check_adapters(cfg, mesh)
  if cfg.train.objective == "dpo" and cfg.dpo.reference == "base" and not cfg.lora.base:
    raise ConfigError("train.objective=dpo with dpo.reference=base needs LoRA (lora.base=WORKDIR: the reference is "
                      "the base, the adapters switched off); for full fine-tuning set dpo.reference=none "
                      "(reference-free)")
  n_proc = jax.process_count()
  if cfg.data.batch_size % n_proc:
    raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by the {n_proc} processes")
  # A bad teacher fails here, before the data is prepared; its tokenizer is checked against the student's next.
  teacher_cfg = distill_lib.teacher_config(cfg, dict(mesh.shape), rules, workdir) if cfg.distill.teacher else None
  task_eval = TaskEval(cfg, n_proc)  # the task files are read and checked here
  t = cfg.train
  ckpt = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpointing)
  cfg = _resume_tokenizer(cfg, workdir, ckpt)  # before a tokenizer is trained for nothing
  return _Run(cfg, workdir, mesh, rules, ckpt, task_eval), teacher_cfg


def _keep_tokenizer(run: _Run, data: TrainingData) -> None:
  """Copies the data's tokenizer into WORKDIR/tokenizer (serving and eval find it there) and logs the data."""
  if run.is_main:
    _copy_tokenizer(data.tokenizer_dir, run.workdir / TOKENIZER_DIR)
  log.info("data: %s", data.description)


def _teacher(run: _Run, teacher_cfg, tokenizer) -> tuple[Any, tuple]:
  """(distill settings, (teacher params,)) when distilling, else (None, ()): the train step's extra argument."""
  cfg = run.cfg
  if teacher_cfg is None:
    return None, ()
  distill_lib.check_teacher_tokenizer(cfg, tokenizer)
  distill, teacher_params, teacher_step = distill_lib.load_teacher(cfg, teacher_cfg, run.mesh)
  log.info("distill: teacher %s (step %d, %s parameters), alpha %g, temperature %g", cfg.distill.teacher,
           teacher_step, f"{count_params(teacher_params):,}", distill.alpha, distill.temperature)
  return distill, (teacher_params,)


@dataclasses.dataclass
class _State:
  """The train state to continue from and where it came from."""

  tx: Any
  schedule: Any
  target: dict  # shapes + shardings only: the restore target
  graphdef: Any
  state: dict
  start_step: int = 0
  data_state: dict = dataclasses.field(default_factory=dict)  # the data position, keyed by stream
  restored_from: Path | None = None
  frozen: dict | None = None  # LoRA: the frozen part of the model (an argument of the step, never saved)

  def full_params(self, state: dict) -> dict:
    """The whole model's parameters (adapters and frozen part with LoRA) for evals and samples."""
    return combine(state["params"], self.frozen)


def _model_state(run: _Run) -> _State:
  """The newest readable checkpoint's state (refusing a different model first), else a fresh initialization."""
  cfg, ckpt, mesh = run.cfg, run.ckpt, run.mesh
  tx, schedule = make_optimizer(cfg.train), make_schedule(cfg.train)
  target = abstract_train_state(cfg, mesh, tx)
  out = _State(tx, schedule, target, model_graphdef(cfg, mesh), state=None)
  if run.is_main:
    (run.workdir / "config.json").write_text(to_json(cfg))
  fresh = None
  if cfg.lora.base:
    # A resumed run keeps the base step its adapters were trained on, even if the base trained on since.
    fresh, out.frozen, base_step = load_frozen(cfg, mesh, recorded_base_step(run.workdir))
    log.info("lora: rank %d adapters on %s (step %d): %s trained, %s frozen", cfg.lora.rank, cfg.lora.base,
             base_step, f"{count_params(fresh):,}", f"{count_params(out.frozen):,}")
    if run.is_main:
      adapters_lib.write_record(run.workdir, cfg, base_step, fresh)
  if ckpt.steps():
    saved_cfg = ckpt.saved_config(ckpt.steps()[0])
    if saved_cfg is not None:  # refuse a different model before touching any tensor
      _check_resumable(saved_cfg.get("model", {}), cfg)
      _check_same_adapters(saved_cfg.get("lora", {}), cfg)
    # NoReadableCheckpoint if none restores; damaged newer steps are moved aside, so their steps can be saved again
    out.start_step, state, data_state, _ = ckpt.restore_latest(target)
    out.data_state = stream_state(data_state)
    before = (saved_cfg or {}).get("train", {}).get("objective", "lm")
    if before != cfg.train.objective:  # e.g. DPO on a pretrained workdir: another kind of data, read from its start
      log.info("train.objective %s -> %s: the data stream starts from the beginning", before, cfg.train.objective)
      out.data_state = {}
    out.restored_from = ckpt.directory / str(out.start_step)
    if "opt_state" not in state:  # an imported model: parameters only, a fresh optimizer
      state = init_optimizer_state(state["params"], target, tx)
    out.state = state
    log.info("resumed from step %d (%s) on mesh %s", out.start_step, out.restored_from, dict(mesh.shape))
  else:
    params = fresh if fresh is not None else init_params(cfg, mesh, target["params"])
    out.state = init_optimizer_state(params, target, tx)
  return out


def _train_stream(run: _Run, data: TrainingData, data_state: dict) -> loader.HostBatches:
  """This process's rows of every global batch, continuing from the checkpoint's data position."""
  d = run.cfg.data
  streams = d.loader_streams or len(data_state) or loader.default_streams(d.batch_size, run.n_proc)
  try:
    train_iter = loader.HostBatches(data.train, seq_len=d.seq_len, batch_size=d.batch_size, seed=d.seed,
                                    num_packing_bins=d.num_packing_bins, num_streams=streams, process_index=run.proc,
                                    process_count=run.n_proc)
    if data_state:  # an imported model's step-0 checkpoint has no data position yet
      train_iter.set_state(data_state)
  except ValueError as e:
    raise ConfigError(f"data.loader_streams={d.loader_streams} ({streams} streams), {run.n_proc} processes: {e}"
                      ) from e
  return train_iter


class _StepLog:
  """Turns each step's metrics into a record (metrics files, progress bar, log line) and stops a diverged run."""

  def __init__(self, run: _Run, st: _State, writer: metrics_lib.MetricsWriter, bar: tqdm):
    cfg = run.cfg
    self.run, self.st, self.writer, self.bar, self.t = run, st, writer, bar, cfg.train
    self.flops_per_token = metrics_lib.model_flops_per_token(cfg.model, cfg.data.seq_len)
    self.peak, peak_source = metrics_lib.peak_flops_per_device(jax.devices()[0], dtype=str(compute_dtype(cfg.model)),
                                                               cache_dir=cache_dir(cfg))
    self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    self.t_last = time.perf_counter()
    self.first_step = True
    self.last: dict = {}
    log.info("model: %s parameters; %.2f MFLOP/token; peak %.3g FLOP/s per device (%s); %d device(s) in %d "
             "process(es), mesh %s, sharding preset %s", f"{count_params(st.target['params']):,}",
             self.flops_per_token / 1e6, self.peak, peak_source, jax.device_count(), run.n_proc,
             dict(run.mesh.shape), cfg.sharding.preset)

  def __call__(self, step: int, step_metrics) -> None:
    t, host = self.t, jax.device_get(step_metrics)
    now = time.perf_counter()
    step_time, self.t_last = now - self.t_last, now
    tok_s = self.tokens_per_step / step_time
    record = {"loss": float(host["loss"]), "grad_norm": float(host["grad_norm"]), "lr": float(host["lr"]),
              "step_time": step_time, "tokens_per_sec": tok_s,
              "mfu": metrics_lib.mfu(self.flops_per_token, tok_s / jax.device_count(), self.peak),
              "log_z_sq": float(host["log_z_sq"]), "skipped": int(host["skipped"]),
              **{k: float(v) for k, v in host.items() if k.startswith(("moe_", "distill_", "rewards/"))}}
    if self.first_step:
      record["compile_step"] = 1  # includes compilation; excluded from throughput summaries
      self.first_step = False
    self.writer.write(step, record)
    self.last = {"step": step, **record}
    self.bar.update(1)
    self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{record['mfu']:.1%}")
    if not t.progress_bar and self.run.is_main and step % t.log_every == 0:
      remaining = (t.steps - step) * step_time
      kl = f" distill_kl {record['distill_kl']:.4f}" if "distill_kl" in record else ""
      log.info("step %d/%d loss %.4f%s grad_norm %.3f lr %.2e %.0f tok/s ETA %.0fs", step, t.steps,
               record["loss"], kl, record["grad_norm"], record["lr"], tok_s, remaining)
    self._check_finite(step, int(host["nonfinite_streak"]), record["skipped"])

  def _check_finite(self, step: int, streak: int, skipped: int) -> None:
    """Warns of a skipped update; raises TrainingDiverged after train.max_nonfinite_steps in a row."""
    t, st = self.t, self.st
    suspect = ""
    if st.restored_from is not None and streak and step - streak + 1 <= st.start_step + SUSPECT_STEPS:
      suspect = (f"; it began {step - streak + 1 - st.start_step} step(s) after restoring checkpoint "
                 f"{st.restored_from}, a suspect: if it persists, move that checkpoint aside (rename it) to resume "
                 "from the one before")
    if skipped:
      log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)%s", step, streak, suspect)
    if streak >= t.max_nonfinite_steps:
      raise TrainingDiverged(
        f"{streak} consecutive steps (up to step {step}) had a non-finite loss or gradient, reaching "
        f"train.max_nonfinite_steps={t.max_nonfinite_steps}; their updates were skipped{suspect}. "
        f"Last checkpoint: {self.run.ckpt.steps()[:1] or 'none'}. Lower train.learning_rate or check the data.")


def _checkpoint(run: _Run, step: int, state: dict, train_iter: loader.HostBatches, config_dict: dict) -> None:
  """Saves the state and every process's data position, unless the state holds non-finite values."""
  bad = nonfinite_leaves(state)  # the same answer on every process: a global reduction
  if bad:  # never write (or replace a good checkpoint with) a state that cannot train on
    log.warning("step %d: no checkpoint written: the train state holds non-finite values (%s); the newest "
                "checkpoint stays %s", step, ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else ""),
                run.ckpt.steps()[:1] or "none")
    return
  merged = {k: v for part in distributed.allgather_json(train_iter.get_state()) for k, v in part.items()}
  run.ckpt.save(step, state, merged, config_dict)


def _steps(run: _Run, st: _State, data: TrainingData, train_iter: loader.HostBatches, distill, teacher_args: tuple,
           writer: metrics_lib.MetricsWriter) -> tuple[dict, dict]:
  """The step loop from the restored step to train.steps, with checkpoints and held-out evals on their schedule;
  returns (final state, last metrics)."""
  cfg, mesh, rules, task_eval = run.cfg, run.mesh, run.rules, run.task_eval
  d, t = cfg.data, cfg.train
  batch_sharding = sharding.batch_sharding(mesh, rules)
  state_shardings = jax.tree.map(lambda x: x.sharding, st.target)
  if st.frozen is not None:  # train_step(state, batch, teacher_params, frozen)
    teacher_args = (teacher_args[0] if teacher_args else None, st.frozen)
  teacher_shardings = tuple(jax.tree.map(lambda x: x.sharding, a) for a in teacher_args)
  dpo = t.objective == "dpo"
  if dpo:
    settings = DPOSettings.from_config(cfg)
    step_fn = make_dpo_train_step(st.graphdef, st.tx, st.schedule, settings, accum_steps=t.grad_accum_steps)
    if st.frozen is None:  # train_step(state, batch, unused, frozen)
      teacher_args, teacher_shardings = (None, None), (None, None)
  else:
    step_fn = make_train_step(st.graphdef, st.tx, st.schedule, z_loss=t.z_loss, accum_steps=t.grad_accum_steps,
                              distill=distill)
  train_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, *teacher_shardings),
                       out_shardings=(state_shardings, None), donate_argnums=0)
  if dpo:  # held-out pairs: the mean DPO loss; its frozen part is an argument, not a constant of the computation
    dpo_eval = jax.jit(make_dpo_eval_step(st.graphdef, settings))
    eval_step = lambda params, batch: dpo_eval(params, batch, st.frozen)  # noqa: E731
  else:
    eval_step = jax.jit(make_eval_step(st.graphdef))
  eval_batches = [process_rows(b, run.proc, run.n_proc) for b in data.eval_batches(
    seq_len=d.seq_len, batch_size=d.batch_size, num_batches=t.eval_batches)]
  config_dict = json.loads(to_json(cfg))

  if st.start_step >= t.steps:
    log.info("already trained to step %d (train.steps=%d); nothing to do", st.start_step, t.steps)
  bar = tqdm(total=t.steps, initial=st.start_step, desc="train", unit="step", dynamic_ncols=True,
             disable=not (run.is_main and t.progress_bar))
  finish_step = _StepLog(run, st, writer, bar)
  state, pending = st.state, None  # pending: metrics of the step in flight, fetched after the next is dispatched
  # On an accelerator the next step is dispatched before the last one's metrics are fetched, so the host's work
  # overlaps the device's. XLA:CPU instead allocates a queued step's temporaries when it is dispatched: two steps in
  # flight held two copies (SmolLM2 LoRA: 5.1 GiB peak RSS instead of 2.7); on CPU each step completes first.
  overlap = jax.default_backend() != "cpu"
  # Activations are constrained by the logical rules while the steps trace.
  with sharding.use_mesh(mesh, rules):
    try:
      for step in range(st.start_step + 1, t.steps + 1):
        batch = sharding.put_batch(next(train_iter), batch_sharding, d.batch_size)
        state, step_metrics = train_step(state, batch, *teacher_args)
        if pending is not None:
          finish_step(*pending)
        pending = (step, step_metrics)
        if not overlap:
          finish_step(*pending)
          pending = None
        if step % t.checkpoint_every == 0 or step == t.steps:
          if pending is not None:
            finish_step(*pending)
            pending = None
          _checkpoint(run, step, state, train_iter, config_dict)
        if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
          if pending is not None:
            finish_step(*pending)
            pending = None
          eval_loss = evaluate(eval_step, state["params"] if dpo else st.full_params(state), eval_batches,
                               batch_sharding)
          scalars = {"eval_loss": eval_loss, "eval_perplexity": float(np.exp(eval_loss))}
          if task_eval:
            scalars.update(task_eval(st.graphdef, st.full_params(state), data.tokenizer, mesh))
            log.info("step %d: %s", step, ", ".join(f"{k[5:]} {v:.4f}" for k, v in scalars.items()
                                                     if k not in ("eval_loss", "eval_perplexity")))
          writer.write(step, scalars)
          finish_step.last["eval_loss"] = eval_loss
          log.info("step %d: eval loss %.4f (perplexity %.2f)", step, eval_loss, np.exp(eval_loss))
          finish_step.t_last = time.perf_counter()  # eval time is not step time
      if pending is not None:
        finish_step(*pending)
    finally:
      bar.close()
      run.ckpt.close()
      writer.flush()
  return state, finish_step.last


def _finish(run: _Run, st: _State, state: dict, tokenizer, writer: metrics_lib.MetricsWriter) -> None:
  """Process 0 plots the metrics and writes an end-of-run sample (one-process runs: parameters on one host)."""
  t, m = run.cfg.train, run.cfg.model
  if run.is_main:
    try:
      writer.plot()
    except MissingExtra as e:
      log.warning("no loss.png: %s", e)
    if t.sample_tokens and run.n_proc > 1:
      log.info("no end-of-run sample in a multi-process run (its parameters span hosts); use a 1-process run")
    elif t.sample_tokens:
      prompt = encode_prompt(tokenizer, t.sample_prompt)
      out = sample_tokens(st.graphdef, st.full_params(state), prompt, t.sample_tokens, max_len=m.max_seq_len,
                          eos_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size)
      text = t.sample_prompt + tokenizer.decode(out)
      (run.workdir / "sample.txt").write_text(text)
      print(f"--- sample ({t.sample_tokens} tokens) ---\n{text}\n---")
  writer.close()


def _precompute_reference(run: _Run, st: _State, data: TrainingData) -> None:
  """dpo.reference=precomputed: every train and eval pair scored once by the model DPO starts from (before its
  first step), kept in WORKDIR/dpo_reference.npz so a resumed run uses the same numbers; attached to the streams."""
  cfg, path = run.cfg, run.workdir / "dpo_reference.npz"
  if path.is_file():
    saved = np.load(path)
    train_ref, eval_ref = saved["train"], saved["eval"]
    if (len(train_ref), len(eval_ref)) != (len(data.train.pairs), len(data.eval)):
      raise ConfigError(f"{path} scores {len(train_ref)} train / {len(eval_ref)} eval pairs, data.paths now gives "
                        f"{len(data.train.pairs)} / {len(data.eval)}: the data changed; use a new --workdir")
  else:  # written before the first DPO step, so missing means this run starts DPO here (from step start_step)
    settings = DPOSettings.from_config(cfg)
    batch_sharding = sharding.batch_sharding(run.mesh, run.rules)
    rows = cfg.data.batch_size
    put = lambda b: sharding.put_batch(process_rows(b, run.proc, run.n_proc), batch_sharding, rows)  # noqa: E731
    refs = []
    with sharding.use_mesh(run.mesh, run.rules):
      for pairs in (data.train.pairs, data.eval):
        packed = pack_pairs(pairs, seq_len=cfg.data.seq_len, max_pairs_per_row=settings.pairs_per_row,
                            with_index=True)
        refs.append(reference_logps(st.graphdef, st.state["params"], st.frozen, packed, settings, put, rows))
    train_ref, eval_ref = refs
    if run.is_main:
      np.savez(path, train=train_ref, eval=eval_ref)
    log.info("dpo: reference log-probabilities of %d train and %d eval pairs computed (%s)", len(train_ref),
             len(eval_ref), path)
  data.train.ref, data.eval_ref = train_ref, eval_ref


def _train(cfg, workdir: Path, devices: list | None) -> dict:
  """The body of `train`, once the workdir and logging are set up: its steps in order."""
  run, teacher_cfg = _setup(cfg, workdir, devices)
  data = load_training_data(run.cfg)
  distill, teacher_args = _teacher(run, teacher_cfg, data.tokenizer)  # checks the teacher's tokenizer against it
  _keep_tokenizer(run, data)
  st = _model_state(run)
  if run.cfg.train.objective == "dpo" and run.cfg.dpo.reference == "precomputed":
    _precompute_reference(run, st, data)
  train_iter = _train_stream(run, data, st.data_state)
  writer = metrics_lib.MetricsWriter(workdir, enabled=run.is_main)
  writer.truncate_after(st.start_step)
  state, last = _steps(run, st, data, train_iter, distill, teacher_args, writer)
  _finish(run, st, state, data.tokenizer, writer)
  last["unigram_entropy"] = data.unigram_entropy
  last["params"] = count_params(st.target["params"])
  return last
