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
from data_pipelines import mixture as mixture_lib
from data_pipelines.tokenizer import MIN_TRAINED_VOCAB, encode_prompt, load_tokenizer
from maxlm import distributed, sharding
from maxlm import metrics as metrics_lib
from maxlm.config import ConfigError, to_json
from maxlm.convert.hf import IMPORT_RECORD
from maxlm.eval.heldout import evaluate
from maxlm.generate import sample_tokens
from maxlm.models.transformer import compute_dtype
from maxlm.train import distill as distill_lib
from maxlm.train.checkpoint import Checkpointer, NoReadableCheckpoint, nonfinite_leaves
from maxlm.train.optim import make_optimizer, make_schedule
from maxlm.train.state import (
  abstract_params,
  abstract_train_state,
  count_params,
  init_optimizer_state,
  init_params,
  model_graphdef,
)
from maxlm.train.step import make_eval_step, make_train_step

log = logging.getLogger("maxlm.train")

SUSPECT_STEPS = 10  # a non-finite streak starting this few steps after a restore names the checkpoint a suspect


class DataError(ValueError):
  """The training data cannot be read or tokenized (missing path, bad UTF-8, malformed JSONL, ...)."""


class TrainingDiverged(RuntimeError):
  """Raised after `train.max_nonfinite_steps` consecutive steps with a non-finite loss or gradient."""


def cache_dir(cfg) -> Path:
  """Where tokenizers, tokenized corpora and the measured CPU peak are cached."""
  return Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else loader.default_cache_dir()


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


def _setup_logging(workdir: Path, is_main: bool) -> None:
  """INFO to train.log and stderr on process 0; other processes print warnings and errors only."""
  root = logging.getLogger()
  if is_main:
    handler = logging.FileHandler(workdir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == handler.baseFilename for h in root.handlers):
      root.addHandler(handler)
  if not any(type(h) is logging.StreamHandler for h in root.handlers):
    stream = logging.StreamHandler()
    prefix = "" if jax.process_count() == 1 else f"[process {jax.process_index()}] "
    stream.setFormatter(logging.Formatter(prefix + "%(levelname)s %(name)s: %(message)s"))
    root.addHandler(stream)
  root.setLevel(logging.INFO if is_main else logging.WARNING)
  for noisy in ("absl", "orbax", "jax._src", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


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
  local = workdir / "tokenizer"
  try:
    tok = load_tokenizer(local) if local.is_dir() and any(local.iterdir()) else None
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
                    f"or directory; `maxlm convert` copies it into {local} when the model directory has one)")


def _check_resumable(saved: dict, cfg) -> None:
  """A workdir's checkpoints can only continue the same model; name every differing key."""
  current = cfg.model.to_dict()
  diffs = [f"model.{k}: checkpoint {saved.get(k)!r} vs config {v!r}"
           for k, v in current.items() if saved.get(k) != v]
  if diffs:
    raise ConfigError("the workdir holds checkpoints of a different model; use a new --workdir or restore "
                      "the config:\n  " + "\n  ".join(diffs))


def _process_rows(batch: dict, index: int, count: int) -> dict:
  rows = batch["inputs"].shape[0] // count
  return {k: v[index * rows:(index + 1) * rows] for k, v in batch.items()}


def _stream_state(data_state: dict) -> dict:
  """A checkpoint's data position keyed by stream; checkpoints of one unnamed stream predate streams."""
  if data_state and not all(k.isdigit() for k in data_state):
    return {"0": data_state}
  return data_state


@dataclasses.dataclass
class TrainingData:
  """The training stream's source (in-memory corpus or token-shard mixture), eval documents and tokenizer."""

  train: Any  # loader.TokenizedDocs | mixture.Mixture: what loader.HostBatches draws from
  eval: loader.TokenizedDocs
  tokenizer: Any
  unigram_entropy: float  # nats/token of the eval (tokenized data) or train (corpus) targets: a loss baseline
  description: str
  tokenizer_dir: Path | None = None  # tokenized data's tokenizer directory, copied into the workdir


