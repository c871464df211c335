"""PEFT interchange: an adapter made by `peft` imports into maxlm and computes what peft computes; maxlm's trained
adapters export to files `peft.PeftModel.from_pretrained` loads, with the same logits; bad adapters are named."""

import copy
import json

import jax
import numpy as np
import pytest
import torch
from helpers import fetch_models, import_tiny_hf_model, small_config, tiny_hf_model
from peft import LoraConfig, PeftModel, get_peft_model

from maxlm.config import ConfigError
from maxlm.convert.peft import export_peft, import_peft
from maxlm.train.loop import train
from maxlm.workdir import load_model

TOKENS = np.random.default_rng(0).integers(2, 512, (2, 24)).astype(np.int32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random transformers Llama and its maxlm import (the base of every adapter here)."""
  model = tiny_hf_model("llama")
  work, _ = import_tiny_hf_model(model, tmp_path_factory.mktemp("peft"))
  return model, work


def _peft_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _maxlm_logits(workdir, tokens):
  model, _, _ = load_model(workdir, devices=jax.devices()[:1])
  return np.asarray(model(tokens))


@pytest.mark.parametrize("settings", [
  dict(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], layers_to_transform=[1]),
  dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], use_rslora=True),
])
def test_an_adapter_made_by_peft_imports_and_computes_what_peft_computes(tiny, tmp_path, settings):
  model, base = tiny
  torch.manual_seed(1)
  peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                               **settings)).eval()
  peft_model.save_pretrained(tmp_path / "peft")
  import_peft(tmp_path / "peft", base, tmp_path / "imported")
  want = _peft_logits(peft_model, TOKENS)
  assert np.abs(want - _peft_logits(model, TOKENS)).max() > 1e-2  # the adapter changes the model
  np.testing.assert_allclose(_maxlm_logits(tmp_path / "imported", TOKENS), want, atol=1e-4, rtol=1e-4)


def test_trained_maxlm_adapters_load_in_peft_with_the_same_logits(tiny, tmp_path):
  model, base = tiny
  cfg = small_config(f"--config.lora.base={base}", "--config.lora.rank=4",
                     "--config.lora.targets=.*attn\\.(q|v)|.*mlp\\..*", "--config.train.steps=3",
                     "--config.train.learning_rate=5e-2", "--config.train.warmup_steps=0",
                     "--config.train.checkpoint_every=3", "--config.train.eval_every=0")
  train(cfg, tmp_path / "lora", devices=jax.devices()[:1])
  _, n = export_peft(tmp_path / "lora", tmp_path / "peft")
  assert n == 2 * 5  # q, v, gate, up, down in both layers
  conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert conf["r"] == 4 and conf["peft_type"] == "LORA"
  ours = _maxlm_logits(tmp_path / "lora", TOKENS)
  peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft").eval()
  assert np.abs(ours - _peft_logits(model, TOKENS)).max() > 1e-3  # trained adapters: not the base any more
  np.testing.assert_allclose(_peft_logits(peft_model, TOKENS), ours, atol=1e-4, rtol=1e-4)


def test_unsupported_adapters_and_workdirs_are_named(tiny, tmp_path):
  model, base = tiny
  peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
  peft_model.save_pretrained(tmp_path / "dora")
  with pytest.raises(ValueError, match="use_dora=True"):
    import_peft(tmp_path / "dora", base, tmp_path / "a")
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    import_peft(tmp_path, base, tmp_path / "b")
  with pytest.raises(ConfigError, match="holds no adapters"):
    export_peft(base, tmp_path / "c")


@pytest.mark.slow  # SmolLM2-135M-Instruct in transformers + peft and in maxlm (~1 min)
def test_smollm2_peft_round_trip_matches_peft_logits(tmp_path):
  models = fetch_models()
  base, folder = models.fetch_workdir("smollm2-135m"), models.fetch_transformers("smollm2-135m")
  import transformers

  hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  torch.manual_seed(0)
  peft_model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"])).eval()
  with torch.no_grad():  # PEFT's random init draws B at A's scale: shrink it to a fine-tuning-sized update
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.mul_(0.05)
  peft_model.save_pretrained(tmp_path / "peft")
  import_peft(tmp_path / "peft", base, tmp_path / "imported")
  export_peft(tmp_path / "imported", tmp_path / "exported")
  tokens = np.random.default_rng(0).integers(0, 49152, (1, 32)).astype(np.int32)
  want = _peft_logits(peft_model, tokens)
  np.testing.assert_allclose(_maxlm_logits(tmp_path / "imported", tokens), want, atol=1e-4, rtol=1e-4)
  again = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                    tmp_path / "exported").eval()
  np.testing.assert_allclose(_peft_logits(again, tokens), want, atol=1e-5, rtol=1e-5)
