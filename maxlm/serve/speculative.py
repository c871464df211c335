"""Speculative decoding: a draft model proposes K tokens, the target verifies all K+1 positions in one pass.

Acceptance is exact rejection sampling (Leviathan et al. 2023, Chen et al. 2023): draft token d_i is kept with
probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection a token is drawn from norm(max(0, p_i - q_i)),
and if all K are kept a bonus token is drawn from p_{K+1}. Every emitted token is then distributed exactly as the
target's own sampling distribution p (after temperature, top-k/top-p and logit bias, the same processing for p
and q). Greedy rows have one-hot p and q, so they keep the target's argmax token for token.

One device program runs up to serve.decode_steps rounds, each K draft steps, the K+1-token target verification
and the acceptance; greedy batches skip distributions and draws (argmax proposals kept while they equal the
target's argmax). Entries past the accepted tokens stay in both caches but lie beyond the kept length: they are
masked and overwritten later (the roll-back), and the engine returns pages past the new length to the pool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maxlm.serve import sampling
from maxlm.serve.forward import forward_cached, with_dense, without_dense

_DRAFT, _UNIFORM, _RESIDUAL = 1, 2, 3  # key streams per sampled position


def accept(draft_tokens: jax.Array, q: jax.Array, p: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(tokens [b, K+1], kept [b]) by rejection sampling; the first kept+1 tokens of a row are its output.

  draft_tokens [b, K] sampled from q [b, K, v]; p [b, K+1, v] the target's distributions at the same positions
  plus the bonus one; keys [b, K+1] PRNG keys of the K+1 sampled positions.
  """
  b, k = draft_tokens.shape
  pd = jnp.take_along_axis(p[:, :k], draft_tokens[..., None], axis=-1)[..., 0]
  qd = jnp.take_along_axis(q, draft_tokens[..., None], axis=-1)[..., 0]
  u = jax.vmap(jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, _UNIFORM))))(keys[:, :k])
  ok = u * qd < pd  # u < p/q without dividing; p(d) = 0 always rejects
  kept = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # leading accepted tokens
  p_at = jnp.take_along_axis(p, kept[:, None, None], axis=1)[:, 0]  # [b, v]
  q_at = jnp.take_along_axis(jnp.pad(q, ((0, 0), (0, 1), (0, 0))), kept[:, None, None], axis=1)[:, 0]  # 0 at K
  residual = jnp.maximum(p_at - q_at, 0.0)
  mass = jnp.sum(residual, axis=-1, keepdims=True)
  residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_at)
  final_key = jnp.take_along_axis(keys, kept[:, None], axis=1)[:, 0]
  final = jax.vmap(lambda key, r: jax.random.categorical(jax.random.fold_in(key, _RESIDUAL), jnp.log(r)))(
    final_key, residual).astype(jnp.int32)
  idx = jnp.arange(k + 1)[None]
  padded = jnp.pad(draft_tokens, ((0, 0), (0, 1)))
  tokens = jnp.where(idx < kept[:, None], padded, jnp.where(idx == kept[:, None], final[:, None], 0))
  return tokens, kept


def _propose(draft, d_cache, prev, last, pos, active, page_table, sp, keys, *, k, kv_len, attention, use_filter,
             pallas_backend, vocab_limit):
  """K draft tokens [b, K] (and their distributions [b, K, v], None when greedy) after `last` at `pos`.

  The first step feeds (prev, last) at (pos - 1, pos): prev's K/V is missing from the draft cache when the last
  round kept all K proposals (rewriting it otherwise is idempotent), so no extra draft pass closes a round.
  """
  b = last.shape[0]
  tokens = jnp.stack([prev, last], axis=1)
  positions = jnp.stack([pos - 1, pos], axis=1)
  valid = jnp.stack([active & (pos > 0), active], axis=1)
  index = jnp.ones(b, jnp.int32)
  proposals, qs = [], []
  for i in range(k):
    lengths = jnp.where(active, pos + i + 1, 1)
    logits, d_cache = forward_cached(draft, d_cache, tokens, jnp.maximum(positions, 0), valid, page_table, lengths,
                                     kv_len=kv_len, attention="xla" if i == 0 else attention,
                                     pallas_backend=pallas_backend, logits_index=index)
    if use_filter is None:  # all greedy: the argmax, no distributions or draws
      tok = sampling.greedy_tokens(logits, sp, vocab_limit)
    else:
      q = sampling.distribution(logits, sp, vocab_limit, use_filter)
      draw = jax.vmap(lambda key, qi: jax.random.categorical(jax.random.fold_in(key, _DRAFT), jnp.log(qi)))(
        keys[:, i], q).astype(jnp.int32)
      tok = jnp.where(sp["temperature"] > 0, draw, jnp.argmax(q, axis=-1).astype(jnp.int32))
      qs.append(q)
    proposals.append(tok)
    tokens, positions, valid, index = tok[:, None], (pos + i + 1)[:, None], active[:, None], jnp.zeros(b, jnp.int32)
  return jnp.stack(proposals, axis=1), (jnp.stack(qs, axis=1) if qs else None), d_cache


