"""Writes the JSONL data of the local lm-evaluation-harness tasks (maxlm/eval/lm_eval_tasks/data/) from text on this
machine; nothing is downloaded. The same Python version gives byte-identical files (choices are drawn with fixed
seeds), so the committed files can be checked with --check.

Sources: the multilingual prose fixture (tests/data_pipelines/fixtures/prose, written for this project, CC0), the
source of pure-Python standard-library modules (inspect.getsource), and the Python documentation topics shipped
with CPython (scripts/real_bench/heldout.py's held-out text). The YAML task files beside the data are written by
hand; see that directory's README.md.

Run:  python scripts/make_lm_eval_tasks.py            (rewrites the data files and MANIFEST.json)
      python scripts/make_lm_eval_tasks.py --check    (exit 1 if a committed file differs)
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import platform
import random
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "maxlm" / "eval" / "lm_eval_tasks" / "data"
PROSE = ROOT / "tests" / "data_pipelines" / "fixtures" / "prose"
LANGUAGES = ("en", "de", "es", "it")
# Pure-Python standard-library modules whose functions become the code tasks (C-accelerated parts have no source).
MODULES = ("textwrap", "shlex", "fractions", "statistics", "heapq", "bisect", "colorsys", "calendar", "string",
           "json.encoder", "json.decoder", "difflib", "fnmatch", "base64", "html", "dataclasses", "functools",
           "copy", "pprint", "reprlib", "tokenize", "urllib.parse", "email.utils", "configparser", "ipaddress",
           "gettext", "shutil", "posixpath", "random", "inspect")
PER_TASK = 40
WORD = re.compile(r"^[^\W\d_]{4,}$")  # a word of letters only, at least 4 of them
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def paragraphs(lang: str) -> list[str]:
  """One language's paragraphs, hard-wrapped lines joined with spaces."""
  text = (PROSE / f"{lang}.txt").read_text(encoding="utf-8")
  return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def functions() -> list[tuple[str, str, list[str], int]]:
  """(module, qualified name, dedented source lines, index of the first body line after the docstring) of every
  function and method of MODULES with 6 to 40 lines, sorted by name."""
  found = {}
  for name in MODULES:
    module = importlib.import_module(name)
    for obj in vars(module).values():
      members = [obj] if inspect.isfunction(obj) else [v for v in vars(obj).values() if inspect.isfunction(v)] \
        if inspect.isclass(obj) else []
      for fn in members:
        if getattr(fn, "__module__", None) != module.__name__:
          continue
        try:
          source = textwrap.dedent(inspect.getsource(fn))
          tree = ast.parse(source)
        except (OSError, TypeError, SyntaxError):
          continue
        lines = source.rstrip("\n").split("\n")
        node = tree.body[0]
        if not 6 <= len(lines) <= 40 or not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
          continue
        body = node.body
        has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
          and isinstance(body[0].value.value, str)
        if has_doc and len(body) == 1:
          continue
        first = (body[1] if has_doc else body[0]).lineno - 1
        found[f"{name}:{fn.__qualname__}"] = (name, fn.__qualname__, lines, first)
  return [found[k] for k in sorted(found)]


def _code_line_ok(line: str, longest: int) -> bool:
  text = line.strip()
  return 8 <= len(text) <= longest and not text.startswith(("#", '"', "'", "@")) and '"""' not in text


def code_samples(fns: list, rng: random.Random, longest: int) -> list[dict]:
  """A context of a function's first lines (through a cut inside its body) and the real next line."""
  out = []
  for module, name, lines, first in fns:
    cuts = [k for k in range(max(first, 2), len(lines)) if _code_line_ok(lines[k], longest)]
    if cuts:
      k = rng.choice(cuts)
      out.append({"module": module, "function": name, "context": "\n".join(lines[:k]) + "\n", "line": lines[k]})
  return out


def mc_code(fns: list, rng: random.Random) -> list[dict]:
  """Which of four lines is the real next line of a standard-library function (the others: lines of other
  functions, indented like the real one)."""
  samples = code_samples(fns, rng, 80)
  pool = sorted({s["line"].strip() for s in samples})
  docs = []
  for i, s in enumerate(rng.sample(samples, PER_TASK)):
    indent = s["line"][:len(s["line"]) - len(s["line"].lstrip())]
    others = rng.sample([p for p in pool if p != s["line"].strip()], 3)
    choices = [s["line"], *(indent + o for o in others)]
    rng.shuffle(choices)
    docs.append({"id": i, "module": s["module"], "function": s["function"], "context": s["context"],
                 "choices": choices, "label": choices.index(s["line"])})
  return docs


def gen_code_line(fns: list, rng: random.Random, exclude: set[str]) -> list[dict]:
  """Complete the next line (at most 50 characters) of a standard-library function not used by mc_code."""
  samples = [s for s in code_samples(fns, rng, 50) if s["function"] not in exclude]
  return [{"id": i, "module": s["module"], "function": s["function"], "context": s["context"],
           "target": s["line"].strip()} for i, s in enumerate(rng.sample(samples, PER_TASK))]


