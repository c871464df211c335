"""The serving engine: continuous batching over a KV cache, chunked prefill, sampling, speculative decoding.

Every `step()` admits waiting requests into free decode slots (reusing cached prefix pages), runs one prefill
chunk for the requests still reading their prompt, and one decode step (or one speculative round) for the
others; requests join and leave the batch at any step. Device work has fixed shapes: the decode batch is always
`serve.max_batch` rows, prefill rows and chunk lengths are padded to powers of two, and the attended span to a
power-of-two bucket, so a handful of programs serve every request length.

Who holds slots and pages is maxlm/serve/scheduler.py's; the jitted programs are maxlm/serve/programs.py's; the
mesh and its checks maxlm/serve/layout.py's. Parameters and activations follow the config's sharding rules.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from kernels_pallas import backend as kernel_backend
from maxlm import sharding
from maxlm.models.transformer import Transformer
from maxlm.serve import kv_cache, layout, programs, sampling
from maxlm.serve.detokenize import find_stop, streamable
from maxlm.serve.forward import Decoder
from maxlm.serve.kv_cache import CacheSpec
from maxlm.serve.programs import Static
from maxlm.serve.request import Request, RequestError, RequestOutput, SamplingParams
from maxlm.serve.scheduler import Scheduler, Seq

_MIN_CHUNK = 16


def _pow2(n: int, lo: int = 1) -> int:
  return max(lo, 1 << max(0, n - 1).bit_length())


class Engine:
  """Continuous-batching decoder over `model` (and optionally a `draft` model for speculative decoding).

  Not thread-safe: one thread calls add_request / abort / step (the HTTP server runs it in its own thread).
  """

  def __init__(self, model: Transformer, cfg, tokenizer, *, draft: Transformer | None = None,
               mesh: jax.sharding.Mesh | None = None, model_name: str = "maxlm"):
    """mesh: where `model` (and `draft`) live, laid out by cfg's sharding rules; default: layout.serving_mesh."""
    sv = cfg.serve
    self.cfg, self.tokenizer, self.model_name = cfg, tokenizer, model_name
    if mesh is None:
      self.mesh, self.rules = layout.serving_mesh(cfg)
    else:
      self.mesh, self.rules = mesh, sharding.config_rules(cfg)
      layout.check_model_layout(cfg, dict(mesh.shape), self.rules)
    self.max_len = sv.max_len or cfg.model.max_seq_len
    self.max_batch = sv.max_batch
    self.vocab_size = tokenizer.vocab_size
    if self.vocab_size > cfg.model.vocab_size:
      raise ValueError(f"tokenizer has {self.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}")
    self.eos_id = tokenizer.eos_id
    self._eos_arg = -1 if self.eos_id is None else self.eos_id  # the decode loops' static eos id (-1: none)
    self.spec_k = sv.speculative_k if draft is not None else 0
    self.paged = sv.kv_layout == "paged"
    capacity = self.max_len + self.spec_k  # a verification writes up to K positions past the last token
    self.pallas_backend = None if cfg.model.pallas_backend == "auto" else cfg.model.pallas_backend
    platform = kernel_backend.resolve(self.pallas_backend)
    self.attention = sv.attention if sv.attention != "auto" else (
      "pallas" if self.paged and platform in ("tpu", "gpu") else "xla")
    if self.paged:
      self.page_size = sv.page_size
      max_pages = -(-capacity // self.page_size)
      num_pages = sv.num_pages or self.max_batch * max_pages + 1
    else:
      self.page_size, max_pages, num_pages = capacity, 1, self.max_batch + 1
    self.max_pages = max_pages
    self.prefill_chunk = sv.prefill_chunk
    self.decode_steps = sv.decode_steps
    kv_dtype = sv.kv_cache if sv.kv_cache != "auto" else str(model.dtype)
    kv_dtype = "bfloat16" if kv_dtype == "bf16" else kv_dtype

    def spec_of(decoder: Decoder) -> CacheSpec:
      attn = decoder.blocks[0].attn
      return CacheSpec(layers=len(decoder.blocks), kv_heads=attn.kv_heads, head_dim=attn.head_dim,
                       page_size=self.page_size, num_pages=num_pages, max_pages=max_pages, dtype=kv_dtype)

    with sharding.use_mesh(self.mesh, self.rules):
      decoder = Decoder(model, fuse_projections=sv.fuse_projections)
      self.cache_spec = spec_of(decoder)
      self.graphdef, self.state = nnx.split(decoder)
      self._static = Static(self.graphdef)
      # Placed as the step's outputs will be, so the second call does not retrace for a new input sharding.
      replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      self.cache = jax.device_put(kv_cache.init_cache(self.cache_spec), replicated)
      self.draft_graphdef = self.draft_state = self.draft_cache = None
      if draft is not None:
        draft_decoder = Decoder(draft, fuse_projections=sv.fuse_projections)
        self.draft_graphdef, self.draft_state = nnx.split(draft_decoder)
        self._draft_static = Static(self.draft_graphdef)
        self._pair_static = Static((self.graphdef, self.draft_graphdef))
        self.draft_cache = jax.device_put(kv_cache.init_cache(spec_of(draft_decoder)), replicated)
    self.default_seed = sv.seed
    self._arrivals = itertools.count()
    self.counters = {"tokens_generated_total": 0, "requests_finished_total": 0, "spec_proposed_total": 0,
                     "spec_accepted_total": 0, "spec_rounds_total": 0, "preemptions_total": 0,
                     "prefill_tokens_total": 0}
    self.scheduler = Scheduler(max_batch=self.max_batch, max_queue=sv.max_queue, paged=self.paged,
                               page_size=self.page_size, max_pages=max_pages, num_pages=num_pages,
                               prefix_sharing=sv.prefix_sharing, counters=self.counters)

  # ------------------------------------------------------------------------------------------- public API

  @classmethod
  def from_workdir(cls, workdir: str, overrides: tuple[str, ...] = (), draft_workdir: str | None = None) -> Engine:
    """An engine over a trained (or imported) workdir, quantized per serve.weights; draft for speculation."""
    from pathlib import Path  # noqa: PLC0415

    from maxlm.serve.loading import load_served  # noqa: PLC0415  (checkpoints, quantization)
    served = load_served(workdir, overrides, draft_workdir)
    name = served.cfg.serve.model_name or Path(workdir).resolve().name
    return cls(served.model, served.cfg, served.tokenizer, draft=served.draft, model_name=name, mesh=served.mesh)

  def add_request(self, request: Request) -> None:
    """Queues a request; RequestError names a bad field, QueueFull when serve.max_queue requests wait."""
    if request.id in self.scheduler.by_id:
      raise RequestError("id", f"request id {request.id!r} is already running")
    ids = request.prompt_ids
    if not ids:
      raise RequestError("prompt", "is empty")
    if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
      raise RequestError("prompt", f"token ids must be in [0, {self.vocab_size})")
    if len(ids) >= self.max_len:
      raise RequestError("prompt", f"{len(ids)} tokens leave no room in the context of {self.max_len} tokens")
    request.params.validate(self.vocab_size)
    if len(ids) + request.params.max_tokens > self.max_len:
      raise RequestError("max_tokens", f"{request.params.max_tokens} + {len(ids)} prompt tokens exceed the context "
                                       f"of {self.max_len} tokens")
    seed = request.params.seed if request.params.seed is not None else (self.default_seed * 1_000_003
                                                                        + next(self._arrivals)) % 2**63
    self.scheduler.queue(Seq(request, seed, next(self._arrivals), list(ids), len(ids)))

  def abort(self, request_id: str) -> None:
    """Drops a request (its slot and pages are freed); unknown or finished ids are ignored."""
    self.scheduler.abort(request_id)

  def has_work(self) -> bool:
    return self.scheduler.has_work()

  def stats(self) -> dict[str, float]:
    """Queue, batch and KV-page occupancy plus running totals (the /metrics gauges and counters)."""
    used, total = self.scheduler.pages_used()
    return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running()), "kv_pages_used": used,
            "kv_pages_total": total, **self.counters}

  def kv_tokens(self) -> tuple[int, int]:
    """(tokens held in the cache by running requests, token slots reserved for them): the waste measure."""
    running = self.scheduler.running()
    used = self.scheduler.pages_used()[0]
    return sum(s.computed for s in running), used * self.page_size

  def step(self) -> list[RequestOutput]:
    """Admits, runs one prefill chunk and decode steps (or speculative rounds); returns the outputs.

    While no request waits for a free slot and none is prefilling, one device call runs up to serve.decode_steps
    decode steps (vLLM's multi-step scheduling): the host's per-token work is paid once per call, and a row that
    meets eos or its token budget stops on device. Otherwise one step, so a new request joins at once.
    """
    outputs: list[RequestOutput] = []
    sched = self.scheduler
    sched.admit()
    prefilling = [s for s in sched.running() if s.computed < len(s.tokens) - 1]
    if prefilling:
      outputs += self._prefill(prefilling)
    decoding = [s for s in sched.running() if s.computed == len(s.tokens) - 1]
    if decoding:
      joining = any(s.computed < len(s.tokens) - 1 for s in sched.running()) or (
        bool(sched.waiting) and None in sched.slots)
      steps = 1 if joining else self.decode_steps
      outputs += self._speculate(decoding, steps) if self.spec_k else self._decode(decoding, steps)
    return outputs

  def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    """Runs prompts to completion (batch use, tests, benchmarks); returns each one's generated token ids."""
    out = [[] for _ in prompts]
    for index, o in self.run_all(prompts, params):
      out[index] += o.token_ids
    return out

  def run_all(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
              ) -> Iterator[tuple[int, RequestOutput]]:
    """(prompt index, output) of every step's outputs until all prompts finish; prompts join the running batch as
    the waiting queue has room (continuous batching over more prompts than max_queue)."""
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    ids = [f"gen-{next(self._arrivals)}" for _ in prompts]
    index = {rid: i for i, rid in enumerate(ids)}
    pending = deque(zip(ids, prompts, params, strict=True))
    while pending or self.has_work():
      while pending and len(self.scheduler.waiting) < self.scheduler.max_queue:
        rid, prompt, p = pending.popleft()
        self.add_request(Request(rid, list(prompt), p))
      for o in self.step():
        if o.id in index:
          yield index[o.id], o

  # ------------------------------------------------------------------------------------------- device steps

  def _kv_len(self, longest: int) -> int:
    return min(_pow2(longest, _MIN_CHUNK), self.max_pages * self.page_size if self.paged else self.page_size)

  def _sampling(self, seqs: list[Seq | None]) -> tuple[dict[str, np.ndarray], bool | None]:
    """Host sampling arrays and the static mode: None = all greedy, else whether top-k/top-p are needed."""
    params = [s.params if s is not None else None for s in seqs]
    seeds = [s.seed if s is not None else 0 for s in seqs]
    greedy = all(p is None or p.temperature == 0 for p in params)
    return sampling.batch_arrays(params, seeds, self.vocab_size), None if greedy else sampling.needs_filter(params)

  def _call(self, batch: dict[str, np.ndarray], sp, use_filter: bool, kv_len: int, attention: str) -> np.ndarray:
    args = (batch["tokens"], batch["positions"], batch["valid"], batch["page_table"], batch["lengths"],
            batch["logits_index"], sp)
    static = {"kv_len": kv_len, "attention": attention, "pallas_backend": self.pallas_backend,
              "vocab_limit": self.vocab_size, "rules": self.rules}
    with sharding.use_mesh(self.mesh, self.rules):
      if self.draft_state is not None:
        _, self.draft_cache = programs.run_step(self.draft_state, self.draft_cache, *args,
                                                graphdef=self._draft_static, use_filter=False, sample=False, **static)
      tokens, self.cache = programs.run_step(self.state, self.cache, *args, graphdef=self._static,
                                             use_filter=use_filter, sample=True, **static)
      return np.asarray(tokens)

  def _prefill(self, seqs: list[Seq]) -> list[RequestOutput]:
    chosen = []
    for s in seqs[:self.max_batch]:
      end = min(len(s.tokens), s.computed + self.prefill_chunk)
      if s.slot >= 0:
        self.scheduler.ensure_pages(s, end)
        chosen.append((s, s.computed, end))
    chosen = [(s, a, b) for s, a, b in chosen if s.slot >= 0]  # a later allocation may have preempted one
    if not chosen:
      return []
    rows = _pow2(len(chosen))
    t = min(_pow2(max(b - a for _, a, b in chosen), _MIN_CHUNK), self.prefill_chunk)  # chunks <= prefill_chunk
    batch = {"tokens": np.zeros((rows, t), np.int32), "positions": np.zeros((rows, t), np.int32),
             "valid": np.zeros((rows, t), bool), "lengths": np.zeros(rows, np.int32),
             "logits_index": np.zeros(rows, np.int32)}
    for i, (s, a, b) in enumerate(chosen):
      n = b - a
      batch["tokens"][i, :n] = s.tokens[a:b]
      batch["positions"][i, :] = np.arange(a, a + t)
      batch["valid"][i, :n] = True
      batch["lengths"][i] = b
      batch["logits_index"][i] = n - 1
    batch["page_table"] = self.scheduler.page_table([s for s, _, _ in chosen], rows)
    sp, use_filter = self._sampling([s for s, _, _ in chosen] + [None] * (rows - len(chosen)))
    kv_len = self._kv_len(max(b for _, _, b in chosen))
    sampled = self._call(batch, sp, use_filter, kv_len, "xla")
    outputs = []
    for i, (s, a, b) in enumerate(chosen):
      s.computed = b
      self.counters["prefill_tokens_total"] += b - a
      self.scheduler.index_prefix(s)
      if b == len(s.tokens):
        out = self._append(s, [int(sampled[i])])
        if out is not None:
          outputs.append(out)
    return outputs

  def _budget(self, s: Seq) -> int:
    """Tokens s may still generate (max_tokens and the context both bound it)."""
    return min(s.params.max_tokens - len(s.generated), self.max_len - len(s.tokens))

  def _plan(self, seqs: list[Seq], n: int, k: int) -> tuple[int, list[Seq | None], dict[str, np.ndarray], int]:
    """Pages and per-row arrays for up to n decode steps (k=0) or speculative rounds of k proposals.

    Returns (n, the decode slots' sequences, arrays prev/last/pos/budget/eos_stop/page_table, kv_len); n drops to
    1 when the free pages do not cover n ahead for every row (one step may preempt instead).
    """
    def reach(s: Seq, n: int) -> int:  # tokens covered by the K/V writes of up to n steps / rounds
      return s.computed + min(self._budget(s) + k, n * (k + 1))

    sched = self.scheduler
    if self.paged and n > 1:
      need = sum(kv_cache.pages_for(reach(s, n), self.page_size) - len(s.pages) for s in seqs)
      n = n if need <= sched.allocator.num_free else 1
    for s in seqs:
      if s.slot >= 0:
        sched.ensure_pages(s, reach(s, n))
    rows = self.max_batch
    active = [s if s is not None and s.computed == len(s.tokens) - 1 else None for s in sched.slots]
    arrays = {name: np.zeros(rows, np.int32) for name in ("prev", "last", "pos", "budget")}
    arrays["eos_stop"] = np.zeros(rows, bool)
    for i, s in enumerate(active):
      if s is not None:
        arrays["prev"][i] = s.tokens[-2] if len(s.tokens) > 1 else 0
        arrays["last"][i], arrays["pos"][i] = s.tokens[-1], s.computed
        arrays["budget"][i] = min(self._budget(s), n * (k + 1))
        arrays["eos_stop"][i] = not s.params.ignore_eos
    arrays["page_table"] = sched.page_table(active, rows)
    kv_len = self._kv_len(max((reach(s, n) for s in active if s is not None), default=1))
    return n, active, arrays, kv_len

  def _decode(self, seqs: list[Seq], steps: int) -> list[RequestOutput]:
    steps, active, a, kv_len = self._plan(seqs, steps, 0)
    sp, use_filter = self._sampling(active)
    with sharding.use_mesh(self.mesh, self.rules):
      sampled, done, self.cache = programs.run_decode(
        self.state, self.cache, a["last"], a["pos"], a["budget"], a["eos_stop"], a["page_table"], sp,
        np.int32(steps), graphdef=self._static, rules=self.rules, kv_len=kv_len, attention=self.attention,
        use_filter=use_filter, pallas_backend=self.pallas_backend, vocab_limit=self.vocab_size,
        max_steps=self.decode_steps, eos_id=self._eos_arg)
    sampled, done = np.asarray(sampled), int(done)
    outputs = []
    for i, s in enumerate(active):
      if s is not None:
        n = min(done, int(a["budget"][i]))
        s.computed += n  # (a row that stopped at eos early finishes below and is released)
        out = self._append(s, sampled[i, :n].tolist())
        if out is not None:
          outputs.append(out)
    return outputs

  def _speculate(self, seqs: list[Seq], rounds: int) -> list[RequestOutput]:
    k = self.spec_k
    rounds, active, a, kv_len = self._plan(seqs, rounds, k)
    sp, use_filter = self._sampling(active)
    with sharding.use_mesh(self.mesh, self.rules):
      tokens, emitted, accepted, proposed, ran, (self.cache, self.draft_cache) = programs.run_speculative(
        (self.state, self.draft_state), (self.cache, self.draft_cache), a["prev"], a["last"], a["pos"], a["budget"],
        a["eos_stop"], a["page_table"], sp, np.int32(rounds), graphdefs=self._pair_static, rules=self.rules, k=k,
        kv_len=kv_len, attention=self.attention, use_filter=use_filter, pallas_backend=self.pallas_backend,
        vocab_limit=self.vocab_size, max_rounds=self.decode_steps, eos_id=self._eos_arg)
    tokens, emitted, accepted, proposed, ran = map(np.asarray, (tokens, emitted, accepted, proposed, ran))
    outputs = []
    for i, s in enumerate(active):
      if s is None:
        continue
      n = int(emitted[i])
      self.counters["spec_proposed_total"] += int(proposed[i])
      self.counters["spec_accepted_total"] += int(accepted[i])
      self.counters["spec_rounds_total"] += int(ran[i])
      s.computed += n
      out = self._append(s, tokens[i, :n].tolist())
      self.scheduler.trim(s)  # roll back: pages past the kept tokens go back to the pool
      if out is not None:
        outputs.append(out)
    return outputs

  # ------------------------------------------------------------------------------------------- outputs

  def _append(self, s: Seq, new: list[int]) -> RequestOutput | None:
    """Adds sampled tokens to s, applies eos / stop strings / max_tokens / context; returns its output.

    Tokens are taken one at a time, so a multi-token step (decode_steps, speculation) ends a request exactly
    where a one-token step would: the tokens after eos, a stop string or the budget are dropped.
    """
    p = s.params
    cut = None
    for tok in new:
      if tok == self.eos_id and not p.ignore_eos:
        s.finish_reason = "stop"
        break
      s.tokens.append(tok)
      self.counters["tokens_generated_total"] += 1
      if p.stop:
        cut = find_stop(s.text.update(self.tokenizer, s.generated, final=False), p.stop, s.emitted_chars)
        if cut is not None:
          s.finish_reason = "stop"
          break
      if len(s.generated) >= p.max_tokens or len(s.tokens) >= self.max_len:
        s.finish_reason = "length"
        break
    finished = s.finish_reason is not None
    text = s.text.update(self.tokenizer, s.generated, final=finished)
    if cut is not None:
      text = text[:cut]
    safe = streamable(text, p.stop, finished)
    delta = text[s.emitted_chars:max(safe, s.emitted_chars)]
    s.emitted_chars += len(delta)
    ids = s.generated[s.emitted_tokens:]
    s.emitted_tokens = len(s.generated)
    if finished:
      self.counters["requests_finished_total"] += 1
      self.scheduler.finish(s)
    if not ids and not delta and not finished:
      return None
    return RequestOutput(s.request.id, ids, delta, finished, s.finish_reason, s.num_prompt, len(s.generated))
