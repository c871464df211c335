"""Hugging Face <-> maxlm for Llama, Mistral, Qwen2 and Mixtral: config mapping, weights and tokenizer.

Import streams: every parameter is built with `jax.make_array_from_callback`, so each device shard is
read from the memory-mapped safetensors (only the layers/experts it holds) and cast on the host one
slice at a time; no shard file and no whole model is ever loaded into host memory. Export writes one
layer's tensors at a time into size-capped safetensors shards.

    from maxlm.convert.hf import from_hf
    model, config = from_hf("path/to/hf_model")     # logits = model(tokens)
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from ml_collections import config_dict

from maxlm import sharding
from maxlm.config import ConfigError, config_from_dict, to_json
from maxlm.convert.safetensors_io import SafetensorsReader, write_safetensors
from maxlm.models.transformer import Transformer
from maxlm.train.state import abstract_params, build_model

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral", "qwen2", "mixtral")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "mixtral": "MixtralForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
IMPORT_RECORD = "hf_import.json"  # in a converted workdir: the source's model_type, dtype and config
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.masked_bias)$")  # buffers older exports saved
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
           "float16": np.dtype(np.float16)}


class UnsupportedModelError(ValueError):
  """A Hugging Face model or option maxlm cannot represent; the message names the field."""


# ---------------------------------------------------------------------------------------------------------
# config


def read_hf_config(hf_dir: str | Path) -> dict:
  """The parsed config.json of a Hugging Face model directory."""
  path = Path(hf_dir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
  try:
    return json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable JSON ({e})") from None


def _rope(hf: dict) -> dict:
  """maxlm rope fields from transformers-5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
  params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
  where = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
  out = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
  kind = params.get("rope_type", params.get("type")) or "default"
  if kind == "default":
    out["rope_scaling"] = ""
  elif kind == "llama3":
    out.update(rope_scaling="llama3", rope_scaling_factor=float(params["factor"]),
               rope_low_freq_factor=float(params["low_freq_factor"]),
               rope_high_freq_factor=float(params["high_freq_factor"]),
               rope_original_max_len=int(params["original_max_position_embeddings"]))
  else:
    raise UnsupportedModelError(f"config.json {where}.rope_type={kind!r} is not supported (default, llama3)")
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise UnsupportedModelError(f"config.json partial_rotary_factor={partial}: only full rotary is supported")
  return out


def _sliding_window(hf: dict, model_type: str) -> int | None:
  """The one window every layer uses, or None; per-layer mixtures are refused."""
  window = hf.get("sliding_window")
  if model_type == "qwen2" and not hf.get("use_sliding_window", False):
    window = None
  layer_types = hf.get("layer_types")
  if layer_types:
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
      return None
    if kinds == {"sliding_attention"} and window:
      return int(window)
    raise UnsupportedModelError(
        f"config.json layer_types={sorted(kinds)} (max_window_layers={hf.get('max_window_layers')}): a sliding "
        "window on some layers only is not supported; maxlm applies one window to every layer")
  if model_type == "qwen2" and window:
    first = int(hf.get("max_window_layers", 0))
    if 0 < first < hf["num_hidden_layers"]:
      raise UnsupportedModelError(f"config.json max_window_layers={first}: a sliding window on some layers "
                                  "only is not supported")
  return int(window) if window else None


