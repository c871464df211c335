"""Text normalisation (Unicode, control characters, whitespace) and exact-dedup keys.

`normalize` is the canonical form every later curation stage sees; it is idempotent
(`normalize(normalize(t)) == normalize(t)`) when mojibake repair is off. `dedup_key` hashes a
more aggressive form (NFKC, casefolded, all whitespace collapsed) so documents differing only in
case or layout collide for exact deduplication.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata

from data_pipelines.extras import require

# Line breaks of every convention (CRLF, CR, VT, FF, NEL, LS, PS) become "\n".
_LINE_BREAKS = re.compile(r"\r\n?|[\x0b\x0c\x85\u2028\u2029]")
# C0/C1 control characters other than \t and \n (\r, \v, \f and NEL are line breaks, handled first),
# invisible zero-width characters (soft hyphen, zero-width space, word joiner, BOM / zero-width
# no-break space) and lone surrogates (not encodable as UTF-8). ZWJ/ZWNJ (U+200C/U+200D) are kept:
# they are meaningful in Persian and Indic scripts and inside emoji sequences.
_INVISIBLE = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u00ad\u200b\u2060\ufeff\ud800-\udfff]+")
# A run of 2+ horizontal whitespace characters, or any single one other than a plain space.
_HSPACE_RUN = re.compile(r"[^\S\n]{2,}|[^\S\n ]")
# The same, but only runs that follow a non-space character (leaves line indentation alone).
_HSPACE_RUN_INNER = re.compile(r"(?<=\S)(?:[^\S\n]{2,}|[^\S\n ])")
_TRAILING_SPACE = re.compile(r"[^\S\n]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")
_ANY_WHITESPACE = re.compile(r"\s+")


@functools.lru_cache(maxsize=1)
def _ftfy_config():
  """ftfy configuration restricted to encoding repairs (no quote/width/ligature/HTML changes)."""
  ftfy = require("curate", "ftfy")  # only needed when fix_mojibake=True

  return ftfy.TextFixerConfig(
    unescape_html=False,
    remove_terminal_escapes=False,
    fix_encoding=True,
    restore_byte_a0=True,
    replace_lossy_sequences=True,
    decode_inconsistent_utf8=True,
    fix_c1_controls=True,
    fix_latin_ligatures=False,
    fix_character_width=False,
    uncurl_quotes=False,
    fix_line_breaks=False,
    fix_surrogates=True,
    remove_control_chars=False,
    normalization=None,
    explain=False,
  )


def repair_mojibake(text: str) -> str:
  """Repair UTF-8 decoded as Latin-1/cp1252 (e.g. "cafÃ©" -> "café") with ftfy, nothing else."""
  return require("curate", "ftfy").fix_text(text, _ftfy_config())


def normalize(text: str, *, fix_mojibake: bool = False, keep_indent: bool = False) -> str:
  """Canonical document text: NFC, no control/zero-width characters, tidy whitespace.

  Steps: optional ftfy encoding repair; every line-break convention -> "\\n"; control characters
  other than \\t/\\n and zero-width characters removed; NFC; runs of horizontal whitespace
  (spaces, tabs, no-break and other Unicode spaces) -> one space (with keep_indent, runs at the start
  of a line are left alone, for code); trailing whitespace on lines removed; 3+ consecutive newlines
  -> 2 (at most one empty line); leading/trailing whitespace of the document stripped.
  """
  if fix_mojibake:
    text = repair_mojibake(text)
  text = _LINE_BREAKS.sub("\n", text)
  text = _INVISIBLE.sub("", text)
  if not text.isascii():
    text = unicodedata.normalize("NFC", text)
  text = (_HSPACE_RUN_INNER if keep_indent else _HSPACE_RUN).sub(" ", text)
  text = _TRAILING_SPACE.sub("\n", text)
  text = _BLANK_LINES.sub("\n\n", text)
  return text.strip()


def dedup_key(text: str, *, normalized: bool = False) -> bytes:
  """16-byte BLAKE2b digest of an aggressive normal form, equal for case/whitespace-only variants.

  The form is normalize(text), NFKC-normalised and casefolded, with every whitespace run (newlines
  included) collapsed to one space. Stable across processes and Python versions. `normalized=True`
  says text is already normalize()d (the curation pipeline), so that pass is not repeated.
  """
  if not normalized:
    text = normalize(text)
  # NFKC on both sides of casefold: either can produce characters the other would change.
  form = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
  form = _ANY_WHITESPACE.sub(" ", form).strip()
  return hashlib.blake2b(form.encode("utf-8"), digest_size=16).digest()
