"""The OpenAI-style HTTP API (FastAPI) over an EngineLoop: completions (JSON or server-sent events), models,
health and Prometheus metrics; the OpenAPI document is at /openapi.json.

What a body may hold, how it is read and validated and the OpenAPI schemas are in maxlm/serve/api.py. A failed
engine step answers HTTP 500 (or an error event); a client that disconnects has its request aborted, and clients
that leave while sending the body or before their answer is complete are counted in /metrics. Needs the `serve`
extra: `maxlm serve` (maxlm.serve.server.serve) checks for it first and names it when it is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from data_pipelines.tokenizer import encode_prompt
from maxlm.serve import api
from maxlm.serve.api import ApiError, CompletionBody, parse_body, validation_error
from maxlm.serve.bridge import RATE_WINDOW_S, EngineDead, EngineLoop
from maxlm.serve.request import QueueFull, Request, RequestError, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

LONG_PROMPT_CHARS = 8192  # longer prompts are tokenized on a worker thread, not on the event loop


async def _to_request(body: CompletionBody, tokenizer: Any, max_len: int) -> Request:
  """The engine Request for a validated body; ApiError(400) for values pydantic's types cannot rule out."""
  neutral = {"n": (body.n, (None, 1)), "best_of": (body.best_of, (None, 1)), "echo": (body.echo, (False,)),
             "logprobs": (body.logprobs, (None,)), "suffix": (body.suffix, (None, "")),
             "presence_penalty": (body.presence_penalty, (None, 0)),
             "frequency_penalty": (body.frequency_penalty, (None, 0))}
  for field, (value, allowed) in neutral.items():
    if value not in allowed:
      raise ApiError(400, f"{field}: {value!r} is not supported (only {allowed[-1]!r})", param=field)
  prompt = body.prompt
  if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
    if len(prompt) != 1:
      raise ApiError(400, f"prompt: one prompt per request, got a list of {len(prompt)}", param="prompt")
    prompt = prompt[0]
  if isinstance(prompt, str):
    encode = functools.partial(encode_prompt, tokenizer, prompt)
    prompt_ids = await asyncio.to_thread(encode) if len(prompt) > LONG_PROMPT_CHARS else encode()
  else:
    prompt_ids = list(prompt)
    bad = [t for t in prompt_ids if not 0 <= t < tokenizer.vocab_size]
    if bad:
      raise ApiError(400, f"prompt: token id {bad[0]} is not in [0, {tokenizer.vocab_size})", param="prompt")
  bias = []
  for key, value in (body.logit_bias or {}).items():
    if not (key.isascii() and key.isdigit() and (key == "0" or key[0] != "0")):  # api.token_key_pattern
      raise ApiError(400, f"logit_bias: key {key!r} is not a token id", param="logit_bias")
    token = int(key)
    if not -100 <= value <= 100:
      raise ApiError(400, f"logit_bias: bias of token {key} must be in [-100, 100], got {value!r}", param="logit_bias")
    bias.append((token, -math.inf if value == -100 else value))  # OpenAI: -100 bans the token
  stop = () if body.stop is None else (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
  params = SamplingParams(
      max_tokens=16 if body.max_tokens is None else body.max_tokens,
      temperature=1.0 if body.temperature is None else body.temperature,
      # top_k >= vocabulary is no filter; clamped so that no int32 array on the engine side overflows
      top_k=min(body.top_k or 0, tokenizer.vocab_size), top_p=1.0 if body.top_p is None else body.top_p,
      # seeds from 2^63 on wrap: no upper bound to state (schema tools compare bounds as doubles: 2^63 - 1 == 2^63)
      seed=body.seed if body.seed is None or body.seed < 0 else body.seed % 2**63, stop=stop,
      logit_bias=tuple(bias), ignore_eos=body.ignore_eos)
  try:
    params.validate(tokenizer.vocab_size)
  except RequestError as e:
    raise ApiError(400, str(e), param=e.field) from None
  n = len(prompt_ids)  # the engine checks these too; here they get OpenAI's code
  if n >= max_len:
    raise ApiError(400, f"prompt: {n} tokens leave no room in the context of {max_len} tokens", param="prompt",
                   code="context_length_exceeded")
  if n + params.max_tokens > max_len:
    raise ApiError(400, f"max_tokens: {params.max_tokens} + {n} prompt tokens exceed the context of {max_len} tokens",
                   param="max_tokens", code="context_length_exceeded")
  return Request(id=f"cmpl-{uuid.uuid4().hex}", prompt_ids=prompt_ids, params=params)


class _Disconnected:
  """Put on a request's output queue when its client has gone."""


_watchers: set[asyncio.Task] = set()  # strong references: the event loop keeps only weak ones


def _watch_disconnect(http_request: HttpRequest, outputs: asyncio.Queue, on_disconnect) -> asyncio.Task:
  """A task that, once the client disconnects, calls on_disconnect and wakes the reader of `outputs`.

  It is started before the response is, so a client that leaves before streaming begins is noticed too.
  """
  async def watch() -> None:
    while (await http_request.receive())["type"] != "http.disconnect":
      await asyncio.sleep(0.1)  # not expected once the body is read; never spin
    on_disconnect()
    outputs.put_nowait(_Disconnected)

  task = asyncio.create_task(watch())
  _watchers.add(task)
  task.add_done_callback(_watchers.discard)
  return task


async def _outputs(engine_loop: EngineLoop, request_id: str, outputs: asyncio.Queue,
                   watcher: asyncio.Task) -> AsyncIterator[RequestOutput]:
  """A request's outputs up to its finished one; stops early if the client disconnects, aborting the request."""
  finished = False
  try:
    while True:
      out = await outputs.get()
      if out is _Disconnected:
        log.info("client of %s disconnected: aborted", request_id)
        return
      finished = out.finished
      yield out
      if finished:
        return
  finally:
    watcher.cancel()
    if not finished:  # disconnect, cancellation, or the consumer stopped early
      engine_loop.count_abort("generation")
      engine_loop.abort(request_id)


def _usage(request: Request, final: RequestOutput, completion_tokens: int) -> dict[str, int]:
  prompt = final.prompt_tokens or len(request.prompt_ids)
  completion = final.completion_tokens or completion_tokens
  return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(data: Any) -> bytes:
  return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _metrics_text(stats: dict[str, float]) -> str:
  """Prometheus text exposition (format 0.0.4) of the engine loop's stats."""
  proposed = stats.get("spec_proposed_total", 0)
  rows = [
      ("maxlm_queue_length", "gauge", "Requests waiting for a decode slot.", stats.get("waiting", 0)),
      ("maxlm_running_requests", "gauge", "Requests in the running batch.", stats.get("running", 0)),
      ("maxlm_kv_pages_used", "gauge", "KV cache pages in use.", stats.get("kv_pages_used", 0)),
      ("maxlm_kv_pages_total", "gauge", "KV cache pages in the pool.", stats.get("kv_pages_total", 0)),
      ("maxlm_generation_tokens_total", "counter", "Tokens generated since start.",
       stats.get("tokens_generated_total", 0)),
      ("maxlm_tokens_per_second", "gauge", f"Tokens generated per second over the last {RATE_WINDOW_S:g} s.",
       stats.get("tokens_per_second", 0)),
      ("maxlm_spec_acceptance_rate", "gauge", "Accepted / proposed speculative draft tokens since start.",
       stats.get("spec_accepted_total", 0) / proposed if proposed else 0.0),
      ("maxlm_requests_finished_total", "counter", "Requests finished since start.",
       stats.get("requests_finished_total", 0)),
      ("maxlm_requests_aborted_total", "counter",
       "Requests whose client left while sending the body (stage body) or before the answer ended (generation).",
       {f'stage="{stage}"': stats.get(f"requests_aborted_{stage}_total", 0) for stage in ("body", "generation")}),
  ]
  lines = []
  for name, kind, help_, value in rows:
    lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    for labels, v in (value.items() if isinstance(value, dict) else [("", value)]):
      v = float(v)
      lines.append(f"{name}{'{' + labels + '}' if labels else ''} {int(v) if v.is_integer() else repr(v)}")
  return "\n".join(lines) + "\n"


def make_app(engine_loop: EngineLoop) -> FastAPI:
  """The FastAPI app serving `engine_loop` (whose thread it starts)."""
  engine_loop.start()
  app = FastAPI(title="maxlm", docs_url=None, redoc_url=None)
  app.state.engine_loop = engine_loop
  tokenizer = engine_loop.tokenizer
  body_schema = api.completion_body_schema(
      vocab_size=tokenizer.vocab_size, max_len=engine_loop.max_len, model_name=engine_loop.model_name,
      empty_prompt_ok=getattr(tokenizer, "bos_id", None) is not None)

  @app.exception_handler(ApiError)
  async def _api_error(_request, exc: ApiError) -> Response:
    return exc.response()

  @app.exception_handler(RequestValidationError)
  async def _invalid(_request, exc: RequestValidationError) -> Response:
    return validation_error(list(exc.errors())).response()

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(_request, exc: StarletteHTTPException) -> Response:
    return ApiError(exc.status_code, str(exc.detail), headers=exc.headers).response()

  @app.post("/v1/completions", responses=api.COMPLETION_RESPONSES, openapi_extra={
      "requestBody": {"required": True, "content": {"application/json": {"schema": body_schema}}}})
  async def completions(http_request: HttpRequest) -> Response:
    """Completes a prompt (OpenAI completions API): one JSON answer, or server-sent events with stream=true."""
    try:
      body = await parse_body(http_request)
    except ClientDisconnect:
      engine_loop.count_abort("body")
      return Response(status_code=499)  # nobody reads this
    if body.model is not None and body.model != engine_loop.model_name:
      raise ApiError(404, f"model: {body.model!r} is not served here (only {engine_loop.model_name!r})",
                     param="model", code="model_not_found")
    request = await _to_request(body, tokenizer, engine_loop.max_len)
    try:
      outputs = await engine_loop.submit(request)
    except RequestError as e:
      raise ApiError(400, str(e), param=e.field) from None
    except QueueFull as e:
      raise ApiError(429, f"the server is busy: {e or 'request queue full'}; retry later", type_="rate_limit_error",
                     code="queue_full", headers={"Retry-After": "1"}) from None
    except EngineDead as e:
      raise ApiError(503, str(e), type_="server_error") from None
    created = int(time.time())
    head = {"id": request.id, "object": "text_completion", "created": created, "model": engine_loop.model_name}
    watcher = _watch_disconnect(http_request, outputs, lambda: engine_loop.abort(request.id))
    stream = _outputs(engine_loop, request.id, outputs, watcher)
    if body.stream:
      include_usage = body.stream_options is not None and body.stream_options.include_usage
      return StreamingResponse(_stream(request, head, stream, include_usage), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, tokens, final = [], 0, None
    async with contextlib.aclosing(stream):
      async for out in stream:
        text.append(out.text)
        tokens += len(out.token_ids)
        final = out
    if final is None:
      return Response(status_code=499)  # the client has gone; nobody reads this
    if final.finish_reason == "error":
      raise ApiError(500, f"engine error: {engine_loop.last_error}", type_="server_error")
    choice = {"text": "".join(text), "index": 0, "logprobs": None, "finish_reason": final.finish_reason}
    return JSONResponse({**head, "choices": [choice], "usage": _usage(request, final, tokens)})

  async def _stream(request: Request, head: dict, stream: AsyncIterator[RequestOutput],
                    include_usage: bool) -> AsyncIterator[bytes]:
    tokens = 0
    async with contextlib.aclosing(stream):
      async for out in stream:
        tokens += len(out.token_ids)
        if out.finish_reason == "error":
          yield _sse({"error": {"message": f"engine error: {engine_loop.last_error}", "type": "server_error",
                                "param": None, "code": None}})
          break
        if out.text or out.finished:
          choice = {"text": out.text, "index": 0, "logprobs": None, "finish_reason": out.finish_reason}
          yield _sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})
        if out.finished and include_usage:
          yield _sse({**head, "choices": [], "usage": _usage(request, out, tokens)})
    yield b"data: [DONE]\n\n"

  @app.get("/v1/models", response_model=api.ModelList)
  async def models() -> dict:
    """The served model."""
    return {"object": "list", "data": [{"id": engine_loop.model_name, "object": "model",
                                        "created": engine_loop.created, "owned_by": "maxlm"}]}

  @app.get("/health", responses=api.HEALTH_RESPONSES)
  async def health() -> JSONResponse:
    """Whether the engine thread is running (200) or has stopped (503, with why)."""
    if engine_loop.alive():
      return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "error", "error": engine_loop.last_error or "engine stopped"}, status_code=503)

  @app.get("/metrics", response_class=PlainTextResponse, responses=api.METRICS_RESPONSES)
  async def metrics() -> PlainTextResponse:
    """Queue, batch, KV-cache and throughput gauges and counters in Prometheus text format."""
    return PlainTextResponse(_metrics_text(engine_loop.stats()), media_type="text/plain; version=0.0.4")

  return app
