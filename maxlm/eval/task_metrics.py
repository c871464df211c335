"""The metrics of evaluation tasks: accuracy (plain and length-normalized) of multiple choice, exact match of
generations (optionally on a regex-extracted answer), and the standard error of a mean over samples."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
  """(mean, standard error of the mean): sample standard deviation (n - 1) / sqrt(n); nan below two samples."""
  x = np.asarray(values, np.float64)
  if x.size == 0:
    return math.nan, math.nan
  if x.size == 1:
    return float(x[0]), math.nan
  return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def choice_picks(logprobs: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
  """(argmax of the choices' log-likelihoods, argmax of log-likelihood per character of the choice): the picks behind
  `acc` and `acc_norm` (lm-evaluation-harness normalizes by the choice string's length in characters)."""
  lp = np.asarray(logprobs, np.float64)
  lengths = np.asarray([max(1, len(c)) for c in choices], np.float64)
  return int(np.argmax(lp)), int(np.argmax(lp / lengths))


def extract(text: str, regex: str) -> str:
  """The answer in a generation: the regex's first group (or whole match) at its first match; "" if none."""
  if not regex:
    return text
  m = re.search(regex, text)
  if m is None:
    return ""
  return m.group(1) if m.groups() else m.group(0)


def exact_match(prediction: str, targets: Sequence[str]) -> bool:
  """Whether the prediction equals one of the targets, surrounding whitespace ignored."""
  p = prediction.strip()
  return any(p == t.strip() for t in targets)
