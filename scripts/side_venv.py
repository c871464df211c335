"""A reference framework in a venv of its own (Tunix, llm-compressor: pins that clash with maxlm's), built once with
exact pins under ~/.cache/maxlm, and a benchmark job run there as a child process. Standard library only, so the
job halves of the scripts that use it import it from either venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

STAMP = "maxlm-venv.json"  # inside the venv: the pins it was built with and the versions installed
VERSIONS_PROBE = ("import importlib.metadata as m, json, sys\nout = {}\nfor name in sys.argv[1:]:\n  try:\n"
                  "    out[name] = m.version(name)\n  except m.PackageNotFoundError:\n    out[name] = None\n"
                  "print(json.dumps(out))")


class VenvUnavailable(RuntimeError):
  """The venv could not be built (the message says which step failed and how)."""


def check(cmd: list[str], what: str, timeout: float = 1800) -> str:
  """Runs `cmd` to the end; its output, or VenvUnavailable naming `what` with the output's last lines."""
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise VenvUnavailable(f"{what}: {e}") from None
  if proc.returncode != 0:
    lines = [line for line in (proc.stdout + proc.stderr).strip().splitlines() if not line.startswith("WARNING:")]
    raise VenvUnavailable(f"{what} failed (exit {proc.returncode}): " + "\n".join(lines[-8:]))
  return proc.stdout


def ensure_venv(root: Path, name: str, pins: Sequence[str], versioned: Sequence[str], smoke_import: str,
                verify: Callable[[Path, dict], None] | None = None) -> Path:
  """The python of `root/name`, a venv holding exactly `pins`: made (or remade, when it was built with other pins or
  not finished) with this interpreter's venv module and pip, then checked by importing `smoke_import` and by
  `verify(python, versions)`. Raises VenvUnavailable."""
  venv = Path(root).expanduser() / name
  python, stamp = venv / "bin" / "python", venv / STAMP
  if python.exists() and stamp.exists():
    try:
      if json.loads(stamp.read_text()).get("pins") == list(pins):
        return python
    except json.JSONDecodeError:
      pass
  venv.parent.mkdir(parents=True, exist_ok=True)
  check([sys.executable, "-m", "venv", "--clear", str(venv)], f"python -m venv {venv}", timeout=300)
  check([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins],
        f"pip install {' '.join(pins)}")
  versions = json.loads(check([str(python), "-c", VERSIONS_PROBE, *versioned], "reading the installed versions"))
  if verify is not None:
    verify(python, versions)
  check([str(python), "-c", f"import {smoke_import}"], f"importing {smoke_import}")
  stamp.write_text(json.dumps({"pins": list(pins), "versions": versions}, indent=1) + "\n")
  return python


def recorded_versions(root: Path, name: str) -> dict[str, str | None]:
  """The versions recorded when `root/name` was built ({} if it is not built)."""
  stamp = Path(root).expanduser() / name / STAMP
  return json.loads(stamp.read_text())["versions"] if stamp.exists() else {}


def child_env(**extra: str) -> dict[str, str]:
  """This process's environment without what would point the child at this venv, plus `extra`."""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
  env.update(extra)
  return env


def run_child(cmd: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
  """Runs `cmd` to the end (output to `log`): exit code, wall time and the child's own peak RSS in GiB."""
  t0 = time.perf_counter()
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
  return {"exit_code": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - t0,
          "peak_rss_gib": usage.ru_maxrss / 2**20}


def last_json(text: str, key: str) -> dict[str, Any] | None:
  """The last line of `text` that is a JSON object holding `key`."""
  for line in reversed(text.splitlines()):
    if line.startswith("{"):
      try:
        obj = json.loads(line)
      except json.JSONDecodeError:
        continue
      if key in obj:
        return obj
  return None
