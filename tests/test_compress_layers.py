"""Per-layer compression (maxlm.compress) against float64 numpy references written here from the papers' algorithms.

The references are deliberately plain: one input row at a time, every later row updated at once (no lazy blocks;
the blocked implementations must agree up to rounding), quantizer parameters and scores per output channel in loops.
GPTQ: Frantar et al. 2022 (IST-DASLab's quantizer); SparseGPT: Frantar & Alistarh 2023 (its per-block threshold);
Wanda: Sun et al. 2023.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm.compress import gptq, hessian, pruning_scores, sparsegpt

K, N = 128, 64
DEAD = 5  # an input channel that is always 0 in the calibration data


def calibration(seed: int, k: int = K, tokens: int = 1024) -> np.ndarray:
  """Inputs [tokens, k] with correlated features (a rank-16 mix plus noise), uneven channel scales, one dead channel."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((tokens, 16)) @ rng.standard_normal((16, k)) + 0.5 * rng.standard_normal((tokens, k))
  x *= rng.uniform(0.2, 2.0, k)
  x[:, DEAD] = 0
  return x


def layer(seed: int, k: int = K, n: int = N) -> tuple[np.ndarray, np.ndarray]:
  """(w [k, n], h = 2/N XᵀX [k, k]) in float64."""
  x = calibration(seed, k)
  return np.random.default_rng(100 + seed).standard_normal((k, n)), 2 / len(x) * x.T @ x


# --- references ---


def ref_prepare(w: np.ndarray, h: np.ndarray, damp: float, order=None):
  """Dead inputs fixed, permuted by order(diag h) if given, damped; returns (w, upper U with UᵀU = H⁻¹, perm)."""
  w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
  k = len(h)
  for i in range(k):
    if h[i, i] == 0:
      h[i, i] = 1
      w[i] = 0
  perm = np.arange(k) if order is None else order(np.diag(h))
  w, h = w[perm], h[perm][:, perm]
  h = h + damp * np.mean(np.diag(h)) * np.eye(k)
  return w, np.linalg.cholesky(np.linalg.inv(h)).T, perm


