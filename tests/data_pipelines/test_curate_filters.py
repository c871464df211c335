"""Text-level curation stages: normalisation, dedup keys, quality rules, PII redaction, language ID."""

from __future__ import annotations

import dataclasses
import random
import re
import sys
import unicodedata

import helpers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipelines.curate import language, pii, quality
from data_pipelines.curate.normalize import dedup_key, normalize, repair_mojibake
from data_pipelines.extras import MissingExtra

# ---------------------------------------------------------------------------------------------------
# normalize / dedup_key


def test_normalize_nfc_composes():
  composed, decomposed = "caf\u00e9", "cafe\u0301"
  assert composed != decomposed
  assert normalize(composed) == normalize(decomposed) == composed
  assert unicodedata.is_normalized("NFC", normalize("A\u030angstro\u0308m"))


def test_normalize_removes_control_and_invisible_characters():
  text = "\ufeffa\x00b\x07c\u200bd\u00ade\u2060f\x7fg\x9bh\td\u200de"
  assert normalize(text) == "abcdefgh d\u200de"  # ZWJ kept; tab is whitespace, collapsed.
  assert normalize("one\r\ntwo\rthree\x0bfour\x0cfive\u2028six") == "one\ntwo\nthree\nfour\nfive\nsix"


def test_normalize_whitespace_rules():
  assert normalize("  a  \t b\u00a0\u3000c  \n") == "a b c"
  assert normalize("line one   \nline two\t\n") == "line one\nline two"
  assert normalize("p1\n\n\n\n\np2\n \n\t\n  \np3") == "p1\n\np2\n\np3"
  assert normalize("p1\n\np2") == "p1\n\np2"
  assert normalize("def f():\n    return 1", keep_indent=True) == "def f():\n    return 1"
  assert normalize("def f():\n    return  1", keep_indent=False) == "def f():\n return 1"
  assert normalize("") == normalize(" \n\t\x00 ") == ""


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.one_of(
  st.characters(),
  st.sampled_from(list(" \t\n\r\x0b\x0c\u00a0\u2028\u200b\ufeff\u0301\u0308e\u00e9.")),
)))
def test_normalize_is_idempotent(text):
  once = normalize(text)
  assert normalize(once) == once
  assert normalize(once, keep_indent=True) == once
  assert unicodedata.is_normalized("NFC", once)


def test_normalize_mojibake_only_when_enabled():
  assert normalize("caf\u00c3\u00a9 na\u00c3\u00afve", fix_mojibake=True) == "café naïve"
  assert normalize("caf\u00c3\u00a9", fix_mojibake=False) == "caf\u00c3\u00a9"
  # Encoding repair only: curly quotes and full-width characters are left alone.
  assert normalize("\u201cquoted\u201d \uff21", fix_mojibake=True) == "\u201cquoted\u201d \uff21"


def test_dedup_key():
  key = dedup_key("Hello   World\n\nthis is\ta TEST")
  assert isinstance(key, bytes) and len(key) == 16
  assert key == dedup_key("hello world this is a test") == dedup_key("  HELLO WORLD\r\nThis Is A Test \u200b")
  assert dedup_key("cafe\u0301") == dedup_key("CAF\u00c9")
  assert key != dedup_key("hello world this is a test!")
  assert dedup_key("a b") != dedup_key("ab")


# ---------------------------------------------------------------------------------------------------
# quality


def _vocab(rng: random.Random, size: int, length: int) -> list[str]:
  """Distinct pseudo-words of one length (so character fractions equal word fractions)."""
  words: set[str] = set()
  while len(words) < size:
    words.add("".join(rng.choice("bcdfghjklmnprstvwz") if i % 2 == 0 else rng.choice("aeiou")
                      for i in range(length)))
  return sorted(words)


_RNG = random.Random(1234)
FILLER = _vocab(_RNG, 600, 5)
PHRASE_WORDS = [w for w in _vocab(_RNG, 900, 5) if w not in FILLER]


def _filler(rng: random.Random, n: int) -> list[str]:
  return [rng.choice(FILLER) for _ in range(n)]


def _lines(words: list[str], per_line: int = 12) -> list[str]:
  """Sentence lines of per_line words, each ending with a period."""
  return [" ".join(words[i:i + per_line]) + "." for i in range(0, len(words), per_line)]


