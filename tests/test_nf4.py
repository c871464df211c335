"""NF4 weights (QLoRA's NormalFloat4 with double-quantized block scales) against a float64 numpy implementation of
the format written here, the fused matmul against the dequantized product, and NF4's point: a smaller error than
symmetric int4 on normally distributed weights at the same block size."""

import jax.numpy as jnp
import numpy as np
import pytest

from maxlm.quant.int4 import unpack_int4
from maxlm.quant.weights import NF4_CODE, quantize_weight

# QLoRA's NF4 levels (bitsandbytes functional.py's table), written out independently of maxlm's copy.
CODE = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0])


def _reference(w: np.ndarray, group: int):
  """(code indices [groups, group, n], block absmax [groups, n], reconstructed weight) of a [k, n] weight."""
  k, n = w.shape
  blocks = w.reshape(k // group, group, n).astype(np.float64)
  absmax = np.abs(blocks).max(axis=1)
  idx = np.abs(blocks[..., None] / absmax[:, None, :, None] - CODE).argmin(-1)
  offset = absmax.mean()  # double quantization: int8 around the mean, one scale per output column
  scale = np.abs(absmax - offset).max(axis=0) / 127
  q = np.clip(np.round((absmax - offset) / scale), -127, 127)
  return idx, absmax, (CODE[idx] * (q * scale + offset)[:, None, :]).reshape(k, n)


@pytest.mark.parametrize("shape, group", [((256, 48), 64), ((128, 40), 32)])
def test_nf4_codes_and_dequantized_weight_equal_the_numpy_format(shape, group):
  w = np.random.default_rng(0).normal(0, 0.02, shape).astype(np.float32)
  q = quantize_weight(jnp.asarray(w), "nf4", group=group)
  idx, _, want = _reference(w, group)
  assert tuple(NF4_CODE) == tuple(CODE)
  got_idx = np.asarray(unpack_int4(q.values)).astype(np.int64) + 8
  assert (got_idx == idx).mean() > 0.9999  # ties at a level midpoint may round either way in float32
  np.testing.assert_allclose(np.asarray(q.dequantize()), want, rtol=1e-5, atol=1e-7)
  x = np.random.default_rng(1).normal(size=(3, shape[0])).astype(np.float32)
  np.testing.assert_allclose(np.asarray(q.matmul(jnp.asarray(x))), x @ np.asarray(q.dequantize()), rtol=2e-5,
                             atol=2e-5)
  bits = sum(a.size * a.dtype.itemsize * 8 for a in (q.values, q.scales["q"], q.scales["scale"], q.scales["offset"]))
  # 4 bits + int8 per block + f32 per column + one f32 offset
  assert bits / w.size <= 4.0 + 8 / group + 32 / shape[0] + 32 / w.size


def test_nf4_beats_int4_on_normal_weights():
  w = np.random.default_rng(2).normal(0, 1, (512, 64)).astype(np.float32)
  err = {m: float(np.mean((np.asarray(quantize_weight(jnp.asarray(w), m, group=64).dequantize()) - w) ** 2))
         for m in ("nf4", "int4")}
  assert err["nf4"] < 0.9 * err["int4"], err
