"""Token log-likelihoods under a model: per-row sums over right-padded windows (jitted on the model's mesh), and the
rolling-window NLL of whole documents built on them. The scoring primitive of `maxlm eval` and of benchmark
evaluations (perplexity, bits per byte, log-likelihood of a continuation given a context)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from maxlm import sharding
from maxlm.eval.windows import WindowRows, window_batches


@dataclasses.dataclass
class RowScores:
  """Per row: summed log-probability of the weighted targets, their count, and whether each was the argmax."""

  logprob: np.ndarray  # float64 [rows]
  tokens: np.ndarray  # float64 [rows]: sum of the weights
  greedy: np.ndarray  # bool [rows]: every weighted target is the model's most likely token


def _row_sums(graphdef: nnx.GraphDef, tail: int | None, state, tokens: jax.Array, targets: jax.Array,
              weights: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sum log p, sum weights, all-greedy) per row. Inputs after a row's last weighted target are padding: they get
  segment id 0, so they take no MoE capacity and cannot change the scored positions. tail: every weighted target
  lies in the `tail` positions ending at its row's last one, so only those get logits (the output projection and
  the softmax over the vocabulary are most of a short continuation's cost); None = every position."""
  model = nnx.merge(graphdef, state)
  t = tokens.shape[1]
  pos = jnp.arange(t, dtype=jnp.int32)
  last = jnp.max(jnp.where(weights > 0, pos, -1), axis=1)
  segment_ids = (pos[None, :] <= last[:, None]).astype(jnp.int32)
  x, _ = model.hidden(tokens, jnp.broadcast_to(pos, tokens.shape), segment_ids)
  if tail is not None:
    at = jnp.clip(last[:, None] - tail + 1 + jnp.arange(tail)[None], 0, t - 1)  # [rows, tail]
    keep = (last[:, None] - tail + 1 + jnp.arange(tail)[None]) >= 0  # a row shorter than tail: no position twice
    x = jnp.take_along_axis(x, at[..., None], axis=1)
    targets = jnp.take_along_axis(targets, at, axis=1)
    weights = jnp.where(keep, jnp.take_along_axis(weights, at, axis=1), 0)
  logits = model.head(x).astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  logp = (target_logit - jax.nn.logsumexp(logits, axis=-1)) * weights
  greedy = jnp.all((jnp.argmax(logits, axis=-1) == targets) | (weights == 0), axis=1)
  return jnp.sum(logp, axis=1), jnp.sum(weights, axis=1), greedy


class WindowScorer:
  """Scores batches of right-padded rows with a model, jitted once per row length on the model's mesh.

  `model` is an nnx Transformer whose parameters are already placed (e.g. maxlm.workdir.load_model's); `rules` are
  the config's logical rules (sharding.config_rules(cfg); default: the default rules). Rows per batch must be a
  multiple of `row_multiple`, the devices the batch dimension is split over.
  """

  def __init__(self, model: nnx.Module, rules: sharding.Rules | None = None, mesh: jax.sharding.Mesh | None = None):
    self.graphdef, self.state = nnx.split(model)
    if mesh is None:
      placed = jax.tree.leaves(self.state)[0].sharding
      if not isinstance(placed, NamedSharding):
        raise ValueError("the model's parameters are not laid out on a mesh: pass mesh=")
      mesh = placed.mesh
    self.mesh = mesh
    self.rules = rules
    self.batch_sharding = sharding.batch_sharding(self.mesh, rules)
    axes = self.batch_sharding.spec[0] if self.batch_sharding.spec else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    self.row_multiple = int(np.prod([self.mesh.shape[a] for a in axes], dtype=np.int64))
    replicated = NamedSharding(self.mesh, PartitionSpec())
    self._fn = jax.jit(_row_sums, static_argnums=(0, 1), out_shardings=(replicated,) * 3)

  def __call__(self, tokens: np.ndarray, targets: np.ndarray, weights: np.ndarray,
               tail: int | None = None) -> RowScores:
    """Scores of rows [rows, length]: every process passes the same global rows (each transfers its own share).
    tail: the weighted targets of every row lie within its last `tail` weighted-or-context positions ending at the
    last weighted one (continuations); only those positions are projected to logits."""
    rows = tokens.shape[0]
    if rows % self.row_multiple:
      raise ValueError(f"{rows} rows do not split over the {self.row_multiple} devices of the batch dimension")
    share, pid = rows // jax.process_count(), jax.process_index()
    local = {"tokens": tokens, "targets": targets, "weights": weights.astype(np.float32)}
    local = {k: np.ascontiguousarray(v[pid * share:(pid + 1) * share]) for k, v in local.items()}
    with sharding.use_mesh(self.mesh, self.rules):
      batch = sharding.put_batch(local, self.batch_sharding, rows)
      logprob, count, greedy = self._fn(self.graphdef, tail, self.state, batch["tokens"], batch["targets"],
                                        batch["weights"])
    return RowScores(np.asarray(logprob, np.float64), np.asarray(count, np.float64), np.asarray(greedy))


Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray], RowScores]


@dataclasses.dataclass
class DocumentScores:
  """Per document: the summed NLL (nats) of its scored tokens and their count (its tokens but the first)."""

  nll: np.ndarray  # float64 [documents]
  tokens: np.ndarray  # int64 [documents]


def score_documents(scorer: Scorer, docs: Sequence[np.ndarray], *, seq_len: int, stride: int | None = None,
                    batch_size: int = 8, lengths: Sequence[int] | None = None,
                    on_batch: Callable[[WindowRows], None] | None = None) -> DocumentScores:
  """Rolling-window NLL of each document (maxlm.eval.windows: every token after the first scored exactly once).

  `scorer` is a WindowScorer (or any function of (inputs, targets, weights) -> RowScores); stride defaults to
  seq_len; `lengths` (default len(doc)) lets lazily read documents be planned without reading them; `on_batch` is
  called after each batch (a progress bar).
  """
  lengths = [len(d) for d in docs] if lengths is None else lengths
  nll, count = np.zeros(len(lengths), np.float64), np.zeros(len(lengths), np.int64)
  for rows in window_batches(docs, lengths, seq_len=seq_len, stride=stride or seq_len, batch_size=batch_size):
    scores = scorer(rows.inputs, rows.targets, rows.weights)
    real = rows.doc_ids >= 0
    np.add.at(nll, rows.doc_ids[real], -scores.logprob[real])
    np.add.at(count, rows.doc_ids[real], np.rint(scores.tokens[real]).astype(np.int64))
    if on_batch is not None:
      on_batch(rows)
  return DocumentScores(nll, count)
