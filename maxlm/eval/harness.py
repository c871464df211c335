"""lm-evaluation-harness backend: `lm_eval --model maxlm --model_args workdir=DIR,...` evaluates a maxlm workdir's
model, tokenizing as lm-eval's `hf` backend does for the same model so that per-request results match it.

  loglikelihood          maxlm.eval.continuations.score_continuations: bucketed rows, left-truncated to max_length
  loglikelihood_rolling  maxlm.eval.loglikelihood.score_documents over [prefix token] + the text's tokens, windows of
                         max_length inputs with stride max_length: lm-eval's get_rolling_token_windows(context_len=1)
  generate_until         the serving engine's continuous batching (maxlm.serve.engine.Engine), greedy by default

model_args (comma-separated key=value):
  workdir=DIR         the maxlm workdir (required): its config.json, newest checkpoint and tokenizer
  batch_size=N        rows per scoring batch (default 8, rounded up to a multiple of the devices the batch is split
                      over); here it wins over lm_eval's --batch_size flag (whose default is 1)
  max_length=N        the context: scoring window and prompt + generation budget (default model.max_seq_len)
  max_gen_toks=N      generated tokens when a task does not say (default 256, as the hf backend)
  overrides=K=V;K=V   config overrides of the workdir's config, `;`-separated (e.g. serve.max_batch=16;
                      model.dtype=float32); in Python also a list of "K=V" strings. Generation runs serve.max_batch
                      requests at a time (the workdir's, default 8)
  add_bos_token=B     force (true) or suppress (false) the tokens the tokenizer adds around a text, as the hf
                      backend's argument of that name; default: the tokenizer's own behaviour
  prefix_token_id=N   the token an empty context is conditioned on (default: the named bos token, else eos)
  devices=N           the first N devices (default: all, the config's mesh over them)
  compile_cache=DIR   keep XLA's compiled programs in DIR (jax's persistent compilation cache, for the whole
                      process): a later run of the same model and shapes skips most compilation
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from maxlm.extras import require

require("lmeval", "lm_eval.api.model")  # MissingExtra naming the pip extra when lm_eval is not installed

# The built-in model table first: lm-eval's get_model fills it only while the registry is empty.
import lm_eval.models as _builtin_models  # noqa: E402, F401
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text  # noqa: E402
from tqdm import tqdm  # noqa: E402

if TYPE_CHECKING:
  from lm_eval.api.instance import Instance

DEFAULT_BATCH = 8
MIN_ENGINE_LEN = 64  # the engine's sequence length is the next power of two of the longest request, at least this
_CONTINUE_TAG = "MAXLM-CONTINUE-FINAL-MESSAGE "  # marks the end of a chat's final message (continue_final_message)


def parse_overrides(value: str | Sequence[str] | None) -> tuple[str, ...]:
  """Config overrides from model_args: "a.b=1;c.d=x" (or a list of "a.b=1"), each "--config." prefix optional."""
  if value is None or value == "":
    return ()
  items = value.split(";") if isinstance(value, str) else list(value)
  out = []
  for item in (str(i).strip() for i in items):
    if not item:
      continue
    body = item.removeprefix("--").removeprefix("config.")
    if "=" not in body:
      raise ValueError(f"overrides: {item!r} is not KEY=VALUE (e.g. overrides=serve.decode_steps=16;model.dtype="
                       "float32)")
    out.append(f"--config.{body}")
  return tuple(out)


def _flag(name: str, value: Any) -> bool | None:
  """A model_args boolean (lm-eval passes True/False, or the strings from a Python model_args string)."""
  if value is None or isinstance(value, bool):
    return value
  text = str(value).strip().lower()
  if text in ("true", "1", "yes"):
    return True
  if text in ("false", "0", "no"):
    return False
  raise ValueError(f"{name}={value!r}: expected true or false")


def _pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


@register_model("maxlm")
class MaxlmLM(TemplateLM):
  """A maxlm workdir as an lm-eval model (see the module docstring for its model_args)."""

  def __init__(self, workdir: str, batch_size: int | str | None = None, max_length: int | None = None,
               max_gen_toks: int | None = None, overrides: str | Sequence[str] | None = None,
               add_bos_token: bool | str | None = None, prefix_token_id: int | None = None,
               devices: int | None = None, compile_cache: str | None = None, progress: bool | str = True,
               max_batch_size: int | None = None, device: str | None = None) -> None:
    super().__init__()
    import jax  # noqa: PLC0415  (lm-eval's CLI imports this module before it knows the model is used)

    from maxlm import sharding  # noqa: PLC0415
    from maxlm.eval.loglikelihood import WindowScorer  # noqa: PLC0415
    from maxlm.workdir import load_model, load_workdir_tokenizer, tokenizer_source  # noqa: PLC0415

    del max_batch_size, device  # lm-eval passes them to every model; jax places the work on its devices
    if compile_cache:
      jax.config.update("jax_compilation_cache_dir", str(compile_cache))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if not os.path.isfile(os.path.join(str(workdir), "config.json")):
      raise ValueError(f"workdir={workdir}: no config.json (not a maxlm workdir)")
    self.workdir = str(workdir)
    self.overrides = parse_overrides(overrides)
    chosen = None if devices is None else jax.devices()[:int(devices)]
    self.model, self.cfg, self.step = load_model(self.workdir, self.overrides, devices=chosen)
    self.scorer = WindowScorer(self.model, sharding.config_rules(self.cfg))
    rows = DEFAULT_BATCH if batch_size in (None, "", "auto") or str(batch_size).startswith("auto") else int(
      batch_size)
    if rows < 1:
      raise ValueError(f"batch_size={batch_size}: must be >= 1")
    self._batch_size = -(-rows // self.scorer.row_multiple) * self.scorer.row_multiple
    model_len = int(self.cfg.model.max_seq_len)
    self._max_length = int(max_length) if max_length else model_len
    if not 1 <= self._max_length <= model_len:
      raise ValueError(f"max_length={max_length}: must be in [1, model.max_seq_len={model_len}]")
    self._max_gen_toks = int(max_gen_toks) if max_gen_toks else 256
    self.progress = bool(_flag("progress", progress))
    self.tokenizer = load_workdir_tokenizer(self.workdir, self.cfg)
    self._tokenizer_source = tokenizer_source(self.workdir, self.cfg)
    self.add_bos_token = _flag("add_bos_token", add_bos_token)
    self._named = self._named_tokens()
    bos = self._named.get("bos_token")
    self._bos_id = self._single_id(bos) if bos is not None else getattr(self.tokenizer, "bos_id", None)
    self._custom_prefix = None if prefix_token_id is None else int(prefix_token_id)
    self._template_name: str | None = None
    self._engine: Any = None

  # ----------------------------------------------------------------------------------------- tokenization

  def _named_tokens(self) -> dict[str, str]:
    """{"bos_token": text, "eos_token": text, ...}: the special tokens transformers' tokenizer names."""
    from data_pipelines.chat_template import special_tokens_of  # noqa: PLC0415
    from data_pipelines.tokenizer import HFTokenizer  # noqa: PLC0415

    if isinstance(self.tokenizer, HFTokenizer):
      return special_tokens_of(self.tokenizer.path.parent)
    return {"bos_token": self.tokenizer.id_to_piece(self.tokenizer.bos_id),
            "eos_token": self.tokenizer.id_to_piece(self.tokenizer.eos_id)}

  def _single_id(self, text: str) -> int | None:
    """The id of a special token's text, None if it is not one token."""
    ids = self._encode_text(text)
    return ids[0] if len(ids) == 1 else None

  def _encode_text(self, text: str) -> list[int]:
    """Token ids of text with nothing added; special-token strings in it are their tokens, as in transformers."""
    encode = getattr(self.tokenizer, "encode_chat", self.tokenizer.encode)
    return list(encode(text))

  def _token_text(self, token_id: int) -> str:
    """A token's text with special tokens kept (transformers' decode(id, skip_special_tokens=False))."""
    specials = getattr(self.tokenizer, "special_token_strings", dict)()
    return specials.get(token_id) or self.tokenizer.id_to_piece(token_id)

  @property
  def eot_token_id(self) -> int:
    return int(self.tokenizer.eos_id)

  @property
  def prefix_token_id(self) -> int:
    if self._custom_prefix is not None:
      return self._custom_prefix
    return self._bos_id if self._bos_id is not None else self.eot_token_id

  def _added(self) -> tuple[list[int], list[int]]:
    """(ids before, ids after) a text encoded with special tokens: the tokenizer's own, or bos alone when
    add_bos_token=True and the tokenizer adds none."""
    from data_pipelines.tokenizer import bos_prefix  # noqa: PLC0415

    before = bos_prefix(self.tokenizer)
    after = [self.tokenizer.eos_id] if getattr(self.tokenizer, "add_eos", False) else []
    if self.add_bos_token and not before and self._bos_id is not None:
      before = [self._bos_id]
    return before, after

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                 **kwargs: Any) -> list[int]:
    """Token ids of a string as the hf backend's tok_encode gives them: the tokenizer's added tokens unless
    add_special_tokens (or add_bos_token) says otherwise, and none when the string already starts with the prefix
    token's text."""
    add = add_special_tokens
    if add is None:
      add = True if self.add_bos_token is None else self.add_bos_token
      prefix = self._token_text(self.prefix_token_id)
      if prefix and string.startswith(prefix):
        add = False
    ids = self._encode_text(string)
    if add:
      before, after = self._added()
      ids = before + ids + after
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def _prompt_ids(self, context: str) -> list[int]:
    """A generation prompt's ids, as the hf backend's tok_batch_encode: special tokens unless it starts with bos."""
    bos = self._named.get("bos_token")
    if bos is not None and context.startswith(bos):
      return self.tok_encode(context, add_special_tokens=False)
    return self.tok_encode(context, add_special_tokens=self.add_bos_token if self.add_bos_token is not None else True)

  def tok_decode(self, tokens: int | Sequence[int], skip_special_tokens: bool = True) -> str:
    """Text of token ids (special tokens dropped unless skip_special_tokens=False)."""
    tokens = [int(tokens)] if isinstance(tokens, int | np.integer) else [int(t) for t in tokens]
    if skip_special_tokens:
      return self.tokenizer.decode(tokens)
    specials = getattr(self.tokenizer, "special_token_strings", dict)()
    return "".join(specials.get(t) or self.tokenizer.decode([t]) for t in tokens)

  # ----------------------------------------------------------------------------------------- sizes

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None) -> MaxlmLM:
    """The model from model_args plus lm-eval's batch_size / max_batch_size / device; a key given in model_args wins
    (lm-eval's own method fails on a key given twice, and its CLI always passes --batch_size, default 1)."""
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
    return cls(**arg_dict, **extra)

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> MaxlmLM:
    """As create_from_arg_obj, from a "key=value,key=value" string."""
    from lm_eval.utils import simple_parse_args_string  # noqa: PLC0415

    return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return self._tokenizer_source.replace("/", "__")

  def get_model_info(self) -> dict[str, Any]:
    """What lm-eval records under results["config"]: the workdir, checkpoint step, parameters and dtypes."""
    import jax  # noqa: PLC0415

    return {"workdir": os.path.abspath(self.workdir), "step": int(self.step), "overrides": list(self.overrides),
            "model_num_parameters": int(sum(x.size for x in jax.tree.leaves(self.scorer.state))),
            "model_dtype": str(self.model.dtype), "param_dtype": str(self.cfg.model.param_dtype)}

  def _bar(self, total: int, desc: str, disable_tqdm: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=disable_tqdm or not self.progress, dynamic_ncols=True)

  # ----------------------------------------------------------------------------------------- requests

  def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                            disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), greedy?) per (request, context ids, continuation ids)."""
    from maxlm.eval.continuations import score_continuations  # noqa: PLC0415

    bar = self._bar(len(requests), "maxlm loglikelihood", disable_tqdm)
    try:
      scores = score_continuations(self.scorer, [(ctx, cont) for _, ctx, cont in requests], seq_len=self.max_length,
                                   batch_size=self.batch_size, on_batch=bar.update)
    finally:
      bar.close()
    out = []
    for (key, _, _), logprob, greedy in zip(requests, scores.logprob, scores.greedy, strict=True):
      answer = (float(logprob), bool(greedy))
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, answer)
      out.append(answer)
    return out

  def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
    """Log-likelihood of whole texts: every token scored once, the first conditioned on the prefix token."""
    from maxlm.eval.loglikelihood import score_documents  # noqa: PLC0415
    from maxlm.eval.windows import rolling_windows  # noqa: PLC0415

    strings = [req.args[0] for req in requests]
    docs = [np.asarray([self.prefix_token_id, *self.tok_encode(s)], np.int32) for s in strings]
    left = [len(rolling_windows(len(d), self.max_length, self.max_length)) for d in docs]
    bar = self._bar(len(docs), "maxlm loglikelihood_rolling", disable_tqdm)
    bar.update(sum(n == 0 for n in left))

    def windows_done(rows: Any) -> None:
      for i in rows.doc_ids[rows.doc_ids >= 0]:
        left[i] -= 1
        bar.update(int(left[i] == 0))

    try:
      scores = score_documents(self.scorer, docs, seq_len=self.max_length, stride=self.max_length,
                               batch_size=self.batch_size, on_batch=windows_done)
    finally:
      bar.close()
    out = [float(-nll) for nll in scores.nll]
    for string, ll in zip(strings, out, strict=True):
      self.cache_hook.add_partial("loglikelihood_rolling", (string,), ll)
    return out

  def _sampling(self, gen_kwargs: dict[str, Any]) -> tuple[Any, list[str]]:
    """(SamplingParams, stop strings) of a request's generation kwargs, as the hf backend reads them."""
    from maxlm.serve.request import SamplingParams  # noqa: PLC0415

    kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
    until = handle_stop_sequences(kwargs.pop("until", None), eos=self._token_text(self.eot_token_id))
    max_tokens = int(kwargs.pop("max_gen_toks"))
    if max_tokens >= self.max_length:
      raise ValueError(f"max_gen_toks={max_tokens} leaves no room for a prompt in max_length={self.max_length}")
    temperature = float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample") else 0.0
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=int(kwargs.get("top_k") or 0),
                            top_p=float(kwargs.get("top_p") or 1.0), stop=tuple(s for s in until if s)[:16])
    return params, until

  def _engine_for(self, longest: int) -> Any:
    """The serving engine over this model, its sequence length a power of two >= longest (rebuilt if longer)."""
    from maxlm.config import apply_override  # noqa: PLC0415
    from maxlm.serve.engine import Engine  # noqa: PLC0415

    max_len = min(self.max_length, max(MIN_ENGINE_LEN, _pow2(longest)))
    if self._engine is None or self._engine.max_len < max_len:
      self._engine = None  # its KV cache goes before the next one is allocated
      cfg = self.cfg.copy_and_resolve_references()
      apply_override(cfg, f"serve.max_len={max_len}")
      self._engine = Engine(self.model, cfg, self.tokenizer, mesh=self.scorer.mesh)
    return self._engine

  def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
    """Completions of every request through the engine's continuous batching, each cut at its first stop string."""
    plans = []
    for req in requests:
      context, gen_kwargs = req.args
      params, until = self._sampling(gen_kwargs)
      ids = self._prompt_ids(context)[-(self.max_length - params.max_tokens):] or [self.prefix_token_id]
      plans.append((ids, params, until))
    if not plans:
      return []
    engine = self._engine_for(max(len(ids) + p.max_tokens for ids, p, _ in plans))
    generated: list[list[int]] = [[] for _ in plans]
    order = sorted(range(len(plans)), key=lambda i: -len(plans[i][0]))  # longest first: similar rows prefill together
    bar = self._bar(len(plans), "maxlm generate_until", disable_tqdm)
    try:
      for i, out in engine.run_all([plans[j][0] for j in order], [plans[j][1] for j in order]):
        generated[order[i]] += out.token_ids
        bar.update(int(out.finished))
    finally:
      bar.close()
    texts = []
    for req, ids, (_, _, until) in zip(requests, generated, plans, strict=True):
      text = postprocess_generated_text(self.tokenizer.decode(ids), until, None)
      self.cache_hook.add_partial("generate_until", req.args, text)
      texts.append(text)
    return texts

  # ----------------------------------------------------------------------------------------- chat

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    """The Jinja source of the workdir tokenizer's chat template (a named one when chat_template is a name)."""
    from data_pipelines.chat_template import template_of  # noqa: PLC0415

    if chat_template is False or chat_template is None:
      return None
    self._template_name = chat_template if isinstance(chat_template, str) else None
    return template_of(self.tokenizer, self._template_name).source

  def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The chat as text, rendered by the tokenizer's template as `maxlm generate --chat` renders it; without a
    generation prompt the final message is left open (transformers' continue_final_message), as the hf backend."""
    from data_pipelines.chat_template import ChatTemplateError, template_of  # noqa: PLC0415

    template = template_of(self.tokenizer, self._template_name)
    try:
      return render_chat(template, chat_history, add_generation_prompt)
    except ChatTemplateError:  # as the hf backend: some templates refuse a system message
      without_system = [m for m in chat_history if m.get("role") != "system"]
      if len(without_system) == len(chat_history):
        raise
      return render_chat(template, without_system, add_generation_prompt)


def render_chat(template: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
  """A chat rendered by a data_pipelines.chat_template.ChatTemplate. Without a generation prompt the text ends right
  after the final message's content (its end-of-turn tokens cut off; trailing whitespace kept where the template
  keeps it): transformers' apply_chat_template(continue_final_message=True)."""
  from data_pipelines.chat_template import ChatTemplateError  # noqa: PLC0415

  if add_generation_prompt:
    return template.render(messages, add_generation_prompt=True)
  if not messages or not isinstance(messages[-1].get("content"), str):
    raise ChatTemplateError("continuing the final message needs a final message with text content")
  marked = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + _CONTINUE_TAG}]
  text = template.render(marked, add_generation_prompt=False)
  at = text.rfind(_CONTINUE_TAG.rstrip())
  if at < 0:
    raise ChatTemplateError(f"the chat template of {template.where} does not render the final message's content")
  return text[:at] if text.startswith(_CONTINUE_TAG, at) else text[:at].rstrip()
