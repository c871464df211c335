"""scripts/profile_step.py's trace aggregation on hand-made Chrome trace events (no jax, no profiler run)."""

import importlib.util
import pathlib
import sys

import pytest


def _load():
  """scripts/profile_step.py as a module (scripts/ is not a package); importing it leaves XLA_FLAGS alone."""
  if "profile_step" not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        "profile_step", pathlib.Path(__file__).resolve().parent.parent / "scripts" / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
  return sys.modules["profile_step"]


ps = _load()
PY, EIGEN_A, EIGEN_B, CLIENT = 10, 20, 21, 30


def meta(tid, name):
  return {"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": name}}


def x(tid, name, ts, dur, **args):
  return {"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": ts, "dur": dur, **({"args": args} if args else {})}


def events():
  """Two marked steps of 100 us; umbrella, completion, python and container events that are not op time."""
  return [
    meta(PY, "python"), meta(EIGEN_A, "tf_XLAEigen/123"), meta(EIGEN_B, "tf_XLAEigen/456"),
    meta(CLIENT, "tf_XLAPjRtCpuClient/789"),
    # step 1: [0, 100]
    x(PY, "profile_step", 0, 100), x(PY, "$engine.py:161 step", 0, 100), x(PY, "PjitFunction(run)", 5, 10),
    x(PY, "$numpy asarray", 40, 55), x(PY, "CommonPjRtBuffer::Await", 50, 10),  # nested wait: counted once
    x(CLIENT, "ThunkExecutor::Execute (wait for completion)", 8, 87), x(CLIENT, "jit_run", 9, 85),
    x(EIGEN_A, "ThunkExecutor::Execute", 10, 80),
    x(EIGEN_A, "dot.1", 10, 20), x(EIGEN_A, "end: dot.1", 29, 1), x(EIGEN_A, "fusion.2", 30, 5),
    x(EIGEN_A, "while.3", 40, 40), x(EIGEN_A, "copy.4", 45, 10),
    x(EIGEN_A, "select_dynamic-update-slice_fusion.5", 60, 10),
    x(EIGEN_B, "dot.6", 20, 30), x(EIGEN_B, "wrapped_scatter", 50, 2),
    # step 2: [200, 300]
    x(PY, "profile_step", 200, 100), x(PY, "$numpy asarray", 230, 60),
    x(EIGEN_A, "dot.1", 210, 30), x(EIGEN_A, "copy.4", 240, 10),
    x(CLIENT, "bitcast_transpose_fusion.7", 250, 10),
    # after the last step: not counted
    x(EIGEN_A, "dot.1", 400, 10),
  ]


def by_name(rows):
  return {r["name"]: r for r in rows}