def load_training_data(cfg) -> TrainingData:
  """data.tokenized (token shards mixed by data.mixture) if set, else data.paths / the default corpus."""
  m, d, t = cfg.model, cfg.data, cfg.train
  if d.tokenized:
    try:
      data = mixture_lib.load(d.tokenized, d.mixture, weight_unit=d.mixture_unit, curriculum=d.curriculum,
                              curriculum_stages=d.curriculum_stages, verify_checksums=d.verify_checksums)
      eval_docs = data.eval_docs(2 * t.eval_batches * d.batch_size * (d.seq_len + 1))
    except (ValueError, OSError) as e:
      raise DataError(f"data.tokenized={d.tokenized!r}, data.mixture={d.mixture!r}: {e}") from e
    if data.tokenizer.vocab_size > m.vocab_size:
      raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenized data's vocabulary "
                        f"({data.tokenizer.vocab_size} ids)")
    entropy = loader.unigram_entropy(eval_docs, data.tokenizer.vocab_size)
    return TrainingData(data.mixture, eval_docs, data.tokenizer, entropy, data.description, data.tokenizer_dir)
  if not d.tokenizer and m.vocab_size < MIN_TRAINED_VOCAB:
    raise ConfigError(f"model.vocab_size={m.vocab_size}: training a byte-fallback tokenizer (data.tokenizer is "
                      f"empty) needs >= {MIN_TRAINED_VOCAB}")
  try:
    corpus = loader.prepare_corpus(
      [p.strip() for p in d.paths.split(",") if p.strip()], vocab_size=m.vocab_size, cache_dir=cache_dir(cfg),
      tokenizer_path=d.tokenizer, max_corpus_bytes=int(d.max_corpus_mb * 2**20), eval_fraction=d.eval_fraction,
      text_field=d.text_field, skip_bad_records=d.skip_bad_records)
  except (ValueError, OSError) as e:
    raise DataError(f"data.paths={d.paths!r}: {e}") from e
  return TrainingData(corpus.train, corpus.eval, corpus.tokenizer, corpus.unigram_entropy, corpus.description)


def _copy_tokenizer(src: Path, dst: Path) -> None:
  """Copies a tokenizer directory's files into dst (replacing what is there)."""
  dst.mkdir(parents=True, exist_ok=True)
  for f in src.iterdir():
    if f.is_file():
      shutil.copyfile(f, dst / f.name)


def train(cfg, workdir: str | Path, *, devices: list | None = None) -> dict:
  """Trains `cfg` in `workdir`, resuming from its newest readable checkpoint. Returns the final metrics.

  Every process of a multi-host job runs this same function (after `maxlm.distributed.initialize`); each
  feeds its own rows of the global batch. `devices` restricts the mesh (tests); default: all devices.
  """
  workdir = Path(workdir)
  distributed.initialize(cfg.distributed)  # a no-op for single-process runs
  workdir.mkdir(parents=True, exist_ok=True)
  _setup_logging(workdir, jax.process_index() == 0)
  try:
    return _train(cfg, workdir, devices)
  except Exception as e:
    _log_failure(workdir, e)  # a run that stops early leaves its reason in train.log, not an empty file
    raise


