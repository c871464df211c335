"""Hostile-traffic check of `maxlm serve`: malformed requests and 64 concurrent valid clients against one server.

Starts `maxlm serve` on 127.0.0.1 (a free port) over --workdir, or over a tiny model it trains first (20 steps,
about a minute), and sends it, bounded in count (--hostile, default 600) and time (--time-limit):

- hostile requests in eleven categories: bad JSON, wrong types, unknown fields, out-of-range values, bad Unicode
  (lone surrogates as JSON escapes and as raw CESU-8 bytes, invalid UTF-8, UTF-16 bodies), deep nesting, huge
  prompts / bodies / headers, wrong methods / paths / content types, malformed HTTP (raw sockets), clients that
  leave mid-body (raw sockets) and clients that leave mid-generation (streaming and not);
- meanwhile --clients valid clients (default 64, half of them streaming), each sending --requests-per-client
  completions and retrying on 429.

It reports the answers per category (target: no 5xx, no request left without an answer), the valid clients'
latency (first attempt to complete answer, p50 / p99) and how many got no complete answer (target 0), and
/metrics once everything is over (target: nothing running or queued, no KV page in use, every abort counted),
plus tracebacks in the server's log (target 0). JSON (with the machine) to --out, and a PNG next to it.

Run:  MAXLM_CACHE=... python scripts/fuzz_server.py [--workdir W]     (only ever talks to the server it starts)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import httpx  # noqa: E402
from bench_host import cpu_model, cpu_snapshot, machine, write_results  # noqa: E402  (light)

TRAIN = ["--config.model.vocab_size=512", "--config.model.d_model=64", "--config.model.num_layers=2",
         "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.mlp_dim=128",
         "--config.model.max_seq_len=256", "--config.data.seq_len=64", "--config.data.batch_size=4",
         "--config.data.max_corpus_mb=0.5", "--config.train.warmup_steps=2", "--config.train.progress_bar=false",
         "--config.train.sample_tokens=0", "--config.train.eval_batches=1"]
CATEGORIES = ("bad_json", "wrong_types", "unknown_fields", "bad_values", "bad_unicode", "deep_nesting", "huge",
              "method_path_type", "malformed_http", "disconnect_body", "disconnect_generation")
MAX_BODY = 4 * 2**20  # maxlm.serve.api.MAX_BODY_BYTES (not imported: that would load the server's dependencies)
HOST = "127.0.0.1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line options."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="", help="the workdir to serve (default: train a tiny one into --train-dir)")
  p.add_argument("--train-dir", default="runs/fuzz_server", help="where the tiny model is trained if needed")
  p.add_argument("--train-steps", type=int, default=20)
  p.add_argument("--hostile", type=int, default=600, help="hostile requests (spread over the categories)")
  p.add_argument("--hostile-concurrency", type=int, default=16, help="hostile requests in flight at once")
  p.add_argument("--clients", type=int, default=64, help="concurrent valid clients")
  p.add_argument("--requests-per-client", type=int, default=2)
  p.add_argument("--max-tokens", type=int, default=24, help="valid requests ask for 4..this many tokens")
  p.add_argument("--request-timeout", type=float, default=120.0, help="seconds one request may take")
  p.add_argument("--time-limit", type=float, default=900.0, help="seconds for all traffic together")
  p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds for the server to come up")
  p.add_argument("--serve-override", action="append", default=[],
                 help="--config.serve.* override for the server (repeatable), e.g. --config.serve.max_queue=16")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="bench_results/fuzz_server.json", help="JSON path (the PNG goes next to it)")
  p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
  args = p.parse_args(argv)
  if args.hostile < len(CATEGORIES) or args.clients < 1 or args.requests_per_client < 1:
    p.error("--hostile must cover every category; --clients and --requests-per-client must be >= 1")
  return args


def progress(msg: str) -> None:
  """A timestamped progress line."""
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def process_cpu_s(pid: int) -> float:
  """CPU seconds (user + system) a process has used so far (NaN off Linux)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return float("nan")


def maxlm_cli() -> list[str]:
  """The `maxlm` command of this interpreter's environment."""
  exe = Path(sys.executable).with_name("maxlm")
  return [str(exe)] if exe.is_file() else [sys.executable, "-m", "maxlm.cli"]


# ------------------------------------------------------------------------------------------- the server


