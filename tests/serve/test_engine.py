"""The serving engine against full-forward references: KV-cached decoding, paged vs contiguous, prefix sharing,
continuous batching, preemption, sampling controls, int8 KV and speculative decoding (greedy and exact sampling)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import VOCAB, CharTokenizer, make_engine, make_model, random_prompts, serve_config
from scipy import stats

from maxlm import sharding
from maxlm.generate import sample_tokens
from maxlm.serve import kv_cache, layout, sampling
from maxlm.serve.engine import Engine
from maxlm.serve.forward import forward_cached
from maxlm.serve.kv_cache import CacheSpec, OutOfPages, PageAllocator
from maxlm.serve.request import QueueFull, Request, RequestError, SamplingParams
from maxlm.serve.speculative import accept
from maxlm.sharding import RulesError
from maxlm.train.state import abstract_params, build_model

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = random_prompts((5, 23, 40, 9, 17, 33))  # 6 requests on 4 slots: they join and leave the batch


@pytest.fixture(scope="module")
def reference(model):
  """Greedy continuations by repeated full forward passes (no cache) of every prompt."""
  graphdef, state = nnx.split(model)
  return [sample_tokens(graphdef, state, p, GREEDY.max_tokens, max_len=64, temperature=0) for p in PROMPTS]


# ------------------------------------------------------------------------------------------------ cache + forward


@pytest.mark.parametrize("dtype,page_size,tol", [("float32", 4, 2e-5), ("float32", 64, 2e-5), ("int8", 4, 0.03)])
def test_cached_forward_equals_full_forward(model, dtype, page_size, tol):
  """Prefill 13 tokens then decode 7 one at a time: every logit equals the full-sequence forward's
  (int8 K/V: within 3% of the logits' range)."""
  tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, VOCAB)
  full = model(tokens)
  max_pages = 64 // page_size
  spec = CacheSpec(2, 2, 8, page_size, 2 * max_pages + 1, max_pages, dtype)
  cache = kv_cache.init_cache(spec)
  table = jnp.asarray(np.arange(1, 2 * max_pages + 1, dtype=np.int32).reshape(2, max_pages)[:, ::-1].copy())
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  logits, cache = forward_cached(model, cache, jnp.pad(tokens[:, :13], ((0, 0), (0, 3))), pos, pos < 13, table,
                                 jnp.array([13, 13]), kv_len=16)
  errors = [jnp.max(jnp.abs(logits[:, :13] - full[:, :13]))]
  for i in range(13, 20):
    logits, cache = forward_cached(model, cache, tokens[:, i:i + 1], jnp.full((2, 1), i), jnp.ones((2, 1), bool),
                                   table, jnp.array([i + 1, i + 1]), kv_len=32, logits_index=jnp.zeros(2, jnp.int32))
    errors.append(jnp.max(jnp.abs(logits - full[:, i])))
  scale = float(jnp.max(full) - jnp.min(full))
  assert max(map(float, errors)) <= tol * scale


def test_int8_page_write_requantizes_within_half_step():
  """Writing tokens one by one into an int8 page keeps every stored value within half a step of the final scale."""
  x = jax.random.normal(jax.random.key(0), (1, 8, 2, 4)) * jnp.arange(1, 9)[None, :, None, None]  # growing range
  spec = CacheSpec(1, 2, 4, 8, 2, 1, "int8")
  layer = kv_cache.init_cache(spec)[0]
  table = jnp.array([[1]], jnp.int32)
  for i in range(8):
    layer = kv_cache.write_kv(layer, x[:, i:i + 1], x[:, i:i + 1], jnp.array([[i]]), jnp.ones((1, 1), bool), table,
                              jnp.array([i + 1]))
  k, _ = kv_cache.gather_kv(layer, table, 8)
  step = np.asarray(layer["k_scale"][1])  # [kv]
  np.testing.assert_allclose(np.asarray(jnp.max(jnp.abs(x), axis=(0, 1, 3))) / 127, step, rtol=1e-6)
  assert np.all(np.abs(np.asarray(k - x)) <= step[None, None, :, None] * (0.5 * 8 + 1e-3))  # <= 1 rounding/write


