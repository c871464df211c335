"""The serving engine: continuous batching over a KV cache, chunked prefill, sampling, speculative decoding.

Every `step()` admits waiting requests into free decode slots (reusing cached prefix pages), runs one prefill
chunk for the requests still reading their prompt, and one decode step (or one speculative round) for the
others; requests join and leave the batch at any step. Device work has fixed shapes: the decode batch is always
`serve.max_batch` rows, prefill rows and chunk lengths are padded to powers of two, and the attended span to a
power-of-two bucket, so a handful of programs serve every request length.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels_pallas import backend as kernel_backend
from maxlm import sharding
from maxlm.models.transformer import Transformer
from maxlm.serve import kv_cache, sampling
from maxlm.serve.forward import Decoder, forward_cached, with_dense, without_dense
from maxlm.serve.kv_cache import CacheSpec, OutOfPages, PageAllocator
from maxlm.serve.request import QueueFull, Request, RequestError, RequestOutput, SamplingParams
from maxlm.serve.speculative import speculative_rounds

log = logging.getLogger(__name__)
_MIN_CHUNK = 16


def _pow2(n: int, lo: int = 1) -> int:
  return max(lo, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass
class _Seq:
  """A request's serving state: its tokens, how many have K/V in the cache, its pages and emitted text."""

  request: Request
  seed: int
  arrival: int
  tokens: list[int]
  num_prompt: int
  computed: int = 0
  pages: list[int] = dataclasses.field(default_factory=list)
  hashes: list[bytes] = dataclasses.field(default_factory=list)
  indexed: int = 0
  slot: int = -1
  text: str = ""  # detokenized completion so far
  prefix_offset: int = 0  # incremental detokenization window over the generated ids (as vLLM / HF streamers)
  read_offset: int = 0
  emitted_chars: int = 0
  emitted_tokens: int = 0
  finish_reason: str | None = None

  @property
  def params(self) -> SamplingParams:
    return self.request.params

  @property
  def generated(self) -> list[int]:
    return self.tokens[self.num_prompt:]


