"""Held-out loss during training: the mean token NLL of the eval split's fixed batches."""

from __future__ import annotations

import jax

from maxlm import sharding


def evaluate(eval_step, params, batches: list[dict], batch_sharding) -> float:
  """Mean token NLL over the held-out batches (each process passes its rows of every batch)."""
  nll, count = 0.0, 0.0
  for batch in batches:
    n, c = eval_step(params, sharding.put_batch(batch, batch_sharding, batch["inputs"].shape[0] * jax.process_count()))
    nll, count = nll + float(n), count + float(c)
  return nll / max(count, 1.0)
