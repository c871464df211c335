"""Optimizer: AdamW with warmup + decay schedules, no weight decay on norms/biases, global-norm clipping."""

from __future__ import annotations

import jax
import optax


def make_schedule(t) -> optax.Schedule:
  """Linear warmup to `t.learning_rate`, then cosine / linear decay to `min_lr_ratio` of it, or constant."""
  peak, warmup = t.learning_rate, t.warmup_steps
  decay_steps = max(t.steps - warmup, 1)
  end = peak * t.min_lr_ratio
  if t.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=t.min_lr_ratio)
  elif t.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif t.schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"train.schedule={t.schedule!r}: expected cosine | linear | constant")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params) -> object:
  """True where weight decay applies: every weight except norm scales and biases (named `scale`, `*bias`)."""
  def decayed(path, _) -> bool:
    name = str(getattr(path[-1], "key", path[-1]))
    return not (name == "scale" or name.endswith("bias"))
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(t) -> optax.GradientTransformation:
  """The optax chain used for training (clipping first, then AdamW with the schedule and mask)."""
  parts = []
  if t.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(t.grad_clip))
  parts.append(optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)