def _prose(n_words: int, seed: int = 0, vocab: list[str] | None = None) -> str:
  rng = random.Random(seed)
  vocab = vocab or FILLER + ["the", "and", "of", "with"]
  return "\n".join(_lines([rng.choice(vocab) for _ in range(n_words)]))


def _repeated_phrases(phrase_len: int, n_phrases: int, ratio: float) -> str:
  """n_phrases distinct phrases, each on two lines amid filler; n_phrases / total words ~= ratio."""
  rng = random.Random(phrase_len)
  total = round(n_phrases / ratio)
  phrases = [PHRASE_WORDS[i * phrase_len:(i + 1) * phrase_len] for i in range(n_phrases)]
  lines = []
  for phrase in phrases * 2:
    lines.append(" ".join(_filler(rng, 4) + phrase + _filler(rng, 4)) + ".")
  used = 2 * n_phrases * (phrase_len + 8)
  lines += _lines(_filler(rng, total - used))
  rng.shuffle(lines)
  return "\n".join(lines)


def _with_tokens(text: str, every: int, make) -> str:
  """Replace/decorate every `every`-th word (never the last of a line) using make(word)."""
  out_lines = []
  for line in text.split("\n"):
    words = line.split(" ")
    for i in range(1, len(words) - 1):
      if i % every == 0:
        words[i] = make(words[i])
    out_lines.append(" ".join(words))
  return "\n".join(out_lines)


BASE = _prose(300)


def _short_vocab() -> list[str]:
  return _vocab(random.Random(7), 80, 2)


def _dup_line_chars_doc() -> str:
  """Five long 4-word lines, each twice, interleaved with short unique lines (no repeated 5-gram)."""
  rng = random.Random(3)
  long_words = _vocab(rng, 50, 9)
  dup_lines = [" ".join(long_words[i * 4:(i + 1) * 4]) + "." for i in range(5)]
  unique = [" ".join(_filler(rng, 3)) + "." for _ in range(10)]
  lines = [line for pair in zip(dup_lines + dup_lines, unique) for line in pair]
  return "\n".join(lines)


def _dup_paragraphs_doc() -> str:
  rng = random.Random(4)
  paragraphs = ["\n".join(_lines(_filler(rng, 48))) for _ in range(7)] + ["Absolutely right."] * 5
  rng.shuffle(paragraphs)
  return "\n\n".join(paragraphs)


def _dup_paragraph_chars_doc() -> str:
  rng = random.Random(5)
  repeated = "\n".join(_lines(_filler(rng, 60)))
  paragraphs = ["\n".join(_lines(_filler(rng, 60))) for _ in range(2)] + [repeated, repeated]
  return "\n\n".join(paragraphs)


def _top_ngram_doc(gram: list[str], side: int, n_lines: int) -> str:
  """Lines of `side` filler words, `gram`, `side` filler words: gram share = len(gram) / line length."""
  rng = random.Random(len(gram))
  return "\n".join(" ".join(_filler(rng, side) + gram + _filler(rng, side)) + "." for _ in range(n_lines))


_NO_LINE_OR_NGRAM_RULES = dict(
  max_dup_line_fraction=None, max_dup_line_char_fraction=None,
  max_top_ngram_char_fraction=(), max_dup_ngram_char_fraction=(),
)

