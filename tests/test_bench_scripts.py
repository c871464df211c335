"""scripts/bench_host.machine() against independent sources, and scripts/bench_regress's comparison, table and
verdict on hand-made benchmark results (no benchmark runs here)."""

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parent.parent / "scripts"
FIELDS = {"cpu_model", "cpu_id", "cpu_flags", "cpu_count", "usable_cpus", "machine", "kernel", "python", "jax",
          "jaxlib", "flax", "numpy", "torch", "transformers", "xla_flags", "omp_num_threads", "mkl_num_threads",
          "malloc_tuning"}


def _script(name: str):
  """scripts/<name>.py as a module (scripts/ is not a package)."""
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return sys.modules[name]


def _proc_flags() -> set[str]:
  """The first CPU's flags in /proc/cpuinfo (empty off Linux)."""
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return set()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() in ("flags", "Features"):
      return set(value.split())
  return set()


def test_machine_fields_match_independent_sources(monkeypatch):
  bench_host = _script("bench_host")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_test_flag=1")
  monkeypatch.setenv("MKL_NUM_THREADS", "3")
  monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
  m = bench_host.machine(malloc_tuned=True)
  assert set(m) == FIELDS
  json.dumps(m)  # goes into the benchmark JSONs as is
  assert m["cpu_count"] == os.cpu_count()
  if hasattr(os, "sched_getaffinity"):
    assert m["usable_cpus"] == len(os.sched_getaffinity(0))
  assert m["machine"] == os.uname().machine and m["kernel"] == os.uname().release
  assert m["python"] == ".".join(map(str, sys.version_info[:3]))
  for package in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers"):
    assert m[package] == importlib.metadata.version(package)  # all installed in the dev environment
  assert m["xla_flags"] == "--xla_cpu_test_flag=1" and m["mkl_num_threads"] == "3" and m["omp_num_threads"] is None
  assert m["malloc_tuning"] is True and bench_host.machine()["malloc_tuning"] is None
  assert isinstance(m["cpu_model"], str) and m["cpu_model"] == bench_host.cpu_model()
  fields = {}
  if os.path.exists("/proc/cpuinfo"):
    for line in pathlib.Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines():
      key, _, value = line.partition(":")
      fields.setdefault(key.strip(), value.strip())
  if "cpu family" in fields:  # x86
    assert m["cpu_id"].startswith(f"family {fields['cpu family']} model {fields['model']}")
  elif "CPU part" in fields:  # Arm
    assert m["cpu_id"].endswith(f"part {fields['CPU part']}")
  flags = _proc_flags()
  assert isinstance(m["cpu_flags"], list) and all(isinstance(f, str) for f in m["cpu_flags"])
  assert set(m["cpu_flags"]) <= flags
  wanted = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve", "avx512_vnni", "avx512_fp16",
            "amx_int8", "fma", "f16c"}
  assert set(m["cpu_flags"]) == wanted & flags
  assert bench_host._version("no-such-distribution-maxlm-test") is None


def test_bench_host_machine_imports_nothing_heavy():
  code = ("import sys; sys.path.insert(0, sys.argv[1]); import bench_host; bench_host.machine(); "
          "heavy = [m for m in ('jax', 'torch', 'transformers', 'numpy') if m in sys.modules]; "
          "assert not heavy, heavy")
  subprocess.run([sys.executable, "-c", code, str(SCRIPTS)], check=True, timeout=60)


def _rows_by_figure(rows):
  return {r["figure"]: r for r in rows}


