"""Pure train and eval steps: packed-batch loss, z-loss, gradient accumulation, NaN/inf guard."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from maxlm.models.lora import dropout_keys

Batch = dict[str, jax.Array]
TrainState = dict  # {"params", "opt_state", "step", "nonfinite_streak", "nonfinite_total"}


def token_loss_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                    z_loss: float) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Sums over weighted tokens: (nll + z_loss * logZ^2, (nll, logZ^2)), all in float32.

  Differentiated by hand (see _loss_sums_bwd): the logits' gradient is one elementwise pass, p * a - onehot * c,
  instead of autodiff's re-exponentiation, zero-filled scatter of the target logits' gradient and sum (three
  extra passes over [tokens, vocab], the largest tensors of a step at large vocabularies).
  """
  total, nll, z_sq = _loss_sums(logits, targets, weights, z_loss)
  return total, (nll, z_sq)


def _loss_parts(logits, targets, weights, z_loss):
  """(total, nll, z_sq) and the per-token log Z, in float32 (the reference formula)."""
  logits32 = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits32, axis=-1)
  target_logit = jnp.take_along_axis(logits32, targets[..., None], axis=-1)[..., 0]
  nll = jnp.sum((log_z - target_logit) * weights)
  z_sq = jnp.sum(jnp.square(log_z) * weights)
  return (nll + z_loss * z_sq, nll, z_sq), log_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _loss_sums(logits, targets, weights, z_loss):
  return _loss_parts(logits, targets, weights, z_loss)[0]


def _loss_sums_fwd(logits, targets, weights, z_loss):
  sums, log_z = _loss_parts(logits, targets, weights, z_loss)
  return sums, (logits, targets, weights, log_z)


def _loss_sums_bwd(z_loss, residuals, cotangents):
  """d/dlogits of g_total * total + g_nll * nll + g_z * z_sq: softmax * (ce + 2 z log Z) - onehot(target) * ce, with
  ce = (g_total + g_nll) * w and z = (g_total * z_loss + g_z) * w per token."""
  logits, targets, weights, log_z = residuals
  g_total, g_nll, g_z = cotangents
  ce = (g_total + g_nll) * weights
  zc = (g_total * z_loss + g_z) * weights * 2.0 * log_z
  probs = jnp.exp(logits.astype(jnp.float32) - log_z[..., None])
  onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
  grad = probs * (ce + zc)[..., None] - jnp.where(onehot, ce[..., None], 0.0)
  return grad.astype(logits.dtype), None, None


_loss_sums.defvjp(_loss_sums_fwd, _loss_sums_bwd)


@dataclasses.dataclass(frozen=True)
class Distill:
  """A frozen teacher's structure and the weights of the distillation term (its parameters are passed apart)."""

  graphdef: nnx.GraphDef  # the teacher's model structure, merged with the teacher's parameters inside the step
  alpha: float  # objective = alpha * T^2 * KL + (1 - alpha) * (nll + z_loss * z_sq) (+ the MoE term)
  temperature: float  # T: both distributions are softmax(logits / T)


def distill_kl_sum(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array,
                   temperature: float) -> jax.Array:
  """Sum over weighted tokens of KL(softmax(teacher / T) || softmax(student / T)), in float32 (not times T^2)."""
  teacher_logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature, -1)
  student_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1)
  kl = jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - student_logp), axis=-1)
  return jnp.sum(kl * weights)


def merge_model(graphdef: nnx.GraphDef, params, frozen=None) -> nnx.Module:
  """The model from its trained parameters and (LoRA) its frozen part."""
  return nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)


def objective_sums(params, graphdef: nnx.GraphDef, batch: Batch, z_loss: float, distill: Distill | None = None,
                   teacher_params=None, frozen=None) -> tuple[jax.Array, tuple]:
  """(objective sum, sums) of one (micro-)batch; padding (segment id 0), and where the batch has a loss_mask the
  targets it marks 0, carry no weight.

  sums = (nll, z_sq, count) for a dense model and (nll, z_sq, count, moe_aux * count, moe_dropped * count) with
  experts. The objective is nll + z_loss * z_sq + moe_aux_loss_coef * moe_aux * count: the MoE's load-balancing
  statistic (a mean over this micro-batch's tokens and the layers) is weighted by the token count so that sums
  over micro-batches still divide by the full batch's count. With gradient accumulation that term is therefore
  the token-weighted average of the micro-batches' statistics, not the statistic recomputed on the full batch
  (f_e and P_e are batch means, so the two differ slightly); every other term equals the full batch's exactly.

  With `distill` (and the frozen `teacher_params`), the teacher runs on the same batch and the objective becomes
  alpha * T^2 * kl + (1 - alpha) * (nll + z_loss * z_sq) (+ the MoE term), kl being the weighted sum of
  `distill_kl_sum`; kl is appended to the sums (last). `frozen` is the LoRA model's frozen part (not
  differentiated: gradients are taken with respect to `params`, the adapters).
  """
  model = merge_model(graphdef, params, frozen)
  logits, aux = model.forward(batch["inputs"], batch["positions"], batch["segment_ids"])
  weights = (batch["segment_ids"] > 0).astype(jnp.float32)
  if "loss_mask" in batch:  # SFT: only the targets marked (assistant text, completions) are trained on
    weights = weights * batch["loss_mask"].astype(jnp.float32)
  total, (nll, z_sq) = token_loss_sums(logits, batch["targets"], weights, z_loss)
  count = jnp.sum(weights)
  sums = (nll, z_sq, count)
  if distill is not None:
    teacher_logits, _ = nnx.merge(distill.graphdef, teacher_params).forward(
      batch["inputs"], batch["positions"], batch["segment_ids"])
    kl = distill_kl_sum(logits, teacher_logits, weights, distill.temperature)
    total = distill.alpha * distill.temperature ** 2 * kl + (1.0 - distill.alpha) * total
  if aux:
    total = total + model.moe_aux_loss_coef * aux["moe_aux_loss"] * count
    sums = (*sums, aux["moe_aux_loss"] * count, aux["moe_dropped"] * count)
  if distill is not None:
    sums = (*sums, kl)
  return total, sums


