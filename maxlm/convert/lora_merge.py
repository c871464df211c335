"""`maxlm convert --merge-lora`: an adapter workdir's adapters folded into its base, written as a plain workdir.

Every adapted weight becomes W + scale * A B (in float32, cast to the base's dtype); with a quantized (QLoRA) base
the sum is taken over the dequantized base, so the merged model is the adapted model exactly, not the original
float base plus the adapters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from flax import nnx

from maxlm import sharding
from maxlm.config import ConfigError
from maxlm.convert.hf import IMPORT_RECORD, check_new_workdir, write_workdir
from maxlm.models.lora import merge_lora
from maxlm.train.state import without_lora
from maxlm.workdir import TOKENIZER_DIR, load_model, load_workdir_config


def merge_lora_workdir(workdir: str | Path, output: str | Path, *, step: int | None = None) -> tuple[list[str], str]:
  """Writes OUTPUT: WORKDIR's model with its adapters merged, as a step-0 workdir; (merged paths, base_quant)."""
  workdir, output = Path(workdir), Path(output)
  cfg = load_workdir_config(workdir)
  if not cfg.lora.base:
    raise ConfigError(f"{workdir} holds no adapters (its config has no lora.base): nothing to merge")
  check_new_workdir(output)
  model, cfg, step = load_model(workdir, step=step)
  with sharding.use_mesh(sharding.make_mesh(cfg.mesh), sharding.config_rules(cfg)):  # the merged weights' layout
    paths = merge_lora(model)
  plain = without_lora(cfg)
  # The base's import record (its Hugging Face family, dtype and special tokens, for --to-hf) plus the merge.
  base_record = Path(cfg.lora.base) / IMPORT_RECORD
  record = json.loads(base_record.read_text()) if base_record.is_file() else {}
  record["merged_lora"] = {"adapters": str(workdir.resolve()), "step": step, "base": cfg.lora.base,
                           "base_quant": cfg.lora.base_quant, "merged": paths}
  write_workdir(output, plain, nnx.to_pure_dict(nnx.state(model)), record)
  if (workdir / TOKENIZER_DIR).is_dir():
    shutil.copytree(workdir / TOKENIZER_DIR, output / TOKENIZER_DIR, dirs_exist_ok=True)
  return paths, cfg.lora.base_quant
