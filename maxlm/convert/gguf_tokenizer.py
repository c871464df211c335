"""GGUF tokenizer metadata <-> a Hugging Face tokenizer directory (`maxlm convert --from-gguf` / `--to-gguf`).

llama.cpp keeps a model's tokenizer as metadata: `tokenizer.ggml.model` ("gpt2": byte-level BPE with merges; "llama":
a sentencepiece vocabulary with scores), the tokens and their types, a pre-tokenizer name (`tokenizer.ggml.pre`) that
stands for llama.cpp's splitting regexes, special-token ids and flags, and the chat template. `write_tokenizer` turns
that into the tokenizer.json (with the pre-tokenizer the model's original tokenizer.json had), tokenizer_config.json,
config.json and chat_template.jinja that maxlm's train / generate / serve / eval load; gguf_tokenizer_export writes
a workdir's tokenizer/ (a byte-level BPE tokenizer.json, or a sentencepiece tokenizer.model) back as that metadata.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gguf
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from maxlm.convert.hf_config import UnsupportedModelError

__all__ = ["PRE_TOKENIZERS", "write_tokenizer"]

log = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (int(t) for t in gguf.TokenType)
_SPACE = "\u2581"  # sentencepiece's space
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")

# llama.cpp's splitting regexes (llama-vocab.cpp) as the models' own tokenizer.json files write them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's "default" (also a file without tokenizer.ggml.pre): these four, each splitting the previous' pieces.
_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                   r"\p{N}+", r"[0-9][0-9][0-9]")


def _byte_level(use_regex: bool, trim_offsets: bool = True) -> pre_tokenizers.ByteLevel:
  return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=trim_offsets, use_regex=use_regex)


def _split(regex: str) -> pre_tokenizers.Split:
  return pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)


@dataclasses.dataclass(frozen=True)
class PreTokenizer:
  """What one tokenizer.ggml.pre name means: the original tokenizer.json's pre-tokenizer (and NFC normalizer), and
  llama.cpp's flags for it (BPE ignore_merges, the add_bos default, clean_up_tokenization_spaces)."""

  make: Callable[[], pre_tokenizers.PreTokenizer]
  nfc: bool = False
  ignore_merges: bool = False
  add_bos: bool = False
  clean_up: bool = False


PRE_TOKENIZERS: dict[str, PreTokenizer] = {
  "gpt-2": PreTokenizer(lambda: _byte_level(True), clean_up=True),
  "default": PreTokenizer(lambda: pre_tokenizers.Sequence([*map(_split, _DEFAULT_SPLITS), _byte_level(False)]),
                          clean_up=True),
  "smollm": PreTokenizer(lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                          _byte_level(True)])),
  "qwen2": PreTokenizer(lambda: pre_tokenizers.Sequence([_split(_QWEN2_SPLIT), _byte_level(False, trim_offsets=False)]),
                        nfc=True),
  "llama-bpe": PreTokenizer(lambda: pre_tokenizers.Sequence([_split(_LLAMA3_SPLIT), _byte_level(False)]),
                            ignore_merges=True, add_bos=True, clean_up=True),
}
# Names llama.cpp treats exactly as one above.
_PRE_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "deepseek-r1-qwen": "qwen2"}


# --- GGUF -> tokenizer directory ---


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
  """The value of one metadata key (a list for arrays), or default if the file lacks it."""
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _token_id(reader: gguf.GGUFReader, key: str, n_tokens: int) -> int | None:
  """A special-token id from the file, None if absent or not a token of the vocabulary."""
  value = _field(reader, f"tokenizer.ggml.{key}")
  if value is None:
    return None
  if not 0 <= int(value) < n_tokens:
    log.warning("GGUF tokenizer.ggml.%s=%s is outside the vocabulary [0, %d): ignored", key, value, n_tokens)
    return None
  return int(value)


def _unique_tokens(tokens: list[str]) -> list[str]:
  """The tokens, an empty or repeated one renamed as llama.cpp does (where a text is on several ids, the last wins)."""
  last = {t: i for i, t in enumerate(tokens)}
  out = []
  for i, t in enumerate(tokens):
    if not t:
      t = f"[EMPTY_{i}]"
    elif last[t] != i:
      log.warning("GGUF token %d %r is repeated (id %d): renamed [DUPLICATE_%d]", i, t, last[t], i)
      t = f"[DUPLICATE_{i}]"
    out.append(t)
  return out


