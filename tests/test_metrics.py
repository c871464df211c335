"""Tests of maxlm.metrics: JSONL/TensorBoard logging, resume truncation, plots, FLOPs, peak FLOP/s, MFU."""

import json
import math
import struct
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ml_collections import config_dict

from maxlm import hardware, metrics
from maxlm.configs import base

# ---- helpers ----


def read_tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
  """Decode every TFRecord-framed Event in `logdir` and collect its scalar summaries by tag."""
  from tensorboardX.proto.event_pb2 import Event

  scalars: dict[str, list[tuple[int, float]]] = {}
  files = sorted(logdir.rglob("events.out.tfevents.*"))
  assert files, f"no event file under {logdir}"
  for path in files:
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      # TFRecord framing: uint64 length, uint32 masked crc of length, payload, uint32 masked crc.
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      event = Event.FromString(data[pos + 12 : pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def write_run(workdir: Path, steps: range) -> None:
  """Log a train record every step and an eval record every 5th step, as the training loop does."""
  with metrics.MetricsWriter(workdir) as writer:
    for step in steps:
      writer.write(step, {"loss": 10.0 / step, "tokens_per_sec": 1000.0 + step})
      if step % 5 == 0:
        writer.write(step, {"eval_loss": 11.0 / step})


def small_model_cfg(**overrides) -> config_dict.ConfigDict:
  m = base.get_config().model
  m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 100, 16, 2, 4, 2, 40
  for key, value in overrides.items():
    setattr(m, key, value)
  return m


def llama_param_shapes(m) -> dict[str, tuple[int, ...]]:
  """The parameter shapes a Llama decoder with SwiGLU and GQA instantiates (norms included)."""
  hd = m.head_dim or m.d_model // m.num_heads
  shapes = {"embed": (m.vocab_size, m.d_model), "final_norm": (m.d_model,)}
  for i in range(m.num_layers):
    shapes |= {
      f"layer{i}/attn_norm": (m.d_model,),
      f"layer{i}/wq": (m.d_model, m.num_heads, hd),
      f"layer{i}/wk": (m.d_model, m.num_kv_heads, hd),
      f"layer{i}/wv": (m.d_model, m.num_kv_heads, hd),
      f"layer{i}/wo": (m.num_heads, hd, m.d_model),
      f"layer{i}/mlp_norm": (m.d_model,),
      f"layer{i}/w_gate": (m.d_model, m.mlp_dim),
      f"layer{i}/w_up": (m.d_model, m.mlp_dim),
      f"layer{i}/w_down": (m.mlp_dim, m.d_model),
    }
  if not m.tie_embeddings:
    shapes["lm_head"] = (m.d_model, m.vocab_size)
  return shapes


def matmul_params_from_shapes(m) -> int:
  """Matrices each token multiplies through: every >=2-D weight; the embedding only as a tied LM head."""
  shapes = llama_param_shapes(m)
  total = sum(math.prod(s) for name, s in shapes.items() if len(s) >= 2 and name != "embed")
  return total + (math.prod(shapes["embed"]) if m.tie_embeddings else 0)


# ---- metrics.jsonl ----


def test_jsonl_written_and_readable(tmp_path):
  write_run(tmp_path, range(1, 11))
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 12  # 10 train + 2 eval records
  assert json.loads(lines[0]) == {"step": 1, "loss": 10.0, "tokens_per_sec": 1001.0}
  records = metrics.read_metrics(tmp_path)
  assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))
  assert [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r] == [(5, 2.2), (10, 1.1)]


def test_write_is_flushed_before_close(tmp_path):
  writer = metrics.MetricsWriter(tmp_path)
  writer.write(3, {"loss": np.float32(2.5), "grad_norm": jax.numpy.asarray(0.5)})
  assert metrics.read_metrics(tmp_path) == [{"step": 3, "loss": 2.5, "grad_norm": 0.5}]
  writer.close()