def test_page_allocator_refcounts_and_prefix_reuse():
  alloc = PageAllocator(6)
  a = alloc.allocate(3)
  assert 0 not in a and alloc.num_used == 3
  hashes = PageAllocator.page_hashes(list(range(12)), 4, 2)
  alloc.index(a[0], hashes[0])
  alloc.index(a[1], hashes[1])
  shared = alloc.match_prefix(hashes)
  assert shared == a[:2] and alloc.refs[a[0]] == 2
  alloc.release(a)
  assert alloc.num_used == 2  # the shared pages are still held
  alloc.release(shared)
  assert alloc.num_used == 0
  assert alloc.match_prefix(hashes) == a[:2]  # freed but not reused yet: still found (prefix caching)
  alloc.release(a[:2])
  with pytest.raises(OutOfPages):
    alloc.allocate(6)
  fresh = alloc.allocate(5)  # reallocating evicts the cached prefix
  assert sorted(fresh) == [1, 2, 3, 4, 5] and alloc.match_prefix(hashes) == []
  with pytest.raises(RuntimeError, match="released more often"):
    alloc.release([fresh[0], fresh[0]])


# ------------------------------------------------------------------------------------------------ engine: greedy


@pytest.mark.parametrize("overrides", [(), ("--config.serve.kv_layout=contiguous",),
                                       ("--config.serve.attention=pallas",)], ids=["paged", "contiguous", "pallas"])
def test_engine_greedy_equals_full_forward(model, reference, overrides):
  """Continuous batching of 6 requests over 4 slots (chunked prefill of the 23- and 40-token prompts) gives each
  request the same tokens as decoding it alone by full forward passes; paged == contiguous == reference."""
  engine = make_engine(model, *overrides)
  assert engine.generate(PROMPTS, GREEDY) == reference
  stats = engine.stats()
  assert stats["running"] == 0 and stats["kv_pages_used"] == 0  # every page went back to the pool


def _on_mesh(model, cfg, mesh):
  """`model`'s parameters placed on `mesh` as cfg's sharding rules lay them out (as a workdir is loaded)."""
  params = jax.tree.map(lambda x, target: jax.device_put(x, target.sharding), nnx.to_pure_dict(nnx.state(model)),
                        abstract_params(cfg, mesh))
  return build_model(cfg, params, mesh)


TENSOR_SPLITS = {  # serve.devices -> overrides; num_kv_heads=2 cannot split 4 ways, so the 4-way rules replicate it
  2: (),
  4: ("--config.sharding.rules=kv_heads=,activation_kv_heads=",),
}


@pytest.mark.parametrize("devices", [2, pytest.param(4, marks=pytest.mark.slow)])  # ~20 s each here
def test_tensor_parallel_engine_greedy_equals_full_forward(model, reference, devices):
  """Heads, MLP and vocabulary split over serve.devices=2 and 4 (simulated CPU devices), under the config's rules:
  the paged engine's greedy tokens are the one-device full-forward reference's."""
  cfg = serve_config("--config.mesh.data=1", f"--config.mesh.tensor={devices}", f"--config.serve.devices={devices}",
                     *TENSOR_SPLITS[devices])
  mesh, rules = layout.serving_mesh(cfg)
  engine = Engine(_on_mesh(model, cfg, mesh), cfg, CharTokenizer())
  assert engine.mesh.shape["tensor"] == devices and engine.rules == rules
  attn = engine.state["blocks"][0]["attn"]
  split = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))  # noqa: E731
  assert split(attn["q"][...]) == (None, "tensor", None)  # [embed, heads, head_dim]: heads split
  assert split(attn["k"][...]) == (None, "tensor" if devices == 2 else None, None)  # kv heads: as the rules say
  assert engine.generate(PROMPTS, GREEDY) == reference


@pytest.mark.slow  # ~70 s here; plain tensor-parallel greedy and one-device speculation stay in the default job
def test_tensor_parallel_speculative_greedy_equals_full_forward(model, draft_model, reference):
  split = ("--config.mesh.data=1", "--config.mesh.tensor=2", "--config.serve.devices=2")
  cfg = serve_config(*split)
  mesh, _ = layout.serving_mesh(cfg)
  draft_cfg = serve_config(*split, "--config.model.num_layers=1", "--config.model.d_model=16")
  engine = Engine(_on_mesh(model, cfg, mesh), cfg, CharTokenizer(), draft=_on_mesh(draft_model, draft_cfg, mesh))
  assert engine.generate(PROMPTS, GREEDY) == reference


