"""Supervised fine-tuning samples (TRL's dataset formats) as token ids and the mask of tokens trained on.

One JSON object a line, in one of TRL's SFT formats (other keys, such as ids or metadata, are ignored):
- {"messages": [{"role": ..., "content": ...}, ...]}: conversational language modelling. The chat template renders
  the conversation (with the record's "tools", if any), encoded as apply_chat_template(tokenize=True) encodes it;
  trained on assistant text only (TRL's assistant_only_loss).
- {"prompt": ..., "completion": ...}: both strings (standard): [bos if the tokenizer adds it] + prompt + completion
  + eos, each piece encoded on its own and eos always appended as TRL appends it; trained on the completion and the
  eos (TRL's completion_only_loss). Or both message lists (conversational): prompt + completion rendered, trained on
  the completion's assistant text (TRL's completion_only_loss and assistant_only_loss together).
- {"text": ...}: plain language modelling: [bos?] + text + eos, every token trained.

Assistant text is found as transformers finds it for apply_chat_template(..., return_assistant_tokens_mask=True): the
text of the template's `{% generation %}` blocks, and a token is trained on when its character offsets overlap that
text. A template without such blocks (most stock ones, SmolLM2's among them, for which transformers and TRL give an
empty mask) is rendered incrementally instead: assistant message i's text runs from the end of messages[:i] rendered
with the generation prompt to the end of messages[:i + 1] rendered, less trailing whitespace (so "<|im_end|>" is
trained on, the newline after it not). mask[0] is always False: the first token is predicted from nothing.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.chat_template import ChatTemplate, ChatTemplateError

Spans = list[tuple[int, int]]


class SFTDataError(ValueError):
  """A bad SFT sample or file: the message names where (file:line) and what is wrong."""


@dataclasses.dataclass
class SFTExample:
  """One encoded sample: its token ids and where they are trained on."""

  tokens: np.ndarray  # int32 [n]
  mask: np.ndarray  # bool [n]: True where the token is trained on (its prediction from the tokens before it counts)

  def __post_init__(self):
    self.tokens = np.asarray(self.tokens, dtype=np.int32)
    self.mask = np.asarray(self.mask, dtype=bool)
    if self.tokens.ndim != 1 or self.mask.shape != self.tokens.shape:
      raise ValueError(f"an SFT example needs 1-D tokens and a mask of the same shape, got {self.tokens.shape} "
                       f"tokens and a {self.mask.shape} mask")


def _check_messages(value: Any, key: str) -> list[dict]:
  """value as a non-empty list of {"role": str, "content": str | list, ...} messages (content may be absent or null
  in a message with tool_calls); anything else is an SFTDataError naming the key."""
  if not isinstance(value, list) or not value:
    got = "an empty list" if isinstance(value, list) else f"a {type(value).__name__}"
    raise SFTDataError(f"{key!r} must be a non-empty list of messages, got {got}")
  for j, message in enumerate(value):
    if not isinstance(message, dict):
      raise SFTDataError(f"{key}[{j}] must be an object with role and content, got a {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str) or not role:
      raise SFTDataError(f"{key}[{j}] must have a role (a non-empty string), got {role!r}")
    content = message.get("content")
    if not isinstance(content, (str, list)) and not (content is None and message.get("tool_calls")):
      raise SFTDataError(f"{key}[{j}] ({role}) must have a content string (or list of parts), got "
                         f"{'none' if content is None else f'a {type(content).__name__}'}")
  return value


def _incremental_spans(template: ChatTemplate, messages: list[dict], text: str, tools: Any) -> Spans:
  """Assistant spans of a template without generation blocks, from renderings of growing prefixes of the chat."""
  spans = []
  for i, message in enumerate(messages):
    if message.get("role") != "assistant":
      continue
    if i == 0:
      raise SFTDataError("the conversation starts with an assistant message; without {% generation %} blocks in the "
                         "chat template, where its text starts is only known after a message before it")
    prefix = template.render(messages[:i], add_generation_prompt=True, tools=tools)
    turn = template.render(messages[:i + 1], tools=tools)
    if not turn.startswith(prefix) or not text.startswith(turn):
      what = ("messages[:i] rendered with the generation prompt is not the start of messages[:i + 1] rendered"
              if not turn.startswith(prefix) else "messages[:i + 1] rendered is not the start of the whole chat")
      raise SFTDataError(f"the chat template does not render conversations incrementally (at message {i}, {what}), "
                         f"so its assistant text cannot be found; mark it with {{% generation %}} blocks")
    start = len(prefix)
    spans.append((start, max(start, len(turn.rstrip()))))
  return spans


def assistant_char_spans(template: ChatTemplate, messages: list[dict],
                         tools: Sequence[dict] | None = None) -> tuple[str, Spans]:
  """The rendered chat and the [start, end) character spans of its assistant text, in order: the template's
  `{% generation %}` blocks where it has them, else each assistant message's text from incremental renderings."""
  if template.has_generation_blocks:
    return template.render_generation_spans(messages, tools=tools)
  text = template.render(messages, tools=tools)
  return text, _incremental_spans(template, messages, text, tools)


def _token_mask(offsets: Sequence[tuple[int, int]], spans: Spans) -> np.ndarray:
  """Tokens whose [start, end) character offsets overlap a span (spans in order), as transformers maps
  return_assistant_tokens_mask's spans to tokens: one pass over both."""
  mask = np.zeros(len(offsets), dtype=bool)
  k = 0
  for i, (start, end) in enumerate(offsets):
    while k < len(spans) and start >= spans[k][1]:
      k += 1
    if k == len(spans):
      break
    mask[i] = end > spans[k][0]
  return mask


