"""Knowledge distillation: a trained teacher workdir checked against the student, then loaded frozen on its mesh.

`maxlm train --config.distill.teacher=WORKDIR` trains the student on alpha * T^2 * KL(teacher_T || student_T) +
(1 - alpha) * its data loss (maxlm.train.step.objective_sums). The teacher's parameters are an argument of the
jitted step: not in the optimizer, not in the student's checkpoints (its config records only the path).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
from ml_collections import config_dict

from data_pipelines.tokenizer import load_tokenizer, same_vocabulary
from maxlm.config import ConfigError, config_from_dict
from maxlm.logical_rules import check_layout
from maxlm.train.checkpoint import Checkpointer
from maxlm.train.state import abstract_params, model_graphdef
from maxlm.train.step import Distill
from maxlm.workdir import TOKENIZER_DIR, load_workdir_config, tokenizer_source

log = logging.getLogger("maxlm.train")



def _where(cfg) -> str:
  return f"distill.teacher={cfg.distill.teacher!r}"


def teacher_config(cfg, mesh_shape: dict[str, int], rules, student_workdir: str | Path | None = None
                   ) -> config_dict.ConfigDict:
  """The teacher's model on the student's mesh, sharding and batch (cfg with model = the teacher's), checked.

  Raises ConfigError before anything is loaded: no such directory, not a maxlm workdir, no checkpoint, a
  vocabulary size other than the student's, a sequence the teacher cannot read, a layout the mesh cannot shard,
  or the student's own workdir.
  """
  where, workdir = _where(cfg), Path(cfg.distill.teacher)
  if not workdir.is_dir():
    raise ConfigError(f"{where}: no such directory")
  if student_workdir is not None and workdir.resolve() == Path(student_workdir).resolve():
    raise ConfigError(f"{where}: that is the student's own --workdir; give the student a new one")
  try:
    saved = load_workdir_config(workdir)
  except FileNotFoundError:
    raise ConfigError(f"{where}: no config.json, not a maxlm workdir (train the teacher with maxlm train "
                      f"--workdir {workdir} or import one with maxlm convert --from-hf)") from None
  except ConfigError as e:
    raise ConfigError(f"{where}: its config.json cannot be used: {e}") from None
  ckpts = workdir / "checkpoints"
  if not (ckpts.is_dir() and any(p.name.isdigit() and p.is_dir() for p in ckpts.iterdir())):
    raise ConfigError(f"{where}: no checkpoint under {ckpts} (is the teacher trained?)")
  tv, sv = saved.model.vocab_size, cfg.model.vocab_size
  if tv != sv:
    raise ConfigError(f"{where}: the teacher's model.vocab_size={tv} differs from the student's "
                      f"model.vocab_size={sv}; distillation compares logits over one shared vocabulary")
  if cfg.data.seq_len > saved.model.max_seq_len:
    raise ConfigError(f"{where}: data.seq_len={cfg.data.seq_len} exceeds the teacher's model.max_seq_len="
                      f"{saved.model.max_seq_len}")
  try:
    tcfg = config_from_dict({**cfg.to_dict(), "model": saved.model.to_dict()})
    check_layout(tcfg, mesh_shape, rules)
  except ConfigError as e:
    raise ConfigError(f"{where}: the teacher's model on the student's mesh {mesh_shape}: {e}") from None
  return tcfg


def _trained_tokenizer_source(cfg) -> dict[str, Any]:
  """The settings that determine the BPE a run trains itself when it has no data.tokenizer / data.tokenized."""
  d = cfg.data
  return {"data.paths": d.paths, "data.text_field": d.text_field, "model.vocab_size": cfg.model.vocab_size,
          "data.max_corpus_mb": None if d.paths.strip() else d.max_corpus_mb}


def check_teacher_tokenizer(cfg, tokenizer) -> None:
  """Raises ConfigError unless the teacher's tokenizer is `tokenizer` (the student's): same file, else same vocab.

  The teacher's tokenizer is TEACHER/tokenizer/ if present, else its data.tokenizer. A teacher that trained its
  own BPE on its corpus records neither: it matches when the student trains its own on the same data settings.
  """
  where, workdir = _where(cfg), Path(cfg.distill.teacher)
  saved = load_workdir_config(workdir)
  local = workdir / TOKENIZER_DIR
  source = tokenizer_source(workdir, saved)
  if not source:
    theirs, ours = _trained_tokenizer_source(saved), _trained_tokenizer_source(cfg)
    if not cfg.data.tokenizer and not cfg.data.tokenized and theirs == ours:
      return  # both train the same BPE on the same data (one cache key)
    raise ConfigError(f"{where}: the teacher trained its own tokenizer on {theirs} and records no "
                      f"{local}/, so it cannot be the student's tokenizer {tokenizer.path} (a different source: "
                      f"data.tokenizer={cfg.data.tokenizer!r}, data.tokenized={cfg.data.tokenized!r}, {ours}); "
                      f"copy the teacher's tokenizer into {local}/ or train the student on the teacher's data")
  try:
    teacher_tok = load_tokenizer(source)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{where}: the teacher's tokenizer {source} cannot be loaded: {e}") from None
  if teacher_tok.sha256 == tokenizer.sha256:
    return
  if same_vocabulary(teacher_tok, tokenizer):
    log.info("distill: the teacher's tokenizer %s differs from the student's %s as a file but has the same "
             "vocabulary", teacher_tok.path, tokenizer.path)
    return
  raise ConfigError(f"{where}: tokenizer mismatch: the teacher's {teacher_tok.path} (vocab {teacher_tok.vocab_size}, "
                    f"sha256 {teacher_tok.sha256[:12]}) vs the student's {tokenizer.path} (vocab "
                    f"{tokenizer.vocab_size}, sha256 {tokenizer.sha256[:12]}): their token ids differ")


def load_teacher(cfg, tcfg: config_dict.ConfigDict, mesh: jax.sharding.Mesh) -> tuple[Distill, dict, int]:
  """(distill, teacher params, teacher step): the teacher's newest readable parameters sharded on the student's
  mesh under the student's rules (optimizer state stays on disk). tcfg is teacher_config's."""
  ckpt = Checkpointer(Path(cfg.distill.teacher) / "checkpoints", async_save=False)
  try:
    step, params = ckpt.restore_params(abstract_params(tcfg, mesh))
  except (OSError, ValueError) as e:
    raise ConfigError(f"{_where(cfg)}: {e}") from None
  finally:
    ckpt.close()
  distill = Distill(graphdef=model_graphdef(tcfg, mesh), alpha=float(cfg.distill.alpha),
                    temperature=float(cfg.distill.temperature))
  return distill, params, step

