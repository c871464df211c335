"""DPO: the losses against TRL's formulas written out in float64, packed per-pair log-probs against a plain loop,
and the preference-pair packer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.preference import EncodedPair, pack_pairs
from maxlm.train.dpo import LOSS_TYPES, dpo_loss, pair_logps, pair_token_counts, segment_logps

# ---------------------------------------------------------------------------------------------------------------
# Reference losses, float64, transcribed from TRL's DPOTrainer: trl 1.16.0 trl/trainer/dpo_trainer.py
# (`_compute_loss`: hinge, ipo, robust, rewards) and trl 0.19.1 (`dpo_loss`: label-smoothed "sigmoid", i.e.
# conservative DPO, which 1.16 reduced to its label_smoothing=0 case).
# ---------------------------------------------------------------------------------------------------------------


def _logsigmoid(x):
  return -np.logaddexp(0.0, -x)


def _trl_reference(pc, pr, rc, rr, beta, loss_type, ls, nc=None, nr=None):
  """(losses, chosen_rewards, rejected_rewards) as TRL computes them, in float64 numpy."""
  pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
  chosen_logratios, rejected_logratios = pc - rc, pr - rr
  delta = chosen_logratios - rejected_logratios
  if loss_type == "sigmoid":  # trl 0.19.1 dpo_loss
    losses = -_logsigmoid(beta * delta) * (1 - ls) - _logsigmoid(-beta * delta) * ls
  elif loss_type == "hinge":  # torch.relu(1 - self.beta * delta_score)
    losses = np.maximum(0.0, 1 - beta * delta)
  elif loss_type == "ipo":  # scores / completion_mask.sum(dim=1).clamp(min=1.0), then (Eq. 17)
    ipo_delta = chosen_logratios / np.maximum(nc, 1.0) - rejected_logratios / np.maximum(nr, 1.0)
    losses = (ipo_delta - 1 / (2 * beta)) ** 2
  elif loss_type == "robust":  # (clean_loss_term - flipped_loss_term) / (1 - 2 * self.label_smoothing)
    clean = -(1 - ls) * _logsigmoid(beta * delta)
    flipped = -ls * _logsigmoid(-beta * delta)
    losses = (clean - flipped) / (1 - 2 * ls)
  return losses, beta * chosen_logratios, beta * rejected_logratios


def _random_logps(n=64, seed=0):
  """float32 policy/reference summed log-probs and completion token counts of n pairs."""
  rng = np.random.default_rng(seed)
  logps = [(-rng.uniform(1, 40, n)).astype(np.float32) for _ in range(4)]
  counts = [rng.integers(0, 30, n).astype(np.float32) for _ in range(2)]  # 0 exercises TRL's clamp(min=1)
  return logps, counts


CASES = [(t, ls) for t in LOSS_TYPES for ls in ((0.0, 0.1, 0.3) if t in ("sigmoid", "robust") else (0.0,))]


@pytest.mark.parametrize("loss_type,ls", CASES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_losses_and_rewards_match_trl(loss_type, ls, beta):
  (pc, pr, rc, rr), (nc, nr) = _random_logps()
  got = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls,
                 chosen_tokens=nc, rejected_tokens=nr)
  want = _trl_reference(pc, pr, rc, rr, beta, loss_type, ls, nc, nr)
  for g, w, name in zip(got, want, ("losses", "chosen_rewards", "rejected_rewards"), strict=True):
    assert g.dtype == jnp.float32 and g.shape == pc.shape, name
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, atol=1e-6, err_msg=name)


def test_reference_free_is_zero_reference():
  (pc, pr, _, _), _ = _random_logps(seed=1)
  zeros = np.zeros_like(pc)
  losses, chosen_r, _ = dpo_loss(pc, pr, zeros, zeros, beta=0.2)
  np.testing.assert_allclose(np.asarray(losses), -_logsigmoid(0.2 * (pc.astype(np.float64) - pr)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(chosen_r), 0.2 * pc.astype(np.float64), rtol=1e-6)


@pytest.mark.parametrize("ls", [0.0, 0.1, 0.3])
def test_sigmoid_gradient_is_analytic(ls):
  (pc, pr, rc, rr), _ = _random_logps(seed=2)
  beta = 0.3
  grads = jax.grad(lambda a, b: dpo_loss(a, b, rc, rr, beta=beta, label_smoothing=ls)[0].sum(), argnums=(0, 1))(
      jnp.asarray(pc), jnp.asarray(pr))
  z = beta * ((pc.astype(np.float64) - pr) - (rc.astype(np.float64) - rr))
  sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
  dz = -(1 - ls) * sig(-z) + ls * sig(z)  # d/dz [-(1-ls) logsigmoid(z) - ls logsigmoid(-z)]
  np.testing.assert_allclose(np.asarray(grads[0]), beta * dz, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(grads[1]), -beta * dz, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type,ls", CASES)
def test_gradients_match_finite_differences(loss_type, ls):
  (pc, pr, rc, rr), (nc, nr) = _random_logps(n=16, seed=3)
  beta = 0.25
  kw = dict(beta=beta, loss_type=loss_type, label_smoothing=ls, chosen_tokens=nc, rejected_tokens=nr)
  grads = jax.grad(lambda a, b: dpo_loss(a, b, rc, rr, **kw)[0].sum(), argnums=(0, 1))(jnp.asarray(pc),
                                                                                         jnp.asarray(pr))
  eps = 1e-4
  for arg, g in zip((0, 1), grads, strict=True):
    def f(x, arg=arg):
      args = [pc.astype(np.float64), pr.astype(np.float64), rc, rr]
      args[arg] = x
      return _trl_reference(*args, beta, loss_type, ls, nc, nr)[0]
    base = (pc if arg == 0 else pr).astype(np.float64)
    fd = (f(base + eps) - f(base - eps)) / (2 * eps)  # losses are per pair: one pass perturbs every pair
    np.testing.assert_allclose(np.asarray(g), fd, rtol=1e-4, atol=1e-5, err_msg=f"argument {arg}")


def test_rewards_carry_no_gradient():
  (pc, pr, rc, rr), _ = _random_logps(n=8, seed=4)
  g = jax.grad(lambda a: sum(x.sum() for x in dpo_loss(a, pr, rc, rr, beta=0.1)[1:]))(jnp.asarray(pc))
  assert not np.any(np.asarray(g))


def test_dpo_loss_jits():
  (pc, pr, rc, rr), (nc, nr) = _random_logps(n=8, seed=5)
  fn = jax.jit(lambda *a: dpo_loss(*a, beta=0.1, loss_type="ipo", chosen_tokens=nc, rejected_tokens=nr))
  want = _trl_reference(pc, pr, rc, rr, 0.1, "ipo", 0.0, nc, nr)[0]
  np.testing.assert_allclose(np.asarray(fn(pc, pr, rc, rr)[0]), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=0.1, loss_type="kto"), "sigmoid, ipo, hinge, robust"),
    (dict(beta=0.0), "beta"),
    (dict(beta=-1.0), "beta"),
    (dict(beta=0.1, label_smoothing=-0.1), r"\[0, 0.5\]"),
    (dict(beta=0.1, label_smoothing=0.6), r"\[0, 0.5\]"),
    (dict(beta=0.1, loss_type="robust", label_smoothing=0.5), r"\[0, 0.5\)"),
    (dict(beta=0.1, loss_type="hinge", label_smoothing=0.1), "no label smoothing"),
    (dict(beta=0.1, loss_type="ipo", label_smoothing=0.1), "no label smoothing"),
    (dict(beta=0.1, loss_type="ipo"), "chosen_tokens"),
])
def test_invalid_loss_arguments_raise(kwargs, match):
  x = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=match):
    dpo_loss(x, x, x, x, **kwargs)


def test_sigmoid_allows_half_smoothing():
  x = np.zeros(3, np.float32)
  losses, _, _ = dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.5)
  np.testing.assert_allclose(np.asarray(losses), np.log(2.0), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Per-segment and per-pair log-probabilities against a plain loop.
# ---------------------------------------------------------------------------------------------------------------


def _random_packed(rows, seq, max_segments, seed):
  """Random segment_ids (1.., contiguous spans, padded with 0) and 0/1 weights, some segments fully unweighted."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((rows, seq), np.int32)
  for r in range(rows):
    start = 0
    for s in range(1, rng.integers(0, max_segments + 1) + 1):
      n = int(rng.integers(1, 6))
      if start + n > seq:
        break
      seg[r, start:start + n] = s
      start += n
  weights = (rng.random((rows, seq)) < 0.6).astype(np.float32) * (seg > 0)
  weights[0, seg[0] == 2] = 0.0  # row 0's pair 0 has an unweighted rejected sequence: invalid
  return seg, weights


