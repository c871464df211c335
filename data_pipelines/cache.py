"""maxlm's cache directory, the one rule every cache (tokenized corpora, tokenizers, measured peak FLOP/s) follows."""

from __future__ import annotations

import os
import pathlib


def default_cache_dir() -> pathlib.Path:
  """$MAXLM_CACHE, else ~/.cache/maxlm (what data.cache_dir = "" means)."""
  return pathlib.Path(os.environ.get("MAXLM_CACHE") or pathlib.Path.home() / ".cache" / "maxlm")
