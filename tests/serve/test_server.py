"""The OpenAI-style HTTP server over a real Engine (tiny random-init model): validation, streaming, metrics,
disconnects, queue limits, engine failures and a 64-client load test against a real uvicorn server."""

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import jax
import numpy as np
import pytest
import uvicorn
from conftest import byte_level_bpe_json, small_config
from prometheus_client.parser import text_string_to_metric_families

from data_pipelines.tokenizer import load_tokenizer
from maxlm import sharding
from maxlm.serve.engine import Engine
from maxlm.serve.server import EngineLoop, make_app
from maxlm.train.state import abstract_params, build_model

MAX_LEN, MAX_BATCH, MAX_QUEUE = 64, 4, 8


def tiny_engine(tmp_path, devices=1):
  """An Engine over a random tiny model (numpy-initialised: no init compile) and a byte-level BPE."""
  (tmp_path / "tokenizer.json").write_text(byte_level_bpe_json(["<s>", "</s>"], False, 300))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
  cfg = small_config(f"--config.serve.max_len={MAX_LEN}", f"--config.serve.max_batch={MAX_BATCH}",
                     f"--config.serve.max_queue={MAX_QUEUE}")
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:devices])
  rng = np.random.default_rng(0)

  def init(path, leaf):
    if "scale" in jax.tree_util.keystr(path):  # norms
      return np.ones(leaf.shape, leaf.dtype)
    return (rng.standard_normal(leaf.shape) * 0.05).astype(leaf.dtype)

  params = jax.tree_util.tree_map_with_path(init, abstract_params(cfg, mesh))
  model = build_model(cfg, params, mesh)
  return Engine(model, cfg, load_tokenizer(tmp_path / "tokenizer.json"), mesh=mesh, model_name="tiny")


@pytest.fixture(scope="module")
def engine_loop(tmp_path_factory):
  with EngineLoop(tiny_engine(tmp_path_factory.mktemp("tokenizer"))) as loop:
    yield loop


@pytest.fixture(scope="module")
def app(engine_loop):
  return make_app(engine_loop)


@pytest.fixture
def client(app):
  """An in-process async client (no sockets); tests run it with asyncio.run."""
  return lambda: httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)


@contextlib.contextmanager
def running_server(app):
  """A real uvicorn server on a free localhost port, in a thread; stopped on exit."""
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  sock.listen(256)
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + 10
  while not server.started and thread.is_alive() and time.monotonic() < deadline:
    time.sleep(0.01)
  assert server.started
  try:
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
  finally:
    server.should_exit = True
    thread.join(10)
    sock.close()
    assert not thread.is_alive()


@contextlib.contextmanager
def patched_step(engine, wrapper):
  """Replaces engine.step by wrapper(original_step) for the duration (the engine thread picks it up)."""
  original = engine.step
  engine.step = wrapper(original)
  try:
    yield
  finally:
    del engine.step
    assert engine.step == original