def test_a_serving_mesh_that_cannot_shard_the_model_fails_early():
  cfg = serve_config("--config.mesh.data=1", "--config.mesh.tensor=4", "--config.serve.devices=4")
  with pytest.raises(RulesError, match=r"serve\.devices=4 .*model\.num_kv_heads=2 is not divisible by the 4 devices"):
    layout.serving_mesh(cfg)
  with pytest.raises(RulesError, match=r"model\.num_kv_heads=2"):  # an explicit mesh is checked too
    Engine(make_model(serve_config()), cfg, CharTokenizer(), mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:4]))
  with pytest.raises(RulesError, match=r"serve\.devices=3: mesh: axes .* need 4 devices, 3 are available"):
    layout.serving_mesh(serve_config("--config.mesh.data=1", "--config.mesh.tensor=4", "--config.serve.devices=3"))
  with pytest.raises(RulesError, match=r"serve\.devices=9: only 8 devices are available"):
    layout.serving_mesh(serve_config("--config.serve.devices=9"))


@pytest.mark.slow  # ~25 s; speculative greedy == plain greedy stays in the default job
def test_untied_head_and_speculation_equal_full_forward():
  """An untied output head (tie_embeddings=false), plain and speculative, gives the full-forward greedy tokens."""
  untied = ("--config.model.tie_embeddings=false",)
  model = make_model(serve_config(*untied), seed=2)
  graphdef, state = nnx.split(model)
  expected = [sample_tokens(graphdef, state, p, GREEDY.max_tokens, max_len=64, temperature=0) for p in PROMPTS[:3]]
  assert make_engine(model, *untied).generate(PROMPTS[:3], GREEDY) == expected
  assert make_engine(model, *untied, draft=model).generate(PROMPTS[:3], GREEDY) == expected


def test_each_request_alone_equals_batched(model, reference):
  engine = make_engine(model)
  assert [engine.generate([p], GREEDY)[0] for p in PROMPTS[:3]] == reference[:3]


def test_prefix_sharing_same_outputs_fewer_pages(model):
  """Requests sharing a 24-token prefix reuse its 6 full pages: identical outputs, fewer pages held."""
  prefix = random_prompts((24,), seed=3)[0]
  prompts = [prefix + tail for tail in random_prompts((3, 7, 5), seed=4)]
  used = {}
  outs = {}
  for sharing in (True, False):
    # one token per step, so both engines stop the first request at the same length (exact page counts)
    engine = make_engine(model, f"--config.serve.prefix_sharing={sharing}", "--config.serve.decode_steps=1")
    engine.add_request(Request("first", prompts[0], GREEDY))
    while engine.scheduler.by_id["first"].computed < len(prompts[0]):  # its prefix pages are computed and indexed
      engine.step()
    for i, p in enumerate(prompts[1:]):
      engine.add_request(Request(f"r{i}", p, GREEDY))
    while any(engine.scheduler.by_id[f"r{i}"].computed < len(p) for i, p in enumerate(prompts[1:])):
      engine.step()
    used[sharing] = engine.stats()["kv_pages_used"]
    outs[sharing] = engine.generate(prompts, GREEDY)
    assert engine.stats()["kv_pages_used"] == 0
  assert outs[True] == outs[False]
  assert used[True] <= used[False] - 2 * 6  # the two later requests hold no copy of the 6 prefix pages


def test_preemption_when_pages_run_out(model, reference):
  """A pool too small for all running requests preempts (recompute) yet every output is unchanged."""
  engine = make_engine(model, "--config.serve.num_pages=24")
  assert engine.generate(PROMPTS, GREEDY) == reference
  assert engine.counters["preemptions_total"] > 0


@pytest.mark.slow  # the slow job of .ci/run
def test_int8_kv_cache_close_to_float(model, reference):
  """int8 K/V pages: most greedy tokens agree with the float cache (quantization error flips near-ties only)."""
  out = make_engine(model, "--config.serve.kv_cache=int8").generate(PROMPTS, GREEDY)
  agree = np.mean([a == b for o, r in zip(out, reference, strict=True) for a, b in zip(o, r, strict=True)])
  assert agree >= 0.8


# ------------------------------------------------------------------------------------------- sampling controls