def test_compare_flags_regressions_and_missed_targets():
  regress = _script("bench_regress")
  targets = {"train_vocab512": 1.1, "train_vocab32000": 1.1, "decode_batch1": 3.0, "decode_batch8": 2.0}
  baseline = {"train_vocab512": 1.20, "train_vocab32000": 1.30, "decode_batch1": 4.0, "decode_batch8": None}
  new = {"train_vocab512": 1.15,  # 4% below the baseline, above the target: ok
         "train_vocab32000": 1.05,  # 19% below the baseline and below the target
         "decode_batch1": 3.2,  # 20% below the baseline, still above the target
         "decode_batch8": 1.9}  # no baseline, below the target
  rows = regress.compare(baseline, new, 0.15, targets)
  assert [r["figure"] for r in rows] == list(regress.FIGURES)
  by = _rows_by_figure(rows)
  assert by["train_vocab512"]["ok"] and by["train_vocab512"]["meets_target"] and not by["train_vocab512"]["regressed"]
  assert by["train_vocab512"]["change"] == pytest.approx(1.15 / 1.20 - 1)
  assert not by["train_vocab32000"]["ok"] and by["train_vocab32000"]["regressed"]
  assert by["train_vocab32000"]["meets_target"] is False and len(by["train_vocab32000"]["problems"]) == 2
  assert not by["decode_batch1"]["ok"] and by["decode_batch1"]["regressed"] and by["decode_batch1"]["meets_target"]
  assert by["decode_batch8"]["change"] is None and not by["decode_batch8"]["regressed"]
  assert not by["decode_batch8"]["ok"] and by["decode_batch8"]["problems"] == ["below the 2x target"]
  # a looser tolerance lets the 20% drop pass; a run that produced nothing never does
  by = _rows_by_figure(regress.compare(baseline, {**new, "train_vocab512": None}, 0.25, targets))
  assert by["decode_batch1"]["ok"] and not by["decode_batch1"]["regressed"]
  assert not by["train_vocab512"]["ok"] and by["train_vocab512"]["problems"] == ["no result"]
  # only the figures that were run are compared; an improvement is fine
  rows = regress.compare(baseline, {"decode_batch1": 5.0}, 0.15, targets)
  assert len(rows) == 1 and rows[0]["ok"] and rows[0]["change"] == pytest.approx(0.25)
  table = regress.markdown_table(rows)
  assert len(table.splitlines()) == 3 and "+25%" in table and "| ok |" in table
  assert regress.summary(rows, 0.15).startswith("bench_regress: ok") and "busy" not in regress.summary(rows, 0.15)
  assert "kept up to 0.90 cores busy" in regress.summary([{**rows[0], "background_cores": 0.9}], 0.15)


def test_targets_come_from_the_scripts(tmp_path):
  regress = _script("bench_regress")
  t = regress.targets()
  assert set(t) == set(regress.FIGURES) and all(isinstance(v, float) and v >= 1 for v in t.values())
  source = tmp_path / "s.py"
  source.write_text("import os\nA = 1.5\nB: dict = {'x': 2.0}\ndef f():\n  C = 3\n")
  assert regress.script_constant(source, "A") == 1.5 and regress.script_constant(source, "B") == {"x": 2.0}
  with pytest.raises(KeyError):
    regress.script_constant(source, "C")  # not module level


def _train_doc(r512: float, r32k: float, cpu: str | None) -> dict:
  verdicts = {"512": {"attention": "xla", "ratio_vs_torch": r512},
              "32000": {"attention": "xla", "ratio_vs_torch": r32k}}
  results = [{"vocab": v, "framework": f, "background_cores": 0.1 * i} for i, (v, f) in
             enumerate([(512, "maxlm"), (512, "torch"), (32000, "maxlm"), (32000, "torch")])]
  meta = {"cpu_count": 2, "machine": "x86_64", **({"cpu_model": cpu} if cpu else {})}
  return {"meta": meta, "verdicts": verdicts, "results": results}


def _decode_doc(r1: float, r8: float) -> dict:
  return {"meta": {"cpu_count": 2, "machine": "x86_64"}, "machine": {"cpu_model": "Now CPU (avx2)"},
          "hf": [{"batch": 1, "background_cores": 0.0}, {"batch": 8, "background_cores": 0.5}],
          "verdicts": {"hf_ratio_batch1": {"value": r1, "target": 3.0, "met": r1 >= 3},
                       "hf_ratio_batch8": {"value": r8, "target": 2.0, "met": r8 >= 2}}}


