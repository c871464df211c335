"""Config loading: overrides, errors that name the key, packaged configs, dry run."""

import json
import subprocess
import sys

import pytest

from maxlm.config import ConfigError, load_config


def test_overrides_are_typed_and_applied():
  cfg = load_config("tiny", ["--config.train.steps=7", "--config.model.sliding_window=32",
                             "--config.train.learning_rate=1e-3", "--config.model.tie_embeddings=false",
                             "--config.data.paths=a.txt,b.jsonl"])
  assert cfg.train.steps == 7 and cfg.model.sliding_window == 32 and cfg.train.learning_rate == 1e-3
  assert cfg.model.tie_embeddings is False and cfg.data.paths == "a.txt,b.jsonl"
  assert cfg.model.head_dim == cfg.model.d_model // cfg.model.num_heads


@pytest.mark.parametrize("override, message", [
  ("--config.train.stepz=3", "unknown config key 'train.stepz'.*did you mean 'train.steps'"),
  ("--config.nosuch.key=3", "unknown config key 'nosuch.key'"),
  ("--config.train.steps=3.5", "'train.steps' expects int, got '3.5'"),
  ("--config.model.tie_embeddings=maybe", "'model.tie_embeddings' expects bool"),
  ("--config.model.num_kv_heads=3", r"model.num_heads=4 is not divisible by model.num_kv_heads=3"),
  ("--config.model.attention=flash", r"model.attention='flash': expected one of"),
  ("--config.model.remat=sometimes", r"model.remat='sometimes'"),
  ("--config.train.grad_accum_steps=3", r"data.batch_size=16 is not divisible by train.grad_accum_steps=3"),
  ("--config.data.seq_len=4096", r"data.seq_len=4096 exceeds model.max_seq_len=1024"),
  ("--config.model.d_model=250", r"model.d_model=250 is not divisible by model.num_heads=4"),
  ("--config.train.steps=0", r"train.steps=0: must be > 0"),
  ("--config.model=3", r"'model' is a section"),
  ("--config.data.mixture=web=1", r"data.mixture='web=1' names sources of tokenized data: set data.tokenized"),
  ("--config.data.curriculum=hard", r"data.curriculum='hard': expected one of"),
  ("--config.tokenize.shard_mb=0", r"tokenize.shard_mb=0.0: must be > 0"),
  ("--config.curate.near_dedup.bands=16", r"bands=16, rows=0: set both"),
  ("--config.curate.near_dedup.threshold=1.5", r"threshold=1.5: must be in"),
])
def test_bad_overrides_fail_naming_the_key(override, message):
  with pytest.raises(ConfigError, match=message):
    load_config("tiny", [override])


def test_unknown_config_file_lists_packaged_configs():
  with pytest.raises(ConfigError, match="no such file.*llama3_8b.*tiny"):
    load_config("configs/nope.py")


def test_cli_reports_config_errors_before_any_work(tmp_path):
  out = subprocess.run([sys.executable, "-m", "maxlm.cli", "train", f"--workdir={tmp_path / 'w'}",
                        "--config.train.stepz=3"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert "unknown config key 'train.stepz'" in out.stderr
  assert not (tmp_path / "w").exists()  # failed before creating anything


def test_cli_help_lists_commands():
  out = subprocess.run([sys.executable, "-m", "maxlm.cli", "--help"], capture_output=True, text=True, timeout=60)
  assert out.returncode == 0 and "train" in out.stdout and "config" in out.stdout


def test_cli_config_prints_the_resolved_config(capsys):
  from maxlm.cli import main
  assert main(["config", "--config.model.num_layers=3"]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed["model"]["num_layers"] == 3 and printed["model"]["head_dim"] == 64


def test_llama3_8b_dry_run_counts_parameters_like_transformers():
  """The dry run builds Llama-3-8B abstractly; transformers' own LlamaForCausalLM (on the meta device) agrees."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  out = subprocess.run([sys.executable, "-m", "maxlm.cli", "train", "--config=configs/llama3_8b.py", "--dry_run"],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  hf_cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
  with torch.device("meta"):
    expected = sum(p.numel() for p in LlamaForCausalLM(hf_cfg).parameters())
  assert f"parameters: {expected:,}" in out.stdout
  assert expected == 8_030_261_248
