"""What the HTTP API accepts and answers: the completions body (read, parsed and validated without a 500 whatever
the bytes), OpenAI-style errors, and the OpenAPI description of each route (maxlm/serve/server.py serves them).

`parse_body` reads at most MAX_BODY_BYTES (413 beyond; 408 if the body stalls for BODY_TIMEOUT_S) of strict UTF-8
JSON (CESU-8 surrogate bytes are not UTF-8), nested at most MAX_JSON_DEPTH deep (checked before parsing, which
recurses: 1,000 levels overflow Python's stack), with no lone surrogate in any string (a "\\ud800" escape is not
Unicode text: tokenizers cannot encode it), then validates it strictly into CompletionBody; each failure is a 400
naming the field or the limit.

The server parses the body itself (any content type), so FastAPI cannot derive its schema: `completion_body_schema`
states it per engine (vocabulary, context, model name), tightly enough that a schema-valid body is accepted unless
the prompt and max_tokens together overflow the context (a rule across fields that JSON Schema cannot state; that
400 has code "context_length_exceeded").
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Literal

import numpy as np
from fastapi import Request as HttpRequest
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, ValidationError

from maxlm.serve.request import MAX_LOGIT_BIAS

MAX_BODY_BYTES = 4 * 2**20  # a longer body is refused (413) without reading the rest
BODY_TIMEOUT_S = 30.0  # a client that sends nothing more of an unfinished body for this long is answered 408
MAX_JSON_DEPTH = 16  # arrays / objects nested deeper are refused (400); a valid body nests 2 deep
MAX_STOP = 16  # SamplingParams.validate's limit on stop strings


# ---- the completions body: reading, parsing, validation ----


class ApiError(Exception):
  """An error answered with an OpenAI-style body {"error": {message, type, param, code}}."""

  def __init__(self, status: int, message: str, *, param: str | None = None,
               type_: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.type, self.code, self.headers = (
        status, message, param, type_, code, headers)

  def response(self) -> Response:
    body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
    # ASCII JSON: a message quoting the client's text stays encodable even if that text is not valid Unicode
    return Response(json.dumps(body, separators=(",", ":")), status_code=self.status, headers=self.headers,
                    media_type="application/json")


class StreamOptions(BaseModel):
  """OpenAI stream_options: include_usage adds a last chunk with the token counts."""

  model_config = ConfigDict(extra="forbid", strict=True)
  include_usage: bool = False


class CompletionBody(BaseModel):
  """The JSON body of POST /v1/completions (OpenAI fields, plus top_k and ignore_eos)."""

  model_config = ConfigDict(extra="forbid", strict=True)
  prompt: str | list[str] | list[int]  # a string, a list of one string, or token ids
  model: str | None = None
  max_tokens: int | None = 16
  temperature: float | None = 1.0
  top_p: float | None = 1.0
  top_k: int | None = 0
  stop: str | list[str] | None = None
  seed: int | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]; -100 bans
  ignore_eos: bool = False
  user: str | None = None
  # OpenAI fields only accepted at their neutral value.
  n: int | None = 1
  best_of: int | None = None
  echo: bool = False
  logprobs: int | None = None
  suffix: str | None = None
  presence_penalty: float | None = 0.0
  frequency_penalty: float | None = 0.0


def validation_error(errors: list[dict]) -> ApiError:
  """ApiError(400) naming the field of pydantic's first error (locations may or may not start with "body")."""
  err = errors[0]
  loc = [p for p in err.get("loc", ()) if p != "body"]
  if err.get("type") == "json_invalid":
    return ApiError(400, f"invalid JSON body: {err.get('msg')}")
  if not loc or not isinstance(loc[0], str):
    return ApiError(400, "the request body must be a JSON object")
  field = loc[0]
  if err.get("type") == "extra_forbidden":
    return ApiError(400, f"unknown field {'.'.join(map(str, loc))!r}", param=field)
  if err.get("type") == "missing":
    return ApiError(400, f"{field}: required", param=field)
  where = "".join(f"[{p!r}]" for p in loc[1:] if not (isinstance(p, str) and ("[" in p or p in ("str", "int"))))
  msgs = "; or ".join(dict.fromkeys(e.get("msg", "") for e in errors if [p for p in e.get("loc", ())
                                                                            if p != "body"][:1] == [field]))
  return ApiError(400, f"{field}{where}: {msgs}", param=field)


