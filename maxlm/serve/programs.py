"""The engine's jitted device programs: one prefill chunk or decode step, a multi-step decode loop, speculation.

Module level, so engines over the same model (equal graphdefs), shapes, mesh and sharding rules share compiled
programs. The rules are a static argument entered while tracing: flax reads them from a context that jit's cache
does not see, so two engines with different `sharding` settings must not share a trace.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from maxlm import sharding
from maxlm.serve import ring, sampling
from maxlm.serve.forward import forward_cached
from maxlm.serve.speculative import speculative_rounds


class Static:
  """A static jit argument hashed once: hashing a GraphDef walks the whole module graph, on every call."""

  __slots__ = ("value", "_hash")

  def __init__(self, value):
    self.value, self._hash = value, hash(value)

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other) -> bool:
    return isinstance(other, Static) and (self.value is other.value or self.value == other.value)


def next_tokens(logits: jax.Array, sp, lengths: jax.Array, use_filter: bool | None, vocab_limit: int) -> jax.Array:
  """Each row's next token; use_filter None = every row greedy (no keys, no draws)."""
  if use_filter is None:
    return sampling.greedy_tokens(logits, sp, vocab_limit)
  return sampling.sample(logits, sp, sampling.row_keys(sp, lengths), vocab_limit, use_filter)


@functools.partial(jax.jit, static_argnames=("graphdef", "rules", "kv_len", "attention", "use_filter", "sample",
                                             "pallas_backend", "vocab_limit"), donate_argnames=("cache",))
def run_step(state, cache, tokens, positions, valid, page_table, lengths, logits_index, sp, *, graphdef: Static,
             rules: sharding.Rules, kv_len, attention, use_filter, sample, pallas_backend, vocab_limit):
  """One prefill chunk or decode step: the new cache and (if `sample`) each row's next token."""
  with sharding.use_rules(rules):
    logits, cache = forward_cached(nnx.merge(graphdef.value, state), cache, tokens, positions, valid, page_table,
                                   lengths, kv_len=kv_len, attention=attention, pallas_backend=pallas_backend,
                                   logits_index=logits_index)
    if not sample:
      return None, cache
    return next_tokens(logits, sp, lengths, use_filter, vocab_limit), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "rules", "kv_len", "attention", "use_filter",
                                             "pallas_backend", "vocab_limit", "max_steps", "eos_id"),
                   donate_argnames=("cache",))
def run_decode(state, cache, last, pos, budget, eos_stop, page_table, sp, steps, *, graphdef: Static,
               rules: sharding.Rules, kv_len, attention, use_filter, pallas_backend, vocab_limit, max_steps, eos_id):
  """Up to `steps` (<= max_steps) decode steps in one program: (tokens [b, max_steps], steps run, new cache).

  Row i feeds back its own samples from token last[i] at position pos[i]; it stops after budget[i] tokens or at
  eos (where eos_stop[i]). Keys depend on (seed, position) only, so the tokens equal one-step decoding's. On the
  XLA path with float pages the loop works on maxlm.serve.ring's dense buffers (pages read once, written once at
  the end); the Pallas kernel and int8 pages read and write the pages every step.
  """
  model = nnx.merge(graphdef.value, state)
  b = last.shape[0]
  zero = jnp.zeros(b, jnp.int32)

  def cond(carry):
    return (carry[0] < steps) & jnp.any(carry[2])

  def advance(i, tok, active, logits, lengths, out):
    nxt = jnp.where(active, next_tokens(logits, sp, lengths, use_filter, vocab_limit), 0)
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
    return nxt, active & (i + 1 < budget) & ~(eos_stop & (nxt == eos_id)), out

  with sharding.use_rules(rules):
    out0 = jnp.zeros((b, max_steps), jnp.int32)
    if attention == "xla" and "k_scale" not in cache[0]:  # (int8 pages: read back as stored, requantised)
      kv = ring.start(cache, page_table, pos, kv_len, max_steps, model.dtype)

      def ring_body(carry):
        i, tok, active, count, kv, out = carry
        logits, kv = ring.advance(model, kv, tok, pos, i, active, kv_len)
        lengths = jnp.where(active, pos + i + 1, 1)
        nxt, still, out = advance(i, tok, active, logits, lengths, out)
        return i + 1, nxt, still, count + active.astype(jnp.int32), kv, out

      done, _, _, count, kv, out = jax.lax.while_loop(cond, ring_body, (jnp.int32(0), last, budget > 0, zero, kv, out0))
      return out, done, ring.finish(cache, kv, pos, count, page_table, kv_len)

    def body(carry):
      i, tok, active, cache, out = carry
      p = pos + i
      lengths = jnp.where(active, p + 1, 1)
      logits, cache = forward_cached(model, cache, tok[:, None], p[:, None], active[:, None], page_table, lengths,
                                     kv_len=kv_len, attention=attention, pallas_backend=pallas_backend,
                                     logits_index=zero)
      nxt, active, out = advance(i, tok, active, logits, lengths, out)
      return i + 1, nxt, active, cache, out

    done, _, _, cache, out = jax.lax.while_loop(cond, body, (jnp.int32(0), last, budget > 0, cache, out0))
    return out, done, cache


@functools.partial(jax.jit, static_argnames=("graphdefs", "rules", "k", "kv_len", "attention", "use_filter",
                                             "pallas_backend", "vocab_limit", "max_rounds", "eos_id"),
                   donate_argnames=("caches",))
def run_speculative(states, caches, *args, graphdefs: Static, rules: sharding.Rules, **static):
  """speculative_rounds, jitted with the (target, draft) graphdefs as one pre-hashed static argument."""
  with sharding.use_rules(rules):
    return speculative_rounds(states, caches, *args, graphdefs=graphdefs.value, **static)
