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
from maxlm.eval import packing
from maxlm.eval.windows import rolling_windows, window_batches


@dataclasses.dataclass
class RowScores:
  """Per row: summed log-probability of the weighted targets, their count, and whether each was the argmax."""

  logprob: np.ndarray  # float64 [rows]
  tokens: np.ndarray  # float64 [rows]: sum of the weights
  greedy: np.ndarray  # bool [rows]: every weighted target is the model's most likely token


def _row_sums(graphdef: nnx.GraphDef, state, tokens: jax.Array, targets: jax.Array,
              weights: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sum log p, sum weights, all-greedy) per row. Inputs after a row's last weighted target are padding: they get
  segment id 0, so they take no MoE capacity and cannot change the scored positions."""
  model = nnx.merge(graphdef, state)
  t = tokens.shape[1]
  pos = jnp.arange(t, dtype=jnp.int32)
  last = jnp.max(jnp.where(weights > 0, pos, -1), axis=1)
  segment_ids = (pos[None, :] <= last[:, None]).astype(jnp.int32)
  x, _ = model.hidden(tokens, jnp.broadcast_to(pos, tokens.shape), segment_ids)
  logits = model.head(x).astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  logp = (target_logit - jax.nn.logsumexp(logits, axis=-1)) * weights
  greedy = jnp.all((jnp.argmax(logits, axis=-1) == targets) | (weights == 0), axis=1)
  return jnp.sum(logp, axis=1), jnp.sum(weights, axis=1), greedy


_SLOT_CHUNK = 128  # slots per output-projection chunk: [rows, 128, vocab] float32 logits at a time


def _slot_scores(graphdef: nnx.GraphDef, tree: bool, sliding_window: int | None, state, tokens: jax.Array,
                 positions: jax.Array, segments: jax.Array, branches: jax.Array, slot_index: jax.Array,
                 slot_target: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(log p of each slot's target, whether it is the argmax) [rows, slots] of packed rows (maxlm.eval.packing):
  the trees' attention mask (tree=True; else causal within segments, by the model's own attention backend), then
  logits only at the slots' positions."""
  model = nnx.merge(graphdef, state)
  mask = packing.attention_mask(segments, branches, positions, sliding_window, xp=jnp) if tree else None
  x, _ = model.hidden(tokens, positions, segments, attention_mask=mask)
  x = jnp.take_along_axis(x, slot_index[..., None], axis=1)  # [rows, slots, d]
  rows, slots = slot_target.shape
  chunk = min(slots, _SLOT_CHUNK)  # slots are a power of two: logits of `chunk` slots at a time bound the memory

  def score(xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    h, target = xs
    logits = model.head(h).astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
    return target_logit - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == target

  parts = (x.reshape(rows, slots // chunk, chunk, -1).swapaxes(0, 1),
           slot_target.reshape(rows, slots // chunk, chunk).swapaxes(0, 1))
  logp, greedy = jax.lax.map(score, parts)
  return logp.swapaxes(0, 1).reshape(rows, slots), greedy.swapaxes(0, 1).reshape(rows, slots)


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
    self._fn = jax.jit(_row_sums, static_argnums=0, out_shardings=(replicated,) * 3)
    self._slots = jax.jit(_slot_scores, static_argnums=(0, 1, 2), out_shardings=(replicated,) * 2)
    block = model.layers[0] if isinstance(model.layers, nnx.List) else model.layers  # scanned: one stacked Block
    self.sliding_window = block.attn.sliding_window

  def __call__(self, tokens: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> RowScores:
    """Scores of rows [rows, length]: every process passes the same global rows (each transfers its own share)."""
    with sharding.use_mesh(self.mesh, self.rules):
      batch = self._put({"tokens": tokens, "targets": targets, "weights": weights.astype(np.float32)})
      logprob, count, greedy = self._fn(self.graphdef, self.state, batch["tokens"], batch["targets"],
                                        batch["weights"])
    return RowScores(np.asarray(logprob, np.float64), np.asarray(count, np.float64), np.asarray(greedy))

  def _put(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global [rows, ...] arrays (the same on every process) laid out over the batch dimension: each process
    transfers its own share of the rows. Call inside the scorer's mesh."""
    rows = next(iter(arrays.values())).shape[0]
    if rows % self.row_multiple:
      raise ValueError(f"{rows} rows do not split over the {self.row_multiple} devices of the batch dimension")
    share, pid = rows // jax.process_count(), jax.process_index()
    local = {k: np.ascontiguousarray(v[pid * share:(pid + 1) * share]) for k, v in arrays.items()}
    return sharding.put_batch(local, self.batch_sharding, rows)

  def score_packed(self, rows: packing.PackedRows) -> tuple[np.ndarray, np.ndarray]:
    """(log p, argmax == target) per slot [rows, slots] of a batch of packed rows (every process the same)."""
    with sharding.use_mesh(self.mesh, self.rules):
      b = self._put({"tokens": rows.tokens, "positions": rows.positions, "segments": rows.segments,
                     "branches": rows.branches, "slot_index": rows.slot_index, "slot_target": rows.slot_target})
      logp, greedy = self._slots(self.graphdef, rows.shared, self.sliding_window, self.state, b["tokens"],
                                 b["positions"], b["segments"], b["branches"], b["slot_index"], b["slot_target"])
    return np.asarray(logp, np.float64), np.asarray(greedy)


Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray], RowScores]


@dataclasses.dataclass
class DocumentScores:
  """Per document: the summed NLL (nats) of its scored tokens and their count (its tokens but the first)."""

  nll: np.ndarray  # float64 [documents]
  tokens: np.ndarray  # int64 [documents]


@dataclasses.dataclass
class WindowsDone:
  """The windows a batch finished: their documents and scored targets (what a progress bar counts)."""

  doc_ids: np.ndarray  # int64 [windows]
  tokens: np.ndarray  # int64 [windows]


def score_documents(scorer: Scorer, docs: Sequence[np.ndarray], *, seq_len: int, stride: int | None = None,
                    batch_size: int = 8, lengths: Sequence[int] | None = None, pack_length: int = 256,
                    windows_per_pack: int = 4096,
                    on_batch: Callable[[WindowsDone], None] | None = None) -> DocumentScores:
  """Rolling-window NLL of each document (maxlm.eval.windows: every token after the first scored exactly once).

  `scorer` is a WindowScorer, whose windows are packed into rows of max(pack_length, the longest window) tokens
  (maxlm.eval.packing, at most seq_len; `windows_per_pack` windows are read and packed at a time), or any function
  of right-padded rows (inputs, targets, weights) -> RowScores. stride defaults to seq_len; `lengths` (default
  len(doc)) lets lazily read documents be planned without reading them; `on_batch` is called after each batch.
  """
  lengths = [len(d) for d in docs] if lengths is None else lengths
  stride = stride or seq_len
  nll, count = np.zeros(len(lengths), np.float64), np.zeros(len(lengths), np.int64)
  if not hasattr(scorer, "score_packed"):
    for rows in window_batches(docs, lengths, seq_len=seq_len, stride=stride, batch_size=batch_size):
      scores = scorer(rows.inputs, rows.targets, rows.weights)
      real = rows.doc_ids >= 0
      tokens = np.rint(scores.tokens[real]).astype(np.int64)
      np.add.at(nll, rows.doc_ids[real], -scores.logprob[real])
      np.add.at(count, rows.doc_ids[real], tokens)
      if on_batch is not None:
        on_batch(WindowsDone(rows.doc_ids[real], tokens))
    return DocumentScores(nll, count)
  plan = [(i, w) for i, n in enumerate(lengths) for w in rolling_windows(int(n), seq_len, stride)]
  for first in range(0, len(plan), windows_per_pack):
    part = plan[first:first + windows_per_pack]
    cached: tuple[int, np.ndarray] | None = None
    requests = []
    for i, w in part:
      if cached is None or cached[0] != i:
        cached = (i, np.asarray(docs[i]))
      requests.append((cached[1][w.start:w.end], w.end - w.first_scored))
    length = packing.row_length([w.length for _, w in part], seq_len, pack_length)
    doc_of = np.asarray([i for i, _ in part], np.int64)
    for batch in packing.pack_requests(requests, batch_size=batch_size, row_length=length, share_contexts=False):
      logp, _ = scorer.score_packed(batch)
      real = batch.slot_request >= 0
      np.add.at(nll, doc_of[batch.slot_request[real]], -logp[real])
      np.add.at(count, doc_of[batch.slot_request[real]], 1)
      if on_batch is not None:
        done = np.asarray(batch.requests, np.int64)
        on_batch(WindowsDone(doc_of[done], np.asarray([requests[r][1] for r in done], np.int64)))
  return DocumentScores(nll, count)