def model_fields(hf: dict) -> dict:
  """The maxlm `model` section for a Hugging Face config dict (raises UnsupportedModelError naming a field)."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED:
    raise UnsupportedModelError(f"config.json model_type={model_type!r} is not supported ({', '.join(SUPPORTED)})")
  act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
  if act != "silu":
    raise UnsupportedModelError(f"config.json hidden_act={act!r}: only silu (SwiGLU) is supported")
  if hf.get("mlp_bias"):
    raise UnsupportedModelError("config.json mlp_bias=true is not supported")
  if model_type == "llama" and hf.get("attention_bias"):
    raise UnsupportedModelError("config.json attention_bias=true (Llama: biases on q/k/v and o) is not supported")
  for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
    if not isinstance(hf.get(key), int):
      raise UnsupportedModelError(f"config.json {key}={hf.get(key)!r}: expected an integer")
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  fields = {
    "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"], "num_layers": hf["num_hidden_layers"],
    "num_heads": heads, "num_kv_heads": hf.get("num_key_value_heads") or heads, "head_dim": head_dim,
    "mlp_dim": hf["intermediate_size"], "max_seq_len": int(hf.get("max_position_embeddings", 2048)),
    "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
    "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    "sliding_window": _sliding_window(hf, model_type), "attention_bias": model_type == "qwen2",
    "init_std": float(hf.get("initializer_range", 0.02)), **_rope(hf),
  }
  if model_type == "mixtral":
    fields["num_experts"] = int(hf["num_local_experts"])
    fields["num_experts_per_tok"] = int(hf["num_experts_per_tok"])
  return fields


def maxlm_config(hf: dict, overrides: Sequence[str] = (), tokenizer: str = "") -> config_dict.ConfigDict:
  """A full maxlm config for a Hugging Face config dict: base defaults, the mapped model, then overrides."""
  model = model_fields(hf)
  data = {"tokenizer": tokenizer, "seq_len": min(512, model["max_seq_len"])}
  try:
    return config_from_dict({"model": model, "data": data}, overrides)
  except ConfigError as e:
    raise UnsupportedModelError(f"config.json maps to an invalid maxlm config: {e}") from None


def hf_config(cfg, model_type: str | None = None, dtype: str = "float32", special_ids: dict | None = None) -> dict:
  """The Hugging Face config.json for a maxlm config; model_type None picks the family that fits."""
  m = cfg.model
  if model_type is None:
    model_type = ("mixtral" if m.num_experts else "qwen2" if m.attention_bias
                  else "mistral" if m.sliding_window else "llama")
  if model_type not in SUPPORTED:
    raise UnsupportedModelError(f"model_type={model_type!r}: expected one of {SUPPORTED}")
  problems = {
    "num_experts > 0 needs model_type mixtral": bool(m.num_experts) != (model_type == "mixtral"),
    "attention_bias needs model_type qwen2": bool(m.attention_bias) != (model_type == "qwen2"),
    "sliding_window is not available in llama": bool(m.sliding_window) and model_type == "llama",
  }
  bad = [k for k, v in problems.items() if v]
  if bad:
    raise UnsupportedModelError(f"cannot export as {model_type}: model.{bad[0]}")
  rope = {"rope_type": "default", "rope_theta": m.rope_theta}
  if m.rope_scaling == "llama3":
    rope.update(rope_type="llama3", factor=m.rope_scaling_factor, low_freq_factor=m.rope_low_freq_factor,
                high_freq_factor=m.rope_high_freq_factor, original_max_position_embeddings=m.rope_original_max_len)
  out = {
    "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": m.vocab_size,
    "hidden_size": m.d_model, "intermediate_size": m.mlp_dim, "num_hidden_layers": m.num_layers,
    "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim,
    "hidden_act": "silu", "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.rms_norm_eps,
    "tie_word_embeddings": m.tie_embeddings, "rope_parameters": rope, "initializer_range": m.init_std,
    "attention_dropout": 0.0, "use_cache": True, "dtype": dtype,
  }
  if m.head_dim == m.d_model // m.num_heads and model_type in ("qwen2", "mixtral"):
    del out["head_dim"]  # these configs derive it (and do not list it) unless it differs
  if model_type == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  elif model_type == "qwen2":
    n = m.num_layers
    out.update(use_sliding_window=bool(m.sliding_window), sliding_window=m.sliding_window,
               max_window_layers=0 if m.sliding_window else n,
               layer_types=["sliding_attention" if m.sliding_window else "full_attention"] * n)
  else:
    out["sliding_window"] = m.sliding_window
  if model_type == "mixtral":
    out.update(num_local_experts=m.num_experts, num_experts_per_tok=m.num_experts_per_tok,
               output_router_logits=False, router_aux_loss_coef=0.001, router_jitter_noise=0.0)
  out.update({k: v for k, v in (special_ids or {}).items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")})
  return out


# ---------------------------------------------------------------------------------------------------------
# weights: one Spec per maxlm parameter leaf


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

  def __init__(self, reader: SafetensorsReader):
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


def load_params(hf_dir: str | Path, cfg, mesh: jax.sharding.Mesh, model_type: str) -> dict:
  """The HF weights as a maxlm parameter dict, each leaf built shard by shard on `mesh`."""
  reader = SafetensorsReader(hf_dir)
  source = _FusedExperts(reader)
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
          raise UnsupportedModelError(f"{hf_dir}: tensor {name!r} is missing (needed for maxlm "
                                      f"{'.'.join(map(str, path))})")
        used.add(source.used(name))
    # Shape check on one layer before anything is read.
    per_layer_shape = target.shape[1:] if where == "stacked" else target.shape
    names0 = spec.hf_names(layers[0])
    probe = [jax.ShapeDtypeStruct(source.get(n).shape, np.float32) for n in names0]
    got = jax.eval_shape(lambda *ws: _maxlm_value(spec, list(ws)), *probe).shape
    if tuple(got) != tuple(per_layer_shape):
      shapes = {n: tuple(source.get(n).shape) for n in names0[:2]}
      raise UnsupportedModelError(f"{hf_dir}: tensor shapes {shapes} give maxlm {'.'.join(map(str, path))} "
                                  f"{tuple(got)}, but config.json implies {tuple(per_layer_shape)}")
    leaf = jax.make_array_from_callback(target.shape, target.sharding,
                                        _callback(spec, source, where, target.dtype, num_layers))
    _set(params, path, leaf.block_until_ready())  # the host copies are freed before the next leaf is read
  unused = [n for n in reader.keys() if n not in used and not _IGNORED.search(n)]
  if cfg.model.tie_embeddings:
    unused = [n for n in unused if n != "lm_head.weight"]
  if unused:
    raise UnsupportedModelError(f"{hf_dir}: {len(unused)} tensor(s) have no maxlm counterpart, e.g. {unused[:3]} "
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


# ---------------------------------------------------------------------------------------------------------
# public entry points


def _tokenizer_file(hf_dir: Path) -> str | None:
  """The name of the model's tokenizer file (tokenizer.json preferred), or None."""
  return next((n for n in ("tokenizer.json", "tokenizer.model") if (hf_dir / n).is_file()), None)


