"""Hugging Face tensors <-> maxlm parameters: one `Spec` per parameter leaf, streamed shard by shard.

Import builds every parameter with `jax.make_array_from_callback`, so each device shard is read from the
memory-mapped safetensors (only the layers/experts it holds) and cast on the host one slice at a time; no shard
file and no whole model is ever loaded into host memory. Any reader with HF tensor names works as the source
(`TensorReader`: the safetensors one, or GGUF's in gguf_tensors.py). Export yields one layer's tensors at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import jax
import numpy as np

from maxlm.convert.hf_config import UnsupportedModelError
from maxlm.convert.safetensors_io import SafetensorsReader
from maxlm.train.state import abstract_params

_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.masked_bias)$")  # buffers older exports saved


class TensorReader(Protocol):
  """What load_params reads: tensors by Hugging Face name, as numpy arrays in HF layout ([out, in])."""

  def keys(self) -> list[str]: ...
  def __contains__(self, name: str) -> bool: ...
  def get(self, name: str) -> np.ndarray: ...


def _source_name(reader) -> Callable[[str], str]:
  """How error messages name an HF tensor: the reader's own name for it (e.g. GGUF's) if it has one."""
  return getattr(reader, "source_name", lambda name: name)


@dataclass(frozen=True)
class Spec:
  """How one maxlm leaf (per layer, when `layered`) maps to Hugging Face tensors."""
  path: tuple[str, ...]  # inside the model (layered leaves: inside one block)
  hf_names: Callable[[int], list[str]]  # the HF tensors of layer i (i unused for global leaves)
  to_maxlm: Callable[[list[np.ndarray]], np.ndarray]
  to_hf: Callable[[np.ndarray], list[np.ndarray]]
  layered: bool = True
  per_expert: bool = False  # hf_names lists one tensor per expert; to_maxlm/to_hf work per expert


def _linear(names: Callable[[int], str]) -> dict:
  """HF Linear weight [out, in] <-> maxlm [in, out]."""
  return dict(hf_names=lambda i: [names(i)], to_maxlm=lambda ws: ws[0].T, to_hf=lambda a: [a.T])


def _heads_in(names: Callable[[int], str], heads: int, head_dim: int) -> dict:
  """q/k/v: HF [heads*head_dim, d] <-> maxlm [d, heads, head_dim]."""
  return dict(hf_names=lambda i: [names(i)], to_maxlm=lambda ws: ws[0].T.reshape(-1, heads, head_dim),
              to_hf=lambda a: [a.reshape(a.shape[0], -1).T])


def _same(names: Callable[[int], str]) -> dict:
  """Embedding and norm scales: the same layout on both sides."""
  return dict(hf_names=lambda i: [names(i)], to_maxlm=lambda ws: ws[0], to_hf=lambda a: [a])


def _bias(names: Callable[[int], str], heads: int, head_dim: int) -> dict:
  """q/k/v biases: HF [heads*head_dim] <-> maxlm [heads, head_dim]."""
  return dict(hf_names=lambda i: [names(i)], to_maxlm=lambda ws: ws[0].reshape(heads, head_dim),
              to_hf=lambda a: [a.reshape(-1)])


def specs(cfg, model_type: str) -> list[Spec]:
  """The parameter mapping of a maxlm model config, for HF family `model_type`."""
  m = cfg.model
  h, kv, hd = m.num_heads, m.num_kv_heads, m.head_dim
  lay = "model.layers.{}.".format
  out = [
    Spec(("embed",), **_same(lambda i: "model.embed_tokens.weight"), layered=False),
    Spec(("final_norm", "scale"), **_same(lambda i: "model.norm.weight"), layered=False),
    Spec(("attn_norm", "scale"), **_same(lambda i: lay(i) + "input_layernorm.weight")),
    Spec(("mlp_norm", "scale"), **_same(lambda i: lay(i) + "post_attention_layernorm.weight")),
    Spec(("attn", "q"), **_heads_in(lambda i: lay(i) + "self_attn.q_proj.weight", h, hd)),
    Spec(("attn", "k"), **_heads_in(lambda i: lay(i) + "self_attn.k_proj.weight", kv, hd)),
    Spec(("attn", "v"), **_heads_in(lambda i: lay(i) + "self_attn.v_proj.weight", kv, hd)),
    # o: HF [d, heads*head_dim] <-> maxlm [heads, head_dim, d]
    Spec(("attn", "o"), hf_names=lambda i: [lay(i) + "self_attn.o_proj.weight"],
         to_maxlm=lambda ws: ws[0].T.reshape(h, hd, -1), to_hf=lambda a: [a.reshape(h * hd, -1).T]),
  ]
  if not m.tie_embeddings:
    out.append(Spec(("lm_head",), **_linear(lambda i: "lm_head.weight"), layered=False))
  if m.attention_bias:
    for name, n in (("q", h), ("k", kv), ("v", kv)):
      out.append(Spec(("attn", f"{name}_bias"),
                      **_bias(lambda i, name=name: lay(i) + f"self_attn.{name}_proj.bias", n, hd)))
  if m.num_experts:
    e = m.num_experts
    expert = lambda w: lambda i: [lay(i) + f"block_sparse_moe.experts.{j}.{w}.weight" for j in range(e)]  # noqa: E731
    per_expert = dict(to_maxlm=lambda ws: ws[0].T, to_hf=lambda a: [a.T], per_expert=True)
    out += [
      Spec(("mlp", "router"), **_linear(lambda i: lay(i) + "block_sparse_moe.gate.weight")),
      Spec(("mlp", "gate"), hf_names=expert("w1"), **per_expert),
      Spec(("mlp", "up"), hf_names=expert("w3"), **per_expert),
      Spec(("mlp", "down"), hf_names=expert("w2"), **per_expert),
    ]
  else:
    out += [Spec(("mlp", p), **_linear(lambda i, p=p: lay(i) + f"mlp.{p}_proj.weight")) for p in ("gate", "up", "down")]
  return out


class _FusedExperts:
  """Reads transformers-5 fused expert tensors (mlp.experts.gate_up_proj / down_proj) as per-expert ones."""

  _NAME = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.(?:experts\.(\d+)\.(w[123])|(gate))\.weight$")

  def __init__(self, reader: TensorReader):
    self.reader = reader

  def __contains__(self, name: str) -> bool:
    return name in self.reader or self._source(name) is not None

  def _source(self, name: str) -> str | None:
    match = self._NAME.match(name)
    if not match:
      return None
    layer, _, w, gate = match.groups()
    src = f"model.layers.{layer}.mlp." + ("gate.weight" if gate else
                                          "experts.down_proj" if w == "w2" else "experts.gate_up_proj")
    return src if src in self.reader else None

  def get(self, name: str) -> np.ndarray:
    if name in self.reader:
      return self.reader.get(name)
    src = self._source(name)
    layer, j, w, gate = self._NAME.match(name).groups()
    full = self.reader.get(src)
    if gate:
      return full
    part = full[int(j)]  # gate_up_proj [E, 2F, d]; down_proj [E, d, F]
    if w == "w2":
      return part
    half = part.shape[0] // 2
    return part[:half] if w == "w1" else part[half:]

  def used(self, name: str) -> str:
    return name if name in self.reader else self._source(name)


def _leaves(cfg, model_type: str) -> Iterator[tuple[Spec, tuple, object]]:
  """(spec, key path in the param dict, where) for every leaf: where is None for global leaves, "stacked"
  for scanned layers (one leaf [num_layers, ...]) or the layer index when layers are not scanned."""
  for spec in specs(cfg, model_type):
    if not spec.layered:
      yield spec, spec.path, None
    elif cfg.model.scan_layers:
      yield spec, ("layers", *spec.path), "stacked"
    else:
      for i in range(cfg.model.num_layers):
        yield spec, ("layers", i, *spec.path), i


def _get(tree: dict, path: tuple):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree: dict, path: tuple, value) -> None:
  for p in path[:-1]:
    tree = tree[p]
  tree[path[-1]] = value


def load_params(hf_dir: str | Path | TensorReader, cfg, mesh: jax.sharding.Mesh, model_type: str) -> dict:
  """The HF weights (a model directory, or any TensorReader) as a maxlm parameter dict, each leaf built shard by
  shard on `mesh`. A reader with a `release()` method may cache what it decodes; it is released after each leaf."""
  reader = SafetensorsReader(hf_dir) if isinstance(hf_dir, str | Path) else hf_dir
  if not isinstance(hf_dir, str | Path):
    hf_dir = getattr(reader, "path", reader)  # what error messages name
  release = getattr(reader, "release", lambda: None)
  shown = _source_name(reader)
  source = _FusedExperts(reader)

  def shape_of(name: str) -> tuple[int, ...]:  # without decoding the tensor where the reader can tell
    return tuple(reader.shape(name)) if name in reader and hasattr(reader, "shape") else source.get(name).shape

  abstract = abstract_params(cfg, mesh)
  used: set[str] = set()
  num_layers = cfg.model.num_layers
  params = jax.tree.map(lambda x: None, abstract)
  for spec, path, where in _leaves(cfg, model_type):
    target = _get(abstract, path)
    layers = list(range(num_layers)) if where == "stacked" else [where if spec.layered else 0]
    for i in layers:
      for name in spec.hf_names(i):
        if name not in source:
          raise UnsupportedModelError(f"{hf_dir}: tensor {shown(name)!r} is missing (needed for maxlm "
                                      f"{'.'.join(map(str, path))})")
        used.add(source.used(name))
    # Shape check on one layer before anything is read.
    per_layer_shape = target.shape[1:] if where == "stacked" else target.shape
    names0 = spec.hf_names(layers[0])
    probe = [jax.ShapeDtypeStruct(shape_of(n), np.float32) for n in names0]
    got = jax.eval_shape(lambda *ws, spec=spec: _maxlm_value(spec, list(ws)), *probe).shape
    if tuple(got) != tuple(per_layer_shape):
      shapes = {shown(n): tuple(shape_of(n)) for n in names0[:2]}
      raise UnsupportedModelError(f"{hf_dir}: tensor shapes {shapes} give maxlm {'.'.join(map(str, path))} "
                                  f"{tuple(got)}, but the model config implies {tuple(per_layer_shape)}")
    leaf = jax.make_array_from_callback(target.shape, target.sharding,
                                        _callback(spec, source, where, target.dtype, num_layers))
    _set(params, path, leaf.block_until_ready())  # the host copies are freed before the next leaf is read
    release()
  unused = [n for n in reader.keys() if n not in used and not _IGNORED.search(n)]
  if cfg.model.tie_embeddings:
    unused = [n for n in unused if n != "lm_head.weight"]
  if unused:
    raise UnsupportedModelError(f"{hf_dir}: {len(unused)} tensor(s) have no maxlm counterpart, e.g. "
                                f"{[shown(n) for n in unused[:3]]} "
                                "(an architecture option maxlm does not model?)")
  return params


def _maxlm_value(spec: Spec, arrays: list[np.ndarray]) -> np.ndarray:
  if spec.per_expert:
    return jax.numpy.stack([spec.to_maxlm([a]) for a in arrays])
  return spec.to_maxlm(arrays)


def _callback(spec: Spec, source: _FusedExperts, where, dtype, num_layers: int) -> Callable:
  """The make_array_from_callback reader of one leaf: loads only the layers (and experts) in `index`."""
  def one_layer(i: int, index: tuple) -> np.ndarray:
    names = spec.hf_names(i)
    if spec.per_expert:  # only the experts this shard holds
      experts = range(len(names))[index[0]] if index else range(len(names))
      rest = index[1:] if index else ()
      first = spec.to_maxlm([source.get(names[experts[0]])])[rest]
      out = np.empty((len(experts), *first.shape), dtype)
      for n, j in enumerate(experts):
        out[n] = spec.to_maxlm([source.get(names[j])])[rest]  # cast on assignment, one expert at a time
      return out
    return np.asarray(spec.to_maxlm([source.get(n) for n in names])[index], dtype=dtype)

  def callback(index: tuple) -> np.ndarray:
    if where != "stacked":
      return one_layer(where if spec.layered else 0, index)
    layers = range(*index[0].indices(num_layers))
    first = one_layer(layers[0], index[1:])
    out = np.empty((len(layers), *first.shape), dtype)  # filled layer by layer: no list of copies
    out[0] = first
    for j, i in enumerate(layers[1:], 1):
      out[j] = one_layer(i, index[1:])
    return out

  return callback


def hf_tensors(cfg, params: dict, model_type: str, dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) pairs of a maxlm parameter tree, produced one layer at a time."""
  for spec, path, where in _leaves(cfg, model_type):
    leaf = _get(params, path)
    layers = range(cfg.model.num_layers) if where == "stacked" else [where if spec.layered else 0]
    for i in layers:
      value = np.asarray(jax.device_get(leaf[i] if where == "stacked" else leaf))
      arrays = ([a for e in value for a in spec.to_hf(e)] if spec.per_expert else spec.to_hf(value))
      for name, array in zip(spec.hf_names(i), arrays, strict=True):
        yield name, np.ascontiguousarray(array.astype(dtype))


def hf_tensor_shapes(cfg, params: dict, model_type: str) -> Iterator[tuple[str, tuple[int, ...]]]:
  """(HF name, shape) pairs in hf_tensors' order, from the parameters' shapes alone (nothing is read)."""
  for spec, path, where in _leaves(cfg, model_type):
    shape = tuple(_get(params, path).shape)
    shape = shape[1:] if where == "stacked" else shape
    layers = range(cfg.model.num_layers) if where == "stacked" else [where if spec.layered else 0]
    if spec.per_expert:
      one = jax.eval_shape(lambda a, spec=spec: spec.to_hf(a), jax.ShapeDtypeStruct(shape[1:], np.float32))
      outs = list(one) * shape[0]
    else:
      outs = jax.eval_shape(lambda a, spec=spec: spec.to_hf(a), jax.ShapeDtypeStruct(shape, np.float32))
    for i in layers:
      for name, out in zip(spec.hf_names(i), outs, strict=True):
        yield name, tuple(out.shape)