# (expected rule, document, language, QualityRules overrides). Each document fails exactly that rule;
# overrides switch off rules that necessarily fail together with it (a duplicated paragraph also
# duplicates its lines and n-grams).
QUALITY_CASES = [
  ("too_few_words", _prose(40), None, {}),
  ("too_many_words", _prose(100_050, seed=1), None, {}),
  ("mean_word_length_too_short", _prose(200, vocab=_short_vocab()), None, {}),
  ("mean_word_length_too_long", _prose(200, vocab=_vocab(random.Random(8), 300, 12)), None, {}),
  ("hash_ratio", _with_tokens(BASE, 5, lambda w: "#" + w), None, {}),
  ("ellipsis_ratio", _with_tokens(BASE, 5, lambda w: w + "..."), None, {}),
  ("bullet_line_fraction", "\n".join("• " + line for line in BASE.split("\n")), None, {}),
  ("ellipsis_line_fraction",
   "\n".join(line[:-1] + ("..." if i % 5 < 2 else ".") for i, line in enumerate(BASE.split("\n"))), None, {}),
  ("alpha_word_fraction", _with_tokens(BASE, 2, lambda w: w + " &"), None, {}),
  ("digit_fraction", _with_tokens(BASE, 4, lambda w: f"x{abs(hash(w)) % 10**7:07d}"), None, {}),
  ("stop_words", _prose(200, vocab=FILLER), "en", {}),
  ("terminal_punct_line_fraction", BASE.replace(".", ""), None, {}),
  ("lorem_ipsum", "Lorem\nipsum " + BASE, None, {}),
  ("dup_line_fraction",
   "\n".join(line + ("\nYes." if i % 2 == 0 else "") for i, line in enumerate(_lines(_filler(random.Random(2), 300)))),
   None, {}),
  ("dup_paragraph_fraction", _dup_paragraphs_doc(), None, {}),
  ("dup_line_char_fraction", _dup_line_chars_doc(), None, {}),
  ("dup_paragraph_char_fraction", _dup_paragraph_chars_doc(), None, _NO_LINE_OR_NGRAM_RULES),
  # Shares 2/8, 3/11 and 4/20: above the n-gram's own limit, below the limits of its sub-grams.
  ("top_2gram_char_fraction", _top_ngram_doc(PHRASE_WORDS[:2], 3, 20), None, {}),
  ("top_3gram_char_fraction", _top_ngram_doc(PHRASE_WORDS[:3], 4, 15), None, {}),
  ("top_4gram_char_fraction", _top_ngram_doc(PHRASE_WORDS[:4], 8, 10), None, {}),
  # Per-phrase ratios chosen so that only the phrase-length n-gram rule crosses its threshold.
  ("dup_5gram_char_fraction", _repeated_phrases(5, 6, 0.036), None, {}),
  ("dup_6gram_char_fraction", _repeated_phrases(6, 6, 0.027), None, {}),
  ("dup_7gram_char_fraction", _repeated_phrases(7, 6, 0.021), None, {}),
  ("dup_8gram_char_fraction", _repeated_phrases(8, 6, 0.017), None, {}),
  ("dup_9gram_char_fraction", _repeated_phrases(9, 6, 0.0135), None, {}),
  ("dup_10gram_char_fraction", _repeated_phrases(10, 6, 0.011), None, {}),
]


def test_quality_cases_cover_every_rule():
  assert sorted(name for name, *_ in QUALITY_CASES) == sorted(quality.RULE_NAMES)


def test_synthetic_base_document_passes():
  assert quality.failed_rules(BASE, language="en") == []


@pytest.mark.parametrize("rule,text,lang,overrides", QUALITY_CASES, ids=[c[0] for c in QUALITY_CASES])
def test_quality_rule_fails_alone(rule, text, lang, overrides):
  rules = quality.QualityRules(**overrides)
  assert quality.failed_rules(text, rules, language=lang) == [rule]
  assert quality.check(text, rules, language=lang) == rule


@pytest.mark.parametrize("rule,text,lang,overrides", QUALITY_CASES, ids=[c[0] for c in QUALITY_CASES])
def test_quality_rule_can_be_disabled(rule, text, lang, overrides):
  off = dict(overrides)
  field = {
    "too_few_words": "min_words", "too_many_words": "max_words",
    "mean_word_length_too_short": "min_mean_word_length", "mean_word_length_too_long": "max_mean_word_length",
    "hash_ratio": "max_symbol_word_ratio", "ellipsis_ratio": "max_symbol_word_ratio",
    "bullet_line_fraction": "max_bullet_line_fraction", "ellipsis_line_fraction": "max_ellipsis_line_fraction",
    "alpha_word_fraction": "min_alpha_word_fraction", "digit_fraction": "max_digit_fraction",
    "stop_words": "min_stop_words", "terminal_punct_line_fraction": "min_terminal_punct_line_fraction",
    "dup_line_fraction": "max_dup_line_fraction", "dup_paragraph_fraction": "max_dup_paragraph_fraction",
    "dup_line_char_fraction": "max_dup_line_char_fraction",
    "dup_paragraph_char_fraction": "max_dup_paragraph_char_fraction",
  }.get(rule)
  if field is not None:
    off[field] = None
  elif rule == "lorem_ipsum":
    off["reject_lorem_ipsum"] = False
  else:
    n = int(re.search(r"_(\d+)gram", rule).group(1))
    key = "max_top_ngram_char_fraction" if rule.startswith("top_") else "max_dup_ngram_char_fraction"
    default = getattr(quality.QualityRules(), key)
    off[key] = tuple((m, None if m == n else limit) for m, limit in default)
  assert quality.check(text, quality.QualityRules(**off), language=lang) is None


