"""The attention mask rule (kernels_pallas/masking.py) against a brute-force enumeration of the definition.

Every mask site (model, ring attention, kernels, references) builds on this module, so it is checked here against
loops written from the rule itself: causal k <= q, window q - k < w (both sides when not causal), equal segments,
existing keys; and the block ranges are the exact extent of the visible pairs.
"""

import itertools

import numpy as np
import pytest

from kernels_pallas import masking

WINDOWS = (None, 1, 2, 3, 5)


def _rule(q: int, k: int, causal: bool, window: int | None) -> bool:
  if causal and k > q:
    return False
  return window is None or abs(q - k) < window


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", WINDOWS)
def test_attention_mask_equals_the_rule_with_segments_and_valid_keys(causal, window):
  rng = np.random.default_rng(0)
  b, s, t = 3, 6, 9
  q_pos = rng.integers(0, t, (b, s))
  k_pos = np.arange(t)
  q_seg, kv_seg = rng.integers(0, 3, (b, s)), rng.integers(0, 3, (b, t))
  kv_valid = rng.random((b, t)) < 0.8
  got = np.asarray(masking.attention_mask(q_pos, k_pos, causal=causal, sliding_window=window, q_segment_ids=q_seg,
                                          kv_segment_ids=kv_seg, kv_valid=kv_valid))
  want = np.zeros((b, s, t), bool)
  for i, j, kk in itertools.product(range(b), range(s), range(t)):
    want[i, j, kk] = (_rule(q_pos[i, j], k_pos[kk], causal, window) and q_seg[i, j] == kv_seg[i, kk]
                      and kv_valid[i, kk])
  np.testing.assert_array_equal(got, want)


def test_attention_mask_without_conditions_is_all_visible_and_broadcasts():
  got = masking.attention_mask(np.arange(4)[None], np.arange(5), causal=False, sliding_window=None)
  assert got.shape == (1, 4, 5) and bool(got.all())
  causal = np.asarray(masking.attention_mask(np.arange(4)[None], np.arange(4), causal=True, sliding_window=None))
  np.testing.assert_array_equal(causal[0], np.tril(np.ones((4, 4), bool)))
  assert masking.visible(0, 1, causal=False, sliding_window=None) is None


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", WINDOWS)
def test_key_and_query_ranges_are_exactly_the_visible_span(causal, window):
  n = 9
  for first, last in itertools.combinations_with_replacement(range(n), 2):
    keys = [k for k in range(n) if any(_rule(q, k, causal, window) for q in range(first, last + 1))]
    lo, hi = masking.key_range(first, last, causal=causal, sliding_window=window, num_keys=n)
    assert list(range(int(lo), int(hi) + 1)) == keys, (first, last)
    queries = [q for q in range(n) if any(_rule(q, k, causal, window) for k in range(first, last + 1))]
    lo, hi = masking.query_range(first, last, causal=causal, sliding_window=window, num_queries=n)
    assert list(range(int(lo), int(hi) + 1)) == queries, (first, last)


def test_mask_value_is_finite_and_vanishes_under_exp():
  m = np.float32(masking.MASK_VALUE)
  assert np.isfinite(m)
  assert np.exp(m - m) == 1.0  # a row with nothing visible yet stays NaN-free in an online softmax
  assert np.exp(m - np.float32(-1e4)) == 0.0  # next to any real score its weight is exactly 0