def _reject_constant(name: str) -> float:
  raise ValueError(f"{name} is not valid JSON")


def _json_float(literal: str) -> float | int:
  """A JSON number written with a fraction or exponent; an integral one is an int (as JSON Schema counts 4.0)."""
  value = float(literal)
  return int(value) if value.is_integer() else value


async def _read_body(http_request: HttpRequest, limit: int) -> bytes:
  """The request body; ApiError 413 once it exceeds `limit` bytes, 408 if it stalls. Raises ClientDisconnect."""
  too_long = ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
  length = http_request.headers.get("content-length", "")
  if length.isdigit() and int(length) > limit:
    raise too_long
  chunks, size, stream = [], 0, http_request.stream()
  while True:
    try:
      chunk = await asyncio.wait_for(anext(stream), BODY_TIMEOUT_S)
    except StopAsyncIteration:
      return b"".join(chunks)
    except TimeoutError:
      raise ApiError(408, f"no more of the request body came for {BODY_TIMEOUT_S:g} s", code="body_timeout") from None
    size += len(chunk)
    if size > limit:
      raise too_long
    chunks.append(chunk)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _json_depth(raw: bytes) -> int:
  """How deep arrays and objects nest in a JSON text, brackets inside strings skipped: linear, without parsing.

  A quote opens or closes a string unless an odd run of backslashes precedes it (what the parser does within
  strings; a stray backslash outside one is a parse error before any deeper nesting).
  """
  opens = raw.count(b"[") + raw.count(b"{")
  if opens <= MAX_JSON_DEPTH:
    return opens  # nests no deeper (the exact depth only matters beyond the limit)
  b = np.frombuffer(raw, np.uint8)
  index = np.arange(b.size, dtype=np.int32)
  last_plain = np.maximum.accumulate(np.where(b != ord("\\"), index, -1))  # the last non-backslash at or before i
  backslashes_before = np.zeros_like(index)
  backslashes_before[1:] = index[:-1] - last_plain[:-1]
  quote = (b == ord('"')) & (backslashes_before % 2 == 0)
  outside = np.cumsum(quote, dtype=np.int32) % 2 == 0
  steps = outside & ((b == ord("[")) | (b == ord("{")))
  return int(np.cumsum(steps.astype(np.int32) - (outside & ((b == ord("]")) | (b == ord("}"))))).max(initial=0))


def _lone_surrogate(data: Any) -> tuple[tuple, bool, re.Match] | None:
  """(path, in a key?, match) of a lone surrogate in the strings or keys of parsed JSON, if any (walks iteratively)."""
  stack = [((), data)]
  while stack:
    path, value = stack.pop()
    if isinstance(value, str):
      if found := _SURROGATE.search(value):
        return path, False, found
    elif isinstance(value, dict):
      for key, item in value.items():
        if found := _SURROGATE.search(key):
          return path, True, found
        stack.append(((*path, key), item))
    elif isinstance(value, list):
      stack.extend(((*path, i), item) for i, item in enumerate(value) if isinstance(item, (str, dict, list)))
  return None


