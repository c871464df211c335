"""`maxlm-lm-eval`: lm-evaluation-harness's own command line with the `maxlm` backend registered, for lm_eval
versions (0.4.13 and earlier) that resolve --model only against their built-in table.

Every argument goes to lm_eval unchanged, subcommands included:
  maxlm-lm-eval --model maxlm --model_args workdir=DIR --tasks T --include_path TASK_DIR
  maxlm-lm-eval run --model maxlm --model_args workdir=DIR,batch_size=16 --tasks T
  maxlm-lm-eval ls tasks --include_path TASK_DIR
The backend is registered lazily: jax and the model load only when `--model maxlm` is evaluated.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from maxlm.extras import require

TARGET = "maxlm.eval.harness:MaxlmLM"


def register() -> None:
  """Registers the `maxlm` model with lm-eval (a lazy placeholder; a no-op when it is already registered)."""
  require("lmeval", "lm_eval")
  import lm_eval.models  # noqa: F401, PLC0415  (the built-in table first: get_model fills it only when empty)
  from lm_eval.api.registry import model_registry  # noqa: PLC0415

  if "maxlm" not in model_registry:
    model_registry.register("maxlm", target=TARGET)


def main(argv: Sequence[str] | None = None) -> None:
  """Applies the host.* defaults (CPU hosts: malloc tuning) before jax loads, registers the backend, then runs
  lm_eval's CLI on argv (default: sys.argv[1:])."""
  from maxlm import host  # noqa: PLC0415
  from maxlm.config import load_config  # noqa: PLC0415

  host.apply(load_config("base"))
  register()
  from lm_eval.__main__ import cli_evaluate  # noqa: PLC0415

  if argv is not None:
    sys.argv = [sys.argv[0], *argv]
  cli_evaluate()


if __name__ == "__main__":
  main()