class Engine:
  """Continuous-batching decoder over `model` (and optionally a `draft` model for speculative decoding).

  Not thread-safe: one thread calls add_request / abort / step (the HTTP server runs it in its own thread).
  """

  def __init__(self, model: Transformer, cfg, tokenizer, *, draft: Transformer | None = None,
               mesh: jax.sharding.Mesh | None = None, model_name: str = "maxlm"):
    sv = cfg.serve
    self.cfg, self.tokenizer, self.model_name = cfg, tokenizer, model_name
    self.mesh = mesh if mesh is not None else sharding.make_mesh(cfg.mesh, jax.devices()[:sv.devices])
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
    self.prefix_sharing = self.paged and sv.prefix_sharing
    self.prefill_chunk = sv.prefill_chunk
    self.decode_steps = sv.decode_steps
    kv_dtype = sv.kv_cache if sv.kv_cache != "auto" else str(model.dtype)
    kv_dtype = "bfloat16" if kv_dtype == "bf16" else kv_dtype

    def spec_of(decoder: Decoder) -> CacheSpec:
      attn = decoder.blocks[0].attn
      return CacheSpec(layers=len(decoder.blocks), kv_heads=attn.kv_heads, head_dim=attn.head_dim,
                       page_size=self.page_size, num_pages=num_pages, max_pages=max_pages, dtype=kv_dtype)

    self.allocator = PageAllocator(num_pages) if self.paged else None
    with sharding.use_mesh(self.mesh):
      decoder = Decoder(model)
      self.cache_spec = spec_of(decoder)
      self.graphdef, self.state = nnx.split(decoder)
      self._static = _Static(self.graphdef)
      # Placed as the step's outputs will be, so the second call does not retrace for a new input sharding.
      replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      self.cache = jax.device_put(kv_cache.init_cache(self.cache_spec), replicated)
      self.draft_graphdef = self.draft_state = self.draft_cache = None
      if draft is not None:
        draft_decoder = Decoder(draft)
        self.draft_graphdef, self.draft_state = nnx.split(draft_decoder)
        self._draft_static = _Static(self.draft_graphdef)
        self._pair_static = _Static((self.graphdef, self.draft_graphdef))
        self.draft_cache = jax.device_put(kv_cache.init_cache(spec_of(draft_decoder)), replicated)
    self.waiting: deque[_Seq] = deque()
    self.slots: list[_Seq | None] = [None] * self.max_batch
    self.by_id: dict[str, _Seq] = {}
    self.max_queue = sv.max_queue
    self.default_seed = sv.seed
    self._arrivals = itertools.count()
    self.counters = {"tokens_generated_total": 0, "requests_finished_total": 0, "spec_proposed_total": 0,
                     "spec_accepted_total": 0, "spec_rounds_total": 0, "preemptions_total": 0,
                     "prefill_tokens_total": 0}

  # ------------------------------------------------------------------------------------------- public API

  @classmethod
  def from_workdir(cls, workdir: str, overrides: tuple[str, ...] = (), draft_workdir: str | None = None) -> Engine:
    """An engine over a trained (or imported) workdir, quantized per serve.weights; draft for speculation."""
    from pathlib import Path  # noqa: PLC0415

    from maxlm.serve.quantize import quantize_model  # noqa: PLC0415
    from maxlm.workdir import load_model, load_workdir_config, load_workdir_tokenizer  # noqa: PLC0415
    cfg = load_workdir_config(workdir, overrides)
    if cfg.serve.devices > jax.device_count():
      raise ValueError(f"serve.devices={cfg.serve.devices}: only {jax.device_count()} devices are available")
    devices = jax.devices()[:cfg.serve.devices]
    model, cfg, _ = load_model(workdir, overrides, devices=devices)
    tokenizer = load_workdir_tokenizer(workdir, cfg)
    model = quantize_model(model, cfg.serve.weights, group=cfg.serve.int4_group)
    draft = None
    if draft_workdir:
      draft, dcfg, _ = load_model(draft_workdir, tuple(o for o in overrides if o.startswith("--config.serve.")),
                                  devices=devices)
      if dcfg.model.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"draft {draft_workdir} has model.vocab_size={dcfg.model.vocab_size}, the target "
                         f"{workdir} {cfg.model.vocab_size}: speculative decoding needs one vocabulary")
      dtok = load_workdir_tokenizer(draft_workdir, dcfg)
      if dtok.vocab_size != tokenizer.vocab_size or dtok.encode("The quick brown fox, 123!") != tokenizer.encode(
          "The quick brown fox, 123!"):
        raise ValueError(f"draft {draft_workdir} and target {workdir} have different tokenizers")
      draft = quantize_model(draft, dcfg.serve.weights, group=dcfg.serve.int4_group)
    name = cfg.serve.model_name or Path(workdir).resolve().name
    return cls(model, cfg, tokenizer, draft=draft, model_name=name, mesh=sharding.make_mesh(cfg.mesh, devices))

  def add_request(self, request: Request) -> None:
    """Queues a request; RequestError names a bad field, QueueFull when serve.max_queue requests wait."""
    if request.id in self.by_id:
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
    if len(self.waiting) >= self.max_queue:
      raise QueueFull(f"{len(self.waiting)} requests are waiting (serve.max_queue={self.max_queue})")
    seed = request.params.seed if request.params.seed is not None else (self.default_seed * 1_000_003
                                                                        + next(self._arrivals)) % 2**63
    seq = _Seq(request, seed, next(self._arrivals), list(ids), len(ids))
    self.waiting.append(seq)
    self.by_id[request.id] = seq

  def abort(self, request_id: str) -> None:
    """Drops a request (its slot and pages are freed); unknown or finished ids are ignored."""
    seq = self.by_id.pop(request_id, None)
    if seq is None:
      return
    if seq.slot >= 0:
      self._release(seq)
    else:
      self.waiting.remove(seq)

  def has_work(self) -> bool:
    return bool(self.waiting) or any(s is not None for s in self.slots)

  def stats(self) -> dict[str, float]:
    """Queue, batch and KV-page occupancy plus running totals (the /metrics gauges and counters)."""
    running = [s for s in self.slots if s is not None]
    used = self.allocator.num_used if self.paged else len(running)
    total = (self.allocator.num_pages - 1) if self.paged else self.max_batch
    return {"waiting": len(self.waiting), "running": len(running), "kv_pages_used": used,
            "kv_pages_total": total, **self.counters}

  def kv_tokens(self) -> tuple[int, int]:
    """(tokens held in the cache by running requests, token slots reserved for them): the waste measure."""
    running = [s for s in self.slots if s is not None]
    held = sum(s.computed for s in running)
    if self.paged:
      return held, self.allocator.num_used * self.page_size
    return held, len(running) * self.page_size

  def step(self) -> list[RequestOutput]:
    """Admits, runs one prefill chunk and decode steps (or speculative rounds); returns the outputs.

    While no request waits for a free slot and none is prefilling, one device call runs up to serve.decode_steps
    decode steps (vLLM's multi-step scheduling): the host's per-token work is paid once per call, and a row that
    meets eos or its token budget stops on device. Otherwise one step, so a new request joins at once.
    """
    outputs: list[RequestOutput] = []
    self._admit()
    prefilling = [s for s in self._running() if s.computed < len(s.tokens) - 1]
    if prefilling:
      outputs += self._prefill(prefilling)
    decoding = [s for s in self._running() if s.computed == len(s.tokens) - 1]
    if decoding:
      joining = any(s.computed < len(s.tokens) - 1 for s in self._running()) or (
        bool(self.waiting) and None in self.slots)
      steps = 1 if joining else self.decode_steps
      outputs += self._speculate(decoding, steps) if self.spec_k else self._decode(decoding, steps)
    return outputs

  def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    """Runs prompts to completion (batch use, tests, benchmarks); returns each one's generated token ids."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [f"gen-{next(self._arrivals)}" for _ in prompts]
    out = {i: [] for i in ids}
    pending = deque(zip(ids, prompts, params, strict=True))
    while pending or self.has_work():
      while pending and len(self.waiting) < self.max_queue:
        rid, prompt, p = pending.popleft()
        self.add_request(Request(rid, list(prompt), p))
      for o in self.step():
        if o.id in out:
          out[o.id] += o.token_ids
    return [out[i] for i in ids]

  # ----------------------------------------------------------------------------------------- scheduling

  def _running(self) -> list[_Seq]:
    return sorted((s for s in self.slots if s is not None), key=lambda s: s.arrival)

  def _admit(self) -> None:
    while self.waiting and None in self.slots:
      seq = self.waiting[0]
      if self.paged:
        need = kv_cache.pages_for(len(seq.tokens) + 1, self.page_size)
        if self.allocator.num_free < need and any(s is not None for s in self.slots):
          return  # wait for running requests to free pages rather than thrash
      self.waiting.popleft()
      seq.slot = self.slots.index(None)
      self.slots[seq.slot] = seq
      seq.computed, seq.pages, seq.indexed = 0, [], 0
      if not self.paged:
        seq.pages = [seq.slot + 1]
      elif self.prefix_sharing:
        full = (seq.num_prompt - 1) // self.page_size  # the last prompt token is always recomputed (its logits)
        seq.hashes = PageAllocator.page_hashes(seq.tokens, self.page_size, full)
        seq.pages = self.allocator.match_prefix(seq.hashes)
        seq.computed, seq.indexed = len(seq.pages) * self.page_size, len(seq.pages)

  def _release(self, seq: _Seq) -> None:
    if self.paged:
      self.allocator.release(seq.pages)
    seq.pages = []
    self.slots[seq.slot] = None
    seq.slot = -1

  def _ensure_pages(self, seq: _Seq, tokens: int) -> None:
    """Gives seq pages for its first `tokens` positions, preempting younger requests if the pool is empty."""
    if not self.paged:
      return
    need = kv_cache.pages_for(tokens, self.page_size) - len(seq.pages)
    while need > 0:
      try:
        seq.pages += self.allocator.allocate(need)
        return
      except OutOfPages:
        victims = [s for s in self._running() if s is not seq]
        if not victims:
          raise RuntimeError(f"serve.num_pages={self.allocator.num_pages} cannot hold one sequence of {tokens} "
                             "tokens") from None
        self._preempt(victims[-1])

  def _preempt(self, seq: _Seq) -> None:
    """Frees a running request's pages and requeues it first; it resumes by recomputing its tokens."""
    log.info("preempting request %s (KV pages exhausted); it will be recomputed", seq.request.id)
    self.counters["preemptions_total"] += 1
    self._release(seq)
    seq.computed = 0
    self.waiting.appendleft(seq)

  def _page_table(self, seqs: list[_Seq | None], rows: int) -> np.ndarray:
    table = np.full((rows, self.max_pages), kv_cache.SCRATCH_PAGE, np.int32)
    for i, s in enumerate(seqs):
      if s is not None:
        table[i, :len(s.pages)] = s.pages
    return table

  def _kv_len(self, longest: int) -> int:
    return min(_pow2(longest, _MIN_CHUNK), self.max_pages * self.page_size if self.paged else self.page_size)

  def _sampling(self, seqs: list[_Seq | None]) -> tuple[dict[str, np.ndarray], bool | None]:
    """Host sampling arrays and the static mode: None = all greedy, else whether top-k/top-p are needed."""
    params = [s.params if s is not None else None for s in seqs]
    seeds = [s.seed if s is not None else 0 for s in seqs]
    greedy = all(p is None or p.temperature == 0 for p in params)
    return sampling.batch_arrays(params, seeds, self.vocab_size), None if greedy else sampling.needs_filter(params)

  # ------------------------------------------------------------------------------------------- device steps

  def _call(self, batch: dict[str, np.ndarray], sp, use_filter: bool, kv_len: int, attention: str) -> np.ndarray:
    args = (batch["tokens"], batch["positions"], batch["valid"], batch["page_table"], batch["lengths"],
            batch["logits_index"], sp)
    static = {"kv_len": kv_len, "attention": attention, "pallas_backend": self.pallas_backend,
              "vocab_limit": self.vocab_size}
    with sharding.use_mesh(self.mesh):
      if self.draft_state is not None:
        _, self.draft_cache = _run_step(self.draft_state, self.draft_cache, *args, graphdef=self._draft_static,
                                        use_filter=False, sample=False, **static)
      tokens, self.cache = _run_step(self.state, self.cache, *args, graphdef=self._static, use_filter=use_filter,
                                     sample=True, **static)
      return np.asarray(tokens)

  def _prefill(self, seqs: list[_Seq]) -> list[RequestOutput]:
    chosen = []
    for s in seqs[:self.max_batch]:
      end = min(len(s.tokens), s.computed + self.prefill_chunk)
      if s.slot >= 0:
        self._ensure_pages(s, end)
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
    batch["page_table"] = self._page_table([s for s, _, _ in chosen], rows)
    sp, use_filter = self._sampling([s for s, _, _ in chosen] + [None] * (rows - len(chosen)))
    kv_len = self._kv_len(max(b for _, _, b in chosen))
    sampled = self._call(batch, sp, use_filter, kv_len, "xla")
    outputs = []
    for i, (s, a, b) in enumerate(chosen):
      s.computed = b
      self.counters["prefill_tokens_total"] += b - a
      self._index_prefix(s)
      if b == len(s.tokens):
        out = self._append(s, [int(sampled[i])])
        if out is not None:
          outputs.append(out)
    return outputs

  def _index_prefix(self, s: _Seq) -> None:
    if not self.prefix_sharing:
      return
    done = min(len(s.hashes), s.computed // self.page_size)
    for i in range(s.indexed, done):
      self.allocator.index(s.pages[i], s.hashes[i])
    s.indexed = max(s.indexed, done)

  def _budget(self, s: _Seq) -> int:
    """Tokens s may still generate (max_tokens and the context both bound it)."""
    return min(s.params.max_tokens - len(s.generated), self.max_len - len(s.tokens))

  def _plan(self, seqs: list[_Seq], n: int, k: int) -> tuple[int, list[_Seq | None], dict[str, np.ndarray], int]:
    """Pages and per-row arrays for up to n decode steps (k=0) or speculative rounds of k proposals.

    Returns (n, the decode slots' sequences, arrays prev/last/pos/budget/eos_stop/page_table, kv_len); n drops to
    1 when the free pages do not cover n ahead for every row (one step may preempt instead).
    """
    def reach(s: _Seq, n: int) -> int:  # tokens covered by the K/V writes of up to n steps / rounds
      return s.computed + min(self._budget(s) + k, n * (k + 1))

    if self.paged and n > 1:
      need = sum(kv_cache.pages_for(reach(s, n), self.page_size) - len(s.pages) for s in seqs)
      n = n if need <= self.allocator.num_free else 1
    for s in seqs:
      if s.slot >= 0:
        self._ensure_pages(s, reach(s, n))
    rows = self.max_batch
    active = [s if s is not None and s.computed == len(s.tokens) - 1 else None for s in self.slots]
    arrays = {name: np.zeros(rows, np.int32) for name in ("prev", "last", "pos", "budget")}
    arrays["eos_stop"] = np.zeros(rows, bool)
    for i, s in enumerate(active):
      if s is not None:
        arrays["prev"][i] = s.tokens[-2] if len(s.tokens) > 1 else 0
        arrays["last"][i], arrays["pos"][i] = s.tokens[-1], s.computed
        arrays["budget"][i] = min(self._budget(s), n * (k + 1))
        arrays["eos_stop"][i] = not s.params.ignore_eos
    arrays["page_table"] = self._page_table(active, rows)
    kv_len = self._kv_len(max((reach(s, n) for s in active if s is not None), default=1))
    return n, active, arrays, kv_len

  def _decode(self, seqs: list[_Seq], steps: int) -> list[RequestOutput]:
    steps, active, a, kv_len = self._plan(seqs, steps, 0)
    sp, use_filter = self._sampling(active)
    with sharding.use_mesh(self.mesh):
      sampled, done, self.cache = _run_decode(
        self.state, self.cache, a["last"], a["pos"], a["budget"], a["eos_stop"], a["page_table"], sp,
        np.int32(steps), graphdef=self._static, kv_len=kv_len, attention=self.attention, use_filter=use_filter,
        pallas_backend=self.pallas_backend, vocab_limit=self.vocab_size, max_steps=self.decode_steps,
        eos_id=self._eos_arg)
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

  def _speculate(self, seqs: list[_Seq], rounds: int) -> list[RequestOutput]:
    k = self.spec_k
    rounds, active, a, kv_len = self._plan(seqs, rounds, k)
    sp, use_filter = self._sampling(active)
    with sharding.use_mesh(self.mesh):
      tokens, emitted, accepted, proposed, ran, (self.cache, self.draft_cache) = _run_speculative(
        (self.state, self.draft_state), (self.cache, self.draft_cache), a["prev"], a["last"], a["pos"], a["budget"],
        a["eos_stop"], a["page_table"], sp, np.int32(rounds), graphdefs=self._pair_static, k=k, kv_len=kv_len,
        attention=self.attention, use_filter=use_filter, pallas_backend=self.pallas_backend,
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
      if s.slot >= 0 and self.paged:  # roll back: pages past the kept tokens go back to the pool
        keep = kv_cache.pages_for(s.computed + 1, self.page_size)
        self.allocator.release(s.pages[keep:])
        del s.pages[keep:]
      if out is not None:
        outputs.append(out)
    return outputs

  # ------------------------------------------------------------------------------------------- outputs

  def _detokenize(self, s: _Seq) -> str:
    """The completion's text, decoding only a short window of new ids per step (not the whole completion).

    Pieces decode differently in context (leading spaces, multi-byte characters split over byte tokens), so the
    window starts a few tokens back; text ending in U+FFFD (an incomplete character) waits for more ids.
    """
    gen = s.generated
    before = self.tokenizer.decode(gen[s.prefix_offset:s.read_offset])
    after = self.tokenizer.decode(gen[s.prefix_offset:])
    if len(after) > len(before) and not after.endswith("\ufffd"):
      s.text += after[len(before):]
      s.prefix_offset, s.read_offset = s.read_offset, len(gen)
    elif s.finish_reason is not None and after.endswith("\ufffd"):
      s.text += after[len(before):]
    return s.text

  def _append(self, s: _Seq, new: list[int]) -> RequestOutput | None:
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
        text = self._detokenize(s)
        hits = [i for i in (text.find(stop, max(0, s.emitted_chars - len(stop) + 1)) for stop in p.stop) if i >= 0]
        if hits:
          cut, s.finish_reason = min(hits), "stop"
          break
      if len(s.generated) >= p.max_tokens or len(s.tokens) >= self.max_len:
        s.finish_reason = "length"
        break
    text = self._detokenize(s)
    if cut is not None:
      text = text[:cut]
    if s.finish_reason is None:
      safe = len(text) - (max((len(x) for x in p.stop), default=1) - 1)
    else:
      safe = len(text)
    delta = text[s.emitted_chars:max(safe, s.emitted_chars)]
    s.emitted_chars += len(delta)
    ids = s.generated[s.emitted_tokens:]
    s.emitted_tokens = len(s.generated)
    finished = s.finish_reason is not None
    if finished:
      self.counters["requests_finished_total"] += 1
      self._release(s)
      self.by_id.pop(s.request.id, None)
    if not ids and not delta and not finished:
      return None
    return RequestOutput(s.request.id, ids, delta, finished, s.finish_reason, s.num_prompt, len(s.generated))


def _next_tokens(logits: jax.Array, sp, lengths: jax.Array, use_filter: bool | None, vocab_limit: int) -> jax.Array:
  """Each row's next token; use_filter None = every row greedy (no keys, no draws)."""
  if use_filter is None:
    return sampling.greedy_tokens(logits, sp, vocab_limit)
  return sampling.sample(logits, sp, sampling.row_keys(sp, lengths), vocab_limit, use_filter)


@functools.partial(jax.jit, static_argnames=("graphdef", "kv_len", "attention", "use_filter", "sample",
                                             "pallas_backend", "vocab_limit"), donate_argnames=("cache",))
def _run_step(state, cache, tokens, positions, valid, page_table, lengths, logits_index, sp, *, graphdef, kv_len,
              attention, use_filter, sample, pallas_backend, vocab_limit):
  """One prefill chunk or decode step: the new cache and (if `sample`) each row's next token."""
  logits, cache = forward_cached(nnx.merge(graphdef.value, state), cache, tokens, positions, valid, page_table, lengths,
                                 kv_len=kv_len, attention=attention, pallas_backend=pallas_backend,
                                 logits_index=logits_index)
  if not sample:
    return None, cache
  return _next_tokens(logits, sp, lengths, use_filter, vocab_limit), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "kv_len", "attention", "use_filter", "pallas_backend",
                                             "vocab_limit", "max_steps", "eos_id"), donate_argnames=("cache",))
