"""The `maxlm` command line: exit codes, --help of every command, config arguments a command cannot honour."""

import subprocess
import sys

import pytest

from maxlm.cli import main

COMMANDS = ("train", "convert", "config", "plan", "curate", "tokenize", "generate", "serve", "eval")


def test_no_command_is_a_usage_error_on_stderr():
  out = subprocess.run([sys.executable, "-m", "maxlm.cli"], capture_output=True, text=True, timeout=60)
  assert out.returncode == 2
  assert out.stdout == "" and "commands:" in out.stderr and "maxlm <command>" in out.stderr


@pytest.mark.parametrize("flag", ["--help", "-h", "help"])
def test_help_is_usage_on_stdout(flag, capsys):
  assert main([flag]) == 0
  printed = capsys.readouterr()
  assert printed.err == "" and all(command in printed.out for command in COMMANDS)
  assert "--config.<section>.<key>=<value>" in printed.out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_explains_overrides(command, capsys):
  with pytest.raises(SystemExit) as e:
    main([command, "--help"])
  assert e.value.code == 0
  help_text = capsys.readouterr().out
  assert help_text.startswith(f"usage: maxlm {command}")
  assert "--config." in help_text and "=<value>" in help_text
  assert "maxlm config" in help_text and "configs/base.py" in help_text


@pytest.mark.parametrize("command, extra", [
  ("generate", ["--prompt=hi"]),
  ("serve", []),
  ("eval", ["--data=x.txt"]),
  ("convert", ["--to-hf", "--output=out"]),
  ("convert", ["--from-hf=hf"]),
])
def test_a_config_file_is_refused_where_the_config_comes_from_the_workdir(command, extra, tmp_path, capsys):
  workdir = tmp_path / "w"
  assert main([command, f"--workdir={workdir}", "--config=missing.py", *extra]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"maxlm {command}: --config=missing.py is not accepted") and "config.json" in err
  assert not workdir.exists()


def test_convert_to_hf_refuses_overrides_it_would_ignore(tmp_path, capsys):
  args = ["convert", "--to-hf", f"--workdir={tmp_path / 'w'}", f"--output={tmp_path / 'out'}"]
  assert main([*args, "--config.model.d_model=32"]) == 2
  assert "--config.model.d_model=32 would be ignored" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_train_still_reports_a_missing_config_file(tmp_path, capsys):
  assert main(["train", f"--workdir={tmp_path / 'w'}", "--config=missing.py"]) == 2
  assert "--config=missing.py: no such file" in capsys.readouterr().err
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("module", ["fastapi", "uvicorn"])
def test_serve_without_its_extra_names_the_extra(module, tmp_path, capsys, monkeypatch):
  """A missing fastapi or uvicorn ends `maxlm serve` with one line naming `maxlm[serve]`, before any model loads."""
  monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
  assert main(["serve", f"--workdir={tmp_path / 'w'}"]) == 1
  printed = capsys.readouterr()
  assert printed.err.count("\n") == 1 and "Traceback" not in printed.err
  assert printed.err.startswith(f"maxlm serve: {module} is not installed")
  assert "pip install 'maxlm[serve]'" in printed.err


def test_a_missing_extra_in_any_command_is_one_line(tmp_path, capsys, monkeypatch):
  """MissingExtra raised deep inside a command (here: curate needing a language identifier) is its message."""
  import maxlm.extras
  from data_pipelines.curate import pipeline

  def curate(*args, **kwargs):
    return maxlm.extras.require("curate", "a_module_that_is_not_installed")

  monkeypatch.setattr(pipeline, "curate", curate)
  (tmp_path / "a.txt").write_text("text")
  assert main(["curate", f"--output={tmp_path / 'out'}", str(tmp_path / "a.txt")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("maxlm curate: a_module_that_is_not_installed is not installed")
  assert "pip install 'maxlm[curate]'" in err and err.count("\n") == 1