def test_write_rejects_bad_values(tmp_path):
  writer = metrics.MetricsWriter(tmp_path)
  with pytest.raises(TypeError, match="'note'"):
    writer.write(1, {"note": "hello"})
  with pytest.raises(ValueError, match="step"):
    writer.write(1, {"step": 2.0})
  writer.close()


def test_truncate_after_keeps_steps_up_to_k_and_drops_torn_line(tmp_path):
  write_run(tmp_path, range(1, 11))
  path = tmp_path / "metrics.jsonl"
  with open(path, "a") as f:
    f.write('{"step": 11, "loss": 0.9')  # a SIGKILL mid-write
  assert [r["step"] for r in metrics.read_metrics(tmp_path)][-1] == 10  # readers skip the torn line

  writer = metrics.MetricsWriter(tmp_path)
  writer.truncate_after(5)
  records = metrics.read_metrics(tmp_path)
  assert sorted({r["step"] for r in records}) == [1, 2, 3, 4, 5]
  assert sum("eval_loss" in r for r in records) == 1
  writer.write(6, {"loss": 1.5})
  writer.close()
  text = path.read_text()
  assert text.endswith("\n") and '"step": 11' not in text
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 5, 6]
  assert not list(tmp_path.glob(".metrics.jsonl.*"))  # the temp file was renamed into place


def test_truncate_after_beyond_last_step_only_drops_torn_line(tmp_path):
  write_run(tmp_path, range(1, 4))
  path = tmp_path / "metrics.jsonl"
  before = path.read_text()
  path.write_text(before + '{"st')
  metrics.MetricsWriter(tmp_path).truncate_after(100)
  assert path.read_text() == before


def test_appending_after_a_torn_line_starts_a_fresh_line(tmp_path):
  write_run(tmp_path, range(1, 3))
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "lo')
  with metrics.MetricsWriter(tmp_path) as writer:  # e.g. a restart that skips truncate_after
    writer.write(3, {"loss": 3.0})
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2, 3]


def _strict_loads(line: str):
  """json.loads that refuses the non-standard NaN / Infinity / -Infinity tokens, like strict JSON parsers."""
  def refuse(token):
    raise ValueError(f"non-standard JSON token {token}")

  return json.loads(line, parse_constant=refuse)


def test_non_finite_values_are_written_as_strict_json_and_read_back_as_floats(tmp_path):
  values = {"loss": math.nan, "grad_norm": math.inf, "log_z_sq": -math.inf, "lr": 1e-3}
  with metrics.MetricsWriter(tmp_path) as writer:
    writer.write(1, values)
    writer.write(2, {"loss": np.float32("nan"), "eval_loss": 2.5})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  first = _strict_loads(lines[0])  # every line parses without the non-standard tokens
  assert first == {"step": 1, "loss": "NaN", "grad_norm": "Infinity", "log_z_sq": "-Infinity", "lr": 1e-3}
  assert _strict_loads(lines[1]) == {"step": 2, "loss": "NaN", "eval_loss": 2.5}
  [one, two] = metrics.read_metrics(tmp_path)
  assert math.isnan(one["loss"]) and one["grad_norm"] == math.inf and one["log_z_sq"] == -math.inf
  assert one["lr"] == 1e-3 and math.isnan(two["loss"]) and two["eval_loss"] == 2.5
  assert metrics.MetricsWriter(tmp_path).plot().read_bytes()[:4] == b"\x89PNG"  # non-finite points are skipped