def ref_params(x: np.ndarray, maxq: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
  """GPTQ's quantizer parameters per output channel (column) of a group x [rows, n]."""
  n = x.shape[1]
  scale, zero = np.zeros(n), np.zeros(n)
  for j in range(n):
    xmin, xmax = min(x[:, j].min(), 0.0), max(x[:, j].max(), 0.0)
    if sym:
      xmax = max(abs(xmin), xmax)
      if xmin < 0:
        xmin = -xmax
    if xmin == 0 and xmax == 0:
      xmin, xmax = -1.0, 1.0
    scale[j] = (xmax - xmin) / maxq
    zero[j] = (maxq + 1) / 2 if sym else np.round(-xmin / scale[j])
  return scale, zero


def ref_gptq(w, h, *, bits, group, sym, act_order, damp=0.01, static_groups=False):
  """(codes [k, n] original order, scales, zeros [groups, n], g_idx, perm, distance of the nearest rounding tie).
  static_groups: parameters of consecutive original rows, from the weights before any update (AutoGPTQ's)."""
  k, n = w.shape
  g = k if group == -1 else group
  maxq = 2**bits - 1
  order = (lambda d: np.argsort(-d, kind="stable")) if act_order else None
  w, u, perm = ref_prepare(w, h, damp, order)
  codes = np.zeros((k, n), np.int64)
  scales, zeros, tie = [], [], np.inf
  if static_groups:
    original = w[np.argsort(perm)]
    fixed = [ref_params(original[j:j + g], maxq, sym) for j in range(0, k, g)]
  for i in range(k):
    if static_groups:
      scale, zero = fixed[perm[i] // g]
    elif i % g == 0:  # a new group: parameters from its current weights
      scale, zero = ref_params(w[i:i + g], maxq, sym)
      scales.append(scale)
      zeros.append(zero)
    r = w[i] / scale
    codes[i] = np.clip(np.round(r) + zero, 0, maxq)
    either_way = np.clip(np.floor(r) + zero, 0, maxq) != np.clip(np.ceil(r) + zero, 0, maxq)
    if either_way.any():  # how close the rounding came to going the other way
      tie = min(tie, np.min(np.abs(np.abs(r - np.floor(r)) - 0.5)[either_way]))
    q = scale * (codes[i] - zero)
    err = (w[i] - q) / u[i, i]
    w[i + 1:] -= np.outer(u[i, i + 1:], err)
  inv = np.argsort(perm)
  if static_groups:
    return codes[inv], np.array([f[0] for f in fixed]), np.array([f[1] for f in fixed]), np.arange(k) // g, perm, tie
  return codes[inv], np.array(scales), np.array(zeros), inv // g, perm, tie


def ref_dequantize(codes, scales, zeros, g_idx):
  w = np.zeros(codes.shape)
  for r in range(len(codes)):
    w[r] = scales[g_idx[r]] * (codes[r] - zeros[g_idx[r]])
  return w


def ref_sparsegpt(w, h, *, sparsity=None, pattern=None, damp=0.01, block=128):
  """(pruned w, keep-mask): per block one threshold over the block's w² / U_ii² (<= the element at int(numel * s)),
  or per m rows per output channel the n lowest scores, each on the current weights."""
  k, n = w.shape
  w, u, _ = ref_prepare(w, h, damp)
  d = np.diag(u)
  pruned = np.zeros((k, n), bool)
  for i1 in range(0, k, block):
    i2 = min(i1 + block, k)
    if sparsity is not None:
      score = w[i1:i2] ** 2 / (d[i1:i2] ** 2)[:, None]
      pruned[i1:i2] = score <= np.sort(score.reshape(-1))[int(score.size * sparsity)]
    for i in range(i1, i2):
      if pattern is not None and (i - i1) % pattern[1] == 0:
        nprune, m = pattern
        for j in range(n):
          score = w[i:i + m, j] ** 2 / d[i:i + m] ** 2
          pruned[i + np.argsort(score, kind="stable")[:nprune], j] = True
      q = np.where(pruned[i], 0.0, w[i])
      err = (w[i] - q) / u[i, i]
      w[i + 1:] -= np.outer(u[i, i + 1:], err)
      w[i] = q
  return w, ~pruned


def ref_lowest_mask(score: np.ndarray, count: int) -> np.ndarray:
  """Keep-mask of a 1-D score: the `count` lowest pruned, ties to the lower index."""
  keep = np.ones(score.shape, bool)
  keep[np.argsort(score, kind="stable")[:count]] = False
  return keep


def ref_nm_mask(score: np.ndarray, n: int, m: int) -> np.ndarray:
  keep = np.ones(score.shape, bool)
  for j in range(score.shape[1]):
    for i in range(0, score.shape[0], m):
      keep[i:i + m, j] = ref_lowest_mask(score[i:i + m, j], n)
  return keep


def first_rows_shrunk(w, h, group, act_order):
  """w with the first row of every group (in processing order) halved.

  With sym, a group's first row is quantized with the parameters computed from it: if it holds the group's negative
  absmax, w / scale is exactly -(maxq + 1) / 2 in exact arithmetic and round-half-even decides that code by the last
  ulp, so two correct implementations can differ there (and in everything GPTQ derives from it). Shrinking those
  rows keeps them off the absmax; `ref_gptq`'s tie distance checks that the data has no such tie.
  """
  d = np.where(np.diag(h) == 0, 1.0, np.diag(h))
  perm = np.argsort(-d, kind="stable") if act_order else np.arange(len(d))
  w = w.copy()
  w[perm[::group]] *= 0.5
  return w


# --- Hessian statistics ---


def test_accumulate_is_the_running_mean_of_2_xxT_over_unmasked_tokens():
  rng = np.random.default_rng(0)
  xs = [rng.standard_normal((3, 7, 16)), rng.standard_normal((2, 5, 16)), rng.standard_normal((4, 16))]
  masks = [rng.random((3, 7)) < 0.7, None, np.zeros(4, bool)]  # the last batch is all padding
  stats = hessian.zeros(16)
  for x, m in zip(xs, masks):
    stats = hessian.accumulate(stats, jnp.asarray(x, jnp.bfloat16), None if m is None else jnp.asarray(m))
  tokens = np.concatenate([xs[0][masks[0]], xs[1].reshape(-1, 16)]).astype(np.float64)
  tokens = np.asarray(jnp.asarray(tokens, jnp.bfloat16).astype(jnp.float32), np.float64)  # what bf16 x carried
  assert stats.h.dtype == jnp.float32 and int(stats.count) == len(tokens)
  np.testing.assert_allclose(stats.h, 2 / len(tokens) * tokens.T @ tokens, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats.input_sq_norms(), (tokens**2).sum(0), rtol=1e-5)
  with pytest.raises(ValueError, match="input channels"):
    hessian.accumulate(stats, jnp.zeros((2, 8)))


# --- GPTQ ---

EXACT_CASES = [dict(bits=b, group=32, block=64, sym=s, act_order=a)
               for b in (4, 3) for s in (False, True) for a in (False, True)]
EXACT_CASES += [dict(bits=4, group=-1, block=64, sym=False, act_order=True),  # one group, longer than a block
                dict(bits=3, group=32, block=48, sym=True, act_order=False)]  # block rounded to align with groups
EXACT_CASES += [dict(bits=4, group=48, block=64, sym=False, act_order=a) for a in (False, True)]  # 48 + 48 + 32
EXACT_CASES += [dict(bits=4, group=g, block=64, sym=False, act_order=a, static_groups=True)  # AutoGPTQ's option
                for g, a in ((32, False), (32, True), (48, True))]


@pytest.mark.parametrize("case", EXACT_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_gptq_float64_equals_reference(case):
  w, h = layer(0)
  if case["sym"]:
    w = first_rows_shrunk(w, h, K if case["group"] == -1 else case["group"], case["act_order"])
  case = dict(case)
  block = case.pop("block")
  codes, scales, zeros, g_idx, perm, tie = ref_gptq(w, h, **case)
  assert tie > 1e-9, f"the test data has a rounding tie ({tie:.1e}): codes there are decided by the last ulp"
  with jax.enable_x64(True):
    r = gptq.gptq_quantize(jnp.asarray(w), jnp.asarray(h), block=block, **case)
    assert r.scales.dtype == jnp.float64
    deq = np.asarray(r.dequantize())
  np.testing.assert_array_equal(r.codes, codes)
  np.testing.assert_allclose(r.scales, scales, rtol=1e-10)
  np.testing.assert_array_equal(r.zeros, zeros)
  np.testing.assert_array_equal(r.g_idx, g_idx)
  assert (r.perm is None) == (not case["act_order"])
  if case["act_order"]:
    np.testing.assert_array_equal(r.perm, perm)
    assert not np.array_equal(perm, np.arange(K))
  g = K if case["group"] == -1 else case["group"]
  # every group has exactly `group` rows, but a last one that is short when group does not divide K
  assert np.bincount(np.asarray(r.g_idx)).tolist() == [g] * (K // g) + ([K % g] if K % g else [])
  np.testing.assert_allclose(deq, ref_dequantize(codes, scales, zeros, g_idx), rtol=1e-12, atol=1e-12)
  assert r.codes.dtype == jnp.uint8 and r.zeros.dtype == jnp.int32 and r.g_idx.dtype == jnp.int32
  assert np.all(deq[DEAD] == 0)  # a dead input's row is zeroed, and 0 quantizes to exactly 0


@pytest.mark.parametrize("sym", [False, True])
def test_gptq_float32_close_to_float64_reference(sym):
  w, h = layer(1)
  if sym:
    w = first_rows_shrunk(w, h, 32, True)
  codes, scales, zeros, g_idx, _, _ = ref_gptq(w, h, bits=4, group=32, sym=sym, act_order=True)
  r = gptq.gptq_quantize(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), bits=4, group=32, sym=sym,
                         act_order=True, block=64)
  assert r.scales.dtype == jnp.float32
  assert np.mean(np.asarray(r.codes) == codes) >= 0.99
  ref_err = float(gptq.layer_error(w, ref_dequantize(codes, scales, zeros, g_idx), h))
  np.testing.assert_allclose(float(gptq.layer_error(w, r.dequantize(), h)), ref_err, rtol=2e-3)


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_gptq_error_below_round_to_nearest(seed):
  w, h = layer(seed)
  wj, hj = jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32)
  for bits, sym in ((4, False), (4, True)):
    rtn = gptq.rtn_quantize(wj, bits=bits, group=32, sym=sym)
    for act_order in (False, True):
      r = gptq.gptq_quantize(wj, hj, bits=bits, group=32, sym=sym, act_order=act_order, block=64)
      assert float(gptq.layer_error(wj, r.dequantize(), hj)) < 0.5 * float(gptq.layer_error(wj, rtn.dequantize(), hj))


def test_rtn_is_the_quantizer_per_group():
  w, _ = layer(0)
  r = gptq.rtn_quantize(jnp.asarray(w, jnp.float32), bits=4, group=32, sym=False)
  assert r.perm is None and r.scales.shape == (K // 32, N)
  for gi in range(K // 32):
    x = w[gi * 32:(gi + 1) * 32]
    scale, zero = ref_params(x, 15, False)
    np.testing.assert_allclose(r.scales[gi], scale, rtol=1e-6)
    codes = np.clip(np.round(x / scale) + zero, 0, 15)
    assert np.mean(np.asarray(r.codes[gi * 32:(gi + 1) * 32]) == codes) > 0.999


# --- SparseGPT ---


@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(pattern=(2, 4)), dict(sparsity=0.6, block=48)],
                         ids=["unstructured", "2of4", "unstructured-short-last-block"])
def test_sparsegpt_float64_equals_reference(target):
  w, h = layer(0)
  block = target.get("block", 64)
  target = {**target, "block": block}
  ref_w, ref_keep = ref_sparsegpt(w, h, **target)
  with jax.enable_x64(True):
    out, keep = sparsegpt.sparsegpt_prune(jnp.asarray(w), jnp.asarray(h), **target)
    assert out.dtype == jnp.float64
  out, keep = np.asarray(out), np.asarray(keep)
  np.testing.assert_array_equal(keep, ref_keep)
  np.testing.assert_allclose(out, ref_w, rtol=1e-9, atol=1e-11)
  assert np.all(out[~keep] == 0) and np.all(out[keep] != 0)
  if "pattern" in target:
    assert np.all(keep.reshape(K // 4, 4, N).sum(1) == 2)  # 2:4 in every group of 4, every output channel
  else:
    for i1 in range(0, K, block):  # the reference's inclusive threshold: int(numel * s) + 1 per block
      rows = min(block, K - i1)
      assert (~keep[i1:i1 + rows]).sum() == int(rows * N * target["sparsity"]) + 1


def test_sparsegpt_error_below_magnitude():
  w, h = layer(1)
  wj, hj = jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32)
  for target in (dict(sparsity=0.5), dict(pattern=(2, 4))):
    out, keep = sparsegpt.sparsegpt_prune(wj, hj, **target)
    assert abs(float(np.mean(~np.asarray(keep))) - 0.5) < 0.01
    magnitude = wj * pruning_scores.magnitude_mask(wj, **target)
    assert float(gptq.layer_error(wj, out, hj)) < 0.5 * float(gptq.layer_error(wj, magnitude, hj))


# --- magnitude and Wanda ---


def test_wanda_and_magnitude_masks_follow_their_definitions():
  w, _ = layer(2)
  x = calibration(2)
  stats = hessian.accumulate(hessian.zeros(K), jnp.asarray(x, jnp.float32))
  norms = np.sqrt(np.asarray(stats.input_sq_norms(), np.float64))
  np.testing.assert_allclose(norms, np.linalg.norm(x, axis=0), rtol=1e-4)
  score = np.zeros((K, N))
  for i in range(K):
    for j in range(N):
      score[i, j] = abs(w[i, j]) * np.linalg.norm(x[:, i])
  np.testing.assert_allclose(pruning_scores.wanda_scores(jnp.asarray(w), jnp.asarray(norms)), score, rtol=1e-4)
  w32, n32 = jnp.asarray(w, jnp.float32), jnp.asarray(norms, jnp.float32)
  wanda_scores = np.asarray(pruning_scores.wanda_scores(w32, n32))
  keep = np.asarray(pruning_scores.wanda_mask(w32, n32, sparsity=0.5))
  for j in range(N):  # per output channel: int(k * s) of its inputs pruned
    np.testing.assert_array_equal(keep[:, j], ref_lowest_mask(wanda_scores[:, j], K // 2))
  assert np.all(keep[DEAD] == False)  # noqa: E712  (a dead input's score is 0: pruned first)
  np.testing.assert_array_equal(pruning_scores.wanda_mask(w32, n32, pattern=(2, 4)), ref_nm_mask(wanda_scores, 2, 4))
  mag = np.abs(np.asarray(w32))
  keep = np.asarray(pruning_scores.magnitude_mask(w32, sparsity=0.3))
  np.testing.assert_array_equal(keep, ref_lowest_mask(mag.reshape(-1), int(K * N * 0.3)).reshape(K, N))
  np.testing.assert_array_equal(pruning_scores.magnitude_mask(w32, pattern=(2, 4)), ref_nm_mask(mag, 2, 4))
  np.testing.assert_array_equal(pruning_scores.magnitude_mask(w32, sparsity=0.0), np.ones((K, N), bool))


def test_masks_break_ties_by_lower_index():
  w = jnp.ones((8, 2))
  keep = np.asarray(pruning_scores.magnitude_mask(w, sparsity=0.25))
  assert (~keep).reshape(-1).tolist() == [True] * 4 + [False] * 12
  keep = np.asarray(pruning_scores.wanda_mask(w, jnp.ones(8), pattern=(2, 4)))
  assert (~keep)[:, 0].tolist() == [True, True, False, False] * 2


# --- bad input ---

W, H = jnp.zeros((8, 4)), jnp.eye(8)
BAD = [
  (lambda: gptq.gptq_quantize(W, H, bits=5, group=4, sym=True, act_order=False), "bits=5"),
  (lambda: gptq.gptq_quantize(W, H, bits=4, group=0, sym=True, act_order=False), "group=0"),
  (lambda: gptq.gptq_quantize(W, jnp.eye(4), bits=4, group=4, sym=True, act_order=False), "input rows"),
  (lambda: gptq.gptq_quantize(W, jnp.zeros((8, 4)), bits=4, group=4, sym=True, act_order=False), "square"),
  (lambda: gptq.gptq_quantize(W[0], H, bits=4, group=4, sym=True, act_order=False), "2-D"),
  (lambda: gptq.gptq_quantize(W, -H, bits=4, group=4, sym=True, act_order=False), "positive definite"),
  (lambda: gptq.gptq_quantize(W, H, bits=4, group=4, sym=True, act_order=False, block=0), "block=0"),
  (lambda: gptq.rtn_quantize(W, bits=1, group=4, sym=True), "bits=1"),
  (lambda: sparsegpt.sparsegpt_prune(W, H), "exactly one of"),
  (lambda: sparsegpt.sparsegpt_prune(W, H, sparsity=0.5, pattern=(2, 4)), "exactly one of"),
  (lambda: sparsegpt.sparsegpt_prune(W, H, sparsity=1.0), "sparsity=1.0"),
  (lambda: sparsegpt.sparsegpt_prune(W, H, sparsity=0), "sparsity=0"),
  (lambda: sparsegpt.sparsegpt_prune(W, H, pattern=(2, 3)), "m=3 does not divide"),
  (lambda: sparsegpt.sparsegpt_prune(W, H, pattern=(4, 4)), "0 < n < m"),
  (lambda: sparsegpt.sparsegpt_prune(W, H, pattern=(2, 4), block=6), "multiple of the pattern"),
  (lambda: pruning_scores.wanda_mask(W, jnp.ones(4), sparsity=0.5), "input_norms"),
  (lambda: pruning_scores.magnitude_mask(W, sparsity=-0.1), "sparsity=-0.1"),
]


@pytest.mark.parametrize("call,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_raises_value_error_naming_the_problem(call, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    call()