def _loop_segment_logps(logits, targets, weights, seg, num_segments):
  """Row by row, token by token: float64 log-softmax of the target, summed per segment id 1..num_segments."""
  logits = np.asarray(logits, np.float64)
  rows, seq, _ = logits.shape
  sums, counts = np.zeros((rows, num_segments)), np.zeros((rows, num_segments))
  for r in range(rows):
    for t in range(seq):
      s = seg[r, t]
      if 1 <= s <= num_segments and weights[r, t] != 0:
        row = logits[r, t]
        m = row.max()
        logp = row[targets[r, t]] - (m + np.log(np.exp(row - m).sum()))
        sums[r, s - 1] += weights[r, t] * logp
        counts[r, s - 1] += weights[r, t]
  return sums, counts


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-5)])
def test_segment_and_pair_logps_match_loop(dtype, rtol):
  rows, seq, vocab, max_pairs = 4, 32, 13, 3
  seg, weights = _random_packed(rows, seq, 2 * max_pairs + 1, seed=6)  # + 1: a segment beyond the pairs
  rng = np.random.default_rng(7)
  logits = jnp.asarray(3 * rng.standard_normal((rows, seq, vocab)), dtype)
  targets = rng.integers(0, vocab, (rows, seq)).astype(np.int32)
  ref_logits = np.asarray(logits.astype(jnp.float32))  # the values the function sees, exactly

  sums, counts = segment_logps(logits, targets, weights, seg, 2 * max_pairs)
  want_sums, want_counts = _loop_segment_logps(ref_logits, targets, weights, seg, 2 * max_pairs)
  assert sums.dtype == jnp.float32 and sums.shape == (rows, 2 * max_pairs)
  np.testing.assert_allclose(np.asarray(sums), want_sums, rtol=rtol, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(counts), want_counts)

  chosen, rejected, valid = jax.jit(pair_logps, static_argnums=4)(logits, targets, weights, seg, max_pairs)
  nc, nr = pair_token_counts(weights, seg, max_pairs)
  for r in range(rows):
    for k in range(max_pairs):
      i = r * max_pairs + k
      np.testing.assert_allclose(float(chosen[i]), want_sums[r, 2 * k], rtol=rtol, atol=1e-5)
      np.testing.assert_allclose(float(rejected[i]), want_sums[r, 2 * k + 1], rtol=rtol, atol=1e-5)
      assert float(nc[i]) == want_counts[r, 2 * k] and float(nr[i]) == want_counts[r, 2 * k + 1]
      assert bool(valid[i]) == (want_counts[r, 2 * k] > 0 and want_counts[r, 2 * k + 1] > 0)
  assert not bool(valid[0]) and valid.dtype == jnp.bool_
  assert 0 < int(valid.sum()) < rows * max_pairs


