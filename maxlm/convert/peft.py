"""PEFT LoRA adapters <-> maxlm adapter workdirs (`maxlm convert --to-peft` / `--from-peft`).

PEFT's files: adapter_config.json (peft_type LORA, r, lora_alpha, use_rslora, target_modules) and
adapter_model.safetensors with, per adapted Linear of the transformers model, `base_model.model.<module>.lora_A.weight`
[r, in_features] and `...lora_B.weight` [out_features, r]; its update is scale * B A with scale = lora_alpha / r
(/ sqrt(r) with use_rslora), maxlm's x A B with the same scale. A maxlm factor flattens to PEFT's by its own axes:
A [*in, r] -> [r, in] and B [r, *out] -> [out, r] (the weights' in/out axes are those of maxlm.convert.hf_tensors,
whose q/k/v/o layouts need no permutation). Llama-family names (Llama, Mistral, Qwen2): self_attn.{q,k,v,o}_proj and
mlp.{gate,up,down}_proj under model.layers.<i>.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from maxlm import sharding
from maxlm.config import ConfigError, config_from_dict, to_json
from maxlm.convert.hf import IMPORT_RECORD, check_new_workdir
from maxlm.train.adapters import write_record
from maxlm.train.checkpoint import Checkpointer
from maxlm.train.state import abstract_params
from maxlm.workdir import TOKENIZER_DIR, load_workdir_config, restore_params

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
HF_MODULES = {("attn", "q"): "self_attn.q_proj", ("attn", "k"): "self_attn.k_proj", ("attn", "v"): "self_attn.v_proj",
              ("attn", "o"): "self_attn.o_proj", ("mlp", "gate"): "mlp.gate_proj", ("mlp", "up"): "mlp.up_proj",
              ("mlp", "down"): "mlp.down_proj"}
_BY_HF = {v: k for k, v in HF_MODULES.items()}
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
                  r"\.lora_([AB])(?:\.default)?\.weight$")


def _layers(cfg, adapters: dict):
  """(layer, (block, name), leaf dict {"a", "b"} of that layer) of an adapter tree, stacked or not."""
  layers = adapters["layers"]
  if cfg.model.scan_layers:
    for block, names in layers.items():
      for name, leaf in names.items():
        for i in range(cfg.model.num_layers):
          yield i, (block, name), {k: v[i] for k, v in leaf.items()}
  else:
    for i, blocks in layers.items():
      for block, names in blocks.items():
        for name, leaf in names.items():
          yield int(i), (block, name), leaf


def export_peft(workdir: str | Path, output: str | Path, *, step: int | None = None) -> tuple[Path, int]:
  """Writes OUTPUT/adapter_config.json and adapter_model.safetensors from an adapter workdir; (output, modules)."""
  workdir, output = Path(workdir), Path(output)
  cfg = load_workdir_config(workdir)
  if not cfg.lora.base:
    raise ConfigError(f"{workdir} holds no adapters (its config has no lora.base): nothing to export to PEFT")
  if cfg.model.num_experts:
    raise ConfigError("PEFT export covers dense models (the adapters of attention and the SwiGLU MLP)")
  _, adapters = restore_params(workdir, cfg, step)
  adapters = jax.device_get(adapters)
  tensors, modules = {}, set()
  for i, key, leaf in _layers(cfg, adapters):
    a, b = np.asarray(leaf["a"], np.float32), np.asarray(leaf["b"], np.float32)
    r = a.shape[-1]
    module = f"model.layers.{i}.{HF_MODULES[key]}"
    tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
    tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
    modules.add(module)
  base_record = Path(cfg.lora.base) / IMPORT_RECORD
  source = json.loads(base_record.read_text()).get("source") if base_record.is_file() else None
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
            "lora_dropout": cfg.lora.dropout, "use_rslora": cfg.lora.rslora, "target_modules": sorted(modules),
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "use_dora": False, "base_model_name_or_path": source or cfg.lora.base}
  output.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(output / ADAPTER_WEIGHTS), metadata={"format": "pt"})
  (output / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
  return output, len(modules)


def _peft_config(peft_dir: Path) -> dict:
  """adapter_config.json, checked for what maxlm's LoRA computes (plain LoRA on Linear weights, no bias, no DoRA)."""
  path = peft_dir / ADAPTER_CONFIG
  if not path.is_file():
    raise FileNotFoundError(f"{peft_dir}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
  conf = json.loads(path.read_text())
  unsupported = [f"{k}={conf.get(k)!r}" for k, ok in (
    ("peft_type", conf.get("peft_type") == "LORA"), ("use_dora", not conf.get("use_dora")),
    ("bias", conf.get("bias", "none") == "none"), ("modules_to_save", not conf.get("modules_to_save")),
    ("fan_in_fan_out", not conf.get("fan_in_fan_out")), ("rank_pattern", not conf.get("rank_pattern")),
    ("alpha_pattern", not conf.get("alpha_pattern"))) if not ok]
  if unsupported:
    raise ValueError(f"{path}: maxlm imports plain LoRA adapters; this one has {', '.join(unsupported)}")
  return conf


def import_peft(peft_dir: str | Path, base: str | Path, workdir: str | Path) -> tuple[int, int]:
  """Writes WORKDIR: the PEFT adapter in PEFT_DIR on the maxlm workdir BASE, as an adapter workdir (step 0) that
  serves, evaluates, merges and trains on; (adapted projections, layers). Layers PEFT left out get zero factors
  (exactly the base there)."""
  peft_dir, base, workdir = Path(peft_dir), Path(base), Path(workdir)
  conf = _peft_config(peft_dir)
  check_new_workdir(workdir)
  tensors = load_file(str(peft_dir / ADAPTER_WEIGHTS))
  found: dict[tuple[int, tuple[str, str]], dict[str, np.ndarray]] = {}
  for name, value in tensors.items():
    m = _KEY.fullmatch(name)
    if m is None:
      raise ValueError(f"{peft_dir / ADAPTER_WEIGHTS}: tensor {name!r} is not a LoRA factor of a Llama-family "
                       "attention or MLP projection")
    found.setdefault((int(m.group(1)), _BY_HF[m.group(2)]), {})[m.group(3)] = value
  kinds = sorted({key for _, key in found})
  base_cfg = load_workdir_config(base)
  d = base_cfg.to_dict()
  d["lora"] = {**d["lora"], "base": str(base.resolve()), "rank": int(conf["r"]), "alpha": float(conf["lora_alpha"]),
               "rslora": bool(conf.get("use_rslora")), "dropout": 0.0,
               "targets": r".*\.(" + "|".join(f"{b}\\.{n}" for b, n in kinds) + ")"}
  cfg = config_from_dict(d)
  mesh = sharding.make_mesh(cfg.mesh)
  target = abstract_params(cfg, mesh)
  filled = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), target)
  num_layers = cfg.model.num_layers
  for (i, key), ab in found.items():
    if i >= num_layers or set(ab) != {"A", "B"}:
      raise ValueError(f"{peft_dir}: layer {i} {HF_MODULES[key]}: expected lora_A and lora_B of one of the base's "
                       f"{num_layers} layers")
    leaf = filled["layers"][key[0]][key[1]] if cfg.model.scan_layers else filled["layers"][i][key[0]][key[1]]
    a_shape = leaf["a"].shape[1:] if cfg.model.scan_layers else leaf["a"].shape
    b_shape = leaf["b"].shape[1:] if cfg.model.scan_layers else leaf["b"].shape
    a, b = ab["A"].astype(np.float32).T, ab["B"].astype(np.float32).T
    if a.size != np.prod(a_shape) or b.size != np.prod(b_shape):
      raise ValueError(f"{peft_dir}: layer {i} {HF_MODULES[key]}: lora_A {ab['A'].shape} / lora_B {ab['B'].shape} do "
                       f"not fit the base's projection (rank {cfg.lora.rank})")
    if cfg.model.scan_layers:
      leaf["a"][i], leaf["b"][i] = a.reshape(a_shape), b.reshape(b_shape)
    else:
      leaf["a"][...], leaf["b"][...] = a.reshape(a_shape), b.reshape(b_shape)
  adapters = jax.tree.map(lambda v, t: jax.device_put(v.astype(t.dtype), t.sharding), filled, target)
  workdir.mkdir(parents=True, exist_ok=True)
  config_json = to_json(cfg)
  (workdir / "config.json").write_text(config_json)
  base_ckpt = Checkpointer(base / "checkpoints", async_save=False)
  base_step = base_ckpt.steps()[0]
  base_ckpt.close()
  write_record(workdir, cfg, base_step, adapters)
  ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
  ckpt.save_params(0, adapters, json.loads(config_json))
  ckpt.close()
  if (base / TOKENIZER_DIR).is_dir():
    shutil.copytree(base / TOKENIZER_DIR, workdir / TOKENIZER_DIR, dirs_exist_ok=True)
  return len(kinds), len({i for i, _ in found})
