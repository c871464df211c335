"""A checkpoint's chat template (Jinja), found among its tokenizer files and rendered as transformers renders it.

Where it is (transformers' order): chat_template.jinja beside the tokenizer (additional_chat_templates/NAME.jinja
adding named ones), else tokenizer_config.json's chat_template: a string, or a list of {"name": ..., "template": ...}.
Rendering follows transformers' apply_chat_template: jinja2's immutable sandbox with trim_blocks, lstrip_blocks and
loop controls; a tojson filter that does not escape HTML; raise_exception, strftime_now and restricted dict and
namespace globals; `{% generation %}` blocks rendered as their body (render_generation_spans also gives where each
block's text is, as transformers' return_assistant_tokens_mask tracks them); the variables messages (keys whose
value is None dropped), add_generation_prompt, tools, documents and tokenizer_config.json's named special tokens
(bos_token, eos_token, ...). The rendered text is encoded with its special tokens and nothing added
(HFTokenizer.encode_chat), as apply_chat_template(tokenize=True) does.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from data_pipelines.tokenizer import HFTokenizer

Message = dict[str, Any]

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
_TOKENIZER_CONFIG = "tokenizer_config.json"
_SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# The named special tokens transformers passes to a template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # one message's reasoning, under each name
_SENTINEL = "MAXLM-END-OF-TURN-PROBE-7f3a"  # an assistant message whose end end_of_turn_id looks at
# A `{% generation %}` tag, as transformers looks for one before tracking assistant text.
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# While render_generation_spans renders: (the text yielded so far, the generation blocks' [start, end) offsets).
_TRACKING: contextvars.ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = contextvars.ContextVar(
    "maxlm_generation_tracking", default=None)


class ChatTemplateError(ValueError):
  """A chat template that is missing, unreadable or fails to render; the message names the template and problem."""


class _GenerationBlock(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): renders its body."""

  tags = {"generation"}  # noqa: RUF012 (jinja2's class attribute)

  def parse(self, parser: Any) -> jinja2.nodes.Node:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller: Any) -> str:
    body = caller()
    tracking = _TRACKING.get()
    if tracking is not None:  # render_generation_spans: the block starts after all the text yielded so far
      rendered, spans = tracking
      start = sum(len(piece) for piece in rendered)
      spans.append((start, start + len(body)))
    return body


def _raise_exception(message: str) -> None:
  raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


class _Dict:
  """The template's `dict`: builds plain dicts, and nothing else of the dict type is reachable."""

  def __call__(self, *args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)

  def fromkeys(self, *args: Any) -> dict:
    return dict.fromkeys(*args)


class _Namespace(jinja2.utils.Namespace):
  """The template's `namespace`, refusing underscore-prefixed attribute names (no way to CPython internals)."""

  def __init__(*args: Any, **kwargs: Any):  # noqa: N805 (jinja2's signature trick: namespace(self=...) works)
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name: str, value: Any) -> None:
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"a chat template cannot set the namespace attribute {name!r}")


@functools.cache
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
  """The sandbox templates render in: transformers' settings, filters and globals."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                     namespace=_Namespace)
  return env


@functools.lru_cache(maxsize=16)
def _compiled(source: str) -> jinja2.Template:
  return _environment().from_string(source)


def _read_text(path: pathlib.Path) -> str:
  try:
    return path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise ChatTemplateError(f"cannot read the chat template {str(path)!r}: {e}") from None


def _read_config(path: pathlib.Path) -> dict[str, Any]:
  """A JSON object file as a dict ({} if absent); invalid JSON is a ChatTemplateError naming the file."""
  if not path.is_file():
    return {}
  try:
    config = json.loads(_read_text(path))
  except json.JSONDecodeError as e:
    raise ChatTemplateError(f"{str(path)!r} is not valid JSON: {e}") from None
  if not isinstance(config, dict):
    raise ChatTemplateError(f"{str(path)!r} must hold a JSON object, got {type(config).__name__}")
  return config


def _token_string(value: Any) -> str | None:
  """A special token's text: a string, or an AddedToken-style {"content": ...}."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _special_tokens(directory: pathlib.Path, config: dict[str, Any]) -> dict[str, str]:
  """The named special tokens a template sees: tokenizer_config.json's, overridden by a legacy special_tokens_map.json
  where transformers reads that (a config without added_tokens_decoder)."""
  values = {name: config.get(name) for name in SPECIAL_TOKEN_NAMES}
  if "added_tokens_decoder" not in config:
    legacy = _read_config(directory / _SPECIAL_TOKENS_MAP)
    values.update({name: legacy[name] for name in SPECIAL_TOKEN_NAMES if name in legacy})
  return {name: text for name, value in values.items() if (text := _token_string(value)) is not None}