def trained_workdir(args: argparse.Namespace) -> Path:
  """--workdir, or a tiny model trained into --train-dir/w (once: an existing checkpoint is reused)."""
  if args.workdir:
    return Path(args.workdir)
  workdir = Path(args.train_dir) / "w"
  if (workdir / "checkpoints" / str(args.train_steps)).is_dir():
    return workdir
  cmd = [*maxlm_cli(), "train", "--workdir", str(workdir), f"--config.train.steps={args.train_steps}",
         f"--config.train.checkpoint_every={args.train_steps}", f"--config.train.eval_every={args.train_steps}", *TRAIN]
  progress(f"[train] {' '.join(cmd)}")
  workdir.parent.mkdir(parents=True, exist_ok=True)
  log = workdir.parent / "train.log"
  with open(log, "w") as f:
    if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode:
      raise SystemExit(f"training {workdir} failed; see {log}")
  return workdir


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket() as s:
    s.bind((HOST, 0))
    return s.getsockname()[1]


def start_server(workdir: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
  """`maxlm serve` on 127.0.0.1 in a subprocess (output to `log`); returns it and its base URL once healthy."""
  port = free_port()
  cmd = [*maxlm_cli(), "serve", "--workdir", str(workdir), "--host", HOST, "--port", str(port), *args.serve_override]
  progress(f"[serve] {' '.join(cmd)} (log {log})")
  log.parent.mkdir(parents=True, exist_ok=True)
  server = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115  (closed with it)
  url = f"http://{HOST}:{port}"
  deadline = time.monotonic() + args.startup_timeout
  while time.monotonic() < deadline:
    if server.poll() is not None:
      raise SystemExit(f"maxlm serve exited with {server.returncode}; see {log}")
    try:
      if httpx.get(f"{url}/health", timeout=2).status_code == 200:
        return server, url
    except httpx.TransportError:
      pass
    time.sleep(0.5)
  server.terminate()
  raise SystemExit(f"maxlm serve did not come up in {args.startup_timeout:.0f}s; see {log}")


def metrics(url: str) -> dict[str, float]:
  """/metrics as {name or name{labels}: value}."""
  text = httpx.get(f"{url}/metrics", timeout=30).text
  return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def wait_idle(url: str, timeout: float = 60.0) -> tuple[dict[str, float], float]:
  """(/metrics, seconds waited) once nothing runs, waits or holds KV pages (or the last reading at timeout)."""
  t0 = time.monotonic()
  while True:
    m = metrics(url)
    idle = m["maxlm_running_requests"] == m["maxlm_queue_length"] == m["maxlm_kv_pages_used"] == 0
    if idle or time.monotonic() - t0 > timeout:
      return m, time.monotonic() - t0
    time.sleep(0.2)


# ------------------------------------------------------------------------------------------- hostile requests


def http_request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
  """The bytes of an HTTP/1.1 request that closes its connection."""
  head = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", "Connection: close", f"Content-Length: {len(body)}",
          *(f"{k}: {v}" for k, v in (headers or {}).items())]
  return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def post(body: bytes | str, content_type: str = "application/json") -> dict:
  """A hostile case sent with httpx: POST /v1/completions with these exact bytes."""
  return {"kind": "http", "method": "POST", "path": "/v1/completions",
          "body": body.encode() if isinstance(body, str) else body, "headers": {"content-type": content_type}}


def raw(data: bytes, read: bool = True, wait_s: float = 0.0) -> dict:
  """A hostile case sent over a raw socket: `data`, then the answer's status line (or close without reading)."""
  return {"kind": "raw", "data": data, "read": read, "wait_s": wait_s}


def valid_body(rng: random.Random, **extra) -> dict:
  """A small valid completion body."""
  return {"prompt": rng.choice(["def f(x):", "import os\n", "Hello", "class A:"]), "max_tokens": rng.randint(1, 8),
          **extra}