def test_a_file_with_bare_nan_tokens_is_read_and_rewritten_strict_on_resume(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": Infinity}\n{"step": 3, "loss": 1.5}\n')
  assert [r["loss"] for r in metrics.read_metrics(tmp_path)][1:] == [math.inf, 1.5]
  metrics.MetricsWriter(tmp_path).truncate_after(2)
  lines = path.read_text().splitlines()
  assert [_strict_loads(line) for line in lines] == [{"step": 1, "loss": "NaN"}, {"step": 2, "loss": "Infinity"}]


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=5))
@settings(max_examples=50, deadline=None, derandomize=True, database=None)
def test_any_float_round_trips_through_a_strict_line(values):
  record = {"step": 7, **{f"m{i}": v for i, v in enumerate(values)}}
  line = metrics.encode_record(record)
  _strict_loads(line)
  decoded = metrics.decode_record(line)
  assert decoded.keys() == record.keys()
  for key, value in record.items():
    assert decoded[key] == value or (math.isnan(value) and math.isnan(decoded[key]))


def test_read_metrics_of_missing_run_is_empty(tmp_path):
  assert metrics.read_metrics(tmp_path / "nothing") == []


def test_disabled_writer_is_a_no_op(tmp_path):
  workdir = tmp_path / "run"
  writer = metrics.MetricsWriter(workdir, enabled=False)
  writer.write(1, {"loss": 1.0, "eval_loss": 2.0})
  writer.truncate_after(0)
  out = writer.plot()
  writer.close()
  assert out == workdir / "loss.png"
  assert not workdir.exists()


# ---- TensorBoard ----


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
  write_run(tmp_path, range(1, 11))
  scalars = read_tensorboard_scalars(tmp_path / "tensorboard")
  assert set(scalars) == {"train/loss", "train/tokens_per_sec", "eval/loss"}
  steps, values = zip(*scalars["train/loss"])
  assert steps == tuple(range(1, 11))
  np.testing.assert_allclose(values, [10.0 / s for s in range(1, 11)], rtol=1e-6)
  assert [s for s, _ in scalars["eval/loss"]] == [5, 10]
  np.testing.assert_allclose([v for _, v in scalars["eval/loss"]], [2.2, 1.1], rtol=1e-6)