def _train(cfg, workdir: Path, devices: list | None) -> dict:
  """The body of `train`, once the workdir and logging are set up."""
  is_main = jax.process_index() == 0
  n_proc, proc = jax.process_count(), jax.process_index()
  m, d, t = cfg.model, cfg.data, cfg.train
  mesh, rules = sharding.mesh_for(cfg, devices)  # checks every sharded dimension divides, naming both numbers
  if d.batch_size % n_proc:
    raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by the {n_proc} processes")
  # A bad teacher fails here, before the data is prepared; its tokenizer is checked against the student's next.
  teacher_cfg = distill_lib.teacher_config(cfg, dict(mesh.shape), rules, workdir) if cfg.distill.teacher else None

  ckpt = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpointing)
  cfg = _resume_tokenizer(cfg, workdir, ckpt)  # before a tokenizer is trained for nothing
  d = cfg.data
  corpus = load_training_data(cfg)
  distill, teacher_args = None, ()  # the frozen teacher's parameters: an extra argument of the train step
  if teacher_cfg is not None:
    distill_lib.check_teacher_tokenizer(cfg, corpus.tokenizer)
    distill, teacher_params, teacher_step = distill_lib.load_teacher(cfg, teacher_cfg, mesh)
    teacher_args = (teacher_params,)
    log.info("distill: teacher %s (step %d, %s parameters), alpha %g, temperature %g", cfg.distill.teacher,
             teacher_step, f"{count_params(teacher_params):,}", distill.alpha, distill.temperature)
  if is_main and corpus.tokenizer_dir is not None:
    _copy_tokenizer(corpus.tokenizer_dir, workdir / "tokenizer")  # serving and eval find it in the workdir
  elif is_main and Path(getattr(corpus.tokenizer, "path", "")).suffix == ".model":  # trained or given sentencepiece
    (workdir / "tokenizer").mkdir(parents=True, exist_ok=True)
    if Path(corpus.tokenizer.path).absolute() != (workdir / "tokenizer" / "tokenizer.model").absolute():
      shutil.copyfile(corpus.tokenizer.path, workdir / "tokenizer" / "tokenizer.model")
  log.info("data: %s", corpus.description)

  tx, schedule = make_optimizer(t), make_schedule(t)
  target = abstract_train_state(cfg, mesh, tx)  # shapes + shardings only: the restore target
  graphdef = model_graphdef(cfg, mesh)
  n_params = count_params(target["params"])
  config_dict = json.loads(to_json(cfg))
  if is_main:
    (workdir / "config.json").write_text(to_json(cfg))

  start_step, data_state, state, restored_from = 0, {}, None, None
  if ckpt.steps():
    saved_cfg = ckpt.saved_config(ckpt.steps()[0])
    if saved_cfg is not None:  # refuse a different model before touching any tensor
      _check_resumable(saved_cfg.get("model", {}), cfg)
    # NoReadableCheckpoint if none restores; damaged newer steps are moved aside, so their steps can be saved again
    start_step, state, data_state, _ = ckpt.restore_latest(target)
    restored_from = ckpt.directory / str(start_step)
    if "opt_state" not in state:  # an imported model: parameters only, a fresh optimizer
      state = init_optimizer_state(state["params"], target, tx)
    log.info("resumed from step %d (%s) on mesh %s", start_step, restored_from, dict(mesh.shape))
  if state is None:
    state = init_optimizer_state(init_params(cfg, mesh, target["params"]), target, tx)
  data_state = _stream_state(data_state)
  streams = d.loader_streams or len(data_state) or loader.default_streams(d.batch_size, n_proc)
  try:
    train_iter = loader.HostBatches(corpus.train, seq_len=d.seq_len, batch_size=d.batch_size, seed=d.seed,
                                    num_packing_bins=d.num_packing_bins, num_streams=streams, process_index=proc,
                                    process_count=n_proc)
    if data_state:  # an imported model's step-0 checkpoint has no data position yet
      train_iter.set_state(data_state)
  except ValueError as e:
    raise ConfigError(f"data.loader_streams={d.loader_streams} ({streams} streams), {n_proc} processes: {e}") from e

  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  writer.truncate_after(start_step)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  state_shardings = jax.tree.map(lambda x: x.sharding, target)
  teacher_shardings = tuple(jax.tree.map(lambda x: x.sharding, a) for a in teacher_args)
  train_step = jax.jit(make_train_step(graphdef, tx, schedule, z_loss=t.z_loss, accum_steps=t.grad_accum_steps,
                                       distill=distill),
                       in_shardings=(state_shardings, batch_sharding, *teacher_shardings),
                       out_shardings=(state_shardings, None), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(graphdef))
  eval_batches = [_process_rows(b, proc, n_proc) for b in loader.make_eval_batches(
    corpus.eval, seq_len=d.seq_len, batch_size=d.batch_size, num_batches=t.eval_batches)]

  flops_per_token = metrics_lib.model_flops_per_token(m, d.seq_len)
  peak, peak_source = metrics_lib.peak_flops_per_device(jax.devices()[0], dtype=str(compute_dtype(m)),
                                                        cache_dir=cache_dir(cfg))
  tokens_per_step = d.batch_size * d.seq_len
  log.info("model: %s parameters; %.2f MFLOP/token; peak %.3g FLOP/s per device (%s); %d device(s) in %d "
           "process(es), mesh %s, sharding preset %s", f"{n_params:,}", flops_per_token / 1e6, peak, peak_source,
           jax.device_count(), n_proc, dict(mesh.shape), cfg.sharding.preset)

  last = {}
  if start_step >= t.steps:
    log.info("already trained to step %d (train.steps=%d); nothing to do", start_step, t.steps)
  bar = tqdm(total=t.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
             disable=not (is_main and t.progress_bar))
  pending = None  # metrics of the step in flight: fetched after the next step is dispatched
  t_last = time.perf_counter()
  first_step = True

  def finish_step(step: int, step_metrics) -> None:
    nonlocal t_last, first_step, last
    host = jax.device_get(step_metrics)
    now = time.perf_counter()
    step_time, t_last = now - t_last, now
    tok_s = tokens_per_step / step_time
    record = {"loss": float(host["loss"]), "grad_norm": float(host["grad_norm"]), "lr": float(host["lr"]),
              "step_time": step_time, "tokens_per_sec": tok_s,
              "mfu": metrics_lib.mfu(flops_per_token, tok_s / jax.device_count(), peak),
              "log_z_sq": float(host["log_z_sq"]), "skipped": int(host["skipped"]),
              **{k: float(v) for k, v in host.items() if k.startswith(("moe_", "distill_"))}}
    if first_step:
      record["compile_step"] = 1  # includes compilation; excluded from throughput summaries
      first_step = False
    writer.write(step, record)
    last = {"step": step, **record}
    bar.update(1)
    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{record['mfu']:.1%}")
    if not t.progress_bar and is_main and step % t.log_every == 0:
      remaining = (t.steps - step) * step_time
      kl = f" distill_kl {record['distill_kl']:.4f}" if "distill_kl" in record else ""
      log.info("step %d/%d loss %.4f%s grad_norm %.3f lr %.2e %.0f tok/s ETA %.0fs", step, t.steps,
               record["loss"], kl, record["grad_norm"], record["lr"], tok_s, remaining)
    streak = int(host["nonfinite_streak"])
    suspect = ""
    if restored_from is not None and streak and step - streak + 1 <= start_step + SUSPECT_STEPS:
      suspect = (f"; it began {step - streak + 1 - start_step} step(s) after restoring checkpoint {restored_from}, "
                 "a suspect: if it persists, move that checkpoint aside (rename it) to resume from the one before")
    if record["skipped"]:
      log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)%s", step, streak, suspect)
    if streak >= t.max_nonfinite_steps:
      raise TrainingDiverged(
        f"{streak} consecutive steps (up to step {step}) had a non-finite loss or gradient, reaching "
        f"train.max_nonfinite_steps={t.max_nonfinite_steps}; their updates were skipped{suspect}. "
        f"Last checkpoint: {ckpt.steps()[:1] or 'none'}. Lower train.learning_rate or check the data.")

  # Activations are constrained by the logical rules while the steps trace.
  with sharding.use_mesh(mesh, rules):
    try:
      for step in range(start_step + 1, t.steps + 1):
        batch = sharding.put_batch(next(train_iter), batch_sharding, d.batch_size)
        state, step_metrics = train_step(state, batch, *teacher_args)
        if pending is not None:
          finish_step(*pending)
        pending = (step, step_metrics)
        if step % t.checkpoint_every == 0 or step == t.steps:
          finish_step(*pending)
          pending = None
          bad = nonfinite_leaves(state)  # the same answer on every process: a global reduction
          if bad:  # never write (or replace a good checkpoint with) a state that cannot train on
            log.warning("step %d: no checkpoint written: the train state holds non-finite values (%s); the newest "
                        "checkpoint stays %s", step, ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else ""),
                        ckpt.steps()[:1] or "none")
          else:
            merged = {k: v for part in distributed.allgather_json(train_iter.get_state()) for k, v in part.items()}
            ckpt.save(step, state, merged, config_dict)
        if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
          if pending is not None:
            finish_step(*pending)
            pending = None
          eval_loss = evaluate(eval_step, state["params"], eval_batches, batch_sharding)
          writer.write(step, {"eval_loss": eval_loss, "eval_perplexity": float(np.exp(eval_loss))})
          last["eval_loss"] = eval_loss
          log.info("step %d: eval loss %.4f (perplexity %.2f)", step, eval_loss, np.exp(eval_loss))
          t_last = time.perf_counter()  # eval time is not step time
      if pending is not None:
        finish_step(*pending)
    finally:
      bar.close()
      ckpt.close()
      writer.flush()

  if is_main:
    writer.plot()
    if t.sample_tokens and n_proc > 1:
      log.info("no end-of-run sample in a multi-process run (its parameters span hosts); use a 1-process run")
    elif t.sample_tokens:
      prompt = encode_prompt(corpus.tokenizer, t.sample_prompt)
      out = sample_tokens(graphdef, state["params"], prompt, t.sample_tokens, max_len=m.max_seq_len,
                          eos_id=corpus.tokenizer.eos_id, vocab_limit=corpus.tokenizer.vocab_size)
      text = t.sample_prompt + corpus.tokenizer.decode(out)
      (workdir / "sample.txt").write_text(text)
      print(f"--- sample ({t.sample_tokens} tokens) ---\n{text}\n---")
  writer.close()
  last["unigram_entropy"] = corpus.unigram_entropy
  last["params"] = n_params
  return last
