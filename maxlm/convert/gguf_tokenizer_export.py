"""A workdir's tokenizer/ directory -> GGUF tokenizer metadata (`maxlm convert --to-gguf`).

The inverse of gguf_tokenizer.write_tokenizer: a byte-level BPE tokenizer.json (its pre-tokenizer recognised by
structure and named as llama.cpp names it) or a sentencepiece tokenizer.model becomes tokenizer.ggml.* fields,
special-token ids and flags, and the chat template; anything llama.cpp could not reproduce fails naming it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import gguf
import tokenizers
from tokenizers import models

from maxlm.convert.gguf_tokenizer import (
  _BYTE_PIECE,
  _GPT2_SPLIT,
  _SPACE,
  BYTE,
  CONTROL,
  NORMAL,
  PRE_TOKENIZERS,
  UNKNOWN,
  UNUSED,
  USER_DEFINED,
)
from maxlm.convert.hf_config import UnsupportedModelError

__all__ = ["add_tokenizer_metadata"]

log = logging.getLogger(__name__)

def _read_json(path: Path) -> dict:
  """A JSON object file ({} if absent), with a clear error naming the file if it is not one."""
  if not path.is_file():
    return {}
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable JSON ({e})") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return data


def _canonical_pre(pre: dict | None) -> list[tuple]:
  """A pre-tokenizer as comparable steps: ByteLevel's own regex becomes the Split it does; offsets are ignored."""
  steps = []
  for p in (pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []):
    kind = p.get("type")
    if kind == "ByteLevel":
      if p.get("add_prefix_space"):
        steps.append(("ByteLevel add_prefix_space",))
      if p.get("use_regex", True):
        steps.append(("Split", _GPT2_SPLIT, "Isolated", False))
      steps.append(("ByteLevel",))
    elif kind == "Split":
      pattern = p.get("pattern", {})
      regex = pattern.get("Regex", re.escape(pattern["String"]) if "String" in pattern else None)
      steps.append(("Split", regex, p.get("behavior"), bool(p.get("invert"))))
    elif kind == "Digits":
      steps.append(("Digits", bool(p.get("individual_digits"))))
    else:
      steps.append((kind,))
  return steps


def _pre_json(pre: Any) -> dict:
  """The JSON form of a pre-tokenizer object."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre
  return json.loads(tok.to_str())["pre_tokenizer"]


def _pre_name(data: dict, where: Path) -> str:
  """The tokenizer.ggml.pre name of a byte-level BPE tokenizer.json, or UnsupportedModelError naming what differs."""
  steps = _canonical_pre(data.get("pre_tokenizer"))
  name = next((n for n, spec in PRE_TOKENIZERS.items() if _canonical_pre(_pre_json(spec.make())) == steps), None)
  if name is None:
    raise UnsupportedModelError(f"{where}: pre_tokenizer {json.dumps(data.get('pre_tokenizer'))[:300]} matches none "
                                f"of llama.cpp's byte-level pre-tokenizers this converter knows "
                                f"({', '.join(PRE_TOKENIZERS)})")
  normalizer = data.get("normalizer")
  if normalizer is not None and not (normalizer.get("type") == "NFC" and PRE_TOKENIZERS[name].nfc):
    raise UnsupportedModelError(f"{where}: normalizer {normalizer.get('type')} is not supported with the {name!r} "
                                "pre-tokenizer (llama.cpp has no normalizer for it)")
  ignore = bool(data["model"].get("ignore_merges", False))
  if ignore != PRE_TOKENIZERS[name].ignore_merges:
    raise UnsupportedModelError(f"{where}: BPE ignore_merges={str(ignore).lower()} is not supported with the "
                                f"{name!r} pre-tokenizer (llama.cpp uses {str(not ignore).lower()})")
  return name


def _template_flags(data: dict) -> tuple[bool | None, bool | None]:
  """(adds bos, adds eos) as the post-processor's TemplateProcessing says, (None, None) without one."""
  post = data.get("post_processor") or {}
  steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
  for step in steps:
    if step.get("type") == "TemplateProcessing":
      single = step.get("single", [])
      return bool(single) and "SpecialToken" in single[0], bool(single) and "SpecialToken" in single[-1]
  return None, None


def _add_flags(config: dict, data: dict, bos_default: bool, eos_default: bool) -> tuple[bool, bool]:
  """(add bos, add eos): tokenizer_config.json's add_*_token, else what the post-processor adds, else the defaults."""
  found = _template_flags(data)
  out = []
  for key, flag, default in (("add_bos_token", found[0], bos_default), ("add_eos_token", found[1], eos_default)):
    value = config.get(key)
    out.append(value if isinstance(value, bool) else flag if flag is not None else default)
  return out[0], out[1]