def test_stop_words_only_for_english():
  text = _prose(200, vocab=FILLER)
  assert quality.check(text, language="en-US") == "stop_words"
  assert quality.check(text, language="de") is None
  assert quality.check(text) is None


def test_real_prose_passes():
  docs = helpers.prose_documents("en", min_chars=3000, limit=10)
  assert len(docs) == 10
  for doc in docs:
    assert quality.failed_rules(normalize(doc), language="en") == [], doc[:200]


def test_quality_rules_are_frozen_and_validated():
  rules = quality.QualityRules()
  with pytest.raises(dataclasses.FrozenInstanceError):
    rules.min_words = 1
  with pytest.raises(ValueError, match="n-gram size"):
    quality.QualityRules(max_top_ngram_char_fraction=((0, 0.2),))
  assert quality.check("") == "too_few_words"
  assert quality.check("", quality.QualityRules(min_words=None)) is None


# ---------------------------------------------------------------------------------------------------
# pii


@pytest.mark.parametrize("text,kind", [
  ("write to john.doe+news@mail.example.co.uk today", "email"),
  ("contact: A_B-c@sub-domain.example.org.", "email"),
  ("server 192.168.0.1 is down", "ip_address"),
  ("ping 8.8.8.8.", "ip_address"),
  ("IPv6 2001:db8::1 here", "ip_address"),
  ("loopback ::1, done", "ip_address"),
  ("full 2001:0db8:85a3:0000:0000:8a2e:0370:7334 form", "ip_address"),
  ("mapped ::ffff:192.0.2.1 form", "ip_address"),
  ("call +1 (415) 555-0132 now", "phone"),
  ("call +44 20 7946 0958 now", "phone"),
  ("call +49 (0)30 1234567 now", "phone"),
  ("call +33 6 12 34 56 78 now", "phone"),
  ("call +4915112345678 now", "phone"),
  ("call (415) 555-0132 now", "phone"),
  ("call 415-555-0132 now", "phone"),
  ("call 415.555.0132 now", "phone"),
  ("call 1-800-555-0199 now", "phone"),
  ("Tel. 030 1234567", "phone"),
  ("Tél. 06 12 34 56 78", "phone"),
  ("Tel 020 7946 0958.", "phone"),
  ("Tel. 089/1234567", "phone"),
])
def test_pii_positives(text, kind):
  placeholder = {"email": pii.EMAIL, "ip_address": pii.IP_ADDRESS, "phone": pii.PHONE}[kind]
  redacted, counts = pii.redact(text)
  assert placeholder in redacted, redacted
  assert counts[kind] == 1 and sum(counts.values()) == 1, counts
  assert not re.search(r"\d{3}", redacted), redacted


@pytest.mark.parametrize("text", [
  "In 2024 we moved; in 1999 we did not.",
  "Released on 2024-01-15, or 15.01.2024, or 01/02/2024, at 12:30:45.",
  "Version 1.2.3 and 10.4.1 and v2.0.0-rc1 are out.",
  "About 1,234,567 people and 3.14159 pies; 42 is the answer; 100 000 units.",
  "Order id 4915112345678 and 12345678901234 and 0123456789.",
  "Not an address: 256.1.1.1, 1.2.3.4.5, 01.2.3.4.",
  "ISBN 978-3-16-148410-0 and 2024-01-15T10:30:00Z.",
  "write to user at example dot com or user(at)example.com",
  "std::vector<int> and Foo::Bar and a::b::c",
  "The ratio was 3:2 and the score 10:30.",
])
def test_pii_negatives(text):
  assert pii.redact(text) == (text, {"email": 0, "ip_address": 0, "phone": 0})


def test_pii_counts_several_kinds():
  text = "a@example.com, b@example.org, 10.0.0.1 and +1 415 555 0132."
  redacted, counts = pii.redact(text)
  assert redacted == "<EMAIL>, <EMAIL>, <IP_ADDRESS> and <PHONE>."
  assert counts == {"email": 2, "ip_address": 1, "phone": 1}


