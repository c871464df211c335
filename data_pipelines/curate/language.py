"""Document language identification with py3langid's bundled model (97 languages, no download).

Only the first `max_chars` characters (default 2,000) are classified: the classifier's cost is linear
in the input, and a couple of thousand characters already identify the language of a document
reliably, so long documents cost the same as short ones. Confidences are py3langid's normalised
probabilities (softmax over all languages, calibrated for input length).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from data_pipelines.extras import require

UNDETERMINED = "und"
"""Label returned for text with nothing to classify (empty or whitespace only)."""
NO_LANGUAGE = "zxx"
"""The model's label for text without linguistic content (e.g. random letters); never kept."""

_CODE_RE = re.compile(r"[a-z]{2}")


@functools.lru_cache(maxsize=1)
def _identifier():
  """The process-wide py3langid identifier with normalised probabilities, loaded on first use."""
  langid = require("curate", "py3langid.langid")
  return langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)


def supported_languages() -> frozenset[str]:
  """ISO 639-1 codes the model can output."""
  return frozenset(_identifier().labels)


class LanguageFilter:
  """Keeps documents whose identified language is in `keep` (empty: any) with enough confidence."""

  def __init__(self, keep: Sequence[str] = (), min_confidence: float = 0.5, *, max_chars: int = 2000):
    if isinstance(keep, str):
      raise TypeError(f"keep must be a sequence of language codes, not the string {keep!r}")
    if not 0.0 <= min_confidence <= 1.0:
      raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    if max_chars <= 0:
      raise ValueError(f"max_chars must be positive, got {max_chars}")
    known = supported_languages()
    for code in keep:
      if not isinstance(code, str) or not _CODE_RE.fullmatch(code):
        raise ValueError(f"language code {code!r} in keep is not an ISO 639-1 code (two lowercase letters)")
      if code not in known:
        raise ValueError(f"language code {code!r} in keep is not known to the language model; known: "
                         f"{', '.join(sorted(known))}")
    self.keep = frozenset(keep)
    self.min_confidence = float(min_confidence)
    self.max_chars = max_chars

  def __repr__(self) -> str:
    return (f"LanguageFilter(keep={sorted(self.keep)}, min_confidence={self.min_confidence}, "
            f"max_chars={self.max_chars})")

  def classify(self, text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the document's first max_chars characters."""
    sample = text[:self.max_chars]
    if not sample.strip():
      return UNDETERMINED, 0.0
    lang, prob = _identifier().classify(sample)
    return lang, float(prob)

  def keep_reason(self, text: str) -> tuple[str, str | None]:
    """(language, None) if the document is kept, else (language, reason it is dropped).

    Confidence is checked first: a low-confidence label says nothing reliable about the language.
    Text the model labels "zxx" (no linguistic content) is dropped as not kept, even with no keep list.
    """
    lang, prob = self.classify(text)
    if lang == UNDETERMINED or prob < self.min_confidence:
      return lang, "low_language_confidence"
    if lang == NO_LANGUAGE or (self.keep and lang not in self.keep):
      return lang, "language_not_kept"
    return lang, None
