"""Training metrics: metrics.jsonl + TensorBoard logging, loss plots, model FLOPs and MFU.

The JSONL file is the source of truth (one `{"step": ..., ...}` object per line, flushed per write so a
killed run loses at most its last line); TensorBoard and the PNG plot are views of the same numbers.
Every line is strict JSON: a non-finite value (a diverged loss) is written as the string "NaN", "Infinity"
or "-Infinity", and `read_metrics` turns those strings back into floats.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.cache import default_cache_dir
from data_pipelines.fileio import atomic_write
from maxlm import hardware
from maxlm.extras import require

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
EVAL_PREFIX = "eval_"
# Keys the plot looks for in the records the training loop writes.
LOSS_KEY = "loss"
EVAL_LOSS_KEY = EVAL_PREFIX + LOSS_KEY
THROUGHPUT_KEY = "tokens_per_sec"
# How metrics.jsonl spells the floats strict JSON has no number for (the tokens Python's json module would write).
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


# ----------------------------------------------------------------------------------------------------
# metrics.jsonl + TensorBoard


def encode_record(record: Mapping[str, Any]) -> str:
  """One metrics.jsonl line (no newline): strict JSON, with NaN and +-inf as the strings "NaN", "Infinity",
  "-Infinity"."""
  def strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
      return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value

  return json.dumps({key: strict(value) for key, value in record.items()}, allow_nan=False)


def decode_record(line: str) -> dict[str, Any]:
  """The record of one metrics.jsonl line, the strings "NaN" / "Infinity" / "-Infinity" read back as floats.

  Bare NaN / Infinity tokens, which files written before the strict format hold, are read too.
  """
  record = json.loads(line)
  if isinstance(record, dict):
    for key, value in record.items():
      if isinstance(value, str) and value in _NON_FINITE:
        record[key] = _NON_FINITE[value]
  return record


def _parse_lines(text: str, path: Path) -> list[dict[str, Any]]:
  """Parse JSONL text into records, dropping a torn last line left by a killed writer."""
  lines = text.split("\n")
  torn_tail = lines.pop()  # "" when the file ends in a newline; otherwise a partial, unterminated line
  if torn_tail:
    logger.warning("%s: dropping a torn last line (%d bytes) from an interrupted write", path, len(torn_tail))
  parsed = []
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = decode_record(line)
    except json.JSONDecodeError:
      record = None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
      logger.warning("%s:%d: skipping a malformed metrics line: %.80r", path, lineno, line)
      continue
    parsed.append(record)
  return parsed


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """Every complete record of WORKDIR/metrics.jsonl in file order (torn or malformed lines skipped)."""
  path = Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return _parse_lines(path.read_text(encoding="utf-8"), path)


class MetricsWriter:
  """Appends step records to WORKDIR/metrics.jsonl and TensorBoard; a no-op on non-zero processes."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.workdir = Path(workdir)
    self.path = self.workdir / METRICS_FILE
    self.enabled = enabled
    self._file = None
    self._tb = None
    self._tb_purge_step: int | None = None  # set by truncate_after: TensorBoard hides the dead run's tail
    if enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Append one record `{"step": step, **scalars}` and the matching TensorBoard scalars."""
    if not self.enabled:
      return
    if isinstance(step, bool) or int(step) != step:
      raise TypeError(f"step must be an int, got {step!r}")
    step = int(step)
    record: dict[str, Any] = {"step": step}
    for key, value in scalars.items():
      if key == "step":
        raise ValueError(f"scalars must not contain 'step' (it is the record key), got {dict(scalars)!r}")
      try:
        record[key] = float(value)
      except (TypeError, ValueError) as e:
        raise TypeError(f"metric {key!r} must be a real scalar, got {value!r}") from e
    f = self._open_jsonl()
    f.write(encode_record(record) + "\n")  # a diverged (NaN / inf) loss is worth recording: as a string
    f.flush()
    tb = self._open_tensorboard()
    for key, value in record.items():
      if key == "step":
        continue
      tag = f"eval/{key[len(EVAL_PREFIX):]}" if key.startswith(EVAL_PREFIX) else f"train/{key}"
      tb.add_scalar(tag, value, step)

  def truncate_after(self, step: int) -> None:
    """Keep only records with step <= `step` (resuming from a checkpoint there); drops a torn last line."""
    if not self.enabled:
      return
    self._close_jsonl()
    if self.path.exists():
      # Re-encoded: a file from before the strict format comes out strict (the same text for a strict one).
      kept = [encode_record(record) for record in _parse_lines(self.path.read_text(encoding="utf-8"), self.path)
              if record["step"] <= step]
      atomic_write(self.path, "".join(line + "\n" for line in kept).encode("utf-8"))
    # The old run's event files still hold steps > `step`; a purge marker makes TensorBoard hide them.
    self._close_tensorboard()
    self._tb_purge_step = step + 1

  def plot(self, path: str | os.PathLike | None = None) -> Path:
    """Render loss (train and eval) and tokens/s against step to a PNG, default WORKDIR/loss.png."""
    out = Path(path) if path is not None else self.workdir / "loss.png"
    if not self.enabled:
      return out
    if self._file is not None:
      self._file.flush()
    records = read_metrics(self.workdir)
    _plot_records(records, out)
    return out

  def flush(self) -> None:
    """Push buffered TensorBoard events to disk (the JSONL is already flushed on every write)."""
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flush and close both outputs; later writes reopen them in append mode."""
    self._close_jsonl()
    self._close_tensorboard()

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()

  # -- internals --

  def _open_jsonl(self):
    """Open metrics.jsonl for appending, first cutting a torn tail so the next record starts a fresh line."""
    if self._file is None:
      if self.path.exists():
        with open(self.path, "rb+") as f:
          data = f.read()
          if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            logger.warning("%s: dropping a torn last line (%d bytes)", self.path, len(data) - keep)
            f.truncate(keep)
      self._file = open(self.path, "a", encoding="utf-8")
    return self._file

  def _open_tensorboard(self):
    """Create the SummaryWriter lazily so a truncate_after before the first write can set its purge step."""
    if self._tb is None:
      from tensorboardX import SummaryWriter  # deferred: only process 0 pays the import

      self._tb = SummaryWriter(
        logdir=str(self.workdir / TENSORBOARD_DIR), purge_step=self._tb_purge_step, flush_secs=30
      )
      self._tb_purge_step = None
    return self._tb

  def _close_jsonl(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def _close_tensorboard(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _plot_records(records: list[dict[str, Any]], out: Path) -> None:
  """Draw the two-panel loss / throughput figure with the Agg canvas (no pyplot, no display)."""
  backend_agg = require("plot", "matplotlib.backends.backend_agg")
  figure = require("plot", "matplotlib.figure")

  def series(key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]

  fig = figure.Figure(figsize=(8, 7), layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  ax_loss, ax_tps = fig.subplots(2, 1, sharex=True)
  for key, label, style in ((LOSS_KEY, "train loss", "-"), (EVAL_LOSS_KEY, "eval loss", "o-")):
    steps, values = series(key)
    if steps:
      ax_loss.plot(steps, values, style, label=label, markersize=3)
  ax_loss.set_ylabel("loss")
  ax_loss.grid(alpha=0.3)
  if ax_loss.has_data():
    ax_loss.legend()
  steps, values = series(THROUGHPUT_KEY)
  if steps:
    ax_tps.plot(steps, values, "-", color="tab:green")
  ax_tps.set_ylabel("tokens/s")
  ax_tps.set_xlabel("step")
  ax_tps.grid(alpha=0.3)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.tmp")
  fig.savefig(tmp, format="png", dpi=100)
  os.replace(tmp, out)


# ----------------------------------------------------------------------------------------------------
# FLOPs and MFU


def _cfg_get(cfg: Any, name: str, default: Any = None) -> Any:
  """Field `name` of a ConfigDict / dataclass / namespace, or `default` when absent."""
  try:
    value = getattr(cfg, name)
  except (AttributeError, KeyError):
    return default
  return default if value is None else value


def matmul_params_per_token(model_cfg: Any) -> int:
  """Weights every token multiplies through: q/k/v/o, 3 SwiGLU matrices (per routed expert, plus the router
  in a MoE) per layer, and the LM head."""
  d, layers = model_cfg.d_model, model_cfg.num_layers
  heads, kv_heads = model_cfg.num_heads, model_cfg.num_kv_heads
  head_dim = _cfg_get(model_cfg, "head_dim") or d // heads
  attention = d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d
  mlp = 3 * d * model_cfg.mlp_dim
  experts = _cfg_get(model_cfg, "num_experts") or 0
  if experts:
    mlp = mlp * model_cfg.num_experts_per_tok + d * experts
  # The head matmul runs whether or not it shares weights with the embedding; the lookup is not a matmul.
  return layers * (attention + mlp) + d * model_cfg.vocab_size


def model_flops_per_token(model_cfg: Any, seq_len: int) -> float:
  """Training (fwd + bwd) FLOPs per token of the Llama decoder: the MFU numerator.

  flops = 6 * P_matmul + 6 * 2 * num_layers * num_heads * head_dim * S_eff, where
    P_matmul = num_layers * (d*H*hd + 2*d*KV*hd + H*hd*d + 3*d*mlp_dim) + d*vocab   (q, k, v, o, SwiGLU, head)
    S_eff    = seq_len / 2 for causal attention (on average a query sees half the row); with a sliding
               window w < seq_len, S_eff = w * (1 - w / (2 * seq_len)) (the causal average with the window),
  6 = 2 FLOPs per multiply-add x (1 forward + 2 backward), and 2 = the QK^T scores plus the weighted sum of V.
  The embedding lookup, norms, RoPE, softmax and the optimizer are not counted (PaLM-style MFU).
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  head_dim = _cfg_get(model_cfg, "head_dim") or model_cfg.d_model // model_cfg.num_heads
  window = _cfg_get(model_cfg, "sliding_window")
  if window is not None and window < seq_len:
    span = window * (1 - window / (2 * seq_len))
  else:
    span = seq_len / 2
  attention = 6 * 2 * model_cfg.num_layers * model_cfg.num_heads * head_dim * span
  return 6.0 * matmul_params_per_token(model_cfg) + attention


def mfu(flops_per_token: float, tokens_per_sec_per_device: float, peak: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s per device over the device's peak FLOP/s, never above 1.

  A device cannot run faster than its peak, so a rate above it shows the peak is too low (a CPU matmul measured
  while the machine was busy): each call divides by the larger of the peak and its own rate. A `PeakFlops` (what
  `peak_flops_per_device` returns) also raises itself, and rewrites its cache entry, once the rate stays above it
  (`PeakFlops.observe`).
  """
  if not peak > 0:
    raise ValueError(f"peak FLOP/s must be positive, got {peak}")
  achieved = flops_per_token * tokens_per_sec_per_device
  if not (math.isfinite(achieved) and achieved >= 0):
    raise ValueError(f"achieved FLOP/s must be finite and >= 0, got {achieved} (tokens/s "
                     f"{tokens_per_sec_per_device})")
  bound = peak.observe(achieved) if isinstance(peak, PeakFlops) else float(peak)
  return achieved / max(bound, achieved) if achieved else 0.0


# Observed rates that raise a peak: the median of this many consecutive steps. One short step interval (a host
# stall makes the next interval short: steps are timed from one result to the next) must not raise the figure
# for every later run; a peak measured too low is exceeded step after step.
_SUSTAINED_STEPS = 5


class PeakFlops(float):
  """Peak FLOP/s of one device (the float's value: the figure it started from), raised by `observe`.

  `bound` is the current peak: the datasheet or measured figure, or the sustained rate that exceeded it. A
  measured peak that is raised rewrites its cache entry, so the next run starts from the higher figure.
  """

  how: str
  bound: float

  def __new__(cls, value: float, how: str, *, cache_path: Path | None = None, cache_key: str | None = None,
              devices_sharing: int = 1) -> PeakFlops:
    peak = super().__new__(cls, value)
    peak.how, peak.bound = how, float(value)
    peak._cache_path, peak._cache_key, peak._devices_sharing = cache_path, cache_key, devices_sharing
    peak._recent = collections.deque(maxlen=_SUSTAINED_STEPS)
    return peak

  def observe(self, flops_per_sec: float) -> float:
    """The peak after a device ran at `flops_per_sec`: raised (logged, cached) to the median of the last
    `_SUSTAINED_STEPS` rates when that median is above it."""
    self._recent.append(flops_per_sec)
    if len(self._recent) < _SUSTAINED_STEPS:
      return self.bound
    sustained = sorted(self._recent)[_SUSTAINED_STEPS // 2]
    if sustained <= self.bound:
      return self.bound
    if self._cache_path is None:
      logger.warning("%d steps ran at a median %.4g FLOP/s per device, above the peak %.4g (%s): the FLOP count or "
                     "the step time is off; using that rate as the peak", _SUSTAINED_STEPS, sustained, self.bound,
                     self.how)
    else:
      logger.warning("%d steps ran at a median %.4g FLOP/s per device, above the measured peak %.4g (%s; measured "
                     "while the machine was busy?): raising the peak to it in %s", _SUSTAINED_STEPS, sustained,
                     self.bound, self.how, self._cache_path)
      _raise_cached_peak(self._cache_path, self._cache_key, sustained * self._devices_sharing)
    self.bound = sustained
    return self.bound


# Matmul sides timed: the GEMM rate peaks where the operands fit the caches, so the fastest of a few sizes counts
# (on the 2-core CPU here, quiet, 1024 ran at 454 GFLOP/s and 2048 at 282-381). Accelerators need bigger operands.
_MEASURE_SIZES = {"cpu": (512, 1024, 2048), "other": (2048, 4096)}
_MEASURE_ROUNDS = 5  # at least this many timings of every size, interleaved, so a burst of load slows only some
_MEASURE_BUDGET_S = 0.5  # and more rounds until this much wall time has passed
_CACHE_FILE = "peak_flops_cpu.json"
# This process's measurement per (cache file, key): every process measures once, and the cache keeps the best.
_measured: dict[tuple[str, str], float] = {}


def _cpu_count() -> int:
  """CPUs this process may run on (the container/affinity limit, not the host's total)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS / Windows
    return os.cpu_count() or 1


def _measure_sizes(device: jax.Device) -> tuple[int, ...]:
  return _MEASURE_SIZES["cpu" if device.platform == "cpu" else "other"]


def _measure_matmul_flops(device: jax.Device, dtype: jnp.dtype) -> float:
  """Best FLOP/s over repeated, interleaved timings of jitted N x N matmuls of several sizes on `device`.

  On CPU one matmul runs on every core (XLA's intra-op thread pool), so this is the whole machine's rate.
  """
  matmul = jax.jit(jnp.matmul)
  rng = np.random.default_rng(0)  # host-side operands: nothing to compile but the matmuls
  operands = []
  for n in _measure_sizes(device):
    a, b = (jax.device_put(rng.standard_normal((n, n), np.float32).astype(dtype), device) for _ in range(2))
    matmul(a, b).block_until_ready()  # compile + first-touch
    operands.append((n, a, b))
  best, rounds, start = 0.0, 0, time.perf_counter()
  while rounds < _MEASURE_ROUNDS or time.perf_counter() - start < _MEASURE_BUDGET_S:
    for n, a, b in operands:
      t0 = time.perf_counter()
      matmul(a, b).block_until_ready()
      best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
    rounds += 1
  return best


def _cpu_devices_sharing(device: jax.Device) -> int:
  """JAX devices of this process that share the CPU cores `device` runs on (several with
  --xla_force_host_platform_device_count): each gets that share of the machine's rate."""
  try:
    return max(1, len(jax.local_devices(backend="cpu")))
  except RuntimeError:  # no CPU backend
    return 1


def _read_cache(cache_path: Path) -> dict[str, Any]:
  if not cache_path.exists():
    return {}
  try:
    cache = json.loads(cache_path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    logger.warning("ignoring unreadable peak-FLOPs cache %s: %s", cache_path, e)
    return {}
  return cache if isinstance(cache, dict) else {}


def _write_cache(cache_path: Path, cache: dict[str, Any]) -> None:
  try:
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache_path, json.dumps(cache, indent=2, sort_keys=True).encode())
  except OSError as e:  # a read-only cache costs a re-measurement next run, nothing more
    logger.warning("could not cache peak FLOP/s in %s: %s", cache_path, e)


def _raise_cached_peak(cache_path: Path, key: str, machine_flops: float) -> None:
  """Raises the cached machine-wide peak `key` to `machine_flops` (re-read first: another run may have raised it)."""
  cache = _read_cache(cache_path)
  entry = cache.get(key) if isinstance(cache.get(key), dict) else {}
  previous = entry.get("peak_flops")
  if isinstance(previous, (int, float)) and math.isfinite(previous) and previous >= machine_flops:
    return
  cache[key] = {**entry, "peak_flops": machine_flops, "raised_from": entry.get("peak_flops"),
                "raised_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "raised_by": "an observed training step rate"}
  _write_cache(cache_path, cache)


def peak_flops_per_device(
  device: jax.Device | None = None, dtype: str = "bfloat16", cache_dir: Path | None = None
) -> tuple[PeakFlops, str]:
  """(peak FLOP/s of one device, how it was obtained): the MFU denominator.

  Known TPUs and NVIDIA GPUs come from the datasheet table (maxlm/hardware.py). CPUs (and unknown accelerators) are
  measured once per process (the fastest of interleaved matmuls of a few sizes, `_measure_matmul_flops`, 1-2 s);
  `cache_dir`/peak_flops_cpu.json keeps the fastest rate any run has measured (keyed by platform, device kind, CPU
  count, dtype and sizes), so one measured while the machine was busy does not stick, and `mfu()` raises it when
  a training step runs faster. On CPU the matmul is always float32 (XLA:CPU has no faster bf16 GEMM, so the
  float32 rate bounds either compute dtype), and the machine's rate is shared by the process's CPU devices.
  """
  if dtype not in hardware.PRECISION_CLASS:
    raise ValueError(f"dtype must be one of {sorted(hardware.PRECISION_CLASS)}, got {dtype!r}")
  device = device if device is not None else jax.local_devices()[0]
  kind = device.device_kind
  if device.platform != "cpu":
    peak = hardware.peak_flops(kind, hardware.PRECISION_CLASS[dtype])
    if peak is not None:
      how = f"datasheet {hardware.PRECISION_CLASS[dtype]} dense peak for {kind!r}"
      return PeakFlops(peak, how), how
    measure_dtype = "float32" if hardware.PRECISION_CLASS[dtype] == "fp32" else "bfloat16"
    logger.warning("no peak-FLOPs entry for device kind %r; measuring a matmul instead", kind)
    sharing = 1
  else:
    measure_dtype = "float32"
    sharing = _cpu_devices_sharing(device)

  sizes = _measure_sizes(device)
  measured = f"fastest {'/'.join(map(str, sizes))}-square {measure_dtype} matmul on {device.platform}"
  per_device = f"; 1/{sharing} of it per device" if sharing > 1 else ""
  cache_path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / _CACHE_FILE
  key = f"{device.platform}|{kind}|cpus={_cpu_count()}|{measure_dtype}|sizes={'/'.join(map(str, sizes))}"
  cache = _read_cache(cache_path)
  entry = cache.get(key) if isinstance(cache.get(key), dict) else {}
  cached = entry.get("peak_flops")
  cached = float(cached) if isinstance(cached, (int, float)) and math.isfinite(cached) and cached > 0 else 0.0
  memo = (str(cache_path), key)
  if memo not in _measured:  # once per process: a run on a quiet machine raises a figure measured under load
    _measured[memo] = now = _measure_matmul_flops(device, jnp.dtype(measure_dtype))
    logger.info("peak FLOP/s: measured %.3g (%s; %d CPUs); best so far %.3g (%s)", now, measured, _cpu_count(),
                max(now, cached), cache_path)
    if now > cached:
      cache[key] = {"peak_flops": now, "device_kind": kind, "cpu_count": _cpu_count(), "how": measured,
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "previous": cached or None}
      _write_cache(cache_path, cache)
  machine = max(cached, _measured[memo])
  if machine > _measured[memo]:
    source = "an observed training step" if entry.get("raised_at") else f"a run at {entry.get('measured_at')}"
    how = f"{measured}, as fast as {source} (cached; this run measured {_measured[memo]:.3g}){per_device}"
  else:
    how = f"{measured}{per_device}"
  return PeakFlops(machine / sharing, how, cache_path=cache_path, cache_key=key, devices_sharing=sharing), how
