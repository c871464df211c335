"""int4 storage: two signed 4-bit values per uint8, and the group size (input channels per scale) for a weight."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

INT4_MAX = 7  # symmetric: -8 is representable by the packing but never produced


def pack_int4(q: jax.Array) -> jax.Array:
  """int values in [-8, 7] [..., 2m, n] -> uint8 [..., m, n]: row j in the low nibble, row j + m in the high."""
  m = q.shape[-2] // 2
  u = jax.lax.bitcast_convert_type(jnp.asarray(q, jnp.int8), jnp.uint8)  # two's complement nibbles
  return (u[..., :m, :] & jnp.uint8(0xF)) | (u[..., m:, :] << jnp.uint8(4))


def unpack_int4(p: jax.Array) -> jax.Array:
  """Inverse of `pack_int4`: uint8 [..., m, n] -> int8 [..., 2m, n], sign-extended with arithmetic shifts."""
  s = jax.lax.bitcast_convert_type(p, jnp.int8)
  lo = jax.lax.shift_right_arithmetic(jax.lax.shift_left(s, jnp.int8(4)), jnp.int8(4))
  hi = jax.lax.shift_right_arithmetic(s, jnp.int8(4))
  return jnp.concatenate([lo, hi], axis=-2)


def int4_group_size(k: int, group: int) -> int:
  """The group used for input dimension k: the largest even divisor of k that is <= group."""
  if not isinstance(group, (int, np.integer)) or isinstance(group, bool) or group < 2:
    raise ValueError(f"int4 group={group!r}: expected an integer >= 2 (input channels per scale)")
  for g in range(min(group, k) - (min(group, k) % 2), 1, -2):
    if k % g == 0:
      return g
  raise ValueError(f"int4 quantization needs an even input dimension (two values per byte), got {k}")
