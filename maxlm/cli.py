"""`maxlm` command line: train | config. Config overrides are `--config.<section>.<key>=<value>`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from maxlm.config import ConfigError, load_config, to_json

USAGE = """maxlm <command> [options]

commands:
  train    train a model (default config: configs/tiny.py on the embedded corpus); resumes from --workdir
  config   print the resolved config after overrides, without running anything

examples:
  maxlm train                                   # tiny default, workdir runs/tiny
  maxlm train --config=configs/tiny.py --workdir=runs/t1 --config.train.steps=50
  maxlm train --config=configs/llama3_8b.py --dry_run
  maxlm config --config=configs/tiny.py --config.model.num_layers=8
"""


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` overrides (also `--config.a.b v`) from the other arguments."""
  overrides, rest = [], []
  it = iter(argv)
  for arg in it:
    if arg.startswith("--config."):
      if "=" not in arg:
        value = next(it, None)
        if value is None:
          raise ConfigError(f"{arg}: missing value (use {arg}=VALUE)")
        arg = f"{arg}={value}"
      overrides.append(arg)
    else:
      rest.append(arg)
  return overrides, rest


def _parser(command: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f"maxlm {command}")
  p.add_argument("--config", default=None, help="config file or name in configs/ (default: tiny)")
  if command == "train":
    p.add_argument("--workdir", default=None, help="checkpoints, metrics and plots (default: runs/<config>)")
    p.add_argument("--dry_run", "--dry-run", action="store_true",
                   help="build the model abstractly, print its size, and exit")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE)
    return 0
  command, rest = argv[0], argv[1:]
  if command not in ("train", "config"):
    print(f"maxlm: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2
  try:
    overrides, rest = _split_overrides(rest)
    args = _parser(command).parse_args(rest)
    cfg = load_config(args.config, overrides)
  except ConfigError as e:
    print(f"maxlm {command}: config error: {e}", file=sys.stderr)
    return 2

  if command == "config":
    print(to_json(cfg))
    return 0

  from maxlm.train import loop  # heavy imports only once the config is known to be good
  if args.dry_run:
    loop.dry_run(cfg)
    return 0
  from pathlib import Path
  workdir = args.workdir or f"runs/{Path(args.config or 'tiny').stem}"
  try:
    result = loop.train(cfg, workdir)
  except loop.DataError as e:
    print(f"maxlm train: data error: {e}", file=sys.stderr)
    return 1
  except (ConfigError, loop.TrainingDiverged) as e:
    print(f"maxlm train: {e}", file=sys.stderr)
    return 1
  summary = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
  print(f"done: {summary}\noutputs in {workdir}: metrics.jsonl, loss.png, tensorboard/, checkpoints/, sample.txt")
  return 0


if __name__ == "__main__":
  sys.exit(main())