def hostile_cases(n: int, max_len: int, vocab: int, rng: random.Random) -> list[tuple[str, dict]]:
  """About n (category, case) pairs, every category represented, in a shuffled order."""
  ok = json.dumps({"prompt": "def f(x):", "max_tokens": 4, "temperature": 0.5})
  pools: dict[str, list[dict]] = {c: [] for c in CATEGORIES}
  pools["bad_json"] += [post(b) for b in [
      "", " ", "{", "}", "{}", "[]", "null", "0", '"prompt"', "{'prompt': 'x'}", '{"prompt": "x",}', '{"prompt" "x"}',
      '{"prompt": "x"} trailing', '{"prompt": NaN}', '{"prompt": "x", "temperature": Infinity}', "{/* c */}",
      '{"prompt": "x" "y"}', '{"prompt": "\\x41"}', '{"prompt": "\\u12"}', '{"prompt": "a\nb"}', "\x00",
      '{"prompt": "x", "prompt": 5}', '{"prompt": tru}', '{"max_tokens": 01}', '{"max_tokens": -}', '{"a":}']]
  pools["bad_json"] += [post(ok[:k]) for k in range(1, len(ok))]  # every truncation
  fields = {"prompt": "x", "model": "m", "max_tokens": 4, "temperature": 0.5, "top_p": 0.5, "top_k": 5, "stop": "s",
            "seed": 1, "stream": True, "stream_options": {}, "logit_bias": {}, "ignore_eos": True, "user": "u", "n": 1,
            "best_of": 1, "echo": False, "logprobs": None, "suffix": "", "presence_penalty": 0.0,
            "frequency_penalty": 0.0}
  wrong = [None, True, 1, -1, 1.5, "1", "", [], [1], ["a"], {}, {"a": 1}, [[1]], [None]]
  for field, good in fields.items():
    for value in wrong:
      nullable = field not in ("prompt", "stream", "echo", "ignore_eos")
      int_for_float = isinstance(good, float) and type(value) is int  # a valid number
      if type(value) is not type(good) and not (value is None and nullable) and not int_for_float:
        pools["wrong_types"].append(post(json.dumps({"prompt": "x", field: value} if field != "prompt"
                                                    else {"prompt": value})))
  for _ in range(40):
    name = "".join(rng.choice("abcxyz_-.$ éß日本\t") for _ in range(rng.randint(1, 12)))
    pools["unknown_fields"].append(post(json.dumps({"prompt": "x", name: rng.choice(wrong)})))
  pools["unknown_fields"] += [post(json.dumps({"prompt": "x", "stream_options": {"include_usage": True, "x": 1}})),
                              post(json.dumps({"prompt": "x", "functions": [{"name": "f"}]}))]
  for body in [{"max_tokens": 0}, {"max_tokens": -5}, {"max_tokens": max_len}, {"max_tokens": 10**30},
               {"temperature": -1}, {"temperature": 1e400}, {"top_p": 0}, {"top_p": 1.0000001}, {"top_p": -1},
               {"top_k": -1}, {"seed": -1}, {"stop": ""}, {"stop": [""]}, {"stop": ["a"] * 17},
               {"logit_bias": {"-1": 1}}, {"logit_bias": {str(vocab): 1}}, {"logit_bias": {"1": 100.5}},
               {"logit_bias": {"01": 1}}, {"logit_bias": {" 1": 1}}, {"logit_bias": {"1e3": 1}},
               {"logit_bias": {str(i): 1 for i in range(33)}}, {"n": 2}, {"best_of": 3}, {"echo": True},
               {"logprobs": 1}, {"suffix": "x"}, {"presence_penalty": 0.1}, {"frequency_penalty": -2},
               {"model": "not-this-one"}, {"prompt": []}, {"prompt": ["a", "b"]}, {"prompt": [vocab]},
               {"prompt": [-1]}, {"prompt": [1] * max_len}, {"prompt": "word " * max_len},
               {"prompt": "x", "max_tokens": max_len - 1}]:
    pools["bad_values"].append(post(json.dumps({"prompt": "x", **body})))
  pools["bad_values"] += [post('{"prompt": "x", "seed": ' + "9" * 5000 + "}"),
                          post('{"prompt": "x", "max_tokens": 1e999}'), post('{"prompt": [1.5, 2]}')]
  surrogates = ["\\ud800", "\\udfff", "\\udbff\\u0041", "a\\udc00b", "\\ude00\\ud83d"]
  for s in surrogates:
    pools["bad_unicode"] += [post(b) for b in [
        f'{{"prompt": "{s}"}}', f'{{"prompt": ["{s}"]}}', f'{{"prompt": "x", "stop": "{s}"}}',
        f'{{"prompt": "x", "stop": ["ok", "{s}"]}}', f'{{"prompt": "x", "user": "{s}"}}',
        f'{{"prompt": "x", "model": "{s}"}}', f'{{"prompt": "x", "{s}": 1}}',
        f'{{"prompt": "x", "logit_bias": {{"{s}": 1}}}}']]
  for raw_bytes in [b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xed\xa0\xbd\xed\xb8\x80", b"\xff", b"\xc0\x80", b"\xe2\x82",
                    b"\xf8\x88\x80\x80\x80", b"\xf4\x90\x80\x80", b"caf\xe9"]:
    pools["bad_unicode"] += [post(b'{"prompt": "' + raw_bytes + b'"}'),
                             post(b'{"prompt": "x", "user": "' + raw_bytes + b'"}')]
  pools["bad_unicode"] += [post(ok.encode("utf-16")), post(ok.encode("utf-16-le")), post(ok.encode("utf-32")),
                           post("\ufeff" + ok), post('{"prompt": "\\u0000 nul"}'), post('{"prompt": "\\ud83d\\ude00"}')]
  for depth in (17, 32, 100, 1000, 10_000, 100_000):
    pools["deep_nesting"] += [post('{"prompt": ' + "[" * depth + "]" * depth + "}"),
                              post('{"prompt": "x", "stream_options": ' + '{"a": ' * depth + "1" + "}" * (depth + 1)),
                              post("[" * depth), post("{" * depth), post('{"prompt": "x", "stop": ' + "[" * depth),
                              post('{"prompt": "' + "[" * min(depth, 40) + '", "max_tokens": 2}')]  # in a string: ok
  pools["huge"] += [post(json.dumps({"prompt": "hello " * n, "max_tokens": 2}))
                    for n in (2_000, 20_000, 200_000, 600_000)]
  pools["huge"] += [post(json.dumps({"prompt": [1] * n})) for n in (10_000, 500_000)]
  pools["huge"] += [post(b'{"prompt": "' + b"a" * (MAX_BODY + 10) + b'"}'),
                    post(json.dumps({"prompt": "x", "logit_bias": {str(i % vocab): 1 for i in range(20_000)}})),
                    post(json.dumps({"prompt": "x", "stop": ["s"] * 100_000})),
                    raw(http_request("POST", "/v1/completions", ok.encode(), {"X-Big": "a" * 100_000})),
                    raw(http_request("POST", "/v1/completions", ok.encode(), {"X-Big": "a" * 10_000})),
                    raw(http_request("POST", "/v1/completions", ok.encode(),
                                     {f"X-H{i}": "v" * 50 for i in range(2_000)})),
                    raw(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % 2**62),
                    raw(b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")]
  for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO"):
    pools["method_path_type"].append(raw(http_request(method, "/v1/completions", ok.encode())))
  for path in ("/metrics", "/health", "/v1/models", "/openapi.json", "/v1/chat/completions", "/v1/completions/",
               "/%00", "/../../etc/passwd", "/v1/completions?x=1", "/" + "a" * 5000):
    pools["method_path_type"].append(raw(http_request("POST", path, ok.encode())))
  for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                "application/json; charset=latin-1", "application/xml", "", "*/*", "application/json" * 200):
    pools["method_path_type"].append(post(json.dumps(valid_body(rng)), ctype))
  pools["malformed_http"] += [raw(d) for d in [
      b"\r\n\r\n", b"GARBAGE\r\n\r\n", b"POST\r\n\r\n", b"POST /v1/completions\r\n\r\n",
      b"POST /v1/completions HTTP/9.9\r\nHost: x\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\n\r\n",
      b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
      b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
      b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
      b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
      b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
      b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n{}",
      b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
      b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n Folded: y\r\n\r\n",
      b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
      b"POST /v1/completions HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}",
      b"POST http://evil/v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
      b"POST * HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello
      b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
      b"POST /v1/completions HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
      b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"]]
  not_eol = [b for b in range(256) if b not in b"\r\n"]  # the framing stays whole, so the server can answer
  for _ in range(20):
    junk = bytes(rng.choice(not_eol) for _ in range(rng.randint(1, 300)))
    pools["malformed_http"].append(raw(junk + b"\r\n\r\n"))
  for _ in range(20):  # a corrupted request line
    request = bytearray(http_request("POST", "/v1/completions", ok.encode()))
    for _ in range(3):
      request[rng.randrange(request.index(b"\r\n"))] = rng.choice(not_eol)
    pools["malformed_http"].append(raw(bytes(request)))
  head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
  for cut in range(0, len(ok), 2):
    pools["disconnect_body"].append(raw(head + b"Content-Length: %d\r\n\r\n" % (len(ok) + 50) + ok[:cut].encode(),
                                        read=False, wait_s=rng.uniform(0, 0.2)))
  for cut in range(0, 30, 3):
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(ok) + ok.encode()
    pools["disconnect_body"].append(raw(chunked[:len(chunked) - cut], read=False))
  for i in range(40):
    body = {"prompt": "def f(x):", "max_tokens": max_len // 2, "ignore_eos": True, "stream": i % 2 == 0}
    pools["disconnect_generation"].append({"kind": "leave", "body": json.dumps(body).encode(), "stream": i % 2 == 0,
                                           "after_s": rng.uniform(0.0, 1.0)})
  # spread n over the categories in proportion to their pools (each at least once), then shuffle
  total = sum(len(v) for v in pools.values())
  cases = []
  for category, pool in pools.items():
    take = max(1, round(n * len(pool) / total))
    cases += [(category, pool[i % len(pool)]) for i in range(take)]
  rng.shuffle(cases)
  return cases


def describe(case: dict) -> str:
  """The start of what a case sends (for the report of unexpected outcomes)."""
  data = case.get("data") or case.get("body") or b""
  what = f"{case.get('method', '')} {case.get('path', '')} ".lstrip() if case["kind"] == "http" else ""
  return f"{case['kind']}: {what}{data[:80]!r}{f' ({len(data):,} bytes)' if len(data) > 80 else ''}"


async def read_status(reader: asyncio.StreamReader, timeout: float) -> str:
  """The status code of the answer on `reader` ("closed" if the server closed without one)."""
  line = await asyncio.wait_for(reader.readline(), timeout)
  match = re.match(rb"HTTP/1\.[01] (\d{3})", line)
  return match.group(1).decode() if match else "closed"


async def run_case(url: str, client: httpx.AsyncClient, case: dict, timeout: float) -> str:
  """Sends one hostile case; the outcome: a status code, "closed" (no answer), "left" (we left) or "timeout"."""
  port = int(url.rsplit(":", 1)[1])
  try:
    if case["kind"] == "http":
      try:
        r = await client.request(case["method"], case["path"], content=case["body"], headers=case["headers"],
                                 timeout=timeout)
        return str(r.status_code)
      except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError):
        return "closed"  # e.g. a 413 answered (and the connection closed) before all of a huge body was sent
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
      if case["kind"] == "raw":
        writer.write(case["data"])
        await writer.drain()
        if not case["read"]:
          await asyncio.sleep(case["wait_s"])
          return "left"
        return await read_status(reader, timeout)
      head = (f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(case['body'])}\r\n\r\n").encode()
      writer.write(head + case["body"])
      await writer.drain()
      if case["stream"]:  # wait for the first event, then leave mid-stream
        status = await read_status(reader, timeout)
        if status != "200":
          return status  # e.g. 429
        while b"data:" not in (line := await asyncio.wait_for(reader.readline(), timeout)):
          if not line:
            return "200+closed"
        return "200+left"
      await asyncio.sleep(case["after_s"])  # leave mid-generation (or before the answer)
      return "left"
    finally:
      writer.close()
      try:
        await writer.wait_closed()
      except OSError:
        pass
  except (TimeoutError, httpx.TimeoutException):
    return "timeout"
  except (ConnectionError, OSError, asyncio.IncompleteReadError):
    return "closed"


async def valid_client(client: httpx.AsyncClient, i: int, args: argparse.Namespace, deadline: float) -> list[dict]:
  """One valid client's requests (alternately streamed), retrying on 429: each one's outcome and latency."""
  rng = random.Random(args.seed * 1000 + i)
  results = []
  for k in range(args.requests_per_client):
    stream = (i + k) % 2 == 1
    body = {"prompt": f"client {i} request {k}: def ", "max_tokens": rng.randint(4, args.max_tokens),
            "ignore_eos": True, "temperature": 0.8, "seed": i * 100 + k, "stream": stream}
    t0, retries, outcome = time.perf_counter(), 0, "lost"
    while time.monotonic() < deadline:
      try:
        r = await client.post("/v1/completions", json=body, timeout=args.request_timeout)
      except httpx.HTTPError as e:
        outcome = f"lost ({type(e).__name__})"
        break
      if r.status_code == 429:
        retries += 1
        await asyncio.sleep(0.05 + 0.05 * rng.random())
        continue
      if r.status_code != 200:
        outcome = f"lost ({r.status_code})"
      elif stream:
        events = [e[len("data: "):] for e in r.text.strip().split("\n\n")]
        complete = events[-1] == "[DONE]" and len(events) >= 2 and "error" not in json.loads(events[-2])
        finish = json.loads(events[-2])["choices"][0]["finish_reason"] if complete else None
        outcome = "complete" if finish == "length" else "lost (incomplete stream)"
      else:
        outcome = "complete" if r.json()["choices"][0]["finish_reason"] == "length" else "lost (finish_reason)"
      break
    results.append({"client": i, "stream": stream, "outcome": outcome, "retries_429": retries,
                    "latency_s": time.perf_counter() - t0, "max_tokens": body["max_tokens"]})
  return results


async def traffic(url: str, cases: list[tuple[str, dict]], args: argparse.Namespace) -> tuple[list, list, float]:
  """Hostile cases (--hostile-concurrency at a time) and the valid clients, all at once; bounded by --time-limit."""
  deadline = time.monotonic() + args.time_limit
  limits = httpx.Limits(max_connections=args.clients + args.hostile_concurrency,
                        max_keepalive_connections=args.clients + args.hostile_concurrency)
  gate = asyncio.Semaphore(args.hostile_concurrency)
  async with httpx.AsyncClient(base_url=url, limits=limits) as valid, \
             httpx.AsyncClient(base_url=url, limits=limits) as hostile:
    async def one(category: str, case: dict) -> tuple[str, str, float, str]:
      async with gate:
        if time.monotonic() > deadline:
          return category, "not sent (time limit)", 0.0, describe(case)
        t0 = time.perf_counter()
        outcome = await run_case(url, hostile, case, args.request_timeout)
        return category, outcome, time.perf_counter() - t0, describe(case)

    t0 = time.perf_counter()
    hostile_task = asyncio.gather(*(one(c, case) for c, case in cases))
    valid_task = asyncio.gather(*(valid_client(valid, i, args, deadline) for i in range(args.clients)))
    hostile_results, valid_results = await asyncio.wait_for(asyncio.gather(hostile_task, valid_task),
                                                            args.time_limit + args.request_timeout + 30)
    return hostile_results, [r for client in valid_results for r in client], time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- report


def summarize(hostile: list[tuple[str, str, float, str]], valid: list[dict]) -> dict:
  """Outcome counts per hostile category, the cases that got a 5xx or no answer in time, and the valid clients'
  completion and latency."""
  per = collections.defaultdict(collections.Counter)
  for category, outcome, _, _ in hostile:
    per[category][outcome] += 1
  rows = []
  for category in CATEGORIES:
    counts = per[category]
    rows.append({"category": category, "requests": sum(counts.values()), "outcomes": dict(sorted(counts.items())),
                 "server_errors_5xx": sum(n for o, n in counts.items() if o[:1] == "5"),
                 "timeouts": counts.get("timeout", 0)})
  latencies = sorted(r["latency_s"] for r in valid if r["outcome"] == "complete")

  def pct(q: float) -> float:
    return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

  lost = [r for r in valid if r["outcome"] != "complete"]
  failed = [{"category": c, "outcome": o, "seconds": t, "sent": d} for c, o, t, d in hostile
            if o[:1] == "5" or o == "timeout"]
  return {"hostile": rows, "hostile_failures": failed, "valid": {
      "requests": len(valid), "complete": len(valid) - len(lost), "lost": len(lost),
      "lost_outcomes": dict(collections.Counter(r["outcome"] for r in lost)),
      "retries_429": sum(r["retries_429"] for r in valid), "streamed": sum(r["stream"] for r in valid),
      "latency_p50_s": pct(0.50), "latency_p99_s": pct(0.99), "latency_max_s": latencies[-1] if latencies else None,
      "latency_mean_s": statistics.fmean(latencies) if latencies else None}}


def table(res: dict) -> str:
  """The report as Markdown tables."""
  out = ["| category | requests | answers | 5xx | timeouts |", "|---|---:|---|---:|---:|"]
  for r in res["hostile"]:
    answers = ", ".join(f"{o}: {n}" for o, n in r["outcomes"].items())
    out.append(f"| {r['category']} | {r['requests']} | {answers} | {r['server_errors_5xx']} | {r['timeouts']} |")
  total = {k: sum(r[k] for r in res["hostile"]) for k in ("requests", "server_errors_5xx", "timeouts")}
  out.append(f"| **all** | **{total['requests']}** | | **{total['server_errors_5xx']}** | **{total['timeouts']}** |")
  v = res["valid"]
  out += ["", "| valid clients | requests | streamed | complete | lost | 429 retries | p50 | p99 | max |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
          f"| {res['meta']['clients']} | {v['requests']} | {v['streamed']} | {v['complete']} | {v['lost']} | "
          f"{v['retries_429']} | {v['latency_p50_s']:.2f} s | {v['latency_p99_s']:.2f} s | "
          f"{v['latency_max_s']:.2f} s |"]
  m = res["after"]
  out += ["", "| after everything | value |", "|---|---:|",
          f"| running requests | {m['running']:.0f} |", f"| queued requests | {m['queued']:.0f} |",
          f"| KV pages in use / total | {m['kv_pages_used']:.0f} / {m['kv_pages_total']:.0f} |",
          f"| aborted: while sending the body | {m['aborted_body']:.0f} |",
          f"| aborted: before the answer ended | {m['aborted_generation']:.0f} |",
          f"| requests finished | {m['finished']:.0f} |", f"| seconds until idle | {m['idle_after_s']:.1f} |",
          f"| tracebacks in the server log | {m['tracebacks']} |", f"| server still healthy | {m['healthy']} |"]
  if v["lost_outcomes"]:
    out.append(f"\nlost: {v['lost_outcomes']}")
  for f in res["hostile_failures"]:
    out.append(f"\n{f['category']}: {f['outcome']} after {f['seconds']:.1f}s: {f['sent']}")
  return "\n".join(out)


def plot(res: dict, path: Path) -> None:
  """Answers per hostile category (stacked by kind) and the valid clients' latency distribution."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(14, 4.8), layout="constrained")
  FigureCanvasAgg(fig)
  ax_h, ax_v = fig.subplots(1, 2, width_ratios=[3, 2])
  kinds = {"2xx / 3xx (200+left: we left mid-stream)": "tab:green", "4xx": "tab:blue",
           "no answer (closed / we left)": "tab:gray", "5xx": "tab:red", "timeout": "black"}

  def kind(outcome: str) -> str:
    if outcome[:3].isdigit():
      return {"2": "2xx / 3xx (200+left: we left mid-stream)", "3": "2xx / 3xx (200+left: we left mid-stream)",
              "4": "4xx"}.get(outcome[0], "5xx")
    return "timeout" if outcome == "timeout" else "no answer (closed / we left)"

  names = [r["category"] for r in res["hostile"]]
  bottom = [0] * len(names)
  for k, color in kinds.items():
    heights = [sum(n for o, n in r["outcomes"].items() if kind(o) == k) for r in res["hostile"]]
    ax_h.bar(names, heights, bottom=bottom, color=color, label=k)
    bottom = [b + h for b, h in zip(bottom, heights)]
  ax_h.tick_params(axis="x", labelrotation=35)
  ax_h.set_ylabel("requests")
  five = sum(r["server_errors_5xx"] for r in res["hostile"])
  ax_h.set_title(f"{sum(bottom)} hostile requests: {five} answered 5xx")
  ax_h.legend(fontsize=8)
  latencies = [r["latency_s"] for r in res["valid_requests"] if r["outcome"] == "complete"]
  ax_v.hist(latencies, bins=30, color="tab:green")
  v = res["valid"]
  for q, style in (("latency_p50_s", "--"), ("latency_p99_s", ":")):
    ax_v.axvline(v[q], color="k", linestyle=style, label=f"{q[8:11]} {v[q]:.2f} s")
  ax_v.set_xlabel("seconds from first attempt to complete answer")
  ax_v.set_ylabel("valid requests")
  ax_v.set_title(f"{res['meta']['clients']} concurrent valid clients: {v['complete']}/{v['requests']} complete, "
                 f"{v['lost']} lost")
  ax_v.legend(fontsize=8)
  fig.suptitle(f"maxlm serve under hostile traffic ({res['meta']['cpu_model']}, {os.cpu_count()} cores)", fontsize=9)
  fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
  """Trains (if needed), starts the server, sends the traffic, prints the tables, writes the JSON and PNG."""
  args = parse_args(argv)
  t_start = time.perf_counter()
  rng = random.Random(args.seed)
  progress(f"{cpu_model()}, {os.cpu_count()} CPUs; python {platform.python_version()}, httpx {httpx.__version__}")
  workdir = trained_workdir(args)
  out = Path(args.out)
  server, url = start_server(workdir, args, out.with_suffix(".server.log"))
  try:
    schema = httpx.get(f"{url}/openapi.json", timeout=30).json()
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    max_len = int(body["properties"]["max_tokens"]["anyOf"][0]["maximum"]) + 1
    vocab = int(body["properties"]["prompt"]["anyOf"][2]["items"]["maximum"]) + 1
    cases = hostile_cases(args.hostile, max_len, vocab, rng)
    progress(f"[serve] {url}: max_len {max_len}, vocabulary {vocab}; warming up (compiles)")
    for warm in ({"stream": False}, {"stream": True}, {"stream": False, "temperature": 0}):
      httpx.post(f"{url}/v1/completions", json={"prompt": "def f(x):", "max_tokens": args.max_tokens, **warm},
                 timeout=args.startup_timeout)
    before = metrics(url)
    progress(f"[traffic] {len(cases)} hostile requests ({args.hostile_concurrency} at a time) and "
             f"{args.clients} valid clients x {args.requests_per_client} requests")
    snap, server_cpu = cpu_snapshot(), process_cpu_s(server.pid)
    hostile, valid, traffic_s = asyncio.run(traffic(url, cases, args))
    end_snap, server_cpu = cpu_snapshot(), process_cpu_s(server.pid) - server_cpu
    after, idle_s = wait_idle(url)
    healthy = httpx.get(f"{url}/health", timeout=30).status_code == 200
  finally:
    server.terminate()
    try:
      server.wait(30)
    except subprocess.TimeoutExpired:
      server.kill()
  log_text = out.with_suffix(".server.log").read_text(errors="replace")
  wall, busy, own = (b - a for a, b in zip(snap, end_snap))
  res = summarize(hostile, valid)
  res["valid_requests"] = valid
  res["after"] = {
      "running": after["maxlm_running_requests"], "queued": after["maxlm_queue_length"],
      "kv_pages_used": after["maxlm_kv_pages_used"], "kv_pages_total": after["maxlm_kv_pages_total"],
      "aborted_body": after['maxlm_requests_aborted_total{stage="body"}']
                      - before['maxlm_requests_aborted_total{stage="body"}'],
      "aborted_generation": after['maxlm_requests_aborted_total{stage="generation"}']
                            - before['maxlm_requests_aborted_total{stage="generation"}'],
      "finished": after["maxlm_requests_finished_total"] - before["maxlm_requests_finished_total"],
      "idle_after_s": idle_s, "healthy": healthy, "tracebacks": log_text.count("Traceback (most recent call last)"),
      "asgi_exceptions": log_text.count("Exception in ASGI application"), "metrics": after}
  res["meta"] = {
      "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
      "workdir": str(workdir), "url": url, "max_len": max_len, "vocab_size": vocab, "clients": args.clients,
      "requests_per_client": args.requests_per_client, "hostile_requests": len(cases),
      "hostile_concurrency": args.hostile_concurrency, "serve_overrides": args.serve_override, "seed": args.seed,
      "traffic_s": traffic_s, "runtime_s": time.perf_counter() - t_start, "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
      "server_cpu_s": server_cpu, "client_cpu_s": own,
      "background_cores": max(busy - own - server_cpu, 0.0) / wall if wall > 0 else float("nan"),
      "targets": {"hostile_5xx": 0, "hostile_timeouts": 0, "valid_lost": 0, "leaked_running_or_pages": 0,
                  "server_tracebacks": 0}}
  res["machine"] = machine()
  print("\n" + table(res) + "\n")
  five = sum(r["server_errors_5xx"] for r in res["hostile"])
  timeouts = sum(r["timeouts"] for r in res["hostile"])
  leaked = res["after"]["running"] + res["after"]["queued"] + res["after"]["kv_pages_used"]
  res["verdicts"] = {"no_5xx": five == 0, "no_timeouts": timeouts == 0, "none_lost": res["valid"]["lost"] == 0,
                     "nothing_leaked": leaked == 0, "no_tracebacks": res["after"]["tracebacks"] == 0}
  for name, met in res["verdicts"].items():
    print(f"{name}: {'meets' if met else 'MISSES'}")
  print(f"traffic {traffic_s:.0f}s, total runtime {res['meta']['runtime_s']:.0f}s; "
        f"server log {out.with_suffix('.server.log')}")
  write_results(res, out, (lambda png: plot(res, png)) if args.plot else None)


if __name__ == "__main__":
  main()