async def parse_body(http_request: HttpRequest, max_bytes: int = MAX_BODY_BYTES) -> CompletionBody:
  """The request's JSON (whatever its content type) validated strictly: ApiError(400) names what is wrong.

  Raises ClientDisconnect if the client leaves before the body is complete.
  """
  raw = await _read_body(http_request, max_bytes)
  try:
    text = raw.decode("utf-8-sig")  # strict: json.loads(bytes) would let CESU-8 surrogates (ED A0 80) through
  except UnicodeDecodeError as e:
    raise ApiError(400, f"the request body is not valid UTF-8: byte {raw[e.start]:#04x} at offset {e.start}") from None
  if (depth := _json_depth(raw)) > MAX_JSON_DEPTH:
    raise ApiError(400, f"the request body nests arrays / objects {depth} deep; at most {MAX_JSON_DEPTH} are allowed",
                   code="json_too_deep")
  try:
    data = json.loads(text, parse_constant=_reject_constant, parse_float=_json_float)
  except ValueError as e:
    raise ApiError(400, f"invalid JSON body: {e}") from None
  if not isinstance(data, dict):
    raise ApiError(400, "the request body must be a JSON object")
  if _SURROGATE_ESCAPE.search(text) and (found := _lone_surrogate(data)):
    path, in_key, match = found
    where = f"{path[0]}{''.join(f'[{p!r}]' for p in path[1:])}" if path else "a field name"
    raise ApiError(400, f"{where}: {'a key holds ' if in_key and path else ''}a lone UTF-16 surrogate "
                        f"{match.group()!r} at character {match.start()}, which is not Unicode text",
                   param=path[0] if path else match.string.encode("utf-8", "backslashreplace").decode())
  try:
    return CompletionBody.model_validate(data)
  except ValidationError as e:
    raise validation_error(e.errors()) from None


# ---- the OpenAPI description ----


class ErrorDetail(BaseModel):
  """An OpenAI-style error: what is wrong, its kind, the offending field (if one) and a machine-readable code."""

  message: str
  type: str
  param: str | None
  code: str | None


class ErrorResponse(BaseModel):
  """The body of every error answer (4xx / 5xx)."""

  error: ErrorDetail


class CompletionChoice(BaseModel):
  """The one completion of a request."""

  text: str
  index: int
  logprobs: None
  finish_reason: Literal["stop", "length", "abort", "error"] | None


class Usage(BaseModel):
  """Token counts of a request."""

  prompt_tokens: int
  completion_tokens: int
  total_tokens: int


class CompletionResponse(BaseModel):
  """An OpenAI text_completion (the non-streamed answer; each server-sent event carries one such chunk)."""

  id: str
  object: Literal["text_completion"]
  created: int
  model: str
  choices: list[CompletionChoice]
  usage: Usage | None = None


class ModelCard(BaseModel):
  """One served model."""

  id: str
  object: Literal["model"]
  created: int
  owned_by: str


class ModelList(BaseModel):
  """GET /v1/models."""

  object: Literal["list"]
  data: list[ModelCard]


class Health(BaseModel):
  """GET /health: "ok", or "error" with why the engine stopped (HTTP 503)."""

  status: Literal["ok", "error"]
  error: str | None = None


def _error(description: str) -> dict[str, Any]:
  return {"model": ErrorResponse, "description": description}


COMPLETION_RESPONSES: dict[int | str, dict[str, Any]] = {
  200: {"model": CompletionResponse,
        "description": "The completion (JSON), or with stream=true server-sent events: `data: {chunk}` per piece of "
                       "text, an optional usage chunk (or an error), then `data: [DONE]`",
        "content": {"text/event-stream": {"schema": {  # one event (OpenAPI 3.1 without itemSchema)
            "type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
                {"const": "[DONE]"},
                {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
                    {"$ref": "#/components/schemas/CompletionResponse"},
                    {"$ref": "#/components/schemas/ErrorResponse"}]}}]}}}}}},
  400: _error("The body is not valid (JSON, UTF-8, nesting, a field): `param` names the field"),
  404: _error("`model` is not the model served here"),
  408: _error("The rest of the body did not come in time"),
  413: _error("The body is larger than the server reads"),
  429: _error("The request queue is full: retry after Retry-After seconds"),
  500: _error("The engine failed while generating"),
  503: _error("The engine has stopped"),
}
HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
  200: {"model": Health, "description": "The engine is running"},
  503: {"model": Health, "description": "The engine has stopped"},
}
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
  200: {"description": "Prometheus text exposition format 0.0.4",
        "content": {"text/plain": {"schema": {"type": "string"}}}},
}


