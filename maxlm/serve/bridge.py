"""The bridge between one engine thread and asyncio handlers: the Engine runs every call on its own thread.

The Engine is not thread-safe, so `EngineLoop` runs every engine call on one thread: commands (add, abort)
arrive through a thread-safe queue and are applied between steps; outputs go back to each request's asyncio
queue with `loop.call_soon_threadsafe`. A failing step ends every in-flight request with finish_reason "error",
so no caller waits forever. Stats (and the recent token rate) are snapshotted for readers on other threads.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Any

from maxlm.serve.request import Request, RequestOutput

log = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0  # maxlm_tokens_per_second averages over this many recent seconds


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