def test_segment_logps_gradient_is_onehot_minus_softmax():
  rows, seq, vocab = 2, 12, 7
  seg, weights = _random_packed(rows, seq, 4, seed=8)
  rng = np.random.default_rng(9)
  logits = rng.standard_normal((rows, seq, vocab)).astype(np.float32)
  targets = rng.integers(0, vocab, (rows, seq)).astype(np.int32)
  g = jax.grad(lambda x: segment_logps(x, targets, weights, seg, 4)[0][:, 0].sum())(jnp.asarray(logits))
  x = logits.astype(np.float64)
  softmax = np.exp(x - x.max(-1, keepdims=True))
  softmax /= softmax.sum(-1, keepdims=True)
  want = (np.eye(vocab)[targets] - softmax) * (weights * (seg == 1))[..., None]
  np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-6)


def test_masked_minus_inf_target_stays_finite():
  logits = np.zeros((1, 3, 4), np.float32)
  logits[0, 1, 2] = -np.inf  # an impossible target, at a position with no weight
  targets = np.array([[0, 2, 1]], np.int32)
  sums, _ = segment_logps(logits, targets, np.array([[1.0, 0.0, 1.0]], np.float32), np.ones((1, 3), np.int32), 1)
  np.testing.assert_allclose(np.asarray(sums), [[2 * np.log(0.25)]], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The packer.
# ---------------------------------------------------------------------------------------------------------------


def test_pack_pairs_hand_example():
  pair = EncodedPair(chosen=[1, 2, 3], chosen_mask=[0, 1, 1], rejected=[1, 2, 4, 5], rejected_mask=[0, 0, 1, 1])
  (row,) = pack_pairs([pair], seq_len=8, max_pairs_per_row=2)
  np.testing.assert_array_equal(row["inputs"], [1, 2, 1, 2, 4, 0, 0, 0])
  np.testing.assert_array_equal(row["targets"], [2, 3, 2, 4, 5, 0, 0, 0])
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 2, 2, 2, 0, 0, 0])
  np.testing.assert_array_equal(row["positions"], [0, 1, 0, 1, 2, 0, 0, 0])
  np.testing.assert_array_equal(row["loss_mask"], [1, 1, 0, 1, 1, 0, 0, 0])
  for key in ("inputs", "targets", "segment_ids", "positions"):
    assert row[key].dtype == np.int32
  assert row["loss_mask"].dtype == np.float32


