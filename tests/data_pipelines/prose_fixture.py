"""The committed multilingual prose fixture (fixtures/prose: English, German, Spanish, Italian; see its README)."""

from __future__ import annotations

import pathlib

PROSE_DIR = pathlib.Path(__file__).parent / "fixtures" / "prose"
LANGUAGES = ("en", "de", "es", "it")


def paragraphs(lang: str) -> list[str]:
  """The paragraphs of one language's file (blank-line separated, hard-wrapped lines kept), in file order."""
  text = (PROSE_DIR / f"{lang}.txt").read_text(encoding="utf-8")
  found = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
  assert found, f"no paragraphs in {PROSE_DIR / f'{lang}.txt'}"
  return found


def documents(lang: str, min_chars: int, limit: int, *, skip: int = 0) -> list[str]:
  """Up to `limit` documents of consecutive paragraphs (after the first `skip`), each at least min_chars long."""
  docs, current = [], []
  for paragraph in paragraphs(lang)[skip:]:
    current.append(paragraph)
    if sum(map(len, current)) >= min_chars:
      docs.append("\n\n".join(current))
      current = []
      if len(docs) == limit:
        break
  return docs