def _special_ids(tok_dir: Path, config: dict, tokens: list[str | None]) -> dict[str, int | None]:
  """bos/eos/unk/pad ids: tokenizer_config.json's token names, else config.json's ids (also where the former says
  null, as Qwen2's bos: llama.cpp's converter records the id; whether it is added is add_bos_token's business)."""
  model_config = _read_json(tok_dir / "config.json")
  lookup = {t: i for i, t in enumerate(tokens) if t is not None}
  out = {}
  for kind in ("bos", "eos", "unk", "pad"):
    token = config.get(f"{kind}_token")
    if isinstance(token, dict):
      token = token.get("content")
    if isinstance(token, str):
      if token not in lookup:
        raise ValueError(f"{tok_dir / 'tokenizer_config.json'}: {kind}_token {token!r} is not in the vocabulary")
      out[kind] = lookup[token]
      continue
    value = model_config.get(f"{kind}_token_id")
    if isinstance(value, list):  # several stop ids: the first is the eos
      value = value[0] if value else None
    valid = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(tokens)
    if value is not None and not valid:
      raise ValueError(f"{tok_dir / 'config.json'}: {kind}_token_id {value!r} is not an id of the vocabulary")
    out[kind] = value
  return out


def _chat_template(tok_dir: Path, config: dict) -> str | list | None:
  """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or a list of named ones)."""
  if (tok_dir / "chat_template.jinja").is_file():
    return (tok_dir / "chat_template.jinja").read_text(encoding="utf-8")
  return config.get("chat_template") or None


def _vocab_size(writer: gguf.GGUFWriter) -> int | None:
  """`<arch>.vocab_size` if the writer already holds it (the model's embedding rows), else None."""
  for kv in getattr(writer, "kv_data", []):
    for key, value in kv.items():
      if key.endswith(".vocab_size"):
        return int(value.value)
  return None


def _json_vocab(data: dict, where: Path) -> tuple[list[str | None], dict[int, dict]]:
  """(tokens by id, None where no token has the id; the added tokens by id) of a tokenizer.json."""
  vocab = data["model"].get("vocab") or {}
  added = {int(t["id"]): t for t in data.get("added_tokens", [])}
  n = max([*vocab.values(), *added, -1]) + 1
  tokens: list[str | None] = [None] * n
  for token, i in vocab.items():
    tokens[i] = token
  for i, t in added.items():
    if tokens[i] is not None and tokens[i] != t["content"]:
      raise UnsupportedModelError(f"{where}: added token {t['content']!r} has id {i}, which the vocabulary gives "
                                  f"to {tokens[i]!r}")
    tokens[i] = t["content"]
  return tokens, added


def _merge_strings(merges: list) -> list[str]:
  """tokenizer.json merges ("a b" strings or [a, b] pairs) as GGUF's "a b" strings."""
  out = []
  for m in merges:
    left, right = (m.split(" ", 1) if isinstance(m, str) else m)
    if " " in left or " " in right:
      raise UnsupportedModelError(f"BPE merge {m!r} holds a space, which GGUF merges cannot represent")
    out.append(f"{left} {right}")
  return out


def _spm_proto(path: Path):
  """The parsed sentencepiece ModelProto of a tokenizer.model."""
  from sentencepiece import sentencepiece_model_pb2  # noqa: PLC0415 (protobuf: only needed here)

  proto = sentencepiece_model_pb2.ModelProto()
  try:
    proto.ParseFromString(path.read_bytes())
  except Exception as e:  # noqa: BLE001 (protobuf's DecodeError and friends)
    raise ValueError(f"{path} is not a sentencepiece model: {e}") from None
  return proto


@dataclasses.dataclass
class _Metadata:
  """A tokenizer as GGUF metadata: tokenizer.ggml.model and pre, tokens, types, scores or merges, ids and flags."""

  model: str
  tokens: list[str]
  types: list[int]
  ids: dict[str, int | None]
  add_bos: bool
  add_eos: bool = False
  pre: str | None = None
  merges: list[str] | None = None
  scores: list[float] | None = None
  add_space_prefix: bool | None = None


