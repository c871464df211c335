"""Config loading: overrides, errors that name the key, packaged configs, dry run."""

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest

from maxlm import config as config_lib
from maxlm.config import ConfigError, load_config
from maxlm.configs import base


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


def _numeric_fields(node: dict, prefix: str = "") -> list[tuple[str, int | float]]:
  """(dotted key, default) of every int / float field of a config dict (bools are not numbers here)."""
  fields = []
  for key, value in node.items():
    if isinstance(value, dict):
      fields += _numeric_fields(value, f"{prefix}{key}.")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      fields.append((f"{prefix}{key}", value))
  return fields


NUMERIC = _numeric_fields(base.get_config().to_dict())
FLOATS = [key for key, value in NUMERIC if isinstance(value, float)]


def _negative_has_a_meaning(key: str) -> bool:
  """As configs/base.py documents: a mesh axis of -1 takes the remaining devices; a negative curate.quality
  threshold disables its rule."""
  return key.startswith(("mesh.", "curate.quality."))


def test_the_audit_sees_every_section():
  assert {key.split(".")[0] for key, _ in NUMERIC} == {"model", "mesh", "distributed", "data", "train", "curate",
                                                       "tokenize", "serve", "distill", "lora", "dpo"}
  assert len(FLOATS) > 20


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOATS)
def test_every_float_rejects_nan_and_infinity_naming_key_and_value(key, value):
  with pytest.raises(ConfigError) as e:
    load_config("base", [f"--config.{key}={value}"])
  assert str(e.value) == f"{key}={float(value)!r}: must be a finite number"


@pytest.mark.parametrize("key", [key for key, _ in NUMERIC if not _negative_has_a_meaning(key)])
def test_every_numeric_key_rejects_a_negative_value_naming_it(key):
  with pytest.raises(ConfigError, match=r"must") as e:
    load_config("base", [f"--config.{key}=-1"])
  assert f"{key}=-1" in str(e.value)


@pytest.mark.parametrize("key", [key for key, value in NUMERIC if isinstance(value, int)])
def test_every_integer_rejects_a_value_beyond_int32_naming_it(key):
  with pytest.raises(ConfigError) as e:
    load_config("base", [f"--config.{key}={2**40}"])
  assert str(e.value).startswith(f"{key}={2**40}: must be")


@pytest.mark.parametrize("key", [key for key, _ in NUMERIC])
def test_zero_is_accepted_or_rejected_naming_the_key(key):
  try:
    cfg = load_config("base", [f"--config.{key}=0"])
  except ConfigError as e:
    assert f"{key}=0" in str(e)
  else:
    assert config_lib._get(cfg, key) == 0


@pytest.mark.parametrize("override, message", [
  # issue 16's examples: each named with its value and what is expected
  ("train.learning_rate=inf", "train.learning_rate=inf: must be a finite number"),
  ("train.eval_every=-1", "train.eval_every=-1: must be >= 0 (0 = only at the end)"),
  ("train.sample_tokens=-5", "train.sample_tokens=-5: must be >= 0 (0 = no sample)"),
  ("model.init_std=-1", "model.init_std=-1.0: must be > 0"),
  ("model.init_std=0", "model.init_std=0.0: must be > 0"),
  ("data.max_corpus_mb=-1", "data.max_corpus_mb=-1.0: must be > 0"),
  # probabilities, shares and Adam's betas
  ("train.b1=1", "train.b1=1.0: must be in [0, 1)"),
  ("train.b2=1.5", "train.b2=1.5: must be in [0, 1)"),
  ("curate.language.min_confidence=1.01", "curate.language.min_confidence=1.01: must be in [0, 1]"),
  ("distill.alpha=-0.1", "distill.alpha=-0.1: must be in [0, 1]"),
  ("data.eval_fraction=0", "data.eval_fraction=0.0: must be in (0, 1)"),
  ("curate.quality.max_digit_fraction=1.5", "curate.quality.max_digit_fraction=1.5: must be <= 1"),
  # seeds: grain's shuffle takes [0, 2^32)
  ("data.seed=4294967296", "data.seed=4294967296: must be in [0, 2^32)"),
  ("train.seed=-1", "train.seed=-1: must be in [0, 2^32)"),
  ("serve.num_pages=1", "serve.num_pages=1: must be 0"),
  ("mesh.fsdp=-2", "mesh.fsdp=-2: must be a positive device count or -1"),
])
def test_out_of_range_values_fail_naming_key_value_and_range(override, message):
  with pytest.raises(ConfigError) as e:
    load_config("base", [f"--config.{override}"])
  assert str(e.value).startswith(message)