def from_hf(path: str | Path, overrides: Sequence[str] = (), *,
            mesh: jax.sharding.Mesh | None = None) -> tuple[Transformer, config_dict.ConfigDict]:
  """(model, config) of a Hugging Face model directory; `model(tokens)` gives logits [batch, seq, vocab].

  overrides are maxlm config overrides (e.g. "model.param_dtype=bfloat16"); parameters are placed on `mesh`
  (default: every device, on the config's mesh axes).
  """
  hf_dir = Path(path)
  hf = read_hf_config(hf_dir)
  name = _tokenizer_file(hf_dir)
  cfg = maxlm_config(hf, overrides, tokenizer=str((hf_dir / name).absolute()) if name else "")
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  return build_model(cfg, load_params(hf_dir, cfg, mesh, hf["model_type"]), mesh), cfg


def copy_tokenizer(hf_dir: Path, out_dir: Path, hf: dict) -> None:
  """Copies the model's tokenizer files and its special-token ids (config.json subset) into out_dir."""
  names = [n for n in TOKENIZER_FILES if (hf_dir / n).is_file()]
  if not names:
    return
  out_dir.mkdir(parents=True, exist_ok=True)
  for name in names:
    shutil.copy2(hf_dir / name, out_dir / name)
  ids = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
  (out_dir / "config.json").write_text(json.dumps(ids, indent=2))