def test_truncate_after_writes_a_tensorboard_purge_marker(tmp_path):
  from tensorboardX.proto.event_pb2 import Event, SessionLog

  write_run(tmp_path, range(1, 8))
  with metrics.MetricsWriter(tmp_path) as writer:
    writer.truncate_after(4)
    writer.write(5, {"loss": 0.5})
  purge_steps = []
  for path in (tmp_path / "tensorboard").glob("events.out.tfevents.*"):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      event = Event.FromString(data[pos + 12 : pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == SessionLog.START:
        purge_steps.append(event.step)
  assert purge_steps == [5]  # TensorBoard drops the killed run's events from step 5 on


# ---- plot ----


def test_plot_writes_a_png(tmp_path):
  write_run(tmp_path, range(1, 21))
  writer = metrics.MetricsWriter(tmp_path)
  out = writer.plot()
  assert out == tmp_path / "loss.png"
  data = out.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
  custom = writer.plot(tmp_path / "plots" / "curve.png")
  assert custom.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  writer.close()


def test_plot_without_eval_or_records(tmp_path):
  with metrics.MetricsWriter(tmp_path) as writer:
    assert writer.plot().read_bytes()[:4] == b"\x89PNG"  # empty run
    writer.write(1, {"loss": 2.0})
    assert writer.plot().read_bytes()[:4] == b"\x89PNG"  # train loss, no eval, no throughput


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
  from maxlm.extras import MissingExtra

  write_run(tmp_path, range(1, 3))
  monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # as if matplotlib were not installed
  with pytest.raises(MissingExtra, match=r"pip install 'maxlm\[plot\]'"):
    metrics.MetricsWriter(tmp_path).plot()


# ---- FLOPs ----


def test_model_flops_per_token_hand_computed():
  m = small_model_cfg()
  # per layer: q 16*4*4=256, k 16*2*4=128, v 128, o 256, SwiGLU 3*16*40=1920 -> 2688; x2 layers = 5376
  # LM head 16*100 = 1600 -> 6976 matmul params; attention 6*2*2 layers*4 heads*4 hd*8 seq*1/2 = 1536
  assert metrics.matmul_params_per_token(m) == 6976
  assert metrics.model_flops_per_token(m, seq_len=8) == 6 * 6976 + 1536 == 43392


@pytest.mark.parametrize(
  "overrides",
  [{}, {"tie_embeddings": True}, {"head_dim": 8}, {"num_kv_heads": 1}, {"num_kv_heads": 4, "num_layers": 3}],
)
def test_model_flops_matches_parameter_shapes(overrides):
  m = small_model_cfg(**overrides)
  seq_len = 64
  hd = m.head_dim or m.d_model // m.num_heads
  attention = 6 * 2 * m.num_layers * m.num_heads * hd * seq_len / 2
  expected = 6 * matmul_params_from_shapes(m) + attention
  assert metrics.model_flops_per_token(m, seq_len) == pytest.approx(expected, rel=1e-12)


def test_model_flops_base_config_and_plain_namespace():
  c = base.get_config()
  fields = {k: c.model[k] for k in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                                    "head_dim", "mlp_dim", "tie_embeddings")}
  flops = metrics.model_flops_per_token(c.model, c.data.seq_len)
  assert flops == metrics.model_flops_per_token(SimpleNamespace(**fields), c.data.seq_len)
  assert flops == 6 * matmul_params_from_shapes(c.model) + 6 * 2 * 8 * 8 * 64 * 512 / 2


def test_sliding_window_attention_flops():
  full = metrics.model_flops_per_token(small_model_cfg(), 64)
  assert metrics.model_flops_per_token(small_model_cfg(sliding_window=64), 64) == full
  assert metrics.model_flops_per_token(small_model_cfg(sliding_window=1000), 64) == full
  windowed = metrics.model_flops_per_token(small_model_cfg(sliding_window=16), 64)
  # exact mean keys per query is (16*17/2 + 48*16) / 64 = 14.125; the formula drops the +w/2T term like T/2
  span = 16 * (1 - 16 / 128)
  assert windowed == pytest.approx(full - 6 * 2 * 2 * 4 * 4 * (32 - span))


def test_mfu():
  assert metrics.mfu(1e9, 1e3, 4e12) == pytest.approx(0.25)
  assert metrics.mfu(1e9, 0.0, 4e12) == 0.0
  with pytest.raises(ValueError):
    metrics.mfu(1e9, 1e3, 0.0)
  with pytest.raises(ValueError, match="achieved"):
    metrics.mfu(1e9, math.inf, 4e12)


def _measured_peak(monkeypatch, cache_dir: Path, machine_flops: float, sharing: int = 1):
  """peak_flops_per_device for the CPU as if a matmul had measured `machine_flops` for the whole machine."""
  monkeypatch.setattr(metrics, "_measure_matmul_flops", lambda device, dtype: machine_flops)
  monkeypatch.setattr(metrics, "_cpu_devices_sharing", lambda device: sharing)
  return metrics.peak_flops_per_device(jax.devices("cpu")[0], "float32", cache_dir=cache_dir)


def _cached_machine_peak(cache_dir: Path) -> float:
  [entry] = json.loads((cache_dir / "peak_flops_cpu.json").read_text()).values()
  return entry["peak_flops"]


@given(flops_per_token=st.floats(1e3, 1e12), sharing=st.sampled_from([1, 2, 8]),
       ratios=st.lists(st.floats(0.0, 3.0), min_size=1, max_size=40))
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_mfu_never_exceeds_one_and_a_faster_rate_raises_the_cached_peak(monkeypatch, flops_per_token, sharing,
                                                                        ratios):
  """Steps run at `ratios` x a stale measured peak: MFU stays in [0, 1], and the cached peak only rises, never
  above a rate that was seen, and at least to the slowest of any five consecutive steps that all beat it."""
  machine = 1e11  # what the (stale) measurement found for the whole machine
  with tempfile.TemporaryDirectory() as tmp:
    cache_dir = Path(tmp)
    peak, _ = _measured_peak(monkeypatch, cache_dir, machine, sharing)
    assert peak == machine / sharing
    achieved, cached = [], machine
    for ratio in ratios:
      rate = ratio * machine / sharing / flops_per_token  # tokens/s per device
      achieved.append(flops_per_token * rate)
      value = metrics.mfu(flops_per_token, rate, peak)
      assert 0.0 <= value <= 1.0
      now = _cached_machine_peak(cache_dir)
      assert cached <= now <= max(machine, sharing * max(achieved)) * (1 + 1e-12)
      if len(achieved) >= 5 and sharing * min(achieved[-5:]) > cached:
        assert now >= sharing * min(achieved[-5:]) * (1 - 1e-12)
      assert value == pytest.approx(achieved[-1] / max(now / sharing, achieved[-1]), rel=1e-9, abs=1e-300)
      cached = now
    # The next run (a new process) measures the same stale figure again, and starts from the raised one.
    monkeypatch.setattr(metrics, "_measured", {})
    again, how = metrics.peak_flops_per_device(jax.devices("cpu")[0], "float32", cache_dir=cache_dir)
    assert again == pytest.approx(cached / sharing, rel=1e-12)
    assert ("observed training step" in how) == (cached > machine)


def test_one_fast_step_leaves_the_cached_peak_but_a_sustained_rate_raises_it(monkeypatch, tmp_path):
  peak, _ = _measured_peak(monkeypatch, tmp_path, 1e11)
  for ratio in [0.5, 0.5, 3.0, 0.5, 0.5, 0.5]:  # a step timed too short (after a host stall)
    assert metrics.mfu(1.0, ratio * 1e11, peak) == min(ratio, 1.0)
  assert _cached_machine_peak(tmp_path) == 1e11
  for ratio in [1.2, 1.3, 1.25, 1.2, 1.3]:  # the machine really is faster than measured
    assert metrics.mfu(1.0, ratio * 1e11, peak) <= 1.0
  assert _cached_machine_peak(tmp_path) == pytest.approx(1.25e11)  # the median of the last five steps
  assert metrics.mfu(1.0, 1e11, peak) == pytest.approx(1 / 1.25)


def test_mfu_of_a_datasheet_peak_is_bounded_without_a_cache(tmp_path):
  peak, _ = metrics.peak_flops_per_device(SimpleNamespace(platform="tpu", device_kind="TPU v4"), cache_dir=tmp_path)
  assert metrics.mfu(1e9, 0.5 * peak / 1e9, peak) == pytest.approx(0.5)
  assert metrics.mfu(1e9, 2 * peak / 1e9, peak) == 1.0  # a wrong FLOP count or step time: bounded by itself
  for _ in range(5):
    metrics.mfu(1e9, 2 * peak / 1e9, peak)  # sustained: the bound is raised in memory (and logged)
  assert metrics.mfu(1e9, peak / 1e9, peak) == pytest.approx(0.5)
  assert not list(tmp_path.iterdir())
  assert metrics.mfu(1e9, 2e3, 1e12) == 1.0  # a plain float: the achieved rate bounds this call


def test_measurement_takes_the_best_of_sizes_and_trials(monkeypatch):
  """A burst of load during the first trials, and a size that runs slower, do not lower the measured peak."""
  clock = [0.0]
  rates = {512: 1e11, 1024: 2e11, 2048: 1.5e11}  # the machine's real FLOP/s for each size, unloaded
  calls = []

  class Result:
    def __init__(self, n):
      self.n = n

    def block_until_ready(self):
      calls.append(self.n)
      busy = 3.0 if len(calls) <= 8 else 1.0  # the first calls (warm-up and first rounds) run on a busy machine
      clock[0] += busy * 2 * self.n**3 / rates[self.n]
      return self

  monkeypatch.setattr(metrics.jax, "jit", lambda f: lambda a, b: Result(a.shape[0]))
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
  best = metrics._measure_matmul_flops(jax.devices("cpu")[0], np.dtype("float32"))
  assert best == pytest.approx(max(rates.values()))
  assert len(calls) >= 3 * (1 + metrics._MEASURE_ROUNDS)  # every size: a warm-up, then interleaved rounds


# ---- peak FLOP/s ----

# Published figures, as the vendors state them (per chip; NVIDIA's tensor-core headlines are "with sparsity", twice
# the dense rate). Sources: cloud.google.com/tpu/docs/v2, /v3, /v4, /v5e, /v5p, /v6e ("peak compute per chip");
# the NVIDIA A100, H100, L4 and V100 datasheets (nvidia.com/en-us/data-center/<product>).
SPARSE = 2  # NVIDIA Ampere+ headline tensor-core rates count 2:4 sparsity
CORES = 2  # TPU v2 / v3 chips show each of their 2 TensorCores as a JAX device


@pytest.mark.parametrize(
  "kind, dtype, expected",
  [
    ("TPU v2", "bfloat16", 45e12 / CORES),
    ("TPU v3", "bfloat16", 123e12 / CORES),
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12),  # v5e; not v5p's 459 ("tpu v5" is a shorter pattern)
    ("TPU v5", "bfloat16", 459e12),  # v5p's device_kind
    ("TPU v6 lite", "float32", 918e12),  # DEFAULT precision: float32 matmuls run as bf16 MXU passes
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 624e12 / SPARSE),
    ("NVIDIA A100-SXM4-80GB", "float32", 312e12 / SPARSE),  # TF32
    ("NVIDIA A100 80GB PCIe", "bfloat16", 624e12 / SPARSE),
    ("NVIDIA L4", "bfloat16", 242e12 / SPARSE),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 1979e12 / SPARSE),  # SXM
    ("NVIDIA H100 80GB HBM3", "float32", 989e12 / SPARSE),
    ("NVIDIA H100 PCIe", "bfloat16", 1513e12 / SPARSE),  # not the SXM figure ("h100" is a shorter pattern)
    ("Tesla V100-SXM2-16GB", "bfloat16", 125e12),  # Volta: fp16 tensor cores, no sparsity
    ("Tesla V100-SXM2-16GB", "float32", 15.7e12),  # and plain FP32 cores (no TF32)
    ("Tesla V100-PCIE-32GB", "bfloat16", 112e12),
  ],
)
def test_peak_table_lookup(kind, dtype, expected, tmp_path):
  platform = "tpu" if kind.startswith("TPU") else "gpu"
  device = SimpleNamespace(platform=platform, device_kind=kind)
  peak, how = metrics.peak_flops_per_device(device, dtype, cache_dir=tmp_path)
  assert peak == pytest.approx(expected, rel=2e-3)  # the datasheets round to 3-4 digits
  assert "datasheet" in how and kind in how
  assert not list(tmp_path.iterdir())  # table hits never measure or cache


