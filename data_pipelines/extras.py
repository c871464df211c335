"""Optional dependency groups (pyproject extras): a step that needs one says which `pip install` provides it.

data_pipelines never imports maxlm, so this is the one home of the rule for both packages (maxlm.extras re-exports it).
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
  """An optional dependency is not installed; the message names the pip extra that provides it."""


def require(extra: str, module: str) -> ModuleType:
  """`module`, imported, or MissingExtra naming `pip install 'maxlm[EXTRA]'` when it is not installed."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise MissingExtra(f"{module} is not installed: it comes with maxlm's {extra!r} extra "
                       f"(pip install 'maxlm[{extra}]', or -e '.[{extra}]' in a checkout)") from e
