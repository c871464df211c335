"""OpenAI-style HTTP server: one background thread owns the Engine; FastAPI handlers talk to it through queues.

Endpoints: POST /v1/completions (JSON or server-sent events), GET /v1/models, GET /health, GET /metrics; the
OpenAPI document is at /openapi.json. What a body may hold, how it is read and validated and the OpenAPI
schemas are in maxlm/serve/api.py.

The Engine is not thread-safe, so `EngineLoop` runs every engine call on one thread: commands (add, abort)
arrive through a thread-safe queue and are applied between steps; outputs go back to each request's asyncio
queue with `loop.call_soon_threadsafe`. A failing step ends every in-flight request with finish_reason "error"
(HTTP 500 or an error event), so no client waits forever; a client that disconnects has its request aborted.
Clients that leave while sending the body or before their answer is complete are counted in /metrics.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import math
import queue
import threading
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
from maxlm.serve.request import QueueFull, Request, RequestError, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0  # maxlm_tokens_per_second averages over this many recent seconds
LONG_PROMPT_CHARS = 8192  # longer prompts are tokenized on a worker thread, not on the event loop


class EngineDead(RuntimeError):
  """The engine thread has stopped (a fatal engine error or shutdown): nothing can be served (HTTP 503)."""


@dataclasses.dataclass
class _Add:
  request: Request
  loop: asyncio.AbstractEventLoop
  outputs: asyncio.Queue
  accepted: concurrent.futures.Future


@dataclasses.dataclass
class _Abort:
  request_id: str


_STOP = object()


class EngineLoop:
  """Runs an Engine on one background thread; the asyncio side submits requests and reads their outputs."""

  def __init__(self, engine: Any):
    self.engine = engine
    self.tokenizer = engine.tokenizer
    self.max_len: int = engine.max_len
    self.model_name: str = engine.model_name
    self.last_error: str | None = None  # why the latest failed step (or the thread) failed
    self._commands: queue.SimpleQueue = queue.SimpleQueue()
    self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # engine thread only
    self._lock = threading.Lock()  # guards _closed (vs. command submission) and _recent (vs. readers)
    self._closed = False
    self._thread: threading.Thread | None = None
    self._stats: dict[str, float] = dict(engine.stats())
    self._recent: collections.deque[tuple[float, float]] = collections.deque()  # (time, tokens generated)
    self._aborted = {"body": 0, "generation": 0}  # clients gone while sending the body / before the answer ended
    self._started = time.monotonic()
    self.created = int(time.time())

  # ---- caller side (any thread / the event loop) ----

  def start(self) -> EngineLoop:
    """Starts the engine thread (idempotent)."""
    with self._lock:
      if self._thread is None and not self._closed:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="maxlm-engine", daemon=True)
        self._thread.start()
    return self

  def stop(self, timeout: float = 30.0) -> None:
    """Ends the engine thread after its current step; in-flight requests finish with an error."""
    self._commands.put(_STOP)
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join(timeout)

  def __enter__(self) -> EngineLoop:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def alive(self) -> bool:
    """Whether the engine thread is running and accepting requests."""
    return self._thread is not None and self._thread.is_alive() and not self._closed

  async def submit(self, request: Request) -> asyncio.Queue:
    """Adds a request on the engine thread; returns the asyncio queue its RequestOutputs arrive on.

    Raises what Engine.add_request raises (RequestError, QueueFull) or EngineDead.
    """
    outputs: asyncio.Queue = asyncio.Queue()
    accepted: concurrent.futures.Future = concurrent.futures.Future()
    self._put(_Add(request, asyncio.get_running_loop(), outputs, accepted))
    try:
      await asyncio.wrap_future(accepted)
    except asyncio.CancelledError:
      self.abort(request.id)  # the add may still be applied: the abort queued behind it undoes it
      raise
    return outputs

  def abort(self, request_id: str) -> None:
    """Aborts a request (frees its slot and KV pages) between two engine steps; unknown ids are ignored."""
    try:
      self._put(_Abort(request_id))
    except EngineDead:
      pass

  def count_abort(self, stage: str) -> None:
    """Counts a client that left while sending its body (stage "body") or before its answer ended ("generation")."""
    with self._lock:
      self._aborted[stage] += 1

  def stats(self) -> dict[str, float]:
    """The engine's latest stats, tokens_per_second over the last RATE_WINDOW_S seconds and the abort counts."""
    now = time.monotonic()
    with self._lock:
      tokens = sum(n for t, n in self._recent if t >= now - RATE_WINDOW_S)
      aborted = {f"requests_aborted_{stage}_total": n for stage, n in self._aborted.items()}
    window = min(RATE_WINDOW_S, max(now - self._started, 1e-3))
    return {**self._stats, "tokens_per_second": tokens / window, **aborted}

  def _put(self, command: Any) -> None:
    with self._lock:
      if self._closed:
        raise EngineDead(f"the engine has stopped: {self.last_error}")
      self._commands.put(command)

  # ---- engine thread ----

  def _run(self) -> None:
    try:
      while self._apply_commands(block=not self.engine.has_work()):
        if self.engine.has_work():
          self._step()
        self._snapshot()
    except BaseException as e:  # noqa: BLE001  (the thread must report, never vanish silently)
      log.exception("engine thread failed")
      self.last_error = f"{type(e).__name__}: {e}"
    finally:
      with self._lock:
        self._closed = True
        self.last_error = self.last_error or "the engine loop was stopped"
      self._fail_streams()
      while True:  # commands that raced with the shutdown
        try:
          command = self._commands.get_nowait()
        except queue.Empty:
          break
        if isinstance(command, _Add) and command.accepted.set_running_or_notify_cancel():
          command.accepted.set_exception(EngineDead(f"the engine has stopped: {self.last_error}"))

  def _apply_commands(self, block: bool) -> bool:
    """Applies queued commands (waits for one first when idle); False once asked to stop."""
    try:
      command = self._commands.get() if block else self._commands.get_nowait()
    except queue.Empty:
      return True
    while True:
      if command is _STOP:
        return False
      if isinstance(command, _Add):
        self._add(command)
      else:
        self._streams.pop(command.request_id, None)
        self.engine.abort(command.request_id)
      try:
        command = self._commands.get_nowait()
      except queue.Empty:
        return True

  def _add(self, command: _Add) -> None:
    if not command.accepted.set_running_or_notify_cancel():
      return  # the client gave up before the request reached the engine
    try:
      self.engine.add_request(command.request)
    except Exception as e:  # noqa: BLE001  (RequestError / QueueFull, or a bug: the handler answers either)
      command.accepted.set_exception(e)
      return
    self._streams[command.request.id] = (command.loop, command.outputs)
    command.accepted.set_result(None)

  def _step(self) -> None:
    try:
      outputs = self.engine.step()
    except Exception as e:  # noqa: BLE001
      log.exception("engine step failed; failing %d in-flight requests", len(self._streams))
      self.last_error = f"{type(e).__name__}: {e}"
      ids = list(self._streams)
      self._fail_streams()
      for request_id in ids:
        self.engine.abort(request_id)  # raising here means the engine is unusable: the thread ends
      if self.engine.has_work():
        raise RuntimeError("the engine still has work after every request was aborted") from e
      return
    for out in outputs:
      entry = self._streams.get(out.id)
      if entry is None:
        continue  # aborted
      if out.finished:
        del self._streams[out.id]
      self._deliver(entry, out)

  def _fail_streams(self) -> None:
    streams, self._streams = self._streams, {}
    for request_id, entry in streams.items():
      self._deliver(entry, RequestOutput(request_id, [], "", finished=True, finish_reason="error"))

  @staticmethod
  def _deliver(entry: tuple[asyncio.AbstractEventLoop, asyncio.Queue], out: RequestOutput) -> None:
    loop, outputs = entry
    try:
      loop.call_soon_threadsafe(outputs.put_nowait, out)
    except RuntimeError:
      pass  # the client's event loop is closed

  def _snapshot(self) -> None:
    stats = dict(self.engine.stats())
    new_tokens = stats.get("tokens_generated_total", 0) - self._stats.get("tokens_generated_total", 0)
    now = time.monotonic()
    with self._lock:
      if new_tokens > 0:
        self._recent.append((now, new_tokens))
      while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
        self._recent.popleft()
    self._stats = stats


# ---- HTTP ----


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


def serve(workdir: str, *, draft_workdir: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          overrides: tuple[str, ...] = ()) -> None:
  """Loads the workdir's model into an Engine and serves it over HTTP until interrupted."""
  import uvicorn  # noqa: PLC0415

  from maxlm.serve.engine import Engine  # noqa: PLC0415  (heavy: jax, the model)

  engine = Engine.from_workdir(workdir, tuple(overrides), draft_workdir=draft_workdir)
  with EngineLoop(engine) as engine_loop:
    uvicorn.run(make_app(engine_loop), host=host, port=port, timeout_graceful_shutdown=5)