def speculative_rounds(states, caches, prev: jax.Array, last: jax.Array, pos: jax.Array, budget: jax.Array,
                       eos_stop: jax.Array, page_table: jax.Array, sp: sampling.Arrays, rounds: jax.Array, *,
                       graphdefs, k: int, kv_len: int, attention: str, use_filter: bool | None,
                       pallas_backend: str | None, vocab_limit: int, max_rounds: int, eos_id: int):
  """Up to `rounds` (<= max_rounds) speculative rounds in one program, each row feeding back its own output.

  prev, last [b]: each row's two newest tokens (last is in neither cache) at positions pos - 1, pos; a row emits at
  most budget[i] tokens and stops after eos where eos_stop[i]. use_filter None = every row greedy (argmax
  proposals, kept while they equal the target's argmax). Returns (tokens [b, max_rounds * (K+1)], tokens emitted
  per row [b], proposals accepted and proposals made per row [b] (a round with r tokens of budget left counts
  min(K, r): proposals past the budget could never be emitted), rounds each row ran [b], (target, draft) caches).
  """
  target = nnx.merge(graphdefs[0], states[0])
  draft = nnx.merge(graphdefs[1], states[1])
  b = last.shape[0]
  rows = jnp.arange(b)[:, None]
  steps = jnp.arange(k + 1)[None]
  sp_rows = jax.tree.map(lambda a: jnp.repeat(a, k + 1, axis=0), sp)  # each row's parameters at its K+1 positions

  def body(carry):
    r, prev, last, pos, active, emitted, accepted, proposed, ran, out, (t_cache, d_cache) = carry
    keys = None if use_filter is None else jnp.stack([sampling.row_keys(sp, pos + 1 + i) for i in range(k + 1)], 1)
    proposals, q, d_cache = _propose(draft, d_cache, prev, last, pos, active, page_table, sp, keys, k=k,
                                     kv_len=kv_len, attention=attention, use_filter=use_filter,
                                     pallas_backend=pallas_backend, vocab_limit=vocab_limit)
    verify = jnp.concatenate([last[:, None], proposals], axis=1)  # [b, K+1] at positions pos .. pos+K
    lengths = jnp.where(active, pos + k + 1, k + 1)
    logits, t_cache = forward_cached(target, t_cache, verify, pos[:, None] + steps, jnp.broadcast_to(
      active[:, None], (b, k + 1)), page_table, lengths, kv_len=kv_len, attention=attention,
                                     pallas_backend=pallas_backend)
    flat = logits.reshape(b * (k + 1), logits.shape[-1])
    if use_filter is None:
      tokens = sampling.greedy_tokens(flat, sp_rows, vocab_limit).reshape(b, k + 1)
      kept = jnp.sum(jnp.cumprod((proposals == tokens[:, :k]).astype(jnp.int32), axis=1), axis=1)
      # (the kept proposals equal the target's argmax; then its correction or bonus token)
    else:
      p = sampling.distribution(flat, sp_rows, vocab_limit, use_filter)
      tokens, kept = accept(proposals, q, p.reshape(logits.shape), keys)
    # this round's output: kept + 1 tokens, cut at the row's budget and after an eos
    n = jnp.minimum(kept + 1, budget - emitted)
    is_eos = eos_stop[:, None] & (tokens == eos_id) & (steps < n[:, None])
    first_eos = jnp.min(jnp.where(is_eos, steps, k + 1), axis=1)
    n = jnp.where(active, jnp.minimum(n, first_eos + 1), 0)
    out = out.at[rows, jnp.where(steps < n[:, None], emitted[:, None] + steps, out.shape[1])].set(tokens, mode="drop")
    new_last = jnp.take_along_axis(tokens, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
    new_prev = jnp.where(n >= 2, jnp.take_along_axis(tokens, jnp.maximum(n - 2, 0)[:, None], axis=1)[:, 0], last)
    accepted = accepted + jnp.where(active, jnp.minimum(kept, n), 0)
    proposed = proposed + jnp.where(active, jnp.minimum(k, budget - emitted), 0)
    ran = ran + active.astype(jnp.int32)
    emitted = emitted + n
    prev, last, pos = jnp.where(active, new_prev, prev), jnp.where(active, new_last, last), pos + n
    active = active & (emitted < budget) & (first_eos > k)
    return r + 1, prev, last, pos, active, emitted, accepted, proposed, ran, out, (t_cache, d_cache)

  def cond(carry):
    return (carry[0] < rounds) & jnp.any(carry[4])

  zeros = jnp.zeros(b, jnp.int32)
  dense = [attention == "xla" and "k_scale" not in c[0] for c in caches]  # as in the plain decode loop
  caches = tuple(with_dense(c, page_table, kv_len) if d else c for c, d in zip(caches, dense, strict=True))
  init = (jnp.int32(0), prev, last, pos, budget > 0, zeros, zeros, zeros, zeros,
          jnp.zeros((b, max_rounds * (k + 1)), jnp.int32), caches)
  _, _, _, _, _, emitted, accepted, proposed, ran, out, caches = jax.lax.while_loop(cond, body, init)
  caches = tuple(without_dense(c) if d else c for c, d in zip(caches, dense, strict=True))
  return out, emitted, accepted, proposed, ran, caches