def test_a_quality_minimum_above_its_maximum_is_rejected():
  with pytest.raises(ConfigError, match=r"^curate.quality.min_words=60 exceeds curate.quality.max_words=50"):
    load_config("base", ["curate.quality.min_words=60", "curate.quality.max_words=50"])
  load_config("base", ["curate.quality.min_words=60", "curate.quality.max_words=-1"])  # no maximum


def test_llama3_rope_scaling_needs_high_above_low_frequency_factor():
  with pytest.raises(ConfigError, match=r"model.rope_high_freq_factor=1.0: must exceed model.rope_low_freq_factor=1.0"):
    load_config("base", ["model.rope_scaling=llama3", "model.rope_high_freq_factor=1"])
  load_config("base", ["model.rope_high_freq_factor=1"])  # unused without llama3 scaling


def test_a_saved_config_with_nan_is_rejected(tmp_path):
  saved = load_config("tiny").to_dict()
  saved["train"]["learning_rate"] = math.nan
  path = tmp_path / "config.json"
  path.write_text(json.dumps(saved))  # Python's json writes the bare NaN token, and reads it back
  with pytest.raises(ConfigError, match=r"^train.learning_rate=nan: must be a finite number"):
    load_config(str(path))


@pytest.mark.parametrize("name", sorted(p.stem for p in Path(config_lib.CONFIG_DIR).glob("*.py")
                                        if not p.stem.startswith("_")))
def test_every_packaged_config_passes_validation(name):
  assert load_config(name).model.head_dim > 0


def test_warmup_beyond_steps_warns_and_the_peak_is_really_never_reached(caplog, monkeypatch):
  from maxlm.train.optim import make_schedule

  monkeypatch.setattr(config_lib, "_warned", set())
  with caplog.at_level(logging.WARNING, logger="maxlm.config"):
    load_config("tiny", ["train.steps=40", "train.warmup_steps=40"])
    assert not caplog.records  # warmup == steps: the peak is reached at the last step
    cfg = load_config("tiny", ["train.steps=40", "train.warmup_steps=50"])
  [record] = caplog.records
  assert "train.warmup_steps=50 exceeds train.steps=40" in record.getMessage()
  schedule = make_schedule(cfg.train)
  assert max(float(schedule(s)) for s in range(cfg.train.steps + 1)) < cfg.train.learning_rate


def test_unknown_config_file_lists_packaged_configs():
  with pytest.raises(ConfigError, match="no such file.*llama3_8b.*tiny"):
    load_config("configs/nope.py")


def test_a_config_file_outside_the_repository_builds_on_a_packaged_one(tmp_path):
  """Config files import their siblings as maxlm.configs.*; a user's file does the same, from any directory."""
  mine = tmp_path / "mine.py"
  mine.write_text("from maxlm.configs import tiny_moe\n\n\ndef get_config():\n  c = tiny_moe.get_config()\n"
                  "  c.model.num_layers = 3\n  return c\n")
  out = subprocess.run([sys.executable, "-m", "maxlm.cli", "config", f"--config={mine}", "--config.train.steps=9"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  printed = json.loads(out.stdout)
  assert (printed["model"]["num_layers"], printed["model"]["num_experts"], printed["train"]["steps"]) == (3, 4, 9)
  by_name = subprocess.run([sys.executable, "-m", "maxlm.cli", "config", "--config=tiny"], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)  # a packaged name, away from the checkout
  assert by_name.returncode == 0, by_name.stderr
  assert json.loads(by_name.stdout) == json.loads(config_lib.to_json(load_config("tiny")))


def test_logical_rules_do_not_import_the_config_loader():
  """The dependency points one way: config.py uses logical_rules.py, which needs only the error type."""
  code = "import sys, maxlm.logical_rules; print(sorted(m for m in sys.modules if m.startswith('maxlm')))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
  assert "'maxlm.config'" not in out.stdout and "'maxlm.errors'" in out.stdout


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