def _spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
  """BPE merges equivalent to sentencepiece's highest-score-first merging: every split of a normal piece into two
  normal pieces, ordered by the merged piece's score (then id)."""
  normal = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
  found = []
  for piece, i in normal.items():
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      if left in normal and right in normal:
        found.append((-scores[i], i, normal[left], left, right))
  found.sort()
  return [(left, right) for *_, left, right in found]


def _template(bos: str | None, eos: str | None, ids: dict[str, int]) -> processors.TemplateProcessing:
  """A post-processor adding bos and/or eos around every encoded sequence (encode with special tokens)."""
  pre, post = [f"{bos}:0"] if bos else [], [f"{eos}:0"] if eos else []
  single = [*pre, "$A:0", *post]
  pair = [*single, *pre, "$B:1", *post]
  special = [(t, ids[t]) for t in dict.fromkeys([*([bos] if bos else []), *([eos] if eos else [])])]
  return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _bpe_tokenizer(reader: gguf.GGUFReader, tokens: list[str]) -> tuple[tokenizers.Tokenizer, bool, bool]:
  """(tokenizer, add_bos default, clean_up_tokenization_spaces) of a byte-level BPE ("gpt2") vocabulary."""
  pre = _field(reader, "tokenizer.ggml.pre")
  if pre is None:
    log.warning("GGUF has no tokenizer.ggml.pre: using llama.cpp's 'default' pre-tokenizer")
    pre = "default"
  name = _PRE_ALIASES.get(pre, pre)
  if name not in PRE_TOKENIZERS:
    raise UnsupportedModelError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported "
                                f"({', '.join(sorted([*PRE_TOKENIZERS, *_PRE_ALIASES]))})")
  spec = PRE_TOKENIZERS[name]
  merges = _field(reader, "tokenizer.ggml.merges")
  if not merges:
    raise UnsupportedModelError("GGUF tokenizer.ggml.model='gpt2' without tokenizer.ggml.merges is not supported")
  pairs = []
  for merge in merges:
    cut = merge.find(" ", 1)  # as llama.cpp splits them
    if cut < 0:
      raise UnsupportedModelError(f"GGUF tokenizer.ggml.merges entry {merge!r} is not two tokens")
    pairs.append((merge[:cut], merge[cut + 1:]))
  tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs,
                                        ignore_merges=spec.ignore_merges, fuse_unk=False, byte_fallback=False))
  if spec.nfc:
    tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = spec.make()
  tok.decoder = decoders.ByteLevel()
  return tok, spec.add_bos, spec.clean_up


def _spm_tokenizer(reader: gguf.GGUFReader, tokens: list[str], types: list[int],
                   unk: int | None) -> tuple[tokenizers.Tokenizer, bool, bool]:
  """(tokenizer, add_bos default, clean_up_tokenization_spaces) of a sentencepiece ("llama") vocabulary: BPE with
  byte fallback and merges from the scores, spaces as U+2581, a space prefixed per tokenizer.ggml.add_space_prefix."""
  scores = _field(reader, "tokenizer.ggml.scores")
  if scores is None or len(scores) != len(tokens):
    raise UnsupportedModelError("GGUF tokenizer.ggml.model='llama' needs tokenizer.ggml.scores, one per token")
  if _field(reader, "tokenizer.ggml.remove_extra_whitespaces", False):
    raise UnsupportedModelError("GGUF tokenizer.ggml.remove_extra_whitespaces=true is not supported")
  prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
  byte_fallback = any(t == BYTE for t in types)
  tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                        merges=_spm_merges(tokens, scores, types),
                                        unk_token=tokens[unk] if unk is not None else None, fuse_unk=True,
                                        byte_fallback=byte_fallback))
  space = normalizers.Replace(" ", _SPACE)
  tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), space]) if prefix else space
  steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
  tok.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)
  return tok, True, False


