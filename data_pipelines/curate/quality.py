"""Heuristic document-quality rules in the style of Gopher (Rae et al. 2021) and C4 (Raffel et al. 2020).

`check(text, rules, language)` returns the name of the first rule a document fails (rules are
evaluated in the order of `RULE_NAMES`, cheapest first) or None if it passes; `failed_rules` lists
every failure. Each threshold of `QualityRules` can be set to None to switch that rule off.

Definitions (all linear in the document length):
  words: whitespace-separated tokens; "word characters" is the sum of their lengths.
  lines: non-empty lines (after stripping); paragraphs: blocks separated by blank lines.
  n-grams: over lower-cased words. A "top n-gram" fraction is (occurrences of the most frequent
    n-gram x its character length) / word characters, counted only if it occurs more than once. A
    "duplicate n-gram" fraction is the share of word characters covered by n-grams already seen
    earlier in the document (scanning left to right, jumping past each duplicate), as in Gopher.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterator, Sequence

# Gopher's stop-word rule (Rae et al. 2021, A.1.1): at least two of these must occur in English text.
GOPHER_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "‣", "⁃", "◦", "●", "○", "▪", "■", "□", "-", "*", "–", "—")
ELLIPSES = ("...", "…")
# C4 keeps only lines ending in terminal punctuation; closing quotes/brackets may follow the mark.
TERMINAL_PUNCT = (".", "!", "?", "…", "。", "！", "？")
_CLOSERS = "\"'”’»)]"
_HAS_ALPHA = re.compile(r"[^\W\d_]").search
_PARAGRAPH_SPLIT = re.compile(r"\n[^\S\n]*\n")
_STRIP_PUNCT = "\"'()[]{}<>«»“”‘’.,;:!?-–—…*#/\\|`~"


@dataclasses.dataclass(frozen=True)
class QualityRules:
  """Thresholds of every rule; None disables that rule. Defaults: Gopher / C4 unless noted."""

  # Gopher A.1.1: 50 <= words <= 100,000.
  min_words: int | None = 50
  max_words: int | None = 100_000
  # Gopher A.1.1: mean word length (punctuation stripped) within [3, 10] characters.
  min_mean_word_length: float | None = 3.0
  max_mean_word_length: float | None = 10.0
  # Gopher A.1.1: "#" and "..." / "…" each at most 0.1 per word.
  max_symbol_word_ratio: float | None = 0.1
  # Gopher A.1.1: at most 90% of lines start with a bullet, at most 30% end with an ellipsis.
  max_bullet_line_fraction: float | None = 0.9
  max_ellipsis_line_fraction: float | None = 0.3
  # Gopher A.1.1: at least 80% of words contain an alphabetic character.
  min_alpha_word_fraction: float | None = 0.8
  # Not from Gopher/C4 (our choice): at most 15% of word characters are ASCII digits; drops
  # tables, logs and number dumps while keeping prose with dates, prices and statistics.
  max_digit_fraction: float | None = 0.15
  # Gopher A.1.1: at least 2 distinct GOPHER_STOP_WORDS; only applied when language is English.
  min_stop_words: int | None = 2
  # C4 keeps only lines ending in terminal punctuation. As a document-level rule (our choice):
  # at least 10% of lines must end in one. Hard-wrapped prose passes (a sentence end every few
  # lines); menus, navigation text and keyword lists do not.
  min_terminal_punct_line_fraction: float | None = 0.1
  # C4: documents containing "lorem ipsum" are placeholder text.
  reject_lorem_ipsum: bool = True
  # Gopher Table A1: duplicate lines / paragraphs, as a fraction of their count and of characters.
  max_dup_line_fraction: float | None = 0.30
  max_dup_paragraph_fraction: float | None = 0.30
  max_dup_line_char_fraction: float | None = 0.20
  max_dup_paragraph_char_fraction: float | None = 0.20
  # Gopher Table A1: characters in the most frequent 2/3/4-gram.
  max_top_ngram_char_fraction: tuple[tuple[int, float | None], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
  # Gopher Table A1: characters in duplicated 5..10-grams.
  max_dup_ngram_char_fraction: tuple[tuple[int, float | None], ...] = (
    (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10),
  )

  def __post_init__(self):
    for name, value in (("max_top_ngram_char_fraction", self.max_top_ngram_char_fraction),
                        ("max_dup_ngram_char_fraction", self.max_dup_ngram_char_fraction)):
      for n, _ in value:
        if not isinstance(n, int) or n < 1:
          raise ValueError(f"{name}: n-gram size must be a positive int, got {n!r}")


RULE_NAMES = (
  "too_few_words", "too_many_words", "mean_word_length_too_short", "mean_word_length_too_long",
  "hash_ratio", "ellipsis_ratio", "bullet_line_fraction", "ellipsis_line_fraction",
  "alpha_word_fraction", "digit_fraction", "stop_words", "terminal_punct_line_fraction", "lorem_ipsum",
  "dup_line_fraction", "dup_paragraph_fraction", "dup_line_char_fraction", "dup_paragraph_char_fraction",
  *(f"top_{n}gram_char_fraction" for n in (2, 3, 4)),
  *(f"dup_{n}gram_char_fraction" for n in range(5, 11)),
)
"""Names `check` can return for the default rules (n-gram names follow the configured sizes)."""


def _is_english(language: str | None) -> bool:
  """True for "en", "eng" and regional tags such as "en-US" / "en_GB"."""
  if not language:
    return False
  return re.split(r"[-_]", language.lower(), maxsplit=1)[0] in ("en", "eng")


def _duplicates(items: Sequence[str]) -> tuple[int, int]:
  """(count, total characters) of items equal to an earlier item."""
  seen: set[str] = set()
  count = chars = 0
  for item in items:
    if item in seen:
      count += 1
      chars += len(item)
    else:
      seen.add(item)
  return count, chars


def _ngrams(words: Sequence[str], n: int) -> Iterator[tuple[str, ...]]:
  """Consecutive word n-grams as tuples (built in C by zip)."""
  return zip(*(words[i:] for i in range(n)))  # noqa: B905  (unequal by design: the shortest ends it)


def _top_ngram_chars(words: Sequence[str], n: int) -> int:
  """Characters covered by the most frequent n-gram (occurrences x length), 0 if none repeats."""
  counts = Counter(_ngrams(words, n))
  if not counts:
    return 0
  gram, count = counts.most_common(1)[0]
  return count * sum(map(len, gram)) if count > 1 else 0


def _dup_ngram_chars(words: Sequence[str], lengths: Sequence[int], n: int) -> int:
  """Characters of n-grams that repeat an earlier n-gram, skipping past each duplicate (Gopher)."""
  grams = list(_ngrams(words, n))
  seen: set[tuple[str, ...]] = set()
  chars = i = 0
  while i < len(grams):
    gram = grams[i]
    if gram in seen:
      chars += sum(lengths[i:i + n])
      i += n
    else:
      seen.add(gram)
      i += 1
  return chars


def _evaluate(text: str, rules: QualityRules, language: str | None) -> Iterator[str]:
  """Yield the names of failed rules lazily, cheapest rules first."""
  words = text.split()
  n_words = len(words)
  if rules.min_words is not None and n_words < rules.min_words:
    yield "too_few_words"
  if rules.max_words is not None and n_words > rules.max_words:
    yield "too_many_words"
  if n_words == 0:
    return  # No further statistic is defined on an empty document.

  stripped = [w.strip(_STRIP_PUNCT) for w in words]
  content_lengths = [len(w) for w in stripped if w]
  mean_len = sum(content_lengths) / len(content_lengths) if content_lengths else 0.0
  if rules.min_mean_word_length is not None and mean_len < rules.min_mean_word_length:
    yield "mean_word_length_too_short"
  if rules.max_mean_word_length is not None and mean_len > rules.max_mean_word_length:
    yield "mean_word_length_too_long"

  if rules.max_symbol_word_ratio is not None:
    if text.count("#") / n_words > rules.max_symbol_word_ratio:
      yield "hash_ratio"
    if (text.count("...") + text.count("…")) / n_words > rules.max_symbol_word_ratio:
      yield "ellipsis_ratio"

  lines = [line.strip() for line in text.split("\n")]
  lines = [line for line in lines if line]
  n_lines = len(lines)
  if rules.max_bullet_line_fraction is not None:
    if sum(line.startswith(BULLETS) for line in lines) / n_lines > rules.max_bullet_line_fraction:
      yield "bullet_line_fraction"
  if rules.max_ellipsis_line_fraction is not None:
    if sum(line.endswith(ELLIPSES) for line in lines) / n_lines > rules.max_ellipsis_line_fraction:
      yield "ellipsis_line_fraction"

  if rules.min_alpha_word_fraction is not None:
    if sum(1 for w in words if _HAS_ALPHA(w)) / n_words < rules.min_alpha_word_fraction:
      yield "alpha_word_fraction"
  word_chars = sum(map(len, words))
  if rules.max_digit_fraction is not None:
    if sum(map(text.count, "0123456789")) / word_chars > rules.max_digit_fraction:
      yield "digit_fraction"

  lower_words = text.lower().split()
  lengths = [len(w) for w in lower_words]  # lower() may change lengths (e.g. "İ" -> "i̇").
  lower_chars = sum(lengths)
  if rules.min_stop_words is not None and _is_english(language):
    found = GOPHER_STOP_WORDS.intersection(w.strip(_STRIP_PUNCT) for w in lower_words)
    if len(found) < rules.min_stop_words:
      yield "stop_words"
  if rules.min_terminal_punct_line_fraction is not None:
    ending = sum(1 for line in lines if line.rstrip(_CLOSERS).endswith(TERMINAL_PUNCT))
    if ending / n_lines < rules.min_terminal_punct_line_fraction:
      yield "terminal_punct_line_fraction"
  if rules.reject_lorem_ipsum and "lorem ipsum" in " ".join(lower_words):
    yield "lorem_ipsum"

  if rules.max_dup_line_fraction is not None or rules.max_dup_line_char_fraction is not None:
    dup_lines, dup_line_chars = _duplicates(lines)
    if rules.max_dup_line_fraction is not None and dup_lines / n_lines > rules.max_dup_line_fraction:
      yield "dup_line_fraction"
    total = sum(map(len, lines))
    if rules.max_dup_line_char_fraction is not None and dup_line_chars / total > rules.max_dup_line_char_fraction:
      yield "dup_line_char_fraction"
  if rules.max_dup_paragraph_fraction is not None or rules.max_dup_paragraph_char_fraction is not None:
    paragraphs = [p.strip() for p in _PARAGRAPH_SPLIT.split(text)]
    paragraphs = [p for p in paragraphs if p]
    dup_paras, dup_para_chars = _duplicates(paragraphs)
    if (rules.max_dup_paragraph_fraction is not None
        and dup_paras / len(paragraphs) > rules.max_dup_paragraph_fraction):
      yield "dup_paragraph_fraction"
    total = sum(map(len, paragraphs))
    if (rules.max_dup_paragraph_char_fraction is not None
        and dup_para_chars / total > rules.max_dup_paragraph_char_fraction):
      yield "dup_paragraph_char_fraction"

  for n, limit in rules.max_top_ngram_char_fraction:
    if limit is not None and _top_ngram_chars(lower_words, n) / lower_chars > limit:
      yield f"top_{n}gram_char_fraction"
  no_repeat_below = None  # If no n-gram repeats, no longer n-gram can repeat either.
  for n, limit in sorted(rules.max_dup_ngram_char_fraction):
    if limit is None:
      continue
    if no_repeat_below is not None and n >= no_repeat_below:
      continue
    chars = _dup_ngram_chars(lower_words, lengths, n)
    if chars == 0:
      no_repeat_below = n
    elif chars / lower_chars > limit:
      yield f"dup_{n}gram_char_fraction"


def check(text: str, rules: QualityRules | None = None, language: str | None = None) -> str | None:
  """Name of the first quality rule the document fails (order of RULE_NAMES), or None if it passes.

  language is an ISO 639 code (e.g. from language identification); English-only rules (stop words)
  run only when it is English.
  """
  return next(_evaluate(text, rules or QualityRules(), language), None)


def failed_rules(text: str, rules: QualityRules | None = None, language: str | None = None) -> list[str]:
  """Names of every quality rule the document fails, in evaluation order (for reports and tests)."""
  return list(_evaluate(text, rules or QualityRules(), language))