def _random_pairs(n, seed, max_len=10):
  """Pairs whose chosen sequence starts with a unique id token 1000 + i, so a packed pair can be identified."""
  rng = np.random.default_rng(seed)
  pairs = []
  for i in range(n):
    lc, lr = rng.integers(2, max_len + 1, 2)
    chosen = np.concatenate([[1000 + i], rng.integers(1, 100, lc - 1)])
    pairs.append(EncodedPair(chosen, rng.random(lc) < 0.5, rng.integers(1, 100, lr), rng.random(lr) < 0.5))
  return pairs


@pytest.mark.parametrize("seq_len,max_pairs", [(16, 2), (24, 3), (18, 1)])
def test_pack_pairs_places_every_pair_whole_and_first_fit(seq_len, max_pairs):
  pairs = _random_pairs(40, seed=seq_len)
  rows = pack_pairs(pairs, seq_len=seq_len, max_pairs_per_row=max_pairs)
  assert rows == [] or all(r["inputs"].shape == (seq_len,) for r in rows)
  placed = {}  # pair index -> row
  for r, row in enumerate(rows):
    seg = row["segment_ids"]
    num_segments = int(seg.max())
    assert num_segments % 2 == 0 and num_segments <= 2 * max_pairs
    t, order = 0, []
    for s in range(1, num_segments + 1):  # segments are consecutive spans 1, 2, 3, ... from position 0
      n = int((seg == s).sum())
      assert np.all(seg[t:t + n] == s)
      k, which = (s - 1) // 2, ("chosen", "rejected")[(s - 1) % 2]
      if which == "chosen":
        i = int(row["inputs"][t]) - 1000
        assert i not in placed
        placed[i] = r
        order.append(i)
      pair = pairs[order[k]]
      tokens, mask = getattr(pair, which), getattr(pair, f"{which}_mask")
      assert n == len(tokens) - 1
      np.testing.assert_array_equal(row["inputs"][t:t + n], tokens[:-1])
      np.testing.assert_array_equal(row["targets"][t:t + n], tokens[1:])
      np.testing.assert_array_equal(row["positions"][t:t + n], np.arange(n))
      np.testing.assert_array_equal(row["loss_mask"][t:t + n], mask[1:].astype(np.float32))
      t += n
    for key in ("inputs", "targets", "segment_ids", "positions", "loss_mask"):  # padding tail
      assert not np.any(row[key][t:])
    assert order == sorted(order)  # a row's pairs keep the given order
  assert sorted(placed) == list(range(len(pairs)))
  # First fit: no earlier row had room (positions and pair count) for a pair when it was placed.
  for i, r in placed.items():
    for earlier in range(r):
      before = [j for j, rj in placed.items() if rj == earlier and j < i]
      used = sum(pairs[j].num_positions for j in before)
      assert len(before) == max_pairs or used + pairs[i].num_positions > seq_len, (i, r, earlier)
  assert pack_pairs(pairs, seq_len=seq_len, max_pairs_per_row=max_pairs)[0]["inputs"].tolist() == \
      rows[0]["inputs"].tolist()  # deterministic


