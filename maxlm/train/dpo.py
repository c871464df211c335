"""DPO (direct preference optimization) losses and the per-sequence log-probabilities of packed preference rows.

The losses follow TRL's DPOTrainer (read from the trl 1.16.0 wheel, trl/trainer/dpo_trainer.py, `_compute_loss`;
label-smoothed "sigmoid" (conservative DPO) from trl 0.19.1, `dpo_loss`, which 1.16 dropped):

  logits   = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
  sigmoid  = -logsigmoid(beta * logits) * (1 - ls) - logsigmoid(-beta * logits) * ls
  hinge    = relu(1 - beta * logits)
  ipo      = (logits_avg - 1 / (2 * beta))^2, each log-ratio divided by its completion's token count (>= 1)
  robust   = (-logsigmoid(beta * logits) * (1 - ls) + logsigmoid(-beta * logits) * ls) / (1 - 2 * ls)
  rewards  = beta * (policy - ref), chosen and rejected, without gradient

Packed rows (data_pipelines.preference.pack_pairs) hold pairs: segment 2k+1 is pair k's chosen sequence,
segment 2k+2 its rejected one, and `weights` is 1 on completion tokens only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def _check_loss_args(beta: float, loss_type: str, label_smoothing: float) -> None:
  """Raises ValueError for an unknown loss type, beta <= 0 or a label smoothing the loss type does not allow."""
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown DPO loss_type {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
  if not beta > 0:
    raise ValueError(f"DPO beta must be > 0, got {beta}")
  ls = label_smoothing
  if loss_type == "sigmoid" and not 0.0 <= ls <= 0.5:
    raise ValueError(f"label_smoothing must lie in [0, 0.5] for the 'sigmoid' loss, got {ls}")
  if loss_type == "robust" and not 0.0 <= ls < 0.5:
    raise ValueError(f"label_smoothing must lie in [0, 0.5) for the 'robust' loss, got {ls}")
  if loss_type in ("hinge", "ipo") and ls != 0.0:
    # TRL warns and ignores it; an ignored setting is more likely a mistake than an intent, so refuse it.
    raise ValueError(f"the {loss_type!r} loss has no label smoothing: set label_smoothing=0, got {ls}")


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array,
             *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: jax.Array | None = None, rejected_tokens: jax.Array | None = None,
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-pair (losses, chosen_rewards, rejected_rewards), float32 [pairs], as TRL's DPOTrainer defines them.

  Inputs are [pairs] summed log-probabilities of each completion under the policy and the reference. For
  reference-free DPO pass zeros as ref_chosen and ref_rejected (logits are then the policy's log-ratio alone, and
  the rewards beta * policy). "ipo" needs chosen_tokens / rejected_tokens, the [pairs] completion token counts:
  TRL's IPO divides each log-ratio by its count (clamped to >= 1) so beta means the same at any length; the
  rewards stay unaveraged, as in TRL. Pairs that are padding still get a finite loss: mask them with
  pair_logps' `valid` before averaging.
  """
  _check_loss_args(beta, loss_type, label_smoothing)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  pc, pr, rc, rr = f32(policy_chosen), f32(policy_rejected), f32(ref_chosen), f32(ref_rejected)
  chosen_ratio, rejected_ratio = pc - rc, pr - rr
  ls = label_smoothing
  if loss_type == "ipo":
    if chosen_tokens is None or rejected_tokens is None:
      raise ValueError("the 'ipo' loss averages log-ratios over completion tokens: pass chosen_tokens and "
                       "rejected_tokens (pair_token_counts gives them)")
    chosen_avg = chosen_ratio / jnp.maximum(f32(chosen_tokens), 1.0)
    rejected_avg = rejected_ratio / jnp.maximum(f32(rejected_tokens), 1.0)
    losses = (chosen_avg - rejected_avg - 1.0 / (2.0 * beta)) ** 2
  else:
    z = beta * (chosen_ratio - rejected_ratio)
    if loss_type == "sigmoid":
      losses = -jax.nn.log_sigmoid(z) * (1.0 - ls) - jax.nn.log_sigmoid(-z) * ls
    elif loss_type == "hinge":
      losses = jax.nn.relu(1.0 - z)
    else:  # robust
      losses = (-jax.nn.log_sigmoid(z) * (1.0 - ls) + jax.nn.log_sigmoid(-z) * ls) / (1.0 - 2.0 * ls)
  chosen_rewards = beta * jax.lax.stop_gradient(chosen_ratio)
  rejected_rewards = beta * jax.lax.stop_gradient(rejected_ratio)
  return losses, chosen_rewards, rejected_rewards


def _segment_sums(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """[rows, num_segments] sums of float32 [rows, seq] values over the positions of segments 1..num_segments."""
  onehot = (segment_ids[..., None] == jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)).astype(jnp.float32)
  return jnp.einsum("rs,rsk->rk", values, onehot, precision=jax.lax.Precision.HIGHEST)


def segment_logps(logits: jax.Array, targets: jax.Array, weights: jax.Array, segment_ids: jax.Array,
                  num_segments: int) -> tuple[jax.Array, jax.Array]:
  """([rows, num_segments] summed log p(target) over weighted tokens of each segment, [rows, num_segments] token
  counts), segment k+1 in column k; float32 whatever the logits' dtype.

  Log-softmax is computed as target logit - logsumexp in float32 (no [rows, seq, vocab] log-prob tensor is kept).
  Tokens of segment 0 (padding) or above num_segments count nowhere; the counts are sums of `weights`.
  """
  logits32 = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits32, axis=-1)
  target_logit = jnp.take_along_axis(logits32, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)
  # where, not a product: a -inf log-prob at a zero-weight position must not turn the sum into NaN.
  token_logp = jnp.where(weights != 0, (target_logit - log_z) * weights, 0.0)
  return _segment_sums(token_logp, segment_ids, num_segments), _segment_sums(weights, segment_ids, num_segments)


def _split_pairs(per_segment: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[rows, 2 * max_pairs] per-segment values -> (chosen, rejected), each [rows * max_pairs], pair k of row r at
  r * max_pairs + k."""
  return per_segment[:, 0::2].reshape(-1), per_segment[:, 1::2].reshape(-1)


def pair_token_counts(weights: jax.Array, segment_ids: jax.Array,
                      max_pairs_per_row: int) -> tuple[jax.Array, jax.Array]:
  """(chosen, rejected) [rows * max_pairs] weighted-token counts of each pair: the IPO loss's lengths, no logits."""
  counts = _segment_sums(weights.astype(jnp.float32), segment_ids, 2 * max_pairs_per_row)
  return _split_pairs(counts)


def pair_logps(logits: jax.Array, targets: jax.Array, weights: jax.Array, segment_ids: jax.Array,
               max_pairs_per_row: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(chosen [rows*max_pairs], rejected [rows*max_pairs], valid [rows*max_pairs] bool): pair k of each row.

  Pair k of row r (at r * max_pairs + k) is segments 2k+1 (chosen) and 2k+2 (rejected); it is valid when both
  have at least one weighted token (rows with fewer pairs leave invalid slots holding zeros).
  """
  logps, counts = segment_logps(logits, targets, weights, segment_ids, 2 * max_pairs_per_row)
  chosen, rejected = _split_pairs(logps)
  chosen_n, rejected_n = _split_pairs(counts)
  return chosen, rejected, (chosen_n > 0) & (rejected_n > 0)