def batch_loss_sums(params, graphdef: nnx.GraphDef, batch: Batch, z_loss: float):
  """(objective sum, (nll, z_sq, count)) of one (micro-)batch: `objective_sums` without the MoE statistics."""
  total, sums = objective_sums(params, graphdef, batch, z_loss)
  return total, sums[:3]


def accumulate_gradients(params, graphdef: nnx.GraphDef, batch: Batch, z_loss: float, accum_steps: int,
                         distill: Distill | None = None, teacher_params=None, frozen=None):
  """(gradient, sums) of the summed objective over `accum_steps` micro-batches, equal to the full batch's.

  `sums` is the tuple of `objective_sums`, summed over the micro-batches. The teacher (if any) is never
  differentiated: gradients are taken with respect to `params` only.
  """
  grad_fn = jax.value_and_grad(objective_sums, has_aux=True)
  num_sums = (5 if merge_model(graphdef, params, frozen).num_experts else 3) + (distill is not None)
  return accumulate(lambda p, mb: grad_fn(p, graphdef, mb, z_loss, distill, teacher_params, frozen), params, batch,
                    accum_steps, num_sums)


def accumulate(grad_fn: Callable, params, batch: Batch, accum_steps: int, num_sums: int):
  """(gradient, sums) of grad_fn(params, micro-batch) -> ((objective, sums), gradient) summed over `accum_steps`
  equal slices of the batch's rows (one scan; a single call when accum_steps is 1)."""
  if accum_steps == 1:
    (_, sums), grads = grad_fn(params, batch)
    return grads, sums

  micro = jax.tree.map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

  def body(carry, mb):
    grads_acc, sums_acc = carry
    (_, sums), grads = grad_fn(params, mb)
    return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

  zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), (jnp.zeros(()),) * num_sums)
  (grads, sums), _ = jax.lax.scan(body, zeros, micro)
  return grads, sums


def guarded_update(tx: optax.GradientTransformation, state: TrainState, grads, checks: tuple
                   ) -> tuple[TrainState, jax.Array, jax.Array]:
  """(new state, gradient norm, finite): one optimizer step on `grads`, or none (parameters and moments kept, the
  non-finite counters raised) when the gradient norm or any of the scalars `checks` is NaN or infinite."""
  params = state["params"]
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(grad_norm)
  for value in checks:
    finite = finite & jnp.isfinite(value)
  updates, new_opt_state = tx.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  new_state = {
    "params": keep(new_params, params),
    "opt_state": keep(new_opt_state, state["opt_state"]),
    "step": state["step"] + 1,
    "nonfinite_streak": jnp.where(finite, 0, state["nonfinite_streak"] + 1),
    "nonfinite_total": state["nonfinite_total"] + (~finite).astype(jnp.int32),
  }
  return new_state, grad_norm, finite


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    *, z_loss: float, accum_steps: int, distill: Distill | None = None
                    ) -> Callable[..., tuple[TrainState, dict]]:
  """Returns train_step(state, batch) -> (state, metrics); a non-finite step leaves params untouched.

  The MoE's load-balancing weight is the model's `moe_aux_loss_coef` (in the graphdef). Metrics: loss (the
  token-mean NLL only), log_z_sq, grad_norm, lr, tokens, skipped, nonfinite_streak, and with experts
  moe_aux_loss (the load-balancing statistic, 1.0 = balanced) and moe_dropped (share of token-to-expert
  assignments over capacity). With `distill` the step is train_step(state, batch, teacher_params) (the frozen
  teacher is an argument, not part of the state) and the metrics add distill_kl, the token-mean KL at T. With LoRA
  the step is train_step(state, batch, teacher_params, frozen): state["params"] are the adapters.
  """

  def train_step(state: TrainState, batch: Batch, teacher_params=None, frozen=None) -> tuple[TrainState, dict]:
    params = state["params"]
    if frozen is not None:  # LoRA: this step's adapter dropout keys (a no-op without dropout)
      frozen = dropout_keys(frozen, state["step"])
    grads_sum, sums = accumulate_gradients(params, graphdef, batch, z_loss, accum_steps, distill, teacher_params,
                                           frozen)
    kl_sum = None
    if distill is not None:
      sums, kl_sum = sums[:-1], sums[-1]
    nll_sum, z_sum, count = sums[:3]
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads_sum)
    loss = nll_sum / denom
    checks = (loss, z_sum, *sums[3:], *(() if kl_sum is None else (kl_sum,)))
    new_state, grad_norm, finite = guarded_update(tx, state, grads, checks)
    metrics = {
      "loss": loss, "log_z_sq": z_sum / denom, "grad_norm": grad_norm, "lr": schedule(state["step"]),
      "tokens": count, "skipped": (~finite).astype(jnp.int32), "nonfinite_streak": new_state["nonfinite_streak"],
    }
    if len(sums) > 3:
      metrics["moe_aux_loss"], metrics["moe_dropped"] = sums[3] / denom, sums[4] / denom
    if kl_sum is not None:
      metrics["distill_kl"] = kl_sum / denom
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[object, Batch], tuple[jax.Array, jax.Array]]:
  """Returns eval_step(params, batch) -> (summed nll, token count)."""

  def eval_step(params, batch: Batch):
    _, (nll, _, count) = batch_loss_sums(params, graphdef, batch, 0.0)
    return nll, count

  return eval_step