def _run_decode(state, cache, last, pos, budget, eos_stop, page_table, sp, steps, *, graphdef, kv_len, attention,
                use_filter, pallas_backend, vocab_limit, max_steps, eos_id):
  """Up to `steps` (<= max_steps) decode steps in one program: (tokens [b, max_steps], steps run, new cache).

  Row i feeds back its own samples from token last[i] at position pos[i]; it stops after budget[i] tokens or at
  eos (where eos_stop[i]). Keys depend on (seed, position) only, so the tokens equal one-step decoding's.
  """
  model = nnx.merge(graphdef.value, state)
  b = last.shape[0]
  zero = jnp.zeros(b, jnp.int32)

  def body(carry):
    i, tok, active, cache, out = carry
    p = pos + i
    lengths = jnp.where(active, p + 1, 1)
    logits, cache = forward_cached(model, cache, tok[:, None], p[:, None], active[:, None], page_table, lengths,
                                   kv_len=kv_len, attention=attention, pallas_backend=pallas_backend,
                                   logits_index=zero)
    nxt = jnp.where(active, _next_tokens(logits, sp, lengths, use_filter, vocab_limit), 0)
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
    active = active & (i + 1 < budget) & ~(eos_stop & (nxt == eos_id))
    return i + 1, nxt, active, cache, out

  def cond(carry):
    return (carry[0] < steps) & jnp.any(carry[2])

  dense = attention == "xla" and "k_scale" not in cache[0]  # (int8 pages: read back as stored, requantised)
  init = (jnp.int32(0), last, budget > 0, with_dense(cache, page_table, kv_len) if dense else cache,
          jnp.zeros((b, max_steps), jnp.int32))
  done, _, _, cache, out = jax.lax.while_loop(cond, body, init)
  return out, done, without_dense(cache) if dense else cache


class _Static:
  """A static jit argument hashed once: hashing a GraphDef walks the whole module graph, on every call."""

  __slots__ = ("value", "_hash")

  def __init__(self, value):
    self.value, self._hash = value, hash(value)

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other) -> bool:
    return isinstance(other, _Static) and (self.value is other.value or self.value == other.value)


# Module level so engines over the same model (equal graphdefs) and shapes share compiled programs.
@functools.partial(jax.jit, static_argnames=("graphdefs", "k", "kv_len", "attention", "use_filter", "pallas_backend",
                                             "vocab_limit", "max_rounds", "eos_id"), donate_argnames=("caches",))
def _run_speculative(states, caches, *args, graphdefs: _Static, **static):
  """speculative_rounds, jitted with the (target, draft) graphdefs as one pre-hashed static argument."""
  return speculative_rounds(states, caches, *args, graphdefs=graphdefs.value, **static)