def test_ratios_and_cpu_from_benchmark_json():
  regress = _script("bench_regress")
  doc = _train_doc(1.08, 1.12, None)
  assert regress.ratios("train", doc) == {"train_vocab512": 1.08, "train_vocab32000": 1.12}
  assert regress.background("train", doc) == {"train_vocab512": pytest.approx(0.1),  # the busier of the two sides
                                              "train_vocab32000": pytest.approx(0.3)}
  assert regress.doc_cpu(doc) == "x86_64, 2 CPUs (model not recorded)"
  assert regress.doc_cpu(_train_doc(1, 1, "Old CPU (avx2)")) == "Old CPU (avx2)"
  doc = _decode_doc(4.06, 2.33)
  assert regress.ratios("decode", doc) == {"decode_batch1": 4.06, "decode_batch8": 2.33}
  assert regress.background("decode", doc) == {"decode_batch1": 0.0, "decode_batch8": 0.5}
  assert regress.doc_cpu(doc) == "Now CPU (avx2)"
  doc["machine"]["cpu_id"] = "family 25 model 17 stepping 1"  # two hosts behind one model name are told apart
  assert regress.doc_cpu(doc) == "Now CPU (avx2) [family 25 model 17 stepping 1]"
  assert regress.ratios("decode", {}) == {"decode_batch1": None, "decode_batch8": None}  # a failed run


@pytest.mark.parametrize("no_fail", [False, True])
def test_main_compares_writes_and_exits(tmp_path, monkeypatch, capsys, no_fail):
  regress = _script("bench_regress")
  base_train, base_decode = tmp_path / "base_train.json", tmp_path / "base_decode.json"
  base_train.write_text(json.dumps(_train_doc(1.10, 1.15, "Old CPU (avx2)")))
  base_decode.write_text(json.dumps(_decode_doc(4.0, 2.3)))
  fresh = {"train": _train_doc(1.12, 1.16, "Now CPU (avx2)"), "decode": _decode_doc(3.0, 2.4)}  # batch 1: -25%
  ran = []

  def fake_run(section, out, quick):
    ran.append((section, out, quick))
    return {"section": section, "command": f"bench_{section}.py", "argv": [], "returncode": 0, "elapsed_s": 1.0,
            "out": str(out), "machine": None, "doc": fresh[section], "tail": []}

  monkeypatch.setattr(regress, "run_benchmark", fake_run)
  out = tmp_path / "regress.json"
  code = regress.main(["--out", str(out), "--baseline-train", str(base_train), "--baseline-decode", str(base_decode),
                       "--quick", *(["--no-fail"] if no_fail else [])])
  assert code == (0 if no_fail else 1)
  assert [(s, q) for s, _, q in ran] == [("train", True), ("decode", True)]
  assert {o.name for _, o, _ in ran} == {"regress_train.json", "regress_decode.json"}
  res = json.loads(out.read_text())
  assert set(res["machine"]) == FIELDS and out.with_suffix(".png").stat().st_size > 0
  assert not res["verdict"]["ok"] and [r["figure"] for r in res["rows"] if not r["ok"]] == ["decode_batch1"]
  assert res["rows"][0]["baseline_cpu"] == "Old CPU (avx2)" and res["rows"][0]["background_cores"] == pytest.approx(0.1)
  printed = capsys.readouterr().out
  assert "REGRESSION: 25% below the baseline 4.00x" in printed
  assert printed.strip().splitlines()[-1].startswith("bench_regress: REGRESSION in 1 of 4 figures")


def test_main_refuses_to_overwrite_a_baseline(tmp_path):
  regress = _script("bench_regress")
  with pytest.raises(SystemExit, match="overwrite the baseline"):
    regress.main(["--out", str(tmp_path / "bench.json"), "--baseline-train", str(tmp_path / "bench_train.json")])


def _harness_result(ll_a, ll_b, gen_a, gen_b, rolling_a, rolling_b):
  """Hand-made simple_evaluate results (logged samples) of the maxlm and hf backends on three tasks."""
  def doc(resps):
    return {"doc_id": 0, "resps": resps}
  samples = [{"mc": [doc([[(v, g)] for v, g in ll])], "gen": [doc([[t] for t in gen])], "ppl": [doc([[r]])]}
             for ll, gen, r in ((ll_a, gen_a, rolling_a), (ll_b, gen_b, rolling_b))]
  return [{"samples": s, "results": {"mc": {"acc,none": 1.0, "acc_stderr,none": 0.1, "alias": "mc"}}}
          for s in samples]