def test_filters_match_numpy():
  """top-k and top-p keep exactly the numpy-computed sets; temperature scales; bias bans a token."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 32)).astype(np.float32) * 3
  params = [SamplingParams(temperature=0.5, top_k=5), SamplingParams(temperature=1.0, top_p=0.6),
            SamplingParams(temperature=2.0, logit_bias=((int(np.argmax(logits[2])), float("-inf")),))]
  sp = sampling.batch_arrays(params, [0, 1, 2], 32)
  out = np.asarray(sampling.filtered_logits(sampling.biased_logits(jnp.asarray(logits), sp, 32), sp, True))
  assert set(np.flatnonzero(np.isfinite(out[0]))) == set(np.argsort(-logits[0])[:5])
  order = np.argsort(-logits[1])
  p = np.exp(logits[1][order] - logits[1].max())
  p /= p.sum()
  nucleus = order[:int(np.searchsorted(np.cumsum(p), 0.6) + 1)]
  assert set(np.flatnonzero(np.isfinite(out[1]))) == set(nucleus)
  assert not np.isfinite(out[2, np.argmax(logits[2])])
  np.testing.assert_allclose(np.delete(out[2], np.argmax(logits[2])), np.delete(logits[2], np.argmax(logits[2])) / 2,
                             rtol=1e-6)


@pytest.mark.slow  # the slow job of .ci/run
def test_seeded_sampling_independent_of_batch(model):
  """A request's samples depend on its seed only, not on what else is batched with it."""
  p = SamplingParams(max_tokens=8, temperature=1.0, top_k=20, seed=7, ignore_eos=True)
  engine = make_engine(model)
  alone = engine.generate(PROMPTS[:1], p)[0]
  mixed = engine.generate(PROMPTS[:4], [p, *[dataclasses.replace(p, seed=i) for i in range(3)]])
  assert mixed[0] == alone
  assert len({tuple(m) for m in mixed}) > 1


def test_bias_stop_eos_and_length(model, reference):
  engine = make_engine(model)
  first = reference[0][0]
  banned = engine.generate(PROMPTS[:1], dataclasses.replace(GREEDY, logit_bias=((first, float("-inf")),)))[0]
  assert first not in banned[:1] and banned[0] != first
  forced = engine.generate(PROMPTS[:1], dataclasses.replace(GREEDY, logit_bias=((9, 100.0),)))[0]
  assert forced == [9] * GREEDY.max_tokens
  # a stop string cuts the text before it and ends the request
  text = CharTokenizer().decode(reference[0])
  engine.add_request(Request("s", PROMPTS[0], dataclasses.replace(GREEDY, stop=(text[3:5],))))
  outs = []
  while engine.has_work():
    outs += engine.step()
  assert "".join(o.text for o in outs) == text[:text.index(text[3:5])]
  assert outs[-1].finished and outs[-1].finish_reason == "stop"
  # eos (id 1) ends a request unless ignore_eos
  eos_forced = dataclasses.replace(GREEDY, logit_bias=((1, 100.0),), ignore_eos=False)
  assert engine.generate(PROMPTS[:1], eos_forced)[0] == []
  engine.add_request(Request("len", PROMPTS[0], dataclasses.replace(GREEDY, max_tokens=3)))
  last = [o for _ in range(20) for o in engine.step()][-1]
  assert last.finish_reason == "length" and last.completion_tokens == 3


def _run_all(engine, requests: list[Request]) -> tuple[dict, int]:
  """Each request's (token ids, text, finish reason) when run to completion, and the engine steps it took."""
  for r in requests:
    engine.add_request(r)
  got = {r.id: [[], "", None] for r in requests}
  steps = 0
  while engine.has_work():
    steps += 1
    for o in engine.step():
      got[o.id][0] += o.token_ids
      got[o.id][1] += o.text
      got[o.id][2] = o.finish_reason
  return got, steps


