"""What a client asks for (Request, SamplingParams) and what the engine returns per step (RequestOutput)."""

from __future__ import annotations

import dataclasses
import math

MAX_LOGIT_BIAS = 32  # logit_bias / banned-token entries per request (a fixed-size array on device)


class RequestError(ValueError):
  """A request that cannot be served as given; `field` names the offending field (HTTP 400)."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field


class QueueFull(RuntimeError):
  """The engine's waiting queue is full (HTTP 429): retry later."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request is decoded. temperature 0 = greedy; top_k 0 and top_p 1 disable those filters."""

  max_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int | None = None
  stop: tuple[str, ...] = ()
  logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added logit); -inf bans the token
  ignore_eos: bool = False

  def validate(self, vocab_size: int) -> None:
    """Raises RequestError naming the field when a value is out of range."""
    if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
      raise RequestError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise RequestError("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
    if not isinstance(self.top_k, int) or not 0 <= self.top_k <= vocab_size:
      raise RequestError("top_k", f"must be an integer in [0, {vocab_size}] (0 = off), got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      raise RequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
    if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
      raise RequestError("seed", f"must be an integer in [0, 2^63), got {self.seed!r}")
    if any(not isinstance(s, str) or not s for s in self.stop) or len(self.stop) > 16:
      raise RequestError("stop", "must be at most 16 non-empty strings")
    if len(self.logit_bias) > MAX_LOGIT_BIAS:
      raise RequestError("logit_bias", f"at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
    for tok, bias in self.logit_bias:
      if not isinstance(tok, int) or not 0 <= tok < vocab_size:
        raise RequestError("logit_bias", f"token id {tok!r} is not in [0, {vocab_size})")
      if math.isnan(bias) or bias == math.inf:
        raise RequestError("logit_bias", f"bias of token {tok} must be a number or -inf, got {bias!r}")


@dataclasses.dataclass
class Request:
  """One completion request: prompt token ids and how to sample; `id` is unique among live requests."""

  id: str
  prompt_ids: list[int]
  params: SamplingParams = dataclasses.field(default_factory=SamplingParams)


@dataclasses.dataclass
class RequestOutput:
  """What one engine step produced for a request: new tokens/text and, at the end, why it finished.

  finish_reason: "stop" (eos or a stop string), "length" (max_tokens or the context), "abort", or None while running.
  """

  id: str
  token_ids: list[int]
  text: str
  finished: bool = False
  finish_reason: str | None = None
  prompt_tokens: int = 0
  completion_tokens: int = 0
