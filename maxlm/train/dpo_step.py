"""The DPO train and eval steps: policy and reference log-probabilities of packed (chosen, rejected) pairs, TRL's loss.

The reference is the frozen starting model. With LoRA (`dpo.reference=base`) it is the same model with its
adapters switched off (zeros in place of A and B inside the step: no second copy of the weights);
`dpo.reference=precomputed` (any run, full fine-tuning included) scores every pair once with the starting weights
before the first step and feeds those log-probabilities with the batches; `dpo.reference=none` trains
reference-free (zeros). Sums over the valid pairs of
each micro-batch accumulate like the language-model step's, so accumulation equals the full batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from maxlm.models.lora import dropout_keys
from maxlm.train.dpo import dpo_loss, pair_logps, pair_token_counts
from maxlm.train.step import Batch, TrainState, accumulate, guarded_update, merge_model

NUM_SUMS = 5  # loss, valid pairs, chosen rewards, rejected rewards, pairs ranked right


@dataclasses.dataclass(frozen=True)
class DPOSettings:
  """The dpo.* config as the steps need it."""

  beta: float
  loss_type: str
  label_smoothing: float
  pairs_per_row: int
  reference: str  # "base" (LoRA: the adapters off) | "precomputed" (the starting model's, once) | "none"

  @classmethod
  def from_config(cls, cfg) -> DPOSettings:
    o = cfg.dpo
    return cls(float(o.beta), o.loss_type, float(o.label_smoothing), int(o.pairs_per_row), o.reference)


def _logps(model, batch: Batch, pairs_per_row: int):
  logits, _ = model.forward(batch["inputs"], batch["positions"], batch["segment_ids"])
  return pair_logps(logits, batch["targets"], batch["loss_mask"], batch["segment_ids"], pairs_per_row)


def dpo_sums(params, graphdef: nnx.GraphDef, batch: Batch, frozen, s: DPOSettings) -> tuple[jax.Array, tuple]:
  """(summed loss, (loss, pairs, chosen rewards, rejected rewards, right)) over the batch's valid pairs."""
  chosen, rejected, valid = _logps(merge_model(graphdef, params, frozen), batch, s.pairs_per_row)
  if s.reference == "none":
    ref_chosen = ref_rejected = jnp.zeros_like(chosen)
  elif s.reference == "precomputed":  # the starting model's, computed once before the first step
    ref_chosen, ref_rejected = batch["ref_chosen"].reshape(-1), batch["ref_rejected"].reshape(-1)
  else:  # the adapters switched off: zeros for A and B give exactly the base's computation
    off = jax.tree.map(jnp.zeros_like, jax.lax.stop_gradient(params))
    ref_chosen, ref_rejected, _ = jax.lax.stop_gradient(_logps(merge_model(graphdef, off, frozen), batch,
                                                               s.pairs_per_row))
  counts = pair_token_counts(batch["loss_mask"], batch["segment_ids"], s.pairs_per_row)
  losses, chosen_rewards, rejected_rewards = dpo_loss(
    chosen, rejected, ref_chosen, ref_rejected, beta=s.beta, loss_type=s.loss_type,
    label_smoothing=s.label_smoothing, chosen_tokens=counts[0], rejected_tokens=counts[1])
  v = valid.astype(jnp.float32)
  total = jnp.sum(losses * v)
  sums = (total, jnp.sum(v), jnp.sum(chosen_rewards * v), jnp.sum(rejected_rewards * v),
          jnp.sum((chosen_rewards > rejected_rewards) * v))
  return total, sums


def make_dpo_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                        settings: DPOSettings, *, accum_steps: int) -> Callable[..., tuple[TrainState, dict]]:
  """train_step(state, batch, unused, frozen) -> (state, metrics): loss (mean over valid pairs), grad_norm, lr,
  tokens (the number of pairs), skipped, nonfinite_streak and TRL's rewards/chosen, rewards/rejected,
  rewards/margins and rewards/accuracies."""
  grad_fn = jax.value_and_grad(dpo_sums, has_aux=True)

  def train_step(state: TrainState, batch: Batch, _unused=None, frozen=None) -> tuple[TrainState, dict]:
    if frozen is not None:  # this step's adapter dropout keys (a no-op without dropout)
      frozen = dropout_keys(frozen, state["step"])
    grads_sum, sums = accumulate(lambda p, mb: grad_fn(p, graphdef, mb, frozen, settings), state["params"], batch,
                                 accum_steps, NUM_SUMS)
    loss_sum, pairs, chosen, rejected, right = sums
    denom = jnp.maximum(pairs, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads_sum)
    new_state, grad_norm, finite = guarded_update(tx, state, grads, (loss_sum, chosen, rejected))
    metrics = {
      "loss": loss_sum / denom, "log_z_sq": jnp.zeros(()), "grad_norm": grad_norm, "lr": schedule(state["step"]),
      "tokens": pairs, "skipped": (~finite).astype(jnp.int32), "nonfinite_streak": new_state["nonfinite_streak"],
      "rewards/chosen": chosen / denom, "rewards/rejected": rejected / denom,
      "rewards/margins": (chosen - rejected) / denom, "rewards/accuracies": right / denom,
    }
    return new_state, metrics

  return train_step


def make_dpo_eval_step(graphdef: nnx.GraphDef, settings: DPOSettings) -> Callable:
  """eval_step(params, batch, frozen) -> (summed DPO loss, valid pairs) of held-out pairs."""

  def eval_step(params, batch: Batch, frozen=None):
    _, sums = dpo_sums(params, graphdef, batch, frozen, settings)
    return sums[0], sums[1]

  return eval_step


def reference_logps(graphdef: nnx.GraphDef, params, frozen, rows: list[dict], settings: DPOSettings,
                    put: Callable[[dict], dict], batch_rows: int) -> np.ndarray:
  """float32 [pairs, 2]: (chosen, rejected) log-probabilities of every pair in `rows` (packed with pair_index) under
  `params`, batch by batch (`put` places one global batch on the devices); what dpo.reference=precomputed feeds."""
  num = 1 + max(int(r["pair_index"].max()) for r in rows)
  out = np.zeros((num, 2), np.float32)
  score = jax.jit(lambda p, b, f: _logps(merge_model(graphdef, p, f), b, settings.pairs_per_row)[:2])
  for batch in rows_to_batches(rows, batch_rows):
    ids = batch.pop("pair_index").reshape(-1)
    chosen, rejected = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                        for x in score(params, put(batch), frozen))
    keep = ids >= 0
    out[ids[keep], 0], out[ids[keep], 1] = chosen[keep], rejected[keep]
  return out


def rows_to_batches(rows: list[dict], batch_rows: int) -> list[dict[str, np.ndarray]]:
  """Consecutive rows stacked into batches of `batch_rows` (the last padded with empty rows: segment 0, no pairs)."""
  out = []
  for i in range(0, len(rows), batch_rows):
    part = rows[i:i + batch_rows]
    pad = {k: (np.full_like(v, -1) if k == "pair_index" else np.zeros_like(v)) for k, v in part[0].items()}
    part = part + [pad] * (batch_rows - len(part))
    out.append({k: np.stack([r[k] for r in part]) for k in part[0]})
  return out
