"""The decoder run incrementally against a KV cache: prefill chunks, decode steps and speculative verification.

Same parameters and layers as `Transformer.forward` (the blocks' own projections, norms and MLPs); only the
attention core differs: new K/V are written to the cache and queries attend to the cached sequence. Layers run
unrolled (a Python loop over the scanned parameters' slices) so each layer's cache is its own donated buffer,
updated in place.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas import masking
from kernels_pallas.paged_attention import paged_attention
from maxlm.models.attention import head_major_attention, xla_attention
from maxlm.models.layers import dense
from maxlm.models.transformer import Block, Transformer
from maxlm.serve import fused, kv_cache


def blocks(model: Transformer) -> list[Block]:
  """The model's decoder blocks as separate modules (slices of the stacked parameters when scanned)."""
  if not model.scan_layers:
    return list(model.layers)
  graphdef, stacked = nnx.split(model.layers)
  n = jax.tree.leaves(stacked)[0].shape[0]
  return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked)) for i in range(n)]


class Decoder(nnx.Module):
  """A Transformer's parameters laid out for decoding: the blocks as separate per-layer modules.

  Slicing scanned [layers, ...] parameters inside the decode program would copy every weight on every step (the
  dominant cost of a small-batch step on CPU); the slices are taken once here instead.
  """

  def __init__(self, model: Transformer, *, fuse_projections: bool = True):
    self.embed = model.embed
    self.final_norm = model.final_norm
    self.lm_head = None if model.tie_embeddings else model.lm_head
    self.blocks = nnx.List([fused.fuse(b) if fuse_projections else b for b in blocks(model)])
    self.tie_embeddings = model.tie_embeddings
    self.dtype = model.dtype


DENSE = ("k_dense", "v_dense")


def with_dense(cache: list[dict[str, jax.Array]], page_table: jax.Array, kv_len: int) -> list[dict[str, jax.Array]]:
  """The cache plus head-major copies [b, kv_heads, kv_len, d] of each row's first kv_len K/V positions.

  A decode loop gathers the pages once and keeps these copies current (forward_cached writes new K/V to both), so
  its steps attend without re-gathering and transposing the whole span from the pages every step.
  """
  out = []
  for layer in cache:
    k, v = kv_cache.gather_kv(layer, page_table, kv_len)
    out.append({**layer, "k_dense": k.transpose(0, 2, 1, 3), "v_dense": v.transpose(0, 2, 1, 3)})
  return out


def without_dense(cache: list[dict[str, jax.Array]]) -> list[dict[str, jax.Array]]:
  """The cache without with_dense's copies."""
  return [{name: a for name, a in layer.items() if name not in DENSE} for layer in cache]


def _put(copy: jax.Array, x: jax.Array, positions: jax.Array, valid: jax.Array) -> jax.Array:
  """Writes x [b, t, kv, d] at positions [b, t] of a head-major copy [b, kv, len, d]; invalid tokens are dropped."""
  rows = jnp.arange(x.shape[0])[:, None]
  return copy.at[rows, :, jnp.where(valid, positions, copy.shape[2])].set(x.astype(copy.dtype), mode="drop")


def forward_cached(model: Decoder | Transformer, cache: list[dict[str, jax.Array]], tokens: jax.Array,
                   positions: jax.Array,
                   valid: jax.Array, page_table: jax.Array, lengths: jax.Array, *, kv_len: int,
                   attention: str = "xla", pallas_backend: str | None = None,
                   logits_index: jax.Array | None = None) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
  """(logits, new cache) for tokens [b, t] at positions [b, t]; `valid` [b, t] marks real tokens.

  lengths [b]: tokens in each sequence's cache after this step (positions < lengths are attended).
  kv_len: static bound on lengths (the attended span; bucketed by the caller to limit recompilation).
  attention: "xla" (gather + masked einsum, any t) or "pallas" (the paged kernel; every row's t tokens are its
  last t, as in decode and verification).
  logits_index [b]: only that token's logits ([b, vocab]); None = all ([b, t, vocab]).
  Layers carrying with_dense copies (kv_len long) are attended through those, updated, and passed on.
  """
  new_cache = []

  def attend(index: int, block: Block, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    layer = cache[index]
    copies = {name: layer[name] for name in DENSE if name in layer}
    layer = kv_cache.write_kv(layer, k, v, positions, valid, page_table, lengths)
    if copies:
      copies = {"k_dense": _put(copies["k_dense"], k, positions, valid),
                "v_dense": _put(copies["v_dense"], v, positions, valid)}
      layer = {**layer, **copies}
    new_cache.append(layer)
    if attention == "pallas":
      if block.attn.sliding_window is not None:
        raise ValueError("serve.attention=pallas: the paged kernel has no sliding window; use serve.attention=xla")
      return paged_attention(q, layer["k"], layer["v"], page_table, lengths, k_scales=layer.get("k_scale"),
                             v_scales=layer.get("v_scale"), sm_scale=block.attn.scale, backend=pallas_backend)
    k_pos = jnp.arange(kv_len)
    mask = masking.attention_mask(positions, k_pos, causal=True, sliding_window=block.attn.sliding_window,
                                  kv_valid=k_pos[None] < lengths[:, None])
    if copies:
      return head_major_attention(q, copies["k_dense"].astype(q.dtype), copies["v_dense"].astype(q.dtype), mask,
                                  block.attn.scale)
    ck, cv = kv_cache.gather_kv(layer, page_table, kv_len)
    return xla_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask, block.attn.scale)

  logits = decoder_pass(model, tokens, positions, valid, attend, logits_index)
  return logits, new_cache


Attend = Callable[[int, Block, jax.Array, jax.Array, jax.Array], jax.Array]


def decoder_pass(model: Decoder | Transformer, tokens: jax.Array, positions: jax.Array, valid: jax.Array,
                 attend: Attend, logits_index: jax.Array | None = None) -> jax.Array:
  """The decoder's layers and head over tokens [b, t]; attend(layer, block, q, k, v) -> [b, t, heads, d] is the
  attention core (it owns the cache). Returns float32 logits ([b, vocab] at logits_index, else [b, t, vocab])."""
  if isinstance(model, Transformer):
    model = Decoder(model, fuse_projections=False)  # inside a trace a concatenation would run every call
  x = model.embed[...].astype(model.dtype)[tokens]
  for index, block in enumerate(model.blocks):
    h = block.attn_norm(x)
    q, k, v = fused.project_qkv(block, h, positions)
    out = attend(index, block, q, k, v)
    x = x + block.attn.project_out(out.astype(x.dtype))
    h = block.mlp_norm(x)
    x = x + fused.mlp(block, h, valid)
  if logits_index is not None:
    x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)[:, 0]
  x = model.final_norm(x)
  if model.tie_embeddings:  # contract with the [vocab, d] table as stored (a transposed copy costs a step's time)
    logits = jnp.einsum("...d,vd->...v", x, model.embed[...].astype(model.dtype))
  else:
    logits = dense(x, model.lm_head[...].astype(model.dtype))
  return logits.astype(jnp.float32)