def test_bench_eval_compares_requests_and_reports_speedups(tmp_path):
  bench = _script("bench_eval")
  ours, theirs = _harness_result([(-1.0, True), (-3.0, False)], [(-1.0004, True), (-2.9, True)], ["a", "b"],
                                 ["a", "c"], -50.0, -50.002)
  agreement = bench.compare(ours, theirs)
  assert agreement["loglikelihood_requests"] == 2 and agreement["loglikelihood_max_abs_diff"] == pytest.approx(0.1)
  assert agreement["loglikelihood_rolling_max_abs_diff"] == pytest.approx(0.002)
  assert agreement["greedy_mismatches"] == 1 and (agreement["choices"], agreement["choice_mismatches"]) == (1, 0)
  assert (agreement["generations"], agreement["generation_mismatches"]) == (2, 1)
  assert bench.metrics(ours) == {"mc": {"acc,none": 1.0}}
  runs = [{"backend": b, "run": r, "seconds": s, "loglikelihood": s / 2, "loglikelihood_rolling": s / 4,
           "generate_until": s / 4, "background_cores": 0.0}
          for b, r, s in (("maxlm", "cold", 100.0), ("hf", "cold", 250.0), ("maxlm", "warm1", 50.0),
                          ("hf", "warm1", 240.0))]
  speed = bench.speedups(runs)
  assert speed["cold"]["total"] == pytest.approx(2.5) and speed["warm1"]["generate_until"] == pytest.approx(4.8)
  res = {"harness": {"runs": runs, "speedup": speed, "load_seconds": {"maxlm": 3.0, "hf": 1.0},
                     "requests": {"loglikelihood": 2, "loglikelihood_rolling": 1, "generate_until": 2},
                     "agreement": agreement, "metrics": {"maxlm": bench.metrics(ours), "hf": bench.metrics(theirs)},
                     "settings": {"model": "m", "batch_size": 8}},
         "machine": {"cpu_model": "Some CPU (avx2)"},
         "tasks": {"limit": 4, "tasks_dir": "/x/local_tasks", "models": {
           m: {"seconds": 9.0, "tasks": {
             "mc": {"type": "multiple_choice", "samples": 4, "seconds": 2.0,
                    "metrics": {"acc": {"value": 0.5, "stderr": 0.25}, "acc_norm": {"value": 0.75, "stderr": 0.2}}},
             "ppl": {"type": "perplexity", "samples": 4, "seconds": 1.0,
                     "metrics": {"bits_per_byte": {"value": 1.25, "stderr": None}}}}} for m in ("a", "b")}}}
  res["verdicts"] = bench.verdicts(res)
  assert res["verdicts"]["harness_speedup_cold"]["met"] and res["verdicts"]["harness_speedup_cold"]["value"] == 2.5
  table = bench.tables(res)
  assert "| maxlm | cold | 50.0 | 25.0 | 25.0 | 100.0 | 2.50x | 0.00 |" in table and "| mc | acc,none |" in table
  assert "| b | mc | multiple_choice | 4 | acc_norm | 0.7500 | 0.2000 | 2.0 |" in table
  assert "| a | ppl | perplexity | 4 | bits_per_byte | 1.2500 |  | 1.0 |" in table
  bench.plot(res, tmp_path / "eval.png")
  assert (tmp_path / "eval.png").stat().st_size > 0
  args = bench.parse_args(["--limit", "3", "--warm-runs", "0"])
  assert (args.sections, args.limit, args.warm_runs, args.batch_size) == (["harness", "tasks"], 3, 0, 8)
  assert args.task_models == ["smollm2-135m", "qwen2.5-coder-0.5b"] and args.task_limit == 40
  with pytest.raises(SystemExit):
    bench.parse_args(["--sections", "nope"])
