"""A workdir's model (and a speculative draft's) loaded for serving: checked first, placed on the serving mesh.

Everything that can be checked without reading weights is checked first: the serving mesh against the model, and
a draft's vocabulary size, layout and tokenizer (piece by piece) against the target's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from ml_collections import config_dict

from data_pipelines.tokenizer import vocabulary_difference
from maxlm import sharding
from maxlm.logical_rules import MESH_AXES
from maxlm.models.transformer import Transformer
from maxlm.serve import layout
from maxlm.workdir import load_model, load_workdir_config, load_workdir_tokenizer


@dataclasses.dataclass
class Served:
  """What an Engine is built from: the (quantized) model and draft on `mesh`, the config and tokenizer."""

  model: Transformer
  cfg: config_dict.ConfigDict
  tokenizer: Any
  draft: Transformer | None
  mesh: jax.sharding.Mesh


def check_draft_tokenizer(tokenizer: Any, draft_tokenizer: Any, where: str) -> None:
  """Raises ValueError unless the draft's tokenizer has the target's vocabulary, piece by piece."""
  diff = vocabulary_difference(tokenizer, draft_tokenizer)
  if diff is not None:
    raise ValueError(f"{where}: the target's and the draft's tokenizers differ (target vs draft: {diff}); "
                     "speculative decoding needs one vocabulary")


def draft_overrides(cfg: config_dict.ConfigDict, overrides: tuple[str, ...]) -> tuple[str, ...]:
  """The draft's overrides: the serve.* ones given, and the target's mesh and sharding (one layout for both)."""
  same = [f"--config.mesh.{a}={cfg.mesh[a]}" for a in MESH_AXES]
  same += [f"--config.sharding.preset={cfg.sharding.preset}", f"--config.sharding.rules={cfg.sharding.rules}"]
  return (*(o for o in overrides if o.startswith("--config.serve.")), *same)


def load_served(workdir: str, overrides: tuple[str, ...] = (), draft_workdir: str | None = None) -> Served:
  """The workdir's model quantized per serve.weights (and the draft's per its own), on the serving mesh."""
  from maxlm.serve.quantize import quantize_model  # noqa: PLC0415  (its home may move; only loading needs it)

  cfg = load_workdir_config(workdir, overrides)
  mesh, _ = layout.serving_mesh(cfg)
  tokenizer = load_workdir_tokenizer(workdir, cfg)
  dcfg = None
  if draft_workdir:
    where = f"draft {draft_workdir}"
    dover = draft_overrides(cfg, overrides)
    dcfg = load_workdir_config(draft_workdir, dover)
    if dcfg.model.vocab_size != cfg.model.vocab_size:
      raise ValueError(f"{where} has model.vocab_size={dcfg.model.vocab_size}, the target {workdir} "
                       f"{cfg.model.vocab_size}: speculative decoding needs one vocabulary")
    layout.check_model_layout(dcfg, dict(mesh.shape), sharding.config_rules(dcfg), where=f"{where}: ")
    check_draft_tokenizer(tokenizer, load_workdir_tokenizer(draft_workdir, dcfg), where)
  devices = jax.devices()[:cfg.serve.devices]  # serving_mesh's devices, in its order
  model, cfg, _ = load_model(workdir, overrides, devices=devices)
  model = quantize_model(model, cfg.serve.weights, group=cfg.serve.int4_group)
  draft = None
  if dcfg is not None:
    draft, dcfg, _ = load_model(draft_workdir, dover, devices=devices)
    draft = quantize_model(draft, dcfg.serve.weights, group=dcfg.serve.int4_group)
  return Served(model, cfg, tokenizer, draft, mesh)