def _added_tokens(tokens: list[str], types: list[int], ids: dict[str, int | None]) -> dict[int, AddedToken]:
  """The tokens matched whole in the text, by id: control and unknown ones (and bos/eos/unk whatever their type) as
  special tokens, which decode(skip_special_tokens) drops, user-defined ones as plain added tokens; as llama.cpp
  matches them and the models' tokenizer.json files had them. (In a sentencepiece vocabulary the text after one gets
  a space prefix, as in llama.cpp; sentencepiece itself matches user-defined pieces inside the prefixed text.)"""
  added = {i: AddedToken(tokens[i], special=types[i] in (CONTROL, UNKNOWN), normalized=False)
           for i in range(len(tokens)) if types[i] in (CONTROL, UNKNOWN, USER_DEFINED)}
  for i in (ids["bos"], ids["eos"], ids["unknown"]):
    if i is not None and i not in added:
      added[i] = AddedToken(tokens[i], special=True, normalized=False)
  return added


def write_tokenizer(reader: gguf.GGUFReader, out_dir: Path) -> None:
  """Writes the GGUF's tokenizer into out_dir as tokenizer.json, tokenizer_config.json, config.json (special ids) and
  chat_template.jinja (if the file has a template), so maxlm and transformers use the model's tokenizer as shipped."""
  out_dir = Path(out_dir)
  kind = _field(reader, "tokenizer.ggml.model")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  if kind is None or not tokens:
    raise UnsupportedModelError("GGUF has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
  tokens = _unique_tokens(tokens)
  types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
  if len(types) != len(tokens):
    raise UnsupportedModelError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
  ids = {k: _token_id(reader, f"{k}_token_id", len(tokens)) for k in ("bos", "eos", "padding", "unknown")}
  if kind == "gpt2":
    tok, add_bos, clean_up = _bpe_tokenizer(reader, tokens)
  elif kind == "llama":
    tok, add_bos, clean_up = _spm_tokenizer(reader, tokens, types, ids["unknown"])
  else:
    raise UnsupportedModelError(f"GGUF tokenizer.ggml.model={kind!r} is not supported (gpt2, llama)")
  add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", add_bos))
  add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
  added = _added_tokens(tokens, types, ids)
  tok.add_special_tokens([t for t in added.values() if t.special])
  tok.add_tokens([t for t in added.values() if not t.special])
  name = {k: tokens[i] if i is not None else None for k, i in ids.items()}
  for flag, key in ((add_bos, "bos"), (add_eos, "eos")):
    if flag and name[key] is None:
      raise UnsupportedModelError(f"GGUF tokenizer.ggml.add_{key}_token is true but the file has no "
                                  f"tokenizer.ggml.{key}_token_id")
  template = _template(name["bos"] if add_bos else None, name["eos"] if add_eos else None,
                       {t: i for i, t in enumerate(tokens)}) if add_bos or add_eos else None
  if kind == "gpt2":
    level = processors.ByteLevel(trim_offsets=False)
    tok.post_processor = processors.Sequence([level, template]) if template else level
  elif template:
    tok.post_processor = template

  chat_template = _field(reader, "tokenizer.chat_template")
  config: dict[str, Any] = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": name["bos"], "eos_token": name["eos"], "unk_token": name["unknown"], "pad_token": name["padding"],
    "add_bos_token": add_bos, "add_eos_token": add_eos, "clean_up_tokenization_spaces": clean_up,
    "added_tokens_decoder": {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": t.special} for i, t in sorted(added.items())},
  }
  arch = _field(reader, "general.architecture")
  context = _field(reader, f"{arch}.context_length") if arch else None
  if context:
    config["model_max_length"] = int(context)
  if chat_template:
    config["chat_template"] = chat_template
  out_dir.mkdir(parents=True, exist_ok=True)
  tok.save(str(out_dir / "tokenizer.json"))
  (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
  special_ids = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"]}
  (out_dir / "config.json").write_text(json.dumps(special_ids, indent=2) + "\n")
  if chat_template:
    (out_dir / "chat_template.jinja").write_text(chat_template)


# --- tokenizer directory -> GGUF ---