def _plain(value: Any) -> Any:
  """value as plain JSON-like data (what a sandboxed template may see); anything else is a ChatTemplateError."""
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, Mapping):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_plain(v) for v in value]
  if isinstance(value, tuple):
    return tuple(_plain(v) for v in value)
  raise ChatTemplateError(f"a chat message holds a {type(value).__name__}; only JSON-like data can be rendered")


def _messages(messages: Sequence[Message]) -> list[Message]:
  """Messages as apply_chat_template passes them: plain dicts, None values dropped, reasoning under each name."""
  if not messages:
    raise ChatTemplateError("cannot render a chat of no messages")
  out = []
  for message in messages:
    if not isinstance(message, Mapping):
      raise ChatTemplateError(f"a chat message must be a dict with role and content, got {message!r}")
    message = {k: v for k, v in _plain(message).items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
    if reasoning is not None:
      message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    out.append(message)
  return out


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """One chat template: its Jinja source, where it came from (for messages) and the special tokens it sees."""

  source: str
  where: str
  special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)

  @property
  def has_generation_blocks(self) -> bool:
    """Whether the template marks assistant text with `{% generation %}` blocks (transformers' test for it)."""
    return _GENERATION_TAG.search(self.source) is not None

  def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False,
             tools: Sequence[Message] | None = None, documents: Sequence[Message] | None = None,
             **variables: Any) -> str:
    """The chat as text, as transformers' apply_chat_template(messages, tokenize=False, ...) gives it."""
    return self._render(messages, add_generation_prompt, tools, documents, variables, None)

  def render_generation_spans(self, messages: Sequence[Message], *, add_generation_prompt: bool = False,
                              tools: Sequence[Message] | None = None, documents: Sequence[Message] | None = None,
                              **variables: Any) -> tuple[str, list[tuple[int, int]]]:
    """The chat as render gives it and the [start, end) character offsets of each `{% generation %}` block's text in
    it, in order: transformers' tracking for apply_chat_template(..., return_assistant_tokens_mask=True)."""
    spans: list[tuple[int, int]] = []
    text = self._render(messages, add_generation_prompt, tools, documents, variables, spans)
    return text, spans

  def _render(self, messages: Sequence[Message], add_generation_prompt: bool, tools: Sequence[Message] | None,
              documents: Sequence[Message] | None, variables: dict[str, Any],
              spans: list[tuple[int, int]] | None) -> str:
    """The rendered chat; with spans, rendered piece by piece (jinja's generate) recording generation blocks."""
    try:
      template = _compiled(self.source)
    except jinja2.TemplateSyntaxError as e:
      raise ChatTemplateError(f"the chat template of {self.where} is not valid Jinja (line {e.lineno}): "
                              f"{e.message}") from None
    context = {**self.special_tokens, **_plain(variables)}
    kwargs = dict(messages=_messages(messages), tools=_plain(tools), documents=_plain(documents),
                  add_generation_prompt=add_generation_prompt, **context)
    try:
      if spans is None:
        return template.render(**kwargs)
      rendered: list[str] = []
      token = _TRACKING.set((rendered, spans))
      try:
        rendered.extend(template.generate(**kwargs))
      finally:
        _TRACKING.reset(token)
      return "".join(rendered)
    except ChatTemplateError:
      raise
    except jinja2.TemplateError as e:
      raise ChatTemplateError(f"the chat template of {self.where} failed: {e}") from None
    except Exception as e:  # noqa: BLE001 (a template is a program: any error of it is the template's)
      raise ChatTemplateError(f"the chat template of {self.where} failed: {type(e).__name__}: {e}") from None