def test_pack_pairs_errors():
  ok = EncodedPair([1, 2, 3], [0, 1, 1], [1, 2], [0, 1])
  long = EncodedPair(np.arange(6), np.ones(6, bool), np.arange(5), np.ones(5, bool))  # 5 + 4 = 9 positions
  with pytest.raises(ValueError, match=r"pair 1 .*seq_len=8.*\(6, 5\)"):
    pack_pairs([ok, long], seq_len=8, max_pairs_per_row=2)
  assert len(pack_pairs([ok, long], seq_len=9, max_pairs_per_row=2)) == 2  # exactly fits a row of its own
  with pytest.raises(ValueError, match="pair 0 .*>= 2 tokens"):
    pack_pairs([EncodedPair([1], [1], [1, 2], [0, 1])], seq_len=8, max_pairs_per_row=1)
  with pytest.raises(ValueError, match="same shape"):
    EncodedPair([1, 2, 3], [0, 1], [1, 2], [0, 1])
  with pytest.raises(ValueError, match="max_pairs_per_row"):
    pack_pairs([ok], seq_len=8, max_pairs_per_row=0)


def test_packed_pairs_logps_match_unpacked_sequences():
  """pack_pairs -> pair_logps with a position-aware toy model equals each sequence scored on its own."""
  vocab, seq_len, max_pairs = 1100, 20, 2
  pairs = _random_pairs(7, seed=11, max_len=7)
  rows = pack_pairs(pairs, seq_len=seq_len, max_pairs_per_row=max_pairs)
  rng = np.random.default_rng(12)
  tok_table = rng.standard_normal((vocab, vocab)).astype(np.float32)
  pos_table = rng.standard_normal((seq_len, vocab)).astype(np.float32)
  model = lambda inputs, positions: tok_table[inputs] + pos_table[positions]  # noqa: E731
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  chosen, rejected, valid = pair_logps(model(batch["inputs"], batch["positions"]), batch["targets"],
                                       batch["loss_mask"], batch["segment_ids"], max_pairs)

  def score(tokens, mask):
    logits = model(tokens[:-1], np.arange(len(tokens) - 1)).astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return sum(logp[t, tokens[t + 1]] for t in range(len(tokens) - 1) if mask[t + 1]), int(mask[1:].sum())

  slot = 0
  for r, row in enumerate(rows):
    num_pairs = int(row["segment_ids"].max()) // 2
    for k in range(max_pairs):
      i = r * max_pairs + k
      if k >= num_pairs:
        assert not bool(valid[i])
        continue
      pair = pairs[int(row["inputs"][row["segment_ids"] == 2 * k + 1][0]) - 1000]
      (c, nc), (rj, nr) = score(pair.chosen, pair.chosen_mask), score(pair.rejected, pair.rejected_mask)
      np.testing.assert_allclose([float(chosen[i]), float(rejected[i])], [c, rj], rtol=1e-5, atol=1e-5)
      assert bool(valid[i]) == (nc > 0 and nr > 0)
      slot += 1
  assert slot == len(pairs)
