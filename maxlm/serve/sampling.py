"""Per-row sampling on device: logit bias / bans, temperature, top-k, top-p, greedy, and per-request seeds.

Every row of a batch carries its own parameters (rows are different requests). A row's random key depends only
on its request's seed and the token position, so a request samples the same tokens whatever else is batched
with it, and after a preemption.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from maxlm.serve.request import MAX_LOGIT_BIAS, SamplingParams

Arrays = dict[str, jax.Array]


def batch_arrays(params: list[SamplingParams | None], seeds: list[int], vocab_size: int) -> dict[str, np.ndarray]:
  """Host arrays of one batch's sampling parameters (None rows are padding: greedy, no bias)."""
  b = len(params)
  out = {"temperature": np.zeros(b, np.float32), "top_k": np.zeros(b, np.int32), "top_p": np.ones(b, np.float32),
         "bias_ids": np.full((b, MAX_LOGIT_BIAS), vocab_size, np.int32),
         "bias_vals": np.zeros((b, MAX_LOGIT_BIAS), np.float32),
         "seed_lo": np.zeros(b, np.uint32), "seed_hi": np.zeros(b, np.uint32)}
  for i, (p, seed) in enumerate(zip(params, seeds, strict=True)):
    if p is None:
      continue
    out["temperature"][i], out["top_k"][i], out["top_p"][i] = p.temperature, p.top_k, p.top_p
    for j, (tok, bias) in enumerate(p.logit_bias):
      out["bias_ids"][i, j], out["bias_vals"][i, j] = tok, bias
    out["seed_lo"][i], out["seed_hi"][i] = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
  return out


def needs_filter(params: list[SamplingParams | None]) -> bool:
  """Whether any sampled row uses top-k or top-p (a static flag: the sort is skipped otherwise)."""
  return any(p is not None and p.temperature > 0 and (p.top_k > 0 or p.top_p < 1) for p in params)


def row_keys(sp: Arrays, positions: jax.Array) -> jax.Array:
  """One PRNG key per row from (request seed, position of the token being sampled)."""
  def one(lo, hi, pos):
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(0), lo), hi), pos)
  return jax.vmap(one)(sp["seed_lo"], sp["seed_hi"], positions.astype(jnp.uint32))


def biased_logits(logits: jax.Array, sp: Arrays, vocab_limit: int) -> jax.Array:
  """logits [b, v] (float32) plus each row's logit bias; ids >= vocab_limit (model padding) are banned."""
  rows = jnp.arange(logits.shape[0])[:, None]
  logits = logits.at[rows, sp["bias_ids"]].add(sp["bias_vals"], mode="drop")
  if vocab_limit < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
  return logits


def greedy_tokens(logits: jax.Array, sp: Arrays, vocab_limit: int) -> jax.Array:
  """Each row's argmax after its logit bias: the token of a greedy row (no keys, no distribution)."""
  return jnp.argmax(biased_logits(logits, sp, vocab_limit), axis=-1).astype(jnp.int32)


def filtered_logits(logits: jax.Array, sp: Arrays, use_filter: bool) -> jax.Array:
  """Temperature-scaled logits with tokens outside each row's top-k / top-p nucleus set to -inf.

  Greedy rows (temperature 0) are returned unscaled; the filters keep ties at the threshold.
  """
  temp = sp["temperature"][:, None]
  scaled = jnp.where(temp > 0, logits / jnp.where(temp > 0, temp, 1.0), logits)
  if not use_filter:
    return scaled
  v = logits.shape[-1]
  ordered = -jnp.sort(-scaled, axis=-1)  # descending
  k = jnp.where(sp["top_k"] > 0, jnp.minimum(sp["top_k"], v), v)
  kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
  in_nucleus = before < sp["top_p"][:, None]
  nucleus_min = jnp.min(jnp.where(in_nucleus, ordered, jnp.inf), axis=-1, keepdims=True)
  threshold = jnp.maximum(kth, nucleus_min)
  return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def distribution(logits: jax.Array, sp: Arrays, vocab_limit: int, use_filter: bool) -> jax.Array:
  """Probabilities [b, v] each row samples from; a greedy row is one-hot on its argmax."""
  adjusted = biased_logits(logits, sp, vocab_limit)
  probs = jax.nn.softmax(filtered_logits(adjusted, sp, use_filter), axis=-1)
  greedy = jax.nn.one_hot(jnp.argmax(adjusted, axis=-1), logits.shape[-1], dtype=probs.dtype)
  return jnp.where(sp["temperature"][:, None] > 0, probs, greedy)


def sample(logits: jax.Array, sp: Arrays, keys: jax.Array, vocab_limit: int, use_filter: bool) -> jax.Array:
  """Token ids [b]: argmax for greedy rows, else a draw from the filtered, temperature-scaled distribution."""
  adjusted = biased_logits(logits, sp, vocab_limit)
  drawn = jax.vmap(jax.random.categorical)(keys, filtered_logits(adjusted, sp, use_filter))
  return jnp.where(sp["temperature"] > 0, drawn, jnp.argmax(adjusted, axis=-1)).astype(jnp.int32)
