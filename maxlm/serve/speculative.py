"""Speculative decoding: a draft model proposes K tokens, the target verifies all K+1 positions in one pass.

Acceptance is exact rejection sampling (Leviathan et al. 2023, Chen et al. 2023): draft token d_i is kept with
probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection a token is drawn from norm(max(0, p_i - q_i)),
and if all K are kept a bonus token is drawn from p_{K+1}. Every emitted token is then distributed exactly as the
target's own sampling distribution p (after temperature, top-k/top-p and logit bias, the same processing for p
and q). Greedy rows have one-hot p and q, so they keep the target's argmax token for token.

One round is one device program: K+1 draft steps (the last only writes d_K's K/V so the draft cache stays
complete), the K+1-token target verification and the acceptance. Entries past the accepted tokens stay in both
caches but lie beyond the kept length: they are masked and overwritten later (the roll-back), and the engine
returns pages past the new length to the pool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maxlm.serve import sampling
from maxlm.serve.forward import forward_cached

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


def speculative_round(states, caches, last: jax.Array, pos: jax.Array, active: jax.Array, page_table: jax.Array,
                      sp: sampling.Arrays, *, graphdefs, k: int, kv_len: int, attention: str, use_filter: bool,
                      pallas_backend: str | None, vocab_limit: int):
  """One round for every active row: returns (tokens [b, K+1], new tokens per row [b], (target, draft) caches).

  last [b]: each row's newest token (not yet in either cache), at position pos [b].
  """
  target = nnx.merge(graphdefs[0], states[0])
  draft = nnx.merge(graphdefs[1], states[1])
  t_cache, d_cache = caches
  b = last.shape[0]
  zero = jnp.zeros(b, jnp.int32)
  # key of the token sampled at position pos + 1 + i
  keys = jnp.stack([sampling.row_keys(sp, pos + 1 + i) for i in range(k + 1)], axis=1)

  tok, proposals, qs = last, [], []
  for i in range(k + 1):
    lengths = jnp.where(active, pos + i + 1, 1)
    logits, d_cache = forward_cached(draft, d_cache, tok[:, None], (pos + i)[:, None], active[:, None], page_table,
                                     lengths, kv_len=kv_len, attention=attention, pallas_backend=pallas_backend,
                                     logits_index=zero)
    if i == k:
      break
    q = sampling.distribution(logits, sp, vocab_limit, use_filter)
    draw = jax.vmap(lambda key, qi: jax.random.categorical(jax.random.fold_in(key, _DRAFT), jnp.log(qi)))(
      keys[:, i], q).astype(jnp.int32)
    tok = jnp.where(sp["temperature"] > 0, draw, jnp.argmax(q, axis=-1).astype(jnp.int32))
    proposals.append(tok)
    qs.append(q)
  proposals = jnp.stack(proposals, axis=1)  # [b, K]
  q = jnp.stack(qs, axis=1)

  verify = jnp.concatenate([last[:, None], proposals], axis=1)  # [b, K+1] at positions pos .. pos+K
  positions = pos[:, None] + jnp.arange(k + 1)[None]
  lengths = jnp.where(active, pos + k + 1, k + 1)
  logits, t_cache = forward_cached(target, t_cache, verify, positions, jnp.broadcast_to(active[:, None], (b, k + 1)),
                                   page_table, lengths, kv_len=kv_len, attention=attention,
                                   pallas_backend=pallas_backend)
  v = logits.shape[-1]
  sp_rows = jax.tree.map(lambda a: jnp.repeat(a, k + 1, axis=0), sp)
  p = sampling.distribution(logits.reshape(b * (k + 1), v), sp_rows, vocab_limit, use_filter).reshape(b, k + 1, v)
  tokens, kept = accept(proposals, q, p, keys)
  return tokens, kept + 1, (t_cache, d_cache)