def convert_from_hf(hf_dir: str | Path, workdir: str | Path, overrides: Sequence[str] = ()) -> config_dict.ConfigDict:
  """Writes a maxlm workdir (step-0 checkpoint, config.json, tokenizer/) from a Hugging Face model directory."""
  from maxlm.train.checkpoint import Checkpointer  # orbax is only needed here

  hf_dir, workdir = Path(hf_dir), Path(workdir)
  hf = read_hf_config(hf_dir)
  ckpt_dir = workdir / "checkpoints"
  if ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    raise FileExistsError(f"{ckpt_dir} already holds checkpoints; convert into a new --workdir")
  tok_dir = workdir / "tokenizer"
  name = _tokenizer_file(hf_dir)
  if name is None:
    log.warning("%s has no tokenizer.json or tokenizer.model: training will need --config.data.tokenizer", hf_dir)
  # The config is mapped (and validated) before anything is written into the workdir.
  cfg = maxlm_config(hf, overrides, tokenizer=str((tok_dir / name).absolute()) if name else "")
  reader = SafetensorsReader(hf_dir)
  params = load_params(hf_dir, cfg, sharding.make_mesh(cfg.mesh), hf["model_type"])
  copy_tokenizer(hf_dir, tok_dir, hf)
  config_json = to_json(cfg)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config_json)
  dtypes = sorted({str(reader.dtype(n)) for n in reader.keys()})
  (workdir / IMPORT_RECORD).write_text(json.dumps(
    {"source": str(hf_dir.absolute()), "model_type": hf["model_type"],
     "dtype": hf.get("dtype", hf.get("torch_dtype")), "tensor_dtypes": dtypes, "config": hf}, indent=2))
  ckpt = Checkpointer(ckpt_dir, async_save=False)
  ckpt.save_params(0, params, json.loads(config_json))
  ckpt.close()
  return cfg


def convert_to_hf(workdir: str | Path, output: str | Path, *, dtype: str | None = None,
                  model_type: str | None = None, step: int | None = None,
                  max_shard_bytes: int = 5 << 30) -> Path:
  """Writes a Hugging Face model directory (config, safetensors, tokenizer) from a maxlm workdir."""
  from maxlm.workdir import load_workdir_config, restore_params  # orbax is only needed here

  workdir, output = Path(workdir), Path(output)
  cfg = load_workdir_config(workdir)
  record = json.loads((workdir / IMPORT_RECORD).read_text()) if (workdir / IMPORT_RECORD).is_file() else {}
  model_type = model_type or record.get("model_type")
  try:
    hf_config(cfg, model_type)
  except UnsupportedModelError:
    if model_type != record.get("model_type"):
      raise
    model_type = None  # the imported family no longer fits (e.g. trained with a window): pick one that does
  dtype = dtype or record.get("dtype") or "float32"
  if dtype not in _DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
  step, params = restore_params(workdir, cfg, step)
  special = {k: record.get("config", {}).get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
  tok_dir = workdir / "tokenizer"
  if (tok_dir / "config.json").is_file():
    special.update(json.loads((tok_dir / "config.json").read_text()))
  config = hf_config(cfg, model_type, dtype, special)
  output.mkdir(parents=True, exist_ok=True)
  write_safetensors(hf_tensors(cfg, params, config["model_type"], _DTYPES[dtype]), output,
                    max_shard_bytes=max_shard_bytes)
  (output / "config.json").write_text(json.dumps(config, indent=2))
  gen = {k: v for k, v in special.items() if k != "pad_token_id" and v is not None}
  (output / "generation_config.json").write_text(json.dumps(gen, indent=2))
  if tok_dir.is_dir():
    for name in TOKENIZER_FILES:
      if (tok_dir / name).is_file():
        shutil.copy2(tok_dir / name, output / name)
  log.info("exported step %d of %s as %s (%s) to %s", step, workdir, config["model_type"], dtype, output)
  return output