def _conversation(record: dict, tokenizer: Any, template: ChatTemplate | None, prompt: list[dict] | None,
                  messages: list[dict]) -> tuple[list[int], np.ndarray]:
  """Tokens and assistant mask of a chat; with a prompt (its first messages), only text after the prompt counts."""
  if template is None:
    raise SFTDataError("a conversational sample needs a chat template, and the tokenizer has no chat template")
  if not hasattr(tokenizer, "encode_chat_offsets"):
    raise SFTDataError(f"a conversational sample needs a Hugging Face tokenizer (tokenizer.json); {tokenizer!r} is "
                       f"not one")
  tools = record.get("tools")
  if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
    raise SFTDataError(f"'tools' must be a list of objects, got {type(tools).__name__}")
  text, spans = assistant_char_spans(template, messages, tools)
  if prompt is not None:  # TRL's completion mask (after the prompt rendered with its generation prompt) times this
    head = template.render(prompt, add_generation_prompt=True, tools=tools)
    if not text.startswith(head):
      raise SFTDataError("the chat template does not render the prompt (with its generation prompt) as the start of "
                         "prompt + completion, so where the completion starts is unknown")
    spans = [(max(start, len(head)), end) for start, end in spans if end > len(head)]
  ids, offsets = tokenizer.encode_chat_offsets(text)
  return ids, _token_mask(offsets, spans)


def _string(record: dict, key: str) -> str:
  value = record[key]
  if not isinstance(value, str):
    raise SFTDataError(f"{key!r} must be a string, got a {type(value).__name__}")
  return value


def _encode(record: Any, tokenizer: Any, template: ChatTemplate | None) -> SFTExample:
  """encode_sample without the location in its errors."""
  if not isinstance(record, dict):
    raise SFTDataError(f"a sample must be a JSON object, got a {type(record).__name__}")
  formats = [name for name, keys in (("messages", ("messages",)), ("prompt/completion", ("prompt", "completion")),
                                     ("text", ("text",))) if any(k in record for k in keys)]
  if not formats:
    raise SFTDataError(f"no 'messages', 'prompt' + 'completion' or 'text' key (TRL's SFT formats); keys: "
                       f"{sorted(record)}")
  if len(formats) > 1:
    raise SFTDataError(f"mixes the {' and '.join(formats)} formats; a sample has one")
  bos = [tokenizer.bos_id] if tokenizer.add_bos else []
  if formats == ["messages"]:
    ids, mask = _conversation(record, tokenizer, template, None, _check_messages(record["messages"], "messages"))
  elif formats == ["text"]:
    text = _string(record, "text")
    if not text:
      raise SFTDataError("'text' is empty")
    ids = [*bos, *tokenizer.encode(text), tokenizer.eos_id]
    mask = np.ones(len(ids), dtype=bool)
  else:
    missing = [k for k in ("prompt", "completion") if k not in record]
    if missing:
      raise SFTDataError(f"a prompt/completion sample without {missing[0]!r} (prompt-only samples are not for SFT)")
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):
      prompt = _check_messages(prompt, "prompt")
      ids, mask = _conversation(record, tokenizer, template, prompt,
                                prompt + _check_messages(completion, "completion"))
    else:
      prompt, completion = _string(record, "prompt"), _string(record, "completion")
      if not completion:
        raise SFTDataError("'completion' is empty")
      head = [*bos, *tokenizer.encode(prompt)]
      ids = [*head, *tokenizer.encode(completion), tokenizer.eos_id]
      mask = np.arange(len(ids)) >= len(head)
  mask[:1] = False  # the first token is predicted from nothing
  if not mask.any():
    raise SFTDataError("no token to train on (no assistant text: no assistant message, or the chat template renders "
                       "none)")
  return SFTExample(np.asarray(ids, dtype=np.int32), mask)


def encode_sample(record: dict, tokenizer: Any, template: ChatTemplate | None, where: str) -> SFTExample:
  """One sample (messages, prompt/completion or text) as tokens and the mask of those trained on; a bad sample is an
  SFTDataError naming `where` and the problem."""
  try:
    return _encode(record, tokenizer, template)
  except (SFTDataError, ChatTemplateError) as e:
    raise SFTDataError(f"{where}: {e}") from None


def jsonl_records(paths: Sequence[str | Path] | str | Path) -> Iterator[tuple[str, Any]]:
  """(file:line, record) of every non-blank line of JSON-lines files, in file then line order; an unreadable file,
  a line that is not UTF-8 or not JSON is an SFTDataError naming it."""
  if isinstance(paths, (str, Path)):
    paths = [paths]
  for path in paths:
    try:
      with open(path, "rb") as f:
        lines = list(f)
    except OSError as e:
      raise SFTDataError(f"cannot read the file {str(path)!r}: {e.strerror or e}") from None
    for lineno, raw in enumerate(lines, start=1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError:
        raise SFTDataError(f"{where}: not UTF-8 text") from None
      if not line.strip():
        continue
      try:
        yield where, json.loads(line)
      except json.JSONDecodeError as e:
        raise SFTDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def load_sft_jsonl(paths: Sequence[str | Path], tokenizer: Any, template: ChatTemplate | None) -> list[SFTExample]:
  """Every sample of JSON-lines files, in file then line order (blank lines skipped); the first bad line is an
  SFTDataError naming file:line."""
  examples = [encode_sample(record, tokenizer, template, where) for where, record in jsonl_records(paths)]
  if not examples:
    names = [paths] if isinstance(paths, (str, Path)) else paths
    raise SFTDataError(f"no SFT samples in {', '.join(map(str, names)) or 'no files'}")
  return examples