def _spm_metadata(tok_dir: Path, config: dict) -> _Metadata:
  """The GGUF "llama" tokenizer of a sentencepiece tokenizer.model (a BPE model, as Llama 2's and maxlm's own)."""
  path = tok_dir / "tokenizer.model"
  proto = _spm_proto(path)
  trainer, norm = proto.trainer_spec, proto.normalizer_spec
  if trainer.model_type != 2:  # BPE
    raise UnsupportedModelError(f"{path}: sentencepiece model_type={trainer.model_type} is not supported (only BPE, "
                                "which llama.cpp's 'llama' tokenizer reproduces)")
  if norm.precompiled_charsmap or norm.name not in ("identity", ""):
    raise UnsupportedModelError(f"{path}: sentencepiece normalizer {norm.name!r} is not supported (only identity)")
  if norm.remove_extra_whitespaces or trainer.treat_whitespace_as_suffix:
    raise UnsupportedModelError(f"{path}: remove_extra_whitespaces / treat_whitespace_as_suffix are not supported")
  tokens = [p.piece for p in proto.pieces]
  ids = {"bos": trainer.bos_id, "eos": trainer.eos_id, "unk": trainer.unk_id, "pad": trainer.pad_id}
  # maxlm starts every document with bos (its own tokenizers have no tokenizer_config.json), as Llama 2 does
  add_bos, add_eos = _add_flags(config, {}, True, False)
  return _Metadata("llama", tokens, [int(p.type) for p in proto.pieces],
                   {k: (v if 0 <= v < len(tokens) else None) for k, v in ids.items()}, add_bos, add_eos,
                   scores=[p.score for p in proto.pieces], add_space_prefix=bool(norm.add_dummy_prefix))


def _spm_prefix(data: dict, where: Path) -> bool | None:
  """Whether a sentencepiece-style tokenizer.json prefixes a space (None: it is not one): Llama 2's layout (Prepend
  and Replace normalizers) or the Metaspace pre-tokenizer of newer files."""
  norm, pre = data.get("normalizer") or {}, data.get("pre_tokenizer") or {}
  steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm else []
  space = {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE}
  if not pre and steps and steps[-1] == space:
    if steps[:-1] == [{"type": "Prepend", "prepend": _SPACE}]:
      return True
    if not steps[:-1]:
      return False
  elif not norm and pre.get("type") == "Metaspace" and pre.get("replacement") == _SPACE and not pre.get("split"):
    return pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never") != "never"
  if data["model"].get("byte_fallback"):
    raise UnsupportedModelError(f"{where}: a byte-fallback BPE with normalizer {json.dumps(norm)[:200]} and "
                                f"pre_tokenizer {json.dumps(pre)[:200]} is not supported (sentencepiece-style ones "
                                "replace spaces by U+2581)")
  return None


def _spm_json_metadata(tok_dir: Path, config: dict, data: dict, prefix: bool) -> _Metadata:
  """The GGUF "llama" tokenizer of a sentencepiece-style tokenizer.json: its tokenizer.model's if that holds the same
  tokens, else scores that rank the pieces in merge order (llama.cpp then merges as the BPE does)."""
  where = tok_dir / "tokenizer.json"
  tokens, added = _json_vocab(data, where)
  if None in tokens:
    raise UnsupportedModelError(f"{where}: no token has id {tokens.index(None)}")
  if (tok_dir / "tokenizer.model").is_file():
    meta = _spm_metadata(tok_dir, config)
    if meta.tokens == tokens:
      meta.add_bos, meta.add_eos = _add_flags(config, data, meta.add_bos, meta.add_eos)
      meta.ids.update({k: v for k, v in _special_ids(tok_dir, config, tokens).items() if v is not None})
      return meta
    log.warning("%s and tokenizer.model hold different tokens: GGUF metadata is written from tokenizer.json", where)
  model = data["model"]
  made = {}  # piece -> rank of the first merge that makes it
  for rank, merge in enumerate(model.get("merges") or []):
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    made.setdefault(left + right, rank)
  unk = model.get("unk_token")
  types = []
  for i, t in enumerate(tokens):
    if i in added:
      types.append(UNKNOWN if t == unk else CONTROL if added[i].get("special") else USER_DEFINED)
    elif t == unk:
      types.append(UNKNOWN)
    elif model.get("byte_fallback") and _BYTE_PIECE.fullmatch(t):
      types.append(BYTE)
    else:  # a longer piece no merge makes is never produced: unused, so that llama.cpp does not produce it either
      types.append(NORMAL if len(t) == 1 or t in made else UNUSED)
  scores = [-float(made[t]) if t in made else 0.0 for t in tokens]
  add_bos, add_eos = _add_flags(config, data, True, False)
  return _Metadata("llama", tokens, types, _special_ids(tok_dir, config, tokens), add_bos, add_eos, scores=scores,
                   add_space_prefix=prefix)


