"""maxlm's exactly-round-tripping sentencepiece BPE (and its training), and HF checkpoints' own."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pathlib
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm
import tokenizers

from data_pipelines.fileio import atomic_write

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# sentencepiece renders spaces as U+2581 and decodes that character back to a space, so a literal
# U+2581 in the text is encoded as its raw UTF-8 bytes (byte-fallback pieces) instead.
_SPACE_MARK = "\u2581"
_NUM_BYTE_PIECES = 256
MIN_TRAINED_VOCAB = 4 + _NUM_BYTE_PIECES + 1  # specials + byte pieces + one merge: train_tokenizer's minimum
# Trainer input bounds: sentencepiece drops "sentences" longer than max_sentence_length bytes, so
# documents are fed as groups of whole lines (newlines kept, so pieces like "):\n" are learned).
_TRAIN_SENTENCE_BYTES = 4096
# Where str.splitlines() ends a line ("\r\n" counting once).
_LINE_BREAK = re.compile(r"\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_DEFAULT_MAX_TRAIN_BYTES = 32 << 20
# encode_array: texts longer than this are encoded piece by piece where the model allows (see Tokenizer.encode_array).
ENCODE_PIECE_CHARS = 1 << 20
_TRAIN_THREADS = 8


def _word_local(model: bytes) -> bool:
  """Whether a sentencepiece model encodes words independently, so a text cut just before a space that follows a
  non-space encodes to the same ids in pieces: identity normalization (no dummy prefix, no whitespace folding),
  splitting at whitespace, which starts each word, and no user-defined piece holding a space."""
  try:
    from sentencepiece import sentencepiece_model_pb2  # noqa: PLC0415 (protobuf: only needed here)

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
  except Exception:  # noqa: BLE001 (no protobuf, or an unparsable proto: then assume nothing)
    return False
  norm, trainer = proto.normalizer_spec, proto.trainer_spec
  return (norm.name == "identity" and not norm.precompiled_charsmap and not norm.add_dummy_prefix
          and not norm.remove_extra_whitespaces and trainer.split_by_whitespace
          and not trainer.treat_whitespace_as_suffix
          and not any(" " in s or _SPACE_MARK in s for s in trainer.user_defined_symbols))


def _next_word_boundary(text: str, pos: int) -> int:
  """The first position >= pos just before a space that follows a non-space, else len(text)."""
  while True:
    pos = text.find(" ", pos)
    if pos < 0:
      return len(text)
    if pos > 0 and text[pos - 1] != " ":
      return pos
    pos += 1


def _checked_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
  """ids as ints; one outside [0, vocab_size) is an error naming it (decode's input check)."""
  ids = [int(i) for i in ids]
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad:
    raise ValueError(f"token id {bad[0]} is outside the tokenizer vocabulary [0, {vocab_size})")
  return ids


class Tokenizer:
  """A loaded sentencepiece model with maxlm's special ids (pad 0, unk 1, bos 2, eos 3); prompts start with bos."""

  add_bos = True  # maxlm's convention for its own models: every prompt and document starts with bos
  add_eos = False

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"tokenizer model {str(self.path)!r} does not exist")
    # Load from the bytes we hash, so the hash names this model even if the file is replaced.
    data = self.path.read_bytes()
    self.sha256: str = hashlib.sha256(data).hexdigest()
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(data)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{str(self.path)!r} is not a sentencepiece model: {e}") from None
    self.vocab_size: int = self._sp.vocab_size()
    self.pad_id: int = self._sp.pad_id()
    self.bos_id: int = self._sp.bos_id()
    self.eos_id: int = self._sp.eos_id()
    if min(self.bos_id, self.eos_id) < 0:
      raise ValueError(f"{str(self.path)!r} defines no bos/eos pieces (bos={self.bos_id}, "
                       f"eos={self.eos_id}); documents cannot be delimited")
    self._strip_ids = frozenset(i for i in (self.pad_id, self.bos_id, self.eos_id) if i >= 0)
    mark_bytes = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode("utf-8")]
    self._mark_ids = mark_bytes if all(self._sp.is_byte(i) for i in mark_bytes) else None
    self._word_local = _word_local(data)

  def __repr__(self) -> str:
    return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

  def encode(self, text: str) -> list[int]:
    """Token ids of text, without bos/eos."""
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    """Token ids of many texts, encoded by sentencepiece's thread pool (-1 = all cores)."""
    texts = list(texts)
    plain = [i for i, t in enumerate(texts) if _SPACE_MARK not in t]
    out: list[list[int] | None] = [None] * len(texts)
    if plain:
      for i, ids in zip(plain, self._sp.encode([texts[i] for i in plain], num_threads=num_threads), strict=True):
        out[i] = ids
    for i, text in enumerate(texts):
      if out[i] is None:
        out[i] = self._encode_with_marks(text)
    return out  # type: ignore[return-value]

  def encode_array(self, text: str, max_chars: int = ENCODE_PIECE_CHARS) -> np.ndarray:
    """int32 ids of text, as encode(text), holding only ~max_chars characters' worth of Python ints at a time.

    A longer text is cut just before a space that follows a non-space: a word boundary that this model never
    merges across (identity normalization, no dummy prefix, whitespace splitting: every model train_tokenizer
    writes), so the pieces' ids are exactly the whole text's. Other models encode the text whole.
    """
    if len(text) <= max_chars or not self._word_local:
      return np.asarray(self.encode(text), dtype=np.int32)
    parts, start = [], 0
    while start < len(text):
      stop = min(len(text), start + max_chars)
      if stop < len(text):
        cut = text.rfind(" ", start + 1, stop + 1)
        while cut > start and text[cut - 1] == " ":  # the start of that run of spaces
          cut -= 1
        stop = cut if cut > start else _next_word_boundary(text, stop)
      parts.append(np.asarray(self.encode(text[start:stop]), dtype=np.int32))
      start = stop
    return np.concatenate(parts)

  def _encode_with_marks(self, text: str) -> list[int]:
    """Encodes text containing literal U+2581 as the byte pieces of that character."""
    if self._mark_ids is None:
      return self._sp.encode(text)  # No byte fallback in this model: nothing better is possible.
    parts = text.split(_SPACE_MARK)
    ids: list[int] = []
    for j, part_ids in enumerate(self._sp.encode(parts)):
      if j:
        ids.extend(self._mark_ids)
      ids.extend(part_ids)
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ids; pad/bos/eos are dropped, ids outside the vocabulary are an error."""
    ids = _checked_ids(ids, self.vocab_size)
    return self._sp.decode([i for i in ids if i not in self._strip_ids])

  def id_to_piece(self, token_id: int) -> str:
    """The vocabulary piece of one id (for inspection)."""
    return self._sp.id_to_piece(int(token_id))

  def score(self, token_id: int) -> float:
    """The BPE merge score of one id (for inspection)."""
    return self._sp.get_score(int(token_id))


# Files of a Hugging Face checkpoint directory.
_HF_TOKENIZER_FILE = "tokenizer.json"
_SPM_TOKENIZER_FILE = "tokenizer.model"
_HF_TOKENIZER_CONFIG = "tokenizer_config.json"
_HF_MODEL_CONFIG = "config.json"
# Llama-3's original/tokenizer.model is a tiktoken rank file ("<base64 token> <rank>" lines).
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?\n")


def _read_json_config(path: pathlib.Path) -> dict[str, Any]:
  """A checkpoint's JSON config as a dict ({} if absent), with a clear error if invalid."""
  if not path.is_file():
    return {}
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from None
  if isinstance(config, dict):
    return config
  raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(config).__name__}")