def _named_templates(directory: pathlib.Path, config: dict[str, Any]) -> tuple[dict[str, str], str]:
  """{name: source} of a tokenizer directory's templates ("default" for an unnamed one) and where they are."""
  extra = sorted((directory / TEMPLATE_DIR).glob("*.jinja")) if (directory / TEMPLATE_DIR).is_dir() else []
  if (directory / TEMPLATE_FILE).is_file() or extra:
    found = {p.stem: _read_text(p) for p in extra}
    if (directory / TEMPLATE_FILE).is_file():
      found["default"] = _read_text(directory / TEMPLATE_FILE)
    return found, str(directory / (TEMPLATE_FILE if "default" in found else TEMPLATE_DIR))
  where = str(directory / _TOKENIZER_CONFIG)
  value = config.get("chat_template")
  if value is None:
    return {}, where
  if isinstance(value, str):
    return {"default": value}, where
  if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                     and isinstance(t.get("template"), str) for t in value):
    return {t["name"]: t["template"] for t in value}, where
  raise ChatTemplateError(f"{where}: chat_template must be a string or a list of {{'name': ..., 'template': ...}}")


def load_chat_template(tokenizer_dir: str | os.PathLike, name: str | None = None, *,
                       tools: bool = False) -> ChatTemplate:
  """The chat template of a tokenizer directory: `name`'s, else "tool_use" when tools are given, else the default."""
  directory = pathlib.Path(tokenizer_dir)
  config = _read_config(directory / _TOKENIZER_CONFIG)
  found, where = _named_templates(directory, config)
  if not found:
    raise ChatTemplateError(f"{str(directory)!r} has no chat template (neither {TEMPLATE_FILE} nor a chat_template "
                            f"in {_TOKENIZER_CONFIG}): the model may not be a chat model")
  if name is None:
    name = "tool_use" if tools and "tool_use" in found else "default"
  if name not in found:
    raise ChatTemplateError(f"{where} has no chat template named {name!r} (it has {', '.join(sorted(found))})")
  label = where if len(found) == 1 else f"{where} ({name!r})"
  return ChatTemplate(found[name], label, _special_tokens(directory, config))


def special_tokens_of(tokenizer_dir: str | os.PathLike) -> dict[str, str]:
  """The named special tokens of a tokenizer directory ({"bos_token": "<s>", ...}): what transformers' tokenizer
  reports as bos_token, eos_token, ... (tokenizer_config.json, else a legacy special_tokens_map.json)."""
  directory = pathlib.Path(tokenizer_dir)
  return _special_tokens(directory, _read_config(directory / _TOKENIZER_CONFIG))


def chat_messages(question: str, system: str | None = None) -> list[Message]:
  """A one-question chat: an optional system message, then the user's question."""
  system_message = [] if system is None else [{"role": "system", "content": system}]
  return [*system_message, {"role": "user", "content": question}]


def _hf_tokenizer(tokenizer: Any) -> HFTokenizer:
  if not isinstance(tokenizer, HFTokenizer):
    raise ChatTemplateError(f"chat needs a Hugging Face tokenizer (tokenizer.json with its special tokens); "
                            f"{tokenizer!r} is not one")
  return tokenizer


def template_of(tokenizer: Any, name: str | None = None) -> ChatTemplate:
  """The chat template beside a tokenizer's tokenizer.json."""
  return load_chat_template(_hf_tokenizer(tokenizer).path.parent, name)


def chat_prompt_ids(tokenizer: Any, template: ChatTemplate, messages: Sequence[Message]) -> list[int]:
  """Token ids of the chat rendered with a generation prompt: what the model answers from (no bos added beyond the
  template's own, as apply_chat_template(..., add_generation_prompt=True, tokenize=True))."""
  return _hf_tokenizer(tokenizer).encode_chat(template.render(messages, add_generation_prompt=True))


def end_of_turn_id(tokenizer: Any, template: ChatTemplate) -> int | None:
  """The special token the template puts right after an assistant's message (<|im_end|>, <|eot_id|>, eos, ...):
  where an answer ends. None if the template renders no special token there (or cannot render such a chat)."""
  tokenizer = _hf_tokenizer(tokenizer)
  try:
    text = template.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}])
  except ChatTemplateError:
    return None
  at = text.find(_SENTINEL)
  if at < 0:
    return None
  ids = tokenizer.encode_chat(text[at + len(_SENTINEL):].lstrip())
  return ids[0] if ids and ids[0] in tokenizer.special_token_strings() else None
