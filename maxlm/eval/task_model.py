"""The TaskModel evaluation tasks run on, from a workdir (`maxlm eval --tasks`) or from a model in memory (the
training loop): one copy of the weights behind both the log-likelihood scorer and the generation engine."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from maxlm.eval.task_runner import TaskModel

EVAL_MAX_LEN = 2048  # the engine's sequence length for generation tasks unless serve.max_len says otherwise


def _chat_template(tokenizer: Any) -> Any:
  from data_pipelines.chat_template import ChatTemplateError, template_of  # noqa: PLC0415

  try:
    return template_of(tokenizer)
  except ChatTemplateError:
    return None


def task_model(model: Any, cfg: Any, tokenizer: Any, *, mesh: jax.sharding.Mesh, batch_size: int | None = None,
               seq_len: int | None = None, chat: bool = False) -> TaskModel:
  """A TaskModel over `model` (its parameters placed on `mesh` by cfg's rules). batch_size: rows per scoring batch
  and the engine's running batch (default 8, rounded up to the devices the batch is split over); seq_len: the
  scoring window (default model.max_seq_len). chat: generation stops at the chat template's end of turn."""
  from data_pipelines.chat_template import end_of_turn_id  # noqa: PLC0415
  from maxlm import sharding  # noqa: PLC0415
  from maxlm.config import apply_override  # noqa: PLC0415
  from maxlm.eval.loglikelihood import WindowScorer  # noqa: PLC0415
  from maxlm.serve.engine import Engine  # noqa: PLC0415

  scorer = WindowScorer(model, sharding.config_rules(cfg), mesh)
  rows = batch_size or 8
  rows = -(-rows // scorer.row_multiple) * scorer.row_multiple
  template = _chat_template(tokenizer)

  def make_engine(model: Any) -> Any:
    max_len = int(cfg.serve.max_len) or min(int(cfg.model.max_seq_len), EVAL_MAX_LEN)
    serve_cfg = cfg.copy_and_resolve_references()
    for item in (f"serve.max_batch={rows}", f"serve.max_len={max_len}"):
      apply_override(serve_cfg, item)
    tok = tokenizer
    if chat and template is not None:
      stop = end_of_turn_id(tokenizer, template)
      tok = tokenizer if stop in (None, tokenizer.eos_id) else tokenizer.with_eos(stop)
    return Engine(model, serve_cfg, tok, mesh=mesh)

  return TaskModel(model=model, tokenizer=tokenizer, scorer=scorer, make_engine=make_engine,
                   seq_len=seq_len or int(cfg.model.max_seq_len), batch_size=rows, chat_template=template)


def from_workdir(workdir: str, overrides: tuple[str, ...] = (), *, batch_size: int | None = None,
                 seq_len: int | None = None, chat: bool = False) -> tuple[TaskModel, int]:
  """(TaskModel, checkpoint step) of a workdir's newest checkpoint, config (with overrides) and tokenizer."""
  from maxlm.workdir import load_model, load_workdir_tokenizer  # noqa: PLC0415

  model, cfg, step = load_model(workdir, overrides)
  mesh = jax.tree.leaves(nnx.state(model))[0].sharding.mesh
  tokenizer = load_workdir_tokenizer(workdir, cfg)
  return task_model(model, cfg, tokenizer, mesh=mesh, batch_size=batch_size, seq_len=seq_len, chat=chat), step