def token_key_pattern(vocab_size: int) -> str:
  """A regex (no anchors) of the canonical decimal integers in [0, vocab_size): the keys of logit_bias."""
  top = str(vocab_size - 1)
  alternatives = ["0"] + [f"[1-9][0-9]{{{k}}}" for k in range(len(top) - 1)]  # the shorter numbers
  for i, digit in enumerate(top):  # as long as top: a prefix of it, then a smaller digit, then any
    lowest = 1 if i == 0 else 0
    if int(digit) > lowest:
      alternatives.append(f"{top[:i]}[{lowest}-{int(digit) - 1}][0-9]{{{len(top) - i - 1}}}")
  alternatives.append(top)
  return "|".join(dict.fromkeys(alternatives))


def completion_body_schema(*, vocab_size: int, max_len: int, model_name: str, empty_prompt_ok: bool) -> dict:
  """JSON Schema of the POST /v1/completions body, with the limits the server enforces for this engine.

  empty_prompt_ok: whether "" is a prompt (the tokenizer prepends bos), or must hold at least one character.
  """
  def nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}

  text = {"type": "string", **({} if empty_prompt_ok else {"minLength": 1})}
  token = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
  stop = {"type": "string", "minLength": 1}
  properties = {
    "prompt": {"anyOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": 1},
                         {"type": "array", "items": token, "minItems": 1, "maxItems": max_len - 1}],
               "description": "A string, a list of one string, or token ids; with max_tokens it must fit in "
                              f"{max_len} tokens"},
    "model": nullable({"type": "string", "enum": [model_name]}),
    "max_tokens": {**nullable({"type": "integer", "minimum": 1, "maximum": max_len - 1}), "default": 16},
    "temperature": {**nullable({"type": "number", "minimum": 0}), "default": 1.0},
    "top_p": {**nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}), "default": 1.0},
    "top_k": {**nullable({"type": "integer", "minimum": 0}), "default": 0,
              "description": "0 = off; values beyond the vocabulary are no filter"},
    "stop": {**nullable({"anyOf": [stop, {"type": "array", "items": stop, "maxItems": MAX_STOP}]}), "default": None},
    "seed": {**nullable({"type": "integer", "minimum": 0}), "default": None,
             "description": "seeds from 2^63 on are taken modulo 2^63"},
    "stream": {"type": "boolean", "default": False},
    "stream_options": {**nullable({"type": "object", "additionalProperties": False,
                                   "properties": {"include_usage": {"type": "boolean", "default": False}}}),
                       "default": None},
    "logit_bias": {**nullable({"type": "object", "maxProperties": MAX_LOGIT_BIAS,
                               "propertyNames": {"pattern": f"^(?:{token_key_pattern(vocab_size)})$"},
                               "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}),
                   "default": None, "description": "token id (a decimal string) -> bias added to its logit; -100 bans"},
    "ignore_eos": {"type": "boolean", "default": False},
    "user": {**nullable({"type": "string"}), "default": None},
    # OpenAI fields only accepted at their neutral value
    "n": {**nullable({"const": 1}), "default": 1},
    "best_of": {**nullable({"const": 1}), "default": None},
    "echo": {"const": False, "default": False},
    "logprobs": {"type": "null", "default": None},
    "suffix": {**nullable({"const": ""}), "default": None},
    "presence_penalty": {**nullable({"const": 0}), "default": 0},
    "frequency_penalty": {**nullable({"const": 0}), "default": 0},
  }
  return {"title": "CompletionBody", "type": "object", "properties": properties, "required": ["prompt"],
          "additionalProperties": False,
          "description": "OpenAI completion fields, plus top_k and ignore_eos; unknown fields are refused"}
