"""The mixture string (`web=0.7,code=0.3`) and the mixture option names: pure Python, so config validation can
parse a mixture without importing grain."""

from __future__ import annotations

import math

CURRICULA = ("none", "length", "tokens_per_byte")
WEIGHT_UNITS = ("tokens", "documents")


def parse_mixture(spec: str) -> dict[str, float]:
  """"web=0.7,code=0.3" -> {"web": 0.7, "code": 0.3}; "" -> {} (every source, in proportion to its tokens)."""
  weights: dict[str, float] = {}
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      continue
    name, eq, value = item.partition("=")
    name = name.strip()
    try:
      weight = float(value) if eq else 1.0
    except ValueError:
      raise ValueError(f"mixture entry {item!r}: weight {value!r} is not a number (use NAME=WEIGHT)") from None
    if not name or not math.isfinite(weight) or weight <= 0:
      raise ValueError(f"mixture entry {item!r}: need NAME=WEIGHT with a positive, finite weight")
    if name in weights:
      raise ValueError(f"mixture names source {name!r} twice")
    weights[name] = weight
  return weights