@pytest.mark.slow  # moved out of the default suite (827 s in a clean CI run with the real-model tests)
def test_multi_step_decode_equals_one_step(model):
  """serve.decode_steps=8 (several decode steps per device call) gives every request exactly the tokens, text and
  finish reason of one step per call, with rows stopping mid-call at eos, a stop string or max_tokens, in far
  fewer engine steps; every page is returned."""
  text = CharTokenizer().decode(random_prompts((40,), seed=9)[0])
  params = [SamplingParams(max_tokens=n, temperature=t, top_p=tp, seed=i, logit_bias=((1, bias),), stop=stop)
            for i, (n, t, tp, bias, stop) in enumerate([
              (30, 1.0, 1.0, 1.5, ()), (7, 0.0, 1.0, 0.0, ()), (25, 0.8, 0.9, 2.0, ()), (19, 1.0, 1.0, 0.0, ("A",)),
              (30, 0.0, 1.0, 0.0, (text[5:7],)), (13, 1.2, 0.95, 1.0, ()), (30, 1.0, 1.0, -100.0, ()),
              (3, 1.0, 1.0, 0.0, ())])]
  prompts = random_prompts((5, 23, 12, 9, 17, 33, 4, 11), seed=5)
  results = {}
  for steps in (1, 8):
    engine = make_engine(model, f"--config.serve.decode_steps={steps}")
    requests = [Request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    results[steps] = _run_all(engine, requests)
    assert engine.stats()["kv_pages_used"] == 0
  (one, one_steps), (multi, multi_steps) = results[1], results[8]
  assert multi == one
  reasons = [r[2] for r in one.values()]
  assert {"stop", "length"} <= set(reasons)
  assert any(r[2] == "stop" and 0 < len(r[0]) < params[i].max_tokens for i, r in enumerate(one.values()))
  assert multi_steps < one_steps / 2, (multi_steps, one_steps)


def test_request_validation(model):
  engine = make_engine(model, "--config.serve.max_queue=2")
  with pytest.raises(RequestError) as e:
    engine.add_request(Request("a", list(range(2, 66)), GREEDY))
  assert e.value.field == "prompt"
  with pytest.raises(RequestError) as e:
    engine.add_request(Request("a", [2] * 60, dataclasses.replace(GREEDY, max_tokens=10)))
  assert e.value.field == "max_tokens"
  with pytest.raises(RequestError) as e:
    engine.add_request(Request("a", [2, 3], dataclasses.replace(GREEDY, top_p=0.0)))
  assert e.value.field == "top_p"
  with pytest.raises(RequestError) as e:
    engine.add_request(Request("a", [2, VOCAB], GREEDY))
  assert e.value.field == "prompt"
  engine.add_request(Request("a", [2, 3], GREEDY))
  engine.add_request(Request("b", [2, 3], GREEDY))
  with pytest.raises(QueueFull):
    engine.add_request(Request("c", [2, 3], GREEDY))
  engine.abort("a")
  engine.abort("unknown")
  engine.add_request(Request("c", [2, 3], GREEDY))
  assert engine.stats()["waiting"] == 2


# ------------------------------------------------------------------------------------------------- speculative


@pytest.mark.slow  # moved out of the default suite (827 s in a clean CI run with the real-model tests)
def test_speculative_greedy_equals_plain_greedy(model, draft_model, reference):
  engine = make_engine(model, draft=draft_model)
  assert engine.generate(PROMPTS, GREEDY) == reference
  assert engine.stats()["kv_pages_used"] == 0  # rolled-back pages were returned
  self_draft = make_engine(model, draft=model)  # a perfect draft: every proposal is accepted
  assert self_draft.generate([PROMPTS[0], PROMPTS[3]], GREEDY) == [reference[0], reference[3]]
  # 12 tokens = 1 from the prefill + rounds of 5, 5 and 1: the last round's proposals past the budget are not counted
  self_draft.generate([PROMPTS[0]], dataclasses.replace(GREEDY, max_tokens=12))
  assert self_draft.counters["spec_accepted_total"] == self_draft.counters["spec_proposed_total"] > 0


@pytest.mark.slow  # ~25 s; speculative greedy == plain greedy stays in the default job
def test_speculative_rounds_end_requests_like_plain_decoding(model, draft_model):
  """Several speculative rounds per device call end each greedy request where plain one-token decoding does (eos
  from a logit bias, a stop string, max_tokens, a 1-token prompt), with the same ids and text, for a weak draft
  and a perfect one; every page is returned."""
  ref_engine = make_engine(model, "--config.serve.decode_steps=1")
  prompts = random_prompts((1, 23, 12, 9, 17, 33), seed=6)
  plain = ref_engine.generate(prompts[:1], dataclasses.replace(GREEDY, max_tokens=40))[0]
  text = CharTokenizer().decode(plain)
  params = [dataclasses.replace(GREEDY, max_tokens=n, logit_bias=((1, bias),), ignore_eos=False, stop=stop)
            for n, bias, stop in [(40, 0.0, (text[20:22],)), (7, 0.0, ()), (30, 3.0, ()), (29, 1.5, ()),
                                  (30, -100.0, ()), (2, 0.0, ())]]
  requests = [Request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
  expected, _ = _run_all(ref_engine, requests)
  assert expected["r0"][2] == "stop" and 20 <= len(expected["r0"][0]) < 40
  assert any(expected[f"r{i}"][2] == "stop" for i in (2, 3))  # eos ended one
  for draft in (draft_model, model):
    engine = make_engine(model, "--config.serve.speculative_k=3", draft=draft)
    got, _ = _run_all(engine, [dataclasses.replace(r) for r in requests])
    assert got == expected
    assert engine.stats()["kv_pages_used"] == 0


def test_accept_is_exact_rejection_sampling():
  """With a draft q far from the target p, the first emitted token is still distributed as p_0 (chi-square),
  and rows whose proposals are all accepted draw the bonus token from p_K."""
  v, k, n = 6, 2, 20000
  rng = np.random.default_rng(0)
  p = rng.dirichlet(np.ones(v), size=k + 1).astype(np.float32)
  q = rng.dirichlet(np.ones(v) * 0.3, size=k).astype(np.float32)
  keys = jax.random.split(jax.random.key(0), (n, k + 1))
  draft_keys = jax.random.split(jax.random.key(1), (n, k))
  drafts = jax.vmap(jax.vmap(lambda key, qi: jax.random.categorical(key, jnp.log(qi))), in_axes=(0, None))(
    draft_keys, jnp.asarray(q)).astype(jnp.int32)
  tokens, kept = accept(drafts, jnp.broadcast_to(q, (n, k, v)), jnp.broadcast_to(p, (n, k + 1, v)), keys)
  first = np.bincount(np.asarray(tokens[:, 0]), minlength=v)
  target = p[0].astype(np.float64) / p[0].astype(np.float64).sum()
  assert stats.chisquare(first, target * n).pvalue > 1e-3
  # acceptance rate of the first proposal is sum_x min(p, q)
  np.testing.assert_allclose(np.mean(np.asarray(kept) >= 1), np.minimum(p[0], q[0]).sum(), atol=0.015)


def test_speculative_sampling_matches_target_distribution(model, draft_model):
  """One speculative round over 512 rows of the same context (different seeds): the first new token follows the
  target's own sampling distribution (chi-square against the full-forward softmax), top-k applied to both."""
  prompt = PROMPTS[1]
  params = SamplingParams(max_tokens=4, temperature=1.0, top_k=8, ignore_eos=True)
  n = 512
  engine = make_engine(model, "--config.serve.max_batch=512", "--config.serve.prefill_chunk=32",
                       "--config.serve.max_queue=512", draft=draft_model)
  for i in range(n):
    engine.add_request(Request(str(i), prompt, dataclasses.replace(params, seed=i)))
  tokens = {str(i): [] for i in range(n)}
  for o in engine.step():  # admits all, prefills (the target samples token 1), then one speculative round
    tokens[o.id] += o.token_ids
  assert all(len(t) >= 2 for t in tokens.values())
  firsts = [t[0] for t in tokens.values()]
  top = max(set(firsts), key=firsts.count)  # condition on the most common first token
  second = np.array([t[1] for t in tokens.values() if t[0] == top])
  logits = np.asarray(model(jnp.asarray([prompt + [top]]))[0, -1], np.float64)
  keep = np.argsort(-logits)[:8]
  probs = np.exp(logits[keep] - logits[keep].max())
  probs /= probs.sum()  # float64: the chi-square's sums must agree
  assert set(second) <= set(keep)
  counts = np.array([np.sum(second == t) for t in keep])
  expected = probs * len(second)
  merged = expected >= 5  # pool rare categories (chi-square needs expected counts >= 5)
  obs = np.append(counts[merged], counts[~merged].sum())
  exp = np.append(expected[merged], expected[~merged].sum())
  assert len(second) >= 60
  assert stats.chisquare(obs[exp > 0], exp[exp > 0]).pvalue > 1e-3