def test_aggregate_matches_hand_computation():
  r = ps.aggregate(events())
  assert r["steps"] == 2
  assert r["wall_ms"] == pytest.approx(0.1)
  # leaves: 20 + 5 + 10 + 10 + 30 + 2 (step 1) + 30 + 10 + 10 (step 2) = 127 us over 9 ops
  assert r["op_ms"] == pytest.approx(0.0635)
  assert r["ops"] == pytest.approx(4.5)
  # covered by any op (the while included): [10, 80] in step 1, [210, 260] in step 2 -> 120 us of 200
  assert r["xla_busy_ms"] == pytest.approx(0.06)
  assert r["uncovered_share"] == pytest.approx(0.4)
  assert r["container_ms"] == pytest.approx(0.02)
  # waits: [40, 95] and [230, 290] -> 115 us; host = 200 - 115
  assert r["python_wait_ms"] == pytest.approx(0.0575)
  assert r["python_host_ms"] == pytest.approx(0.0425)
  assert r["threads"] == {"tf_XLAEigen": {"threads": 2, "op_ms": pytest.approx(0.0585)},
                          "tf_XLAPjRtCpuClient": {"threads": 1, "op_ms": pytest.approx(0.005)}}
  cats = by_name(r["categories"])
  assert list(cats) == ["dot", "copy", "fusion: bitcast_transpose", "fusion: select_dynamic-update-slice", "fusion",
                        "scatter"]
  assert cats["dot"]["ms"] == pytest.approx(0.04) and cats["dot"]["count"] == pytest.approx(1.5)
  assert cats["dot"]["share"] == pytest.approx(80 / 127)
  assert cats["copy"]["ms"] == pytest.approx(0.01) and cats["copy"]["count"] == pytest.approx(1.0)
  assert cats["fusion"]["ms"] == pytest.approx(0.0025)
  assert cats["scatter"]["ms"] == pytest.approx(0.001) and cats["scatter"]["count"] == pytest.approx(0.5)
  assert sum(c["share"] for c in cats.values()) == pytest.approx(1.0)
  instrs = by_name(r["instructions"])
  assert [i["name"] for i in r["instructions"][:3]] == ["dot.1", "dot.6", "copy.4"]
  assert instrs["dot.1"]["ms"] == pytest.approx(0.025) and instrs["dot.1"]["count"] == pytest.approx(1.0)
  assert instrs["wrapped_scatter"]["category"] == "scatter"
  assert not {"while.3", "end: dot.1", "jit_run", "ThunkExecutor::Execute"} & set(instrs)


def test_aggregate_uses_hlo_op_args_when_present():
  evs = [meta(PY, "python"), meta(EIGEN_A, "tf_XLAEigen/1"), x(PY, "profile_step", 0, 50),
         x(EIGEN_A, "dot.1", 0, 10, hlo_op="dot.1"), x(EIGEN_A, "Unrelated", 10, 10),
         x(EIGEN_A, "ynn_fusion.2", 20, 20, hlo_op="ynn_fusion.2")]
  r = ps.aggregate(evs)
  assert r["op_ms"] == pytest.approx(0.03) and r["ops"] == 2
  assert by_name(r["categories"])["dot"]["count"] == 2
  assert r["uncovered_share"] == pytest.approx(1 - 30 / 50)


@pytest.mark.parametrize("name, cat", [
  ("dot.183", "dot"), ("ynn_fusion.7", "dot"), ("custom-call.3", "dot"), ("fusion.12", "fusion"),
  ("select_dynamic-update-slice_fusion.15", "fusion: select_dynamic-update-slice"), ("copy.120", "copy"),
  ("wrapped_copy", "copy"), ("wrapped_scatter", "scatter"), ("gather.2", "gather"), ("sort.1", "sort"),
  ("wrapped_reduce-window.1", "other: reduce-window"), ("while.51", "other: while")])
def test_category(name, cat):
  assert ps.category(name) == cat


def test_enable_xla_traceme_keeps_existing_flags():
  env = {"XLA_FLAGS": "--xla_foo=1"}
  assert ps.enable_xla_traceme(env) == f"--xla_foo=1 {ps.XPROF_FLAG}"
  assert ps.enable_xla_traceme(env) == f"--xla_foo=1 {ps.XPROF_FLAG}"  # idempotent
  assert ps.enable_xla_traceme({}) == ps.XPROF_FLAG


def test_compare_lists_both_runs():
  def run(evs, label):
    evs = [{**e, "ts": e["ts"] * 1000, "dur": e["dur"] * 1000} if e["ph"] == "X" else e for e in evs]  # ms
    return {"label": label, "workloads": {"w": {**ps.aggregate(evs), "unit": "step"}}}

  first_dot = next(i for i, e in enumerate(events()) if e.get("name") == "dot.1")
  before = run(events(), "before")
  after = run([e for i, e in enumerate(events()) if i != first_dot], "after")
  text = ps.compare(after, before)
  assert "| | before ms/step | after ms/step | ratio |" in text
  assert "| dot | 40.00 | 30.00 | 0.75x |" in text  # 80 ms of dots over 2 steps, then 60
  assert "| copy | 10.00 | 10.00 | 1.00x |" in text
