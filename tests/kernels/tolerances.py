"""Per-dtype tolerances for every kernel-vs-reference comparison, in one place.

The reference computes in float32 at Precision.HIGHEST. float32 kernels differ only by summation order
(blockwise online softmax); bfloat16 kernels round q, k, v, probabilities and outputs to 8 mantissa bits,
so their errors are ~2^-8 relative. Gradients accumulate over whole sequences and get a looser bound.
"""

import jax.numpy as jnp
import numpy as np

TOLERANCES = {
  # (what, dtype): (atol, rtol)
  ("out", jnp.float32): (2e-5, 2e-5),
  ("out", jnp.bfloat16): (2e-2, 2e-2),
  ("grad", jnp.float32): (1e-4, 1e-4),
  ("grad", jnp.bfloat16): (6e-2, 6e-2),
}


def assert_close(actual, expected, dtype, what: str = "out", name: str = "") -> None:
  """Asserts `actual` ~ `expected` within the (what, dtype) tolerance, comparing in float32."""
  atol, rtol = TOLERANCES[(what, jnp.dtype(dtype).type)]
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), atol=atol,
                             rtol=rtol, err_msg=name)