def test_peak_lookup_longest_pattern_on_word_boundaries():
  """Every row is what its own pattern finds; a longer pattern beats one it contains; no partial-word matches."""
  for pattern, row in hardware.CHIPS.items():
    assert hardware.chip(pattern) is row, pattern
    assert hardware.chip(f"Vendor {pattern.upper().replace(' ', '-')} 96GB") is row, pattern  # case, "-" for " "
  assert hardware.chip("NVIDIA H100 PCIe").bf16 < hardware.chip("NVIDIA H100 80GB HBM3").bf16
  assert hardware.chip("Tesla V100S-PCIE-32GB") is hardware.CHIPS["v100s"]
  assert hardware.chip("NVIDIA A100-SXM4-40GB") is hardware.CHIPS["a100"]  # "a10" stops at a word boundary
  for unknown in ("NVIDIA A10G", "NVIDIA H1000", "TPU v55", "AMD Instinct MI300X", ""):
    assert hardware.chip(unknown) is None and hardware.peak_flops(unknown, "bf16") is None, unknown


def test_peak_table_precision_ratios():
  """TPUs run float32 at the bf16 MXU rate; Ampere and later run TF32 at half their bf16 rate; Volta's FP32 cores
  run at about 1/8 of its fp16 tensor cores. Every row's memory, where given, is a plausible HBM size."""
  for pattern, row in hardware.CHIPS.items():
    if pattern.startswith("tpu"):
      assert row.fp32 == row.bf16, pattern
    elif pattern.startswith("v100"):
      assert 7.5 < row.bf16 / row.fp32 < 8.5, pattern
    else:
      assert row.bf16 / row.fp32 == pytest.approx(2, rel=0.015), pattern
    assert 1e13 < row.bf16 < 1e16 and (row.memory_gib is None or 8 <= row.memory_gib <= 512), pattern