def _json_metadata(tok_dir: Path, config: dict) -> _Metadata:
  """The GGUF tokenizer of a tokenizer.json: byte-level BPE ("gpt2") or sentencepiece-style BPE ("llama")."""
  where = tok_dir / "tokenizer.json"
  data = _read_json(where)
  model = data.get("model") or {}
  if model.get("type") != "BPE":
    raise UnsupportedModelError(f"{where}: model type {model.get('type')!r} is not supported (byte-level or "
                                "sentencepiece-style BPE)")
  for key in ("continuing_subword_prefix", "end_of_word_suffix"):
    if model.get(key):
      raise UnsupportedModelError(f"{where}: BPE {key}={model[key]!r} is not supported")
  if model.get("dropout"):
    raise UnsupportedModelError(f"{where}: BPE dropout={model['dropout']} is not supported")
  prefix = _spm_prefix(data, where)
  if prefix is not None:
    return _spm_json_metadata(tok_dir, config, data, prefix)
  decoder = (data.get("decoder") or {}).get("type")
  if decoder != "ByteLevel":
    raise UnsupportedModelError(f"{where}: decoder {decoder!r} is not supported (a byte-level BPE has ByteLevel)")
  pre = _pre_name(data, where)
  tokens, added = _json_vocab(data, where)
  types = [UNUSED if t is None else NORMAL for t in tokens]
  for i, t in added.items():
    types[i] = CONTROL if t.get("special") else USER_DEFINED
  tokens = [f"[PAD{i}]" if t is None else t for i, t in enumerate(tokens)]
  add_bos, add_eos = _add_flags(config, data, PRE_TOKENIZERS[pre].add_bos, False)
  return _Metadata("gpt2", tokens, types, _special_ids(tok_dir, config, tokens), add_bos, add_eos, pre=pre,
                   merges=_merge_strings(model.get("merges") or []))


def add_tokenizer_metadata(writer: gguf.GGUFWriter, tok_dir: Path, *, vocab_size: int | None = None) -> None:
  """Writes a workdir's tokenizer/ (byte-level BPE tokenizer.json, or sentencepiece tokenizer.model) as GGUF tokenizer
  metadata, padded with unused tokens to vocab_size (default: the writer's `<arch>.vocab_size`, if set)."""
  tok_dir = Path(tok_dir)
  config = _read_json(tok_dir / "tokenizer_config.json")
  if (tok_dir / "tokenizer.json").is_file():
    meta = _json_metadata(tok_dir, config)
  elif (tok_dir / "tokenizer.model").is_file():
    meta = _spm_metadata(tok_dir, config)
  else:
    raise FileNotFoundError(f"{tok_dir} holds neither tokenizer.json nor tokenizer.model")
  tokens, types, scores = list(meta.tokens), list(meta.types), meta.scores
  vocab_size = vocab_size if vocab_size is not None else _vocab_size(writer)
  if vocab_size is not None:
    if vocab_size < len(tokens):
      raise UnsupportedModelError(f"{tok_dir}: {len(tokens)} tokens do not fit the model's vocab_size {vocab_size}")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [UNUSED] * (vocab_size - len(types))
    if scores is not None:
      scores = [*scores, *[-1000.0] * (vocab_size - len(scores))]
  writer.add_tokenizer_model(meta.model)
  if meta.pre is not None:  # llama.cpp reads it for BPE vocabularies only
    writer.add_tokenizer_pre(meta.pre)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  if scores is not None:
    writer.add_token_scores(scores)
  if meta.merges is not None:
    writer.add_token_merges(meta.merges)
  ids = meta.ids
  for kind, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                    ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
    if ids.get(kind) is not None:
      add(ids[kind])
  for kind in ("bos", "eos"):
    if getattr(meta, f"add_{kind}") and ids.get(kind) is None:
      raise UnsupportedModelError(f"{tok_dir}: add_{kind}_token is set but the tokenizer has no {kind} token")
  writer.add_add_bos_token(meta.add_bos)
  writer.add_add_eos_token(meta.add_eos)
  if meta.add_space_prefix is not None:
    writer.add_add_space_prefix(meta.add_space_prefix)
  template = _chat_template(tok_dir, config)
  if template:
    writer.add_chat_template(template)