def test_pii_is_linear_on_long_tokens():
  text = ("a" * 200_000 + " ") + ("1." * 50_000) + ("0:" * 50_000)
  assert pii.redact(text)[0] == text  # Would take minutes with quadratic backtracking.


# ---------------------------------------------------------------------------------------------------
# language

@pytest.fixture(scope="module")
def language_docs() -> dict[str, list[str]]:
  return {lang: helpers.prose_documents(lang, min_chars=300, limit=40) for lang in helpers.PROSE_LANGUAGES}


def test_language_accuracy(language_docs):
  lf = language.LanguageFilter()
  for lang, docs in language_docs.items():
    assert len(docs) >= 30, lang
    predicted = [lf.classify(doc)[0] for doc in docs]
    accuracy = sum(p == lang for p in predicted) / len(docs)
    assert accuracy >= 0.9, (lang, accuracy, predicted)


def test_language_keep_list(language_docs):
  lf = language.LanguageFilter(keep=["en", "de"], min_confidence=0.5)
  for lang, docs in language_docs.items():
    reasons = [lf.keep_reason(doc) for doc in docs]
    if lang in ("en", "de"):
      assert sum(r == (lang, None) for r in reasons) >= 0.9 * len(docs), reasons
    else:
      assert sum(r == (lang, "language_not_kept") for r in reasons) >= 0.9 * len(docs), reasons
  assert language.LanguageFilter().keep_reason(language_docs["es"][0]) == ("es", None)


def test_language_low_confidence():
  mixed = "The cat sat. Der Hund lief. El perro corre. Il gatto dorme."
  lang, prob = language.LanguageFilter().classify(mixed)
  assert prob < 0.5
  assert language.LanguageFilter(min_confidence=0.5).keep_reason(mixed) == (lang, "low_language_confidence")
  assert language.LanguageFilter(min_confidence=0.0).keep_reason(mixed) == (lang, None)
  assert language.LanguageFilter().keep_reason("  \n ") == ("und", "low_language_confidence")


def test_language_no_linguistic_content_is_never_kept():
  garbage = "zq 7x kk9 qwv zzt p0 xq"
  assert language.LanguageFilter().classify(garbage)[0] == language.NO_LANGUAGE
  assert language.LanguageFilter(min_confidence=0.0).keep_reason(garbage) == ("zxx", "language_not_kept")


def test_language_classifies_prefix_only():
  lf = language.LanguageFilter(max_chars=300)
  english = helpers.prose_documents("en", min_chars=300, limit=1)[0][:300]
  german = "\n".join(helpers.prose_paragraphs("de"))
  assert lf.classify(english + "\n" + german)[0] == "en"
  assert language.LanguageFilter(max_chars=len(german) + 400).classify(english + "\n" + german)[0] == "de"


@pytest.mark.parametrize("keep,match", [
  (["en", "EN"], "'EN'.*two lowercase letters"),
  (["eng"], "'eng'.*two lowercase letters"),
  (["en", "qq"], "'qq'.*not known"),
  ("en", "not the string"),
])
def test_language_bad_codes(keep, match):
  with pytest.raises((ValueError, TypeError), match=match):
    language.LanguageFilter(keep=keep)
  with pytest.raises(ValueError, match="min_confidence"):
    language.LanguageFilter(min_confidence=1.5)


def test_missing_curate_dependencies_name_the_extra(monkeypatch):
  """Without ftfy or py3langid, the step that needs one says `pip install 'maxlm[curate]'`."""
  monkeypatch.setitem(sys.modules, "ftfy", None)  # an import of it now fails as if it were not installed
  monkeypatch.setitem(sys.modules, "py3langid.langid", None)
  language._identifier.cache_clear()
  try:
    with pytest.raises(MissingExtra, match=r"ftfy is not installed.*pip install 'maxlm\[curate\]'"):
      repair_mojibake("cafÃ©")
    with pytest.raises(MissingExtra, match=r"py3langid.langid is not installed.*maxlm\[curate\]"):
      language.LanguageFilter(["en"]).keep_reason("some english text here")
  finally:
    language._identifier.cache_clear()
  assert normalize("plain text") == "plain text"  # what needs neither still works
