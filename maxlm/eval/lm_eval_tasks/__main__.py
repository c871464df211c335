"""`python -m maxlm.eval.lm_eval_tasks DIR`: writes the local tasks' YAML into DIR with absolute data paths."""

import sys

from maxlm.eval.lm_eval_tasks import write_task_dir


def main(argv: list[str] | None = None) -> int:
  """Writes the task directory named by the one argument; prints the --include_path to use."""
  args = sys.argv[1:] if argv is None else argv
  if len(args) != 1 or args[0].startswith("-"):
    print("usage: python -m maxlm.eval.lm_eval_tasks DIR", file=sys.stderr)
    return 2
  print(f"--include_path {write_task_dir(args[0])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
