"""Pure train and eval steps: packed-batch loss, z-loss, gradient accumulation, NaN/inf guard."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Batch = dict[str, jax.Array]
TrainState = dict  # {"params", "opt_state", "step", "nonfinite_streak", "nonfinite_total"}


def token_loss_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                    z_loss: float) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Sums over weighted tokens: (nll + z_loss * logZ^2, (nll, logZ^2)), all in float32."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = (log_z - target_logit) * weights
  z_sq = jnp.square(log_z) * weights
  return jnp.sum(nll) + z_loss * jnp.sum(z_sq), (jnp.sum(nll), jnp.sum(z_sq))


def batch_loss_sums(params, graphdef: nnx.GraphDef, batch: Batch, z_loss: float):
  """Loss sums of one (micro-)batch; padding (segment id 0) carries no weight."""
  model = nnx.merge(graphdef, params)
  logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  weights = (batch["segment_ids"] > 0).astype(jnp.float32)
  total, (nll, z_sq) = token_loss_sums(logits, batch["targets"], weights, z_loss)
  return total, (nll, z_sq, jnp.sum(weights))


def accumulate_gradients(params, graphdef: nnx.GraphDef, batch: Batch, z_loss: float, accum_steps: int):
  """Gradient of the summed token loss over `accum_steps` micro-batches, equal to the full batch's."""
  grad_fn = jax.value_and_grad(batch_loss_sums, has_aux=True)
  if accum_steps == 1:
    (_, aux), grads = grad_fn(params, graphdef, batch, z_loss)
    return grads, aux

  micro = jax.tree.map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

  def body(carry, mb):
    grads_acc, aux_acc = carry
    (_, aux), grads = grad_fn(params, graphdef, mb, z_loss)
    return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, aux_acc, aux)), None

  zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), (jnp.zeros(()),) * 3)
  (grads, aux), _ = jax.lax.scan(body, zeros, micro)
  return grads, aux


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    *, z_loss: float, accum_steps: int) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Returns train_step(state, batch) -> (state, metrics); a non-finite step leaves params untouched."""

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    params = state["params"]
    grads_sum, (nll_sum, z_sum, count) = accumulate_gradients(params, graphdef, batch, z_loss, accum_steps)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads_sum)
    loss = nll_sum / denom
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(z_sum)
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
    metrics = {
      "loss": loss, "log_z_sq": z_sum / denom, "grad_norm": grad_norm, "lr": schedule(state["step"]),
      "tokens": count, "skipped": (~finite).astype(jnp.int32), "nonfinite_streak": new_state["nonfinite_streak"],
    }
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[object, Batch], tuple[jax.Array, jax.Array]]:
  """Returns eval_step(params, batch) -> (summed nll, token count)."""

  def eval_step(params, batch: Batch):
    _, (nll, _, count) = batch_loss_sums(params, graphdef, batch, 0.0)
    return nll, count

  return eval_step