def per_language(rng: random.Random, make) -> list[dict]:
  """PER_TASK documents, a quarter per language, from make(lang, paragraphs, rng) -> candidate documents."""
  docs = []
  for lang in LANGUAGES:
    candidates = make(lang, paragraphs(lang), rng)
    docs += [{"lang": lang, **d} for d in rng.sample(candidates, PER_TASK // len(LANGUAGES))]
  return [{"id": i, **d} for i, d in enumerate(docs)]


def cloze(lang: str, paras: list[str], rng: random.Random) -> list[dict]:
  """A paragraph but its last word (lambada's form): the word is the target."""
  del lang, rng
  out = []
  for p in paras[0::2]:
    head, _, last = p.rpartition(" ")
    word = last.rstrip(".!?»\"')")
    if WORD.match(word):
      out.append({"context": head, "target": " " + word})
  return out


def mc_prose(lang: str, paras: list[str], rng: random.Random) -> list[dict]:
  """A paragraph's first sentences and four candidates for the next: the real one and three from other paragraphs
  of the same language."""
  del lang
  split = [SENTENCE_END.split(p) for p in paras]
  pool = sorted({s for sents in split for s in sents[1:]})
  out = []
  for sents in split[1::2]:
    if len(sents) < 3:
      continue
    k = rng.randrange(1, len(sents))
    choices = [sents[k], *rng.sample([s for s in pool if s not in sents], 3)]
    rng.shuffle(choices)
    out.append({"context": " ".join(sents[:k]), "choices": choices, "label": choices.index(sents[k])})
  return out


def next_word(lang: str, paras: list[str], rng: random.Random) -> list[dict]:
  """A paragraph cut before a word of its second half (letters only, at least 4): generate that word."""
  del lang
  out = []
  for p in paras[1::2]:
    words = p.split(" ")
    spots = [i for i in range(len(words) // 2, len(words)) if WORD.match(words[i])]
    if spots:
      i = rng.choice(spots)
      out.append({"context": " ".join(words[:i]), "target": words[i]})
  return out


def ppl_prose(lang: str, paras: list[str], rng: random.Random) -> list[dict]:
  """Two consecutive paragraphs as one document."""
  del lang, rng
  return [{"text": paras[i] + "\n\n" + paras[i + 1]} for i in range(0, len(paras) - 1, 2)]


def ppl_pydoc(rng: random.Random) -> list[dict]:
  """Up to 1,500 characters (whole lines) of documentation topics, 16 of them."""
  sys.path.insert(0, str(ROOT / "scripts"))
  from real_bench.heldout import source  # noqa: PLC0415

  texts, _ = source()
  import pydoc_data.topics as module  # noqa: PLC0415

  names = sorted(module.topics)
  docs = []
  for i in sorted(rng.sample(range(len(texts)), 16)):
    text = texts[i]
    if len(text) > 1500:
      text = text[:text.rfind("\n", 0, 1500)]
    docs.append({"id": len(docs), "topic": names[i], "text": text.strip("\n")})
  return docs


def build() -> dict[str, list[dict]]:
  """Every task's documents by file stem."""
  fns = functions()
  code = mc_code(fns, random.Random(1))
  return {
    "cloze_prose": per_language(random.Random(2), cloze),
    "mc_prose": per_language(random.Random(3), mc_prose),
    "mc_code": code,
    "ppl_prose": per_language(random.Random(4), ppl_prose)[:24],
    "ppl_pydoc": ppl_pydoc(random.Random(5)),
    "gen_code_line": gen_code_line(fns, random.Random(6), {d["function"] for d in code}),
    "gen_next_word": per_language(random.Random(7), next_word),
  }


def render(docs: list[dict]) -> str:
  return "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs)


def main(argv: list[str] | None = None) -> int:
  """Writes (or with --check compares) the data files and MANIFEST.json."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing them")
  args = p.parse_args(argv)
  files = {f"{stem}.jsonl": render(docs) for stem, docs in build().items()}
  manifest = {"python": platform.python_version(), "modules": list(MODULES),
              "documents": {name: text.count("\n") for name, text in files.items()}}
  files["MANIFEST.json"] = json.dumps(manifest, indent=2) + "\n"
  if args.check:
    stale = [n for n, text in files.items() if not (OUT / n).is_file() or (OUT / n).read_text("utf-8") != text]
    for name in stale:
      print(f"differs: {OUT / name}")
    return 1 if stale else 0
  OUT.mkdir(parents=True, exist_ok=True)
  for name, text in files.items():
    (OUT / name).write_text(text, encoding="utf-8")
    print(f"wrote {OUT / name} ({len(text.encode('utf-8')):,} bytes)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
