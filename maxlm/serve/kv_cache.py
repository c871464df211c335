"""KV cache storage (paged or contiguous, float or int8) on device, and its page allocator with prefix sharing.

Both layouts are one pool of pages `[num_pages, page_size, kv_heads, head_dim]` per layer and per K/V, read
through a page table `[batch, max_pages]` (the layout of kernels_pallas.paged_attention):

* paged: small pages handed out as a sequence grows and freed when it ends; full prompt pages are shared,
  reference counted, between requests with the same prefix.
* contiguous: one page of max_len tokens per decode slot, reserved for the slot's whole life (the classic
  [batch, max_len] cache; the baseline of the memory-waste comparison).

Page 0 is a scratch page: page-table entries that belong to no sequence point at it, so a read past a
sequence's pages never touches another sequence's data. Writes of padding tokens are dropped (out-of-range
scatter index). int8 pages carry a float32 scale per (page, kv head): value = int8 * scale.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.kv_pages import dequantize_pages

SCRATCH_PAGE = 0


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """Shape of a KV cache: layers x pool of pages; max_pages = page-table width per sequence."""

  layers: int
  kv_heads: int
  head_dim: int
  page_size: int
  num_pages: int
  max_pages: int
  dtype: str  # a float dtype name or "int8"

  @property
  def quantized(self) -> bool:
    return self.dtype == "int8"

  def bytes(self) -> int:
    """Device bytes of the whole cache (K and V of every layer, scales included)."""
    per_page = self.page_size * self.kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize
    if self.quantized:
      per_page += self.kv_heads * 4
    return 2 * self.layers * self.num_pages * per_page


def init_cache(spec: CacheSpec) -> list[dict[str, jax.Array]]:
  """Zeroed cache: one {"k", "v"[, "k_scale", "v_scale"]} dict per layer."""
  shape = (spec.num_pages, spec.page_size, spec.kv_heads, spec.head_dim)
  layers = []
  for _ in range(spec.layers):
    layer = {"k": jnp.zeros(shape, spec.dtype), "v": jnp.zeros(shape, spec.dtype)}
    if spec.quantized:
      layer["k_scale"] = jnp.zeros((spec.num_pages, spec.kv_heads), jnp.float32)
      layer["v_scale"] = jnp.zeros((spec.num_pages, spec.kv_heads), jnp.float32)
    layers.append(layer)
  return layers


# ------------------------------------------------------------------------------------------ device-side access


def write_kv(layer: dict[str, jax.Array], k: jax.Array, v: jax.Array, positions: jax.Array, valid: jax.Array,
             page_table: jax.Array, lengths: jax.Array) -> dict[str, jax.Array]:
  """Writes k, v [b, t, kv, d] of tokens at `positions` [b, t] into their pages; invalid tokens are dropped.

  lengths [b] = tokens in the cache after this write (for int8: which rows of a page hold data).
  """
  if "k_scale" not in layer:
    return {"k": _scatter(layer["k"], k, positions, valid, page_table),
            "v": _scatter(layer["v"], v, positions, valid, page_table)}
  kq, ks = _write_int8(layer["k"], layer["k_scale"], k, positions, valid, page_table, lengths)
  vq, vs = _write_int8(layer["v"], layer["v_scale"], v, positions, valid, page_table, lengths)
  return {"k": kq, "v": vq, "k_scale": ks, "v_scale": vs}


def _slots(positions: jax.Array, valid: jax.Array, page_table: jax.Array, page_size: int, num_pages: int):
  """(page, offset) of each token in the pool; the page is out of range (the write dropped) where not valid."""
  page_idx = jnp.clip(positions // page_size, 0, page_table.shape[1] - 1)
  pages = jnp.take_along_axis(page_table, page_idx, axis=1)
  return jnp.where(valid, pages, num_pages), positions % page_size


def _scatter(pool: jax.Array, x: jax.Array, positions, valid, page_table) -> jax.Array:
  # Indexed by (page, offset), not a flattened row: reshaping the pool would make XLA copy it on every write.
  pages, offsets = _slots(positions, valid, page_table, pool.shape[1], pool.shape[0])
  return pool.at[pages, offsets].set(x.astype(pool.dtype), mode="drop")


def _write_int8(pool, scales, x, positions, valid, page_table, lengths):
  """int8 write: the pages the new tokens fall in are dequantised, updated and requantised with a fresh
  per-(page, head) absmax scale over the page's filled rows. A page's scale only grows while it fills, and
  requantising at an unchanged scale is exact, so earlier rows lose at most half a step of the new scale."""
  num_pages, page_size = pool.shape[:2]
  b, t = positions.shape
  max_pages = page_table.shape[1]
  touch = min(max_pages, -(-t // page_size) + 1)  # pages a run of t tokens can span
  first = jnp.min(jnp.where(valid, positions, jnp.iinfo(jnp.int32).max), axis=1) // page_size  # [b]
  first = jnp.clip(first, 0, max_pages - touch)
  local_idx = first[:, None] + jnp.arange(touch)[None]  # [b, touch] page-table columns
  ids = jnp.take_along_axis(page_table, local_idx, axis=1)
  deq = dequantize_pages(pool[ids.reshape(-1)], scales[ids.reshape(-1)])
  deq = deq.reshape(b, touch * page_size, *pool.shape[2:])
  rel = positions - first[:, None] * page_size  # row within the gathered pages
  rel = jnp.where(valid, rel, touch * page_size)
  deq = deq.at[jnp.arange(b)[:, None], rel].set(x.astype(jnp.float32), mode="drop")
  deq = deq.reshape(b, touch, page_size, *pool.shape[2:])
  row_pos = local_idx[:, :, None] * page_size + jnp.arange(page_size)[None, None]  # [b, touch, page_size]
  filled = row_pos < lengths[:, None, None]
  amax = jnp.max(jnp.where(filled[..., None, None], jnp.abs(deq), 0.0), axis=(2, 4))  # [b, touch, kv]
  new_scale = jnp.maximum(amax / 127.0, 1e-12)
  q = jnp.clip(jnp.round(deq / new_scale[:, :, None, :, None]), -127, 127).astype(jnp.int8)
  written = jnp.zeros((b, touch), bool).at[jnp.arange(b)[:, None], jnp.where(valid, rel // page_size, touch)].set(
      True, mode="drop")
  target = jnp.where(written, ids, num_pages).reshape(-1)  # untouched pages: dropped
  pool = pool.at[target].set(q.reshape(b * touch, *pool.shape[1:]), mode="drop")
  scales = scales.at[target].set(new_scale.reshape(b * touch, -1), mode="drop")
  return pool, scales


def gather_kv(layer: dict[str, jax.Array], page_table: jax.Array, kv_len: int) -> tuple[jax.Array, jax.Array]:
  """Dense (k, v) [b, kv_len, kv, d] of each sequence's first kv_len positions (dequantised if int8)."""
  page_size = layer["k"].shape[1]
  pages = -(-kv_len // page_size)
  table = page_table[:, :pages]

  def one(name: str) -> jax.Array:
    if page_size >= kv_len:  # one page covers it (contiguous layout): gather only its first kv_len rows
      dense = layer[name][table[:, 0], :kv_len]
      if f"{name}_scale" in layer:
        dense = dense.astype(jnp.float32) * layer[f"{name}_scale"][table[:, 0]][:, None, :, None]
      return dense
    dense = dequantize_pages(layer[name], layer.get(f"{name}_scale"))[table] if f"{name}_scale" in layer \
        else layer[name][table]
    return dense.reshape(table.shape[0], pages * page_size, *dense.shape[3:])[:, :kv_len]

  return one("k"), one("v")


# ------------------------------------------------------------------------------------------ host-side allocation


class OutOfPages(RuntimeError):
  """The page pool has no free page (the engine preempts a request and retries)."""


class PageAllocator:
  """Reference-counted pages of the pool with a prefix index of full prompt pages.

  A page whose count drops to 0 is free; if it holds an indexed prefix it stays findable until reallocated
  (oldest first), so a later request with the same prefix reuses it without recomputing (as vLLM's prefix
  caching does). Page 0 (scratch) is never handed out.
  """

  def __init__(self, num_pages: int):
    if num_pages < 2:
      raise ValueError(f"a page pool needs >= 2 pages (one is scratch), got {num_pages}")
    self.num_pages = num_pages
    self.refs = np.zeros(num_pages, np.int32)
    self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(1, num_pages))
    self._by_hash: dict[bytes, int] = {}
    self._hash_of: dict[int, bytes] = {}

  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def num_used(self) -> int:
    """Pages held by at least one sequence."""
    return self.num_pages - 1 - len(self._free)

  def allocate(self, n: int) -> list[int]:
    """n fresh pages (count 1); raises OutOfPages (allocating none) if fewer are free."""
    if n > len(self._free):
      raise OutOfPages(f"{n} pages wanted, {len(self._free)} free of {self.num_pages - 1}")
    pages = []
    for _ in range(n):
      page, _ = self._free.popitem(last=False)
      h = self._hash_of.pop(page, None)
      if h is not None:
        del self._by_hash[h]
      self.refs[page] = 1
      pages.append(page)
    return pages

  def release(self, pages: list[int]) -> None:
    """Drops one reference to each page; pages reaching 0 become free."""
    for page in pages:
      if self.refs[page] <= 0:
        raise RuntimeError(f"page {page} released more often than it was taken")
      self.refs[page] -= 1
      if self.refs[page] == 0:
        self._free[page] = None

  @staticmethod
  def page_hashes(tokens: list[int], page_size: int, num_full: int) -> list[bytes]:
    """Chained hashes of the first num_full pages of tokens (each covers its whole prefix)."""
    out, h = [], b""
    for i in range(num_full):
      block = np.asarray(tokens[i * page_size:(i + 1) * page_size], np.int64).tobytes()
      h = hashlib.blake2b(h + block, digest_size=16).digest()
      out.append(h)
    return out

  def match_prefix(self, hashes: list[bytes]) -> list[int]:
    """Takes a reference to the longest run of indexed pages matching `hashes` from the start; returns them."""
    pages = []
    for h in hashes:
      page = self._by_hash.get(h)
      if page is None:
        break
      if self.refs[page] == 0:
        del self._free[page]
      self.refs[page] += 1
      pages.append(page)
    return pages

  def index(self, page: int, h: bytes) -> None:
    """Records that `page` holds the full prompt page with chained hash h (first writer wins)."""
    if h not in self._by_hash and page not in self._hash_of:
      self._by_hash[h] = page
      self._hash_of[page] = h


def pages_for(tokens: int, page_size: int) -> int:
  """Pages holding `tokens` tokens."""
  return math.ceil(tokens / page_size)