class HFTokenizer:
  """A Hugging Face fast tokenizer (tokenizer.json) with its checkpoint's bos/eos/pad ids and bos/eos settings.

  eos and pad come from tokenizer_config.json, else config.json, beside tokenizer.json (a pad token explicitly null
  there means none); eos must resolve, as it separates documents. What a prompt gets around its text (add_bos,
  add_eos) is what tokenizer.json's post_processor adds (Llama-3's TemplateProcessing prepends bos; SmolLM2's and
  Qwen2's add nothing), each overridden by tokenizer_config.json's add_bos_token / add_eos_token when set (the rule
  of transformers 4's LlamaTokenizerFast and of llama.cpp's converter; transformers 5 ignores those two keys
  whenever a tokenizer.json exists, so it differs only where they contradict the post_processor). bos_id is the id
  prepended to a prompt, None when nothing is. Special-token strings inside a text encode as plain text, so
  documents cannot forge a separator and decode(encode(x)) == x whenever the tokenizer is lossless (byte-level
  BPE); encode_chat is the exception, for rendered chat templates.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"tokenizer file {str(self.path)!r} does not exist")
    data = self.path.read_bytes()  # Parse the bytes we hash, as Tokenizer does.
    try:
      self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 (the Rust side raises plain Exception on bad input)
      raise ValueError(f"{str(self.path)!r} is not a Hugging Face tokenizer.json: {e}") from None
    self._tok.encode_special_tokens = True
    self._tok.no_padding()  # A tokenizer.json may carry padding/truncation for its original use.
    self._tok.no_truncation()
    self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
    tok_config = _read_json_config(self.path.parent / _HF_TOKENIZER_CONFIG)
    model_config = _read_json_config(self.path.parent / _HF_MODEL_CONFIG)
    self.eos_id: int = self._special_id("eos", tok_config, model_config, required=True)
    self.pad_id: int | None = self._special_id("pad", tok_config, model_config)
    self.bos_id: int | None = None
    self.add_eos: bool = False
    self._resolve_added(tok_config, model_config)
    self._strip_ids = frozenset(i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None)
    self._chat_tok: tokenizers.Tokenizer | None = None  # encode_chat's copy, made on first use
    specials = json.dumps({"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id, "add_eos": self.add_eos,
                           "encode_special_tokens": True}, sort_keys=True)
    # Covers the resolved special ids too, so editing the config files re-keys corpus caches.
    self.sha256: str = hashlib.sha256(data + b"\0" + specials.encode()).hexdigest()

  def _resolve_added(self, tok_config: dict[str, Any], model_config: dict[str, Any]) -> None:
    """Sets bos_id / add_eos: what the post_processor adds around a text, then tokenizer_config's overrides."""
    probe = self._tok.encode("a", add_special_tokens=True)
    mask = probe.special_tokens_mask
    if all(mask):
      raise ValueError(f"{str(self.path)!r}: cannot tell what its post_processor adds (the text 'a' encodes to "
                       f"no tokens of its own: {probe.ids})")
    first, last = mask.index(0), len(mask) - mask[::-1].index(0)
    prefix, suffix = probe.ids[:first], probe.ids[last:]
    where = self.path.parent / _HF_TOKENIZER_CONFIG
    for kind in ("bos", "eos"):
      flag = tok_config.get(f"add_{kind}_token")
      if flag is None:
        continue
      if not isinstance(flag, bool):
        raise ValueError(f"{str(where)!r}: add_{kind}_token must be true or false, got {flag!r}")
      token_id = self.eos_id if kind == "eos" else self._special_id("bos", tok_config, model_config)
      added = [token_id] if flag and token_id is not None else []  # no such token: nothing to add (transformers)
      prefix, suffix = (added, suffix) if kind == "bos" else (prefix, added)
    if len(prefix) > 1 or suffix not in ([], [self.eos_id]):
      raise ValueError(f"{str(self.path)!r}: its post_processor adds {prefix} before a text and {suffix} after it; "
                       f"maxlm supports at most one token before and eos ({self.eos_id}) after")
    self.bos_id = prefix[0] if prefix else None
    self.add_eos = bool(suffix)

  @property
  def add_bos(self) -> bool:
    """Whether a prompt (and so a document) starts with bos."""
    return self.bos_id is not None

  def _special_id(self, kind: str, tok_config: dict[str, Any], model_config: dict[str, Any],
                  *, required: bool = False) -> int | None:
    """The id of the bos/eos/pad token named by tokenizer_config.json, else by config.json."""
    key = f"{kind}_token"
    where = self.path.parent / _HF_TOKENIZER_CONFIG
    if key in tok_config:
      token = tok_config[key]
      if isinstance(token, dict):  # {"content": "<s>", "lstrip": false, ...}
        token = token.get("content")
      if token is not None:
        if not isinstance(token, str):
          raise ValueError(f"{str(where)!r}: {key} must be a string or {{'content': ...}}, "
                           f"got {token!r}")
        token_id = self._tok.token_to_id(token)
        if token_id is None:
          raise ValueError(f"{str(where)!r}: {key} {token!r} is not in the vocabulary of "
                           f"{str(self.path)!r}")
        return token_id
      if not required:
        return None  # Explicitly none (Qwen2's bos_token: null); config.json's id is a leftover.
    where = self.path.parent / _HF_MODEL_CONFIG
    token_id = model_config.get(f"{kind}_token_id")
    if isinstance(token_id, list):  # Several stop ids (Llama-3 instruct): the first is the eos.
      token_id = token_id[0] if token_id else None
    if token_id is None:
      if required:
        raise ValueError(
            f"tokenizer {str(self.path)!r} has no {kind} token: set {key} in "
            f"{_HF_TOKENIZER_CONFIG} or {kind}_token_id in {_HF_MODEL_CONFIG} beside it "
            "(documents are separated by eos)")
      return None
    if isinstance(token_id, bool) or not isinstance(token_id, int) or not (
        0 <= token_id < self.vocab_size):
      raise ValueError(f"{str(where)!r}: {kind}_token_id {token_id!r} is not an id in the "
                       f"tokenizer vocabulary [0, {self.vocab_size})")
    return token_id

  def __repr__(self) -> str:
    return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

  def encode(self, text: str) -> list[int]:
    """Token ids of text, without bos/eos (add_special_tokens=False)."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_chat(self, text: str) -> list[int]:
    """Token ids of a rendered chat template: special-token strings in it are their tokens, and nothing is added
    (as transformers' tokenizer(text, add_special_tokens=False), which apply_chat_template(tokenize=True) uses)."""
    return self._chat_encoding(text).ids

  def encode_chat_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """encode_chat's ids and each token's [start, end) character offsets in text (what transformers maps
    return_assistant_tokens_mask's character spans to tokens with)."""
    encoding = self._chat_encoding(text)
    return encoding.ids, encoding.offsets

  def _chat_encoding(self, text: str) -> tokenizers.Encoding:
    """The tokenizers Encoding of a rendered chat (special-token strings as their tokens, nothing added)."""
    if self._chat_tok is None:
      chat_tok = tokenizers.Tokenizer.from_str(self._tok.to_str())
      chat_tok.encode_special_tokens = False
      self._chat_tok = chat_tok
    return self._chat_tok.encode(text, add_special_tokens=False)

  def special_token_strings(self) -> dict[int, str]:
    """{id: string} of the vocabulary's special added tokens (control tokens such as <|im_end|>)."""
    return {i: t.content for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

  def with_eos(self, eos_id: int) -> HFTokenizer:
    """A copy whose eos (where generation stops) is eos_id: a chat stops at its end-of-turn token."""
    if not 0 <= eos_id < self.vocab_size:
      raise ValueError(f"eos id {eos_id} is outside the tokenizer vocabulary [0, {self.vocab_size})")
    other = copy.copy(self)
    other.eos_id = eos_id
    other._strip_ids = self._strip_ids | {eos_id}
    return other

  def encode_array(self, text: str, max_chars: int = ENCODE_PIECE_CHARS) -> np.ndarray:
    """int32 ids of text, as encode(text) (always whole: a tokenizer.json's pre-tokenizer may merge anywhere)."""
    del max_chars
    return np.asarray(self.encode(text), dtype=np.int32)

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    """Token ids of many texts, on the tokenizers thread pool (num_threads=1: sequentially)."""
    texts = list(texts)
    if num_threads == 1:
      return [self.encode(t) for t in texts]
    return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ids; special tokens are dropped, ids outside the vocabulary are an error."""
    ids = _checked_ids(ids, self.vocab_size)
    return self._tok.decode([i for i in ids if i not in self._strip_ids],
                            skip_special_tokens=True)

  def id_to_piece(self, token_id: int) -> str:
    """The vocabulary piece of one id (for inspection)."""
    piece = self._tok.id_to_token(int(token_id))
    if piece is None:
      raise ValueError(f"token id {token_id} is not in the vocabulary of {str(self.path)!r}")
    return piece


AnyTokenizer = Tokenizer | HFTokenizer


def bos_prefix(tokenizer: AnyTokenizer) -> list[int]:
  """[bos] if the tokenizer starts a text with bos, else [] (SmolLM2, Qwen2): what every prompt and document
  starts with."""
  return [] if tokenizer.bos_id is None else [tokenizer.bos_id]


def encode_prompt(tokenizer: AnyTokenizer, text: str) -> list[int]:
  """Token ids of a prompt as the model's own tokenizer gives them (transformers' tokenizer(text)["input_ids"]):
  bos if the tokenizer adds it, the text's ids, eos if it adds that (a tokenizer without add_eos adds none)."""
  eos = [tokenizer.eos_id] if getattr(tokenizer, "add_eos", False) else []
  return bos_prefix(tokenizer) + list(tokenizer.encode(text)) + eos


def vocabulary_difference(a: AnyTokenizer, b: AnyTokenizer) -> str | None:
  """Where two tokenizers' vocabularies first differ (size, else the lowest id whose pieces differ); None if equal.

  Piece by piece, because two different tokenizers can encode a sample sentence alike and still differ elsewhere.
  """
  if a.vocab_size != b.vocab_size:
    return f"{a.vocab_size} vs {b.vocab_size} tokens"
  for i in range(a.vocab_size):
    pa, pb = a.id_to_piece(i), b.id_to_piece(i)
    if pa != pb:
      return f"id {i} is {pa!r} vs {pb!r}"
  return None


def same_vocabulary(a: AnyTokenizer, b: AnyTokenizer) -> bool:
  """Equal vocabularies: the same size and the same piece under every id (token ids mean the same text)."""
  return vocabulary_difference(a, b) is None


def _looks_like_tiktoken(path: pathlib.Path) -> bool:
  """Whether a file starts like a tiktoken rank file rather than a sentencepiece proto."""
  with path.open("rb") as f:
    return bool(_TIKTOKEN_LINE.fullmatch(f.readline(4096)))


def load_tokenizer(path: str | os.PathLike) -> AnyTokenizer:
  """Loads a sentencepiece .model, an HF tokenizer.json, or a directory of either (json first)."""
  path = pathlib.Path(path)
  if path.is_dir():
    if (path / _HF_TOKENIZER_FILE).is_file():
      return HFTokenizer(path / _HF_TOKENIZER_FILE)
    if not (path / _SPM_TOKENIZER_FILE).is_file():
      raise FileNotFoundError(f"tokenizer directory {str(path)!r} holds neither "
                              f"{_HF_TOKENIZER_FILE} nor {_SPM_TOKENIZER_FILE}")
    path = path / _SPM_TOKENIZER_FILE
  elif path.suffix == ".json":
    return HFTokenizer(path)
  try:
    return Tokenizer(path)
  except ValueError as e:
    if _looks_like_tiktoken(path):
      raise ValueError(f"{e}; it looks like a tiktoken BPE file (as in Llama-3's original/): "
                       f"load the checkpoint's {_HF_TOKENIZER_FILE} instead") from None
    raise


def _line_pieces(text: str, max_chars: int) -> Iterator[str]:
  """text's lines with their ends (as str.splitlines(keepends=True)), a line longer than max_chars cut into pieces
  of at most max_chars (before a space where there is one), without copying the whole text."""
  pos, end = 0, len(text)
  while pos < end:
    stop = min(end, pos + max_chars)
    m = _LINE_BREAK.search(text, pos, stop)
    if m and m.end() == stop < end and text[m.start():stop + 1] == "\r\n":  # a "\r\n" that the window cut
      stop = m.start() if m.start() > pos else stop + 1
    elif m:
      stop = m.end()
    elif stop < end:
      space = text.rfind(" ", pos + max_chars // 2, stop)
      stop = space if space > pos else stop  # the next piece starts with " word", as the word does in the line
    yield text[pos:stop]
    pos = stop


def _training_sentences(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
  """The trainer's sample: groups of whole lines (newlines kept) of up to _TRAIN_SENTENCE_BYTES, max_bytes in all.

  A line longer than _TRAIN_SENTENCE_BYTES characters is cut into pieces of that many (at most 4 bytes each, so
  within the trainer's max_sentence_length) rather than cut short, so a document of one giant line is sampled
  like any other. No document gives more than a quarter of max_bytes: one giant document cannot fill the sample.
  """
  budget = max_bytes
  for text in texts:
    buf, buf_bytes = [], 0
    doc_budget = min(budget, max(1, max_bytes // 4))
    for piece in _line_pieces(text, _TRAIN_SENTENCE_BYTES):
      piece = piece.replace(_SPACE_MARK, " ")
      n = len(piece.encode("utf-8"))
      if buf and buf_bytes + n > _TRAIN_SENTENCE_BYTES:
        yield "".join(buf)
        buf, buf_bytes = [], 0
      buf.append(piece)
      buf_bytes += n
      budget -= n
      doc_budget -= n
      if doc_budget <= 0:
        break
    if buf:
      yield "".join(buf)
    if budget <= 0:
      return


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_prefix: str | os.PathLike,
                    *, max_train_bytes: int = _DEFAULT_MAX_TRAIN_BYTES) -> Tokenizer:
  """Trains an exactly-round-tripping BPE on texts and writes <model_prefix>.model atomically.

  Identity normalisation, no whitespace folding, no dummy prefix, byte fallback and
  whitespace-only pieces make decode(encode(x)) == x for any string (code indentation included).
  The same texts give a byte-identical model on any machine, so racing processes agree.
  """
  if vocab_size < MIN_TRAINED_VOCAB:
    raise ValueError(f"vocab_size {vocab_size} is too small: byte fallback needs 256 byte pieces "
                     f"plus 4 specials, so at least {MIN_TRAINED_VOCAB}")
  model = io.BytesIO()
  failure: list[Exception] = []  # an error of the texts' own iterator (a bad input record), raised as it was
  sentences_seen = 0

  def sentences() -> Iterator[str]:
    nonlocal sentences_seen
    try:
      for sentence in _training_sentences(texts, max_train_bytes):
        sentences_seen += 1
        yield sentence
    except Exception as e:  # noqa: BLE001 (re-raised below, not swallowed)
      failure.append(e)
      raise

  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_writer=model,  # In memory: no temp prefix path is baked into the model.
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9995,  # Rarer characters use byte pieces, not vocabulary slots.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=_TRAIN_SENTENCE_BYTES * 4,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        # Recorded in the model, so fixed rather than os.cpu_count(): identical bytes everywhere.
        num_threads=_TRAIN_THREADS,
        minloglevel=2,
    )
  except RuntimeError as e:
    if failure:
      raise failure[0] from None
    if not sentences_seen:
      raise ValueError("no text to train a tokenizer on (every input document is empty)") from None
    raise ValueError(
        f"sentencepiece could not train a {vocab_size}-piece tokenizer: {e}") from None
  path = pathlib.Path(f"{model_prefix}.model")
  atomic_write(path, model.getvalue())
  tokenizer = Tokenizer(path)
  # A human-readable "piece<TAB>score" listing, with control characters escaped as \xNN.
  escape = {c: f"\\x{c:02x}" for c in [*range(32), 0x5C, 0x7F, 0x85, 0x2028, 0x2029]}
  vocab = "".join(f"{tokenizer.id_to_piece(i).translate(escape)}\t{tokenizer.score(i):g}\n"
                  for i in range(tokenizer.vocab_size))
  atomic_write(pathlib.Path(f"{model_prefix}.vocab"), vocab.encode("utf-8"))
  return tokenizer