def test_plan_device_memory_matches_the_datasheets():
  """`maxlm plan --device` memory per device, from the same rows as the FLOP/s (sources as above)."""
  published = {"tpu-v4": 32, "tpu-v5e": 16, "tpu-v5p": 95, "tpu-v6e": 32, "h100": 80, "h200": 141, "a100-40": 40,
               "a100-80": 80}
  assert hardware.DEVICE_MEMORY_GIB == published
  for name, row in hardware.PLAN_DEVICES.items():
    assert hardware.CHIPS[row].memory_gib == published[name]
    assert hardware.chip(name) is not None and hardware.chip(name).bf16 == hardware.CHIPS[row].bf16, name


def test_peak_rejects_unknown_dtype():
  with pytest.raises(ValueError, match="int8"):
    metrics.peak_flops_per_device(SimpleNamespace(platform="tpu", device_kind="TPU v4"), "int8")


def test_unknown_accelerator_is_measured(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(metrics, "_measure_matmul_flops", lambda device, dtype: calls.append(dtype) or 1e14)
  device = SimpleNamespace(platform="gpu", device_kind="NVIDIA A10G")  # no entry; not "A10" either
  peak, how = metrics.peak_flops_per_device(device, "bfloat16", cache_dir=tmp_path)
  assert peak == 1e14 and "bfloat16 matmul on gpu" in how  # one accelerator: no sharing of the rate
  assert calls == [np.dtype(jax.numpy.bfloat16)]


def test_the_cache_keeps_the_fastest_measurement_of_any_run(monkeypatch, tmp_path):
  """A figure measured while the machine was busy is replaced by a later, faster one, and never replaces one."""
  for run, (measured, expected) in enumerate([(1e11, 1e11), (4e11, 4e11), (2e11, 4e11), (5e11, 5e11)]):
    monkeypatch.setattr(metrics, "_measured", {})  # a new process
    peak, how = _measured_peak(monkeypatch, tmp_path, measured)
    assert peak == expected and _cached_machine_peak(tmp_path) == expected, run
    assert ("this run measured" in how) == (measured < expected)


def test_cpu_peak_is_measured_once_per_process_and_cached(monkeypatch, tmp_path):
  cpu = jax.devices("cpu")[0]
  peak, how = metrics.peak_flops_per_device(cpu, cache_dir=tmp_path)
  sharing = len(jax.local_devices(backend="cpu"))  # the test session simulates 8 CPU devices on the same cores
  assert peak > 1e8 / sharing and "float32 matmul on cpu" in how
  cache = json.loads((tmp_path / "peak_flops_cpu.json").read_text())
  [(key, entry)] = cache.items()
  assert cpu.device_kind in key and entry["peak_flops"] == pytest.approx(peak * sharing, rel=1e-12)

  def no_measuring(*args):
    raise AssertionError("this process's measurement should have been used")

  monkeypatch.setattr(metrics, "_measure_matmul_flops", no_measuring)
  assert metrics.peak_flops_per_device(cpu, "float32", cache_dir=tmp_path) == (peak, how)