def wait_idle(engine_loop, timeout=10.0):
  """The engine loop's stats once nothing runs, waits or holds KV pages (fails after timeout)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    stats = engine_loop.stats()
    if stats["running"] == stats["waiting"] == stats["kv_pages_used"] == 0:
      return stats
    time.sleep(0.02)
  raise AssertionError(f"engine not idle after {timeout}s: {engine_loop.stats()}")


def sse_events(text):
  """The data payloads of a server-sent-events body, checking its framing."""
  assert text.endswith("\n\n")
  events = text[:-2].split("\n\n")
  assert all(e.startswith("data: ") and "\n" not in e for e in events), events
  return [e[len("data: "):] for e in events]


@pytest.mark.parametrize("body, param", [
  ('{"prompt": "hi",', None),  # invalid JSON
  ('{"prompt": "hi", "temperature": NaN}', None),  # not JSON either
  ('["hi"]', None),  # not an object
  ('{"max_tokens": 4}', "prompt"),  # missing
  ('{"prompt": "hi", "frobnicate": 1}', "frobnicate"),  # unknown field
  ('{"prompt": "hi", "stream_options": {"x": true}}', "stream_options"),
  ('{"prompt": "hi", "max_tokens": "4"}', "max_tokens"),  # wrong types (strict: no coercion)
  ('{"prompt": "hi", "max_tokens": 4.0}', "max_tokens"),
  ('{"prompt": "hi", "stream": "yes"}', "stream"),
  ('{"prompt": 7}', "prompt"),
  ('{"prompt": "hi", "stop": ["a", 1]}', "stop"),
  ('{"prompt": ["a", "b"]}', "prompt"),
  ('{"prompt": [1, 100000]}', "prompt"),
  ('{"prompt": "' + "word " * MAX_LEN + '"}', "prompt"),  # over-long prompt (the engine says so)
  ('{"prompt": "hi", "max_tokens": 1000}', "max_tokens"),  # beyond the context
  ('{"prompt": "hi", "max_tokens": 0}', "max_tokens"),
  ('{"prompt": "hi", "temperature": -0.5}', "temperature"),
  ('{"prompt": "hi", "top_p": 0}', "top_p"),
  ('{"prompt": "hi", "top_p": 1.5}', "top_p"),
  ('{"prompt": "hi", "top_k": -1}', "top_k"),
  ('{"prompt": "hi", "seed": -1}', "seed"),
  ('{"prompt": "hi", "stop": ""}', "stop"),
  ('{"prompt": "hi", "logit_bias": {"x": 1}}', "logit_bias"),
  ('{"prompt": "hi", "logit_bias": {"5": 101}}', "logit_bias"),
  ('{"prompt": "hi", "logit_bias": {"100000": 1}}', "logit_bias"),
  ('{"prompt": "hi", "n": 2}', "n"),
  ('{"prompt": "hi", "echo": true}', "echo"),
  ('{"prompt": "hi", "presence_penalty": 0.5}', "presence_penalty"),
])
def test_invalid_requests_are_400_naming_the_field(client, engine_loop, body, param):
  async def go():
    async with client() as c:
      return await c.post("/v1/completions", content=body, headers={"content-type": "application/json"})

  r = asyncio.run(go())
  assert r.status_code == 400, r.text
  error = r.json()["error"]
  assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] is None
  assert error["message"] and (param is None or param in error["message"]), error


def test_unknown_model_is_404_and_tolerated_fields_are_accepted(client, engine_loop):
  async def go():
    async with client() as c:
      bad = await c.post("/v1/completions", json={"prompt": "hi", "model": "gpt-9"})
      ok = await c.post("/v1/completions", json={
          "prompt": ["def f(x):"], "model": "tiny", "max_tokens": 3, "n": 1, "user": "u1", "best_of": 1,
          "logprobs": None, "echo": False, "presence_penalty": 0, "frequency_penalty": 0.0, "temperature": 0,
          "top_k": 5, "top_p": 0.9, "seed": 3, "stop": ["\n\n"], "logit_bias": {"5": -100, "6": 2.5}})
      huge = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "top_k": 2**62, "seed": 2**63 - 1})
      return bad, ok, huge

  bad, ok, huge = asyncio.run(go())
  assert bad.status_code == 404 and bad.json()["error"]["param"] == "model"
  assert ok.status_code == 200 and huge.status_code == 200, (ok.text, huge.text)
  wait_idle(engine_loop)


def test_completion_and_its_stream_agree(client, engine_loop):
  """A non-streamed completion is an OpenAI text_completion; the stream of the same request (greedy, and
  seeded sampling) concatenates to the same text, framed as SSE with a final [DONE]."""
  async def go(stream, **params):
    async with client() as c:
      body = {"prompt": "import json\n", "max_tokens": 12, "ignore_eos": True, "stream": stream, **params}
      if stream:
        body["stream_options"] = {"include_usage": True}
      r = await c.post("/v1/completions", json=body)
      assert r.status_code == 200, r.text
      return r

  for params in ({"temperature": 0}, {"temperature": 1.0, "seed": 1234, "top_k": 50}):
    full = asyncio.run(go(False, **params))
    data = full.json()
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-") and data["model"] == "tiny"
    assert isinstance(data["created"], int)
    (choice,) = data["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] == "length"
    usage = data["usage"]
    assert usage["completion_tokens"] == 12 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    streamed = asyncio.run(go(True, **params))
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == usage
    assert [c["choices"][0]["finish_reason"] for c in text_chunks] == [None] * (len(text_chunks) - 1) + ["length"]
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == choice["text"], params
  wait_idle(engine_loop)


def test_models_health_and_metrics(client, engine_loop):
  async def go():
    async with client() as c:
      return [await c.get(p) for p in ("/v1/models", "/health", "/metrics", "/nope")]

  models, health, metrics, missing = asyncio.run(go())
  assert models.json()["object"] == "list" and [m["id"] for m in models.json()["data"]] == ["tiny"]
  assert health.status_code == 200 and health.json() == {"status": "ok"}
  assert missing.status_code == 404 and "error" in missing.json()
  assert metrics.headers["content-type"].startswith("text/plain")
  families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
  kinds = {"maxlm_queue_length": "gauge", "maxlm_running_requests": "gauge", "maxlm_kv_pages_used": "gauge",
           "maxlm_kv_pages_total": "gauge", "maxlm_generation_tokens": "counter", "maxlm_tokens_per_second": "gauge",
           "maxlm_spec_acceptance_rate": "gauge", "maxlm_requests_finished": "counter"}
  assert {n: families[n].type for n in kinds} == kinds
  assert all(families[n].documentation for n in kinds)
  value = {n: families[n].samples[0].value for n in kinds}
  assert value["maxlm_kv_pages_total"] > 0 and value["maxlm_generation_tokens"] > 0  # earlier tests generated
  assert "# TYPE maxlm_generation_tokens_total counter" in metrics.text


def test_full_queue_is_429(client, engine_loop):
  """With the engine held inside a step, requests pile up: those beyond serve.max_queue get 429 at once."""
  release, in_step = threading.Event(), threading.Event()

  def hold(step):
    def held():
      in_step.set()
      release.wait(30)
      return step()
    return held

  async def go():
    async with client() as c:
      post = lambda: c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "temperature": 0})  # noqa: E731
      first = asyncio.create_task(post())
      await asyncio.to_thread(in_step.wait, 30)
      rest = [asyncio.create_task(post()) for _ in range(MAX_BATCH + MAX_QUEUE + 2)]
      await asyncio.sleep(0.2)  # all of them are queued as commands behind the held step
      release.set()
      return [await first] + [await t for t in rest]

  with patched_step(engine_loop.engine, hold):
    responses = asyncio.run(go())
  codes = [r.status_code for r in responses]
  assert set(codes) == {200, 429} and codes.count(429) >= 2, codes
  error = next(r for r in responses if r.status_code == 429)
  assert error.headers["retry-after"] and error.json()["error"]["type"] == "rate_limit_error"
  wait_idle(engine_loop)


def test_failing_step_errors_every_request_and_the_server_recovers(client, engine_loop):
  engine = engine_loop.engine

  def fail_once(step):
    both_running = []

    def failing():
      if engine.stats()["running"] == 2:
        both_running.append(1)
        if len(both_running) == 2:  # both requests have produced tokens: fail mid-stream
          raise RuntimeError("device lost")
      return step()
    return failing

  async def go():
    async with client() as c:
      body = {"prompt": "x", "max_tokens": 40, "ignore_eos": True}  # several device calls (decode_steps 8)
      return await asyncio.gather(c.post("/v1/completions", json=body),
                                  c.post("/v1/completions", json={**body, "stream": True}))

  with patched_step(engine, fail_once):
    plain, streamed = asyncio.run(asyncio.wait_for(go(), 60))
  assert plain.status_code == 500 and plain.json()["error"]["type"] == "server_error"
  assert "device lost" in plain.json()["error"]["message"]
  events = sse_events(streamed.text)
  assert events[-1] == "[DONE]" and "device lost" in json.loads(events[-2])["error"]["message"]
  wait_idle(engine_loop)

  async def again():
    async with client() as c:
      return await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}), await c.get("/health")

  ok, health = asyncio.run(again())
  assert ok.status_code == 200 and health.status_code == 200


def test_disconnecting_clients_free_their_slots(app, engine_loop):
  """A client that goes away mid-generation (streaming or not) has its request aborted: running and
  kv_pages_used return to 0 long before the request would have finished."""
  max_tokens = MAX_LEN - 8

  def slow(step):
    def slowed():
      time.sleep(0.4)  # a step decodes up to serve.decode_steps=8 tokens
      return step()
    return slowed

  async def go(url, stream):
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
      body = {"prompt": "hi", "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
      task = asyncio.create_task(c.post("/v1/completions", json=body))
      deadline = time.monotonic() + 10
      while engine_loop.stats()["running"] == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
      await asyncio.sleep(0.1)
      task.cancel()  # closes the connection
      with contextlib.suppress(asyncio.CancelledError):
        await task

  with running_server(app) as url, patched_step(engine_loop.engine, slow):
    for stream in (False, True):
      before = engine_loop.stats()["tokens_generated_total"]
      asyncio.run(go(url, stream))
      after = wait_idle(engine_loop, timeout=1.5)["tokens_generated_total"]  # a full run takes ~3 s
      assert 0 < after - before < max_tokens, (stream, before, after)


def test_64_concurrent_clients_all_answered(app, engine_loop):
  """64 clients at once against uvicorn, retrying on 429: every attempt gets a completion or a 429, every
  client completes in the end, and the engine finished exactly the completed requests (none lost or hung)."""
  num_clients, max_attempts = 64, 200
  finished_before = engine_loop.stats()["requests_finished_total"]

  async def one(c, i):
    body = {"prompt": f"client {i}:", "max_tokens": 4 + i % 8, "ignore_eos": True, "stream": i % 2 == 1,
            "temperature": 0.8, "seed": i}
    codes = []
    while len(codes) < max_attempts:
      r = await c.post("/v1/completions", json=body)
      codes.append(r.status_code)
      if r.status_code == 429:
        assert r.json()["error"]["type"] == "rate_limit_error" and r.headers["retry-after"]
        await asyncio.sleep(0.05)  # Retry-After says 1 s; the test retries sooner
        continue
      assert r.status_code == 200, r.text
      if body["stream"]:
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])["choices"][0]
      else:
        last = r.json()["choices"][0]
      assert last["finish_reason"] == "length"
      break
    return codes

  async def go(url):
    limits = httpx.Limits(max_connections=num_clients, max_keepalive_connections=num_clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
      return await asyncio.wait_for(asyncio.gather(*(one(c, i) for i in range(num_clients))), 90)

  with running_server(app) as url:
    t0 = time.monotonic()
    attempts = asyncio.run(go(url))
    elapsed = time.monotonic() - t0
  codes = [code for client in attempts for code in client]
  assert len(attempts) == num_clients and set(codes) <= {200, 429}
  assert all(client[-1] == 200 for client in attempts), attempts  # each client completed once, at its end
  assert codes.count(200) == num_clients and codes.count(429) > 0  # the queue limit was exercised
  stats = wait_idle(engine_loop)
  assert stats["requests_finished_total"] - finished_before == num_clients
  print(f"{num_clients} clients: {len(codes)} requests, {codes.count(429)} got 429, {elapsed:.1f}s")


class _StoppedEngine:
  """Just enough of an Engine for an EngineLoop whose thread has ended."""

  tokenizer = type("Tokenizer", (), {"vocab_size": 16, "encode": staticmethod(lambda text: [1])})()
  max_len, model_name = 16, "stopped"
  has_work = staticmethod(lambda: False)
  stats = staticmethod(dict)


def test_a_dead_engine_thread_is_503():
  loop = EngineLoop(_StoppedEngine())
  app = make_app(loop)
  loop.stop()

  async def go():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
      return await c.get("/health"), await c.post("/v1/completions", json={"prompt": [1]})

  health, completion = asyncio.run(go())
  assert health.status_code == 503 and health.json()["status"] == "error"
  assert completion.status_code == 503 and "stopped" in completion.json()["error"]["message"]


def test_cli_serve_reports_a_missing_workdir(tmp_path, capsys):
  from maxlm.cli import main  # noqa: PLC0415

  assert main(["serve", "--workdir", str(tmp_path / "missing"), "--port", "0"]) == 1
  assert "no config.json" in capsys.readouterr().err
