"""`maxlm eval --tasks`: multiple-choice scores equal a transformers forward pass, bits per byte by hand, greedy
generations equal `maxlm generate`, few-shot prompts reproducible, metrics against numpy, and bad task files as
one-line errors before any weights load."""

import json
import math
import statistics

import jax
import numpy as np
import pytest
import torch
from test_eval import EOS, TEXTS, _hf_model, _hf_nll, _import

from maxlm.cli import main as cli_main
from maxlm.eval import task_metrics
from maxlm.eval.tasks import TaskError, context, fewshot_examples, load_task

CHOICE_WORDS = ["import json", "return a + b", "print(i)", "for i in range(3):", "def f(x):", "pass"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(hf model, workdir, hf tokenizer) of a random tiny Llama imported into maxlm (bos prepended by its tokenizer)."""
  model = _hf_model("llama", seed=3)
  work, tok = _import(model, tmp_path_factory.mktemp("tasks"))
  return model, work, tok


def _write_task(root, name: str, spec: dict, records: list[dict], fewshot: list[dict] | None = None):
  (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  spec = {"task": name, "data": f"{name}.jsonl", **spec}
  if fewshot is not None:
    (root / f"{name}_shots.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fewshot))
    spec["fewshot_data"] = f"{name}_shots.jsonl"
  path = root / f"{name}.json"
  path.write_text(json.dumps(spec))
  return path


def _mc_records(n: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [{"context": TEXTS[int(rng.integers(len(TEXTS)))][:int(rng.integers(5, 40))],
           "choices": [str(c) for c in rng.choice(CHOICE_WORDS, size=3, replace=False)],
           "answer": int(rng.integers(3))} for _ in range(n)]


def _run(capsys, *args) -> tuple[int, str, str]:
  code = cli_main(["eval", "--quiet", *map(str, args)])
  out = capsys.readouterr()
  return code, out.out, out.err


def _hf_choice_logprob(model, tok, ctx: str, continuation: str) -> float:
  """The continuation's log-probability after ctx from one transformers pass, the pair split as lm-eval splits it
  (context's trailing whitespace moved to the continuation, continuation = whole[len(context ids):])."""
  stripped = ctx.rstrip()
  continuation = ctx[len(stripped):] + continuation
  ctx_ids, whole = tok(stripped)["input_ids"], tok(stripped + continuation)["input_ids"]
  with torch.no_grad():
    logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
  cont = whole[len(ctx_ids):]
  rows = logp[len(ctx_ids) - 1:]
  return float(rows.gather(1, torch.tensor(cont)[:, None]).sum())


def test_multiple_choice_scores_equal_transformers_and_accuracy_follows(tiny, tmp_path, capsys):
  """Every choice's log-likelihood against a transformers forward pass; acc / acc_norm and their standard errors
  recomputed in numpy from those log-likelihoods; the JSON holds per-sample records and a PNG is written."""
  model, work, tok = tiny
  shots = _mc_records(4, seed=1)
  path = _write_task(tmp_path, "mc", {"type": "multiple_choice", "prompt": "{context}", "choices": "choices",
                                      "answer": "answer"}, _mc_records(6, seed=0), shots)
  code, out, err = _run(capsys, "--workdir", work, "--tasks", path, "--num-fewshot", 2, "--output",
                        tmp_path / "r.json")
  assert code == 0, err
  report = json.loads((tmp_path / "r.json").read_text())
  task = load_task(path)
  result = report["tasks"]["mc"]
  acc, acc_norm = [], []
  for sample in result["samples"]:
    record = task.records[sample["index"]]
    assert sample["prompt"] == context(task, sample["index"], 2, 1234)
    want = [_hf_choice_logprob(model, tok, sample["prompt"], " " + c) for c in record["choices"]]
    np.testing.assert_allclose(sample["logprobs"], want, atol=2e-4)
    lengths = np.array([len(c) for c in record["choices"]], float)
    acc.append(float(np.argmax(want) == record["answer"]))
    acc_norm.append(float(np.argmax(np.array(want) / lengths) == record["answer"]))
  for name, values in (("acc", acc), ("acc_norm", acc_norm)):
    assert result["metrics"][name]["value"] == pytest.approx(np.mean(values))
    assert result["metrics"][name]["stderr"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(len(values)))
  assert (tmp_path / "r.png").stat().st_size > 0
  assert "acc_norm" in out and "mc" in out


def test_perplexity_task_bits_per_byte_by_hand(tiny, tmp_path, capsys):
  model, work, tok = tiny
  path = _write_task(tmp_path, "ppl", {"type": "perplexity", "text": "body"}, [{"body": t} for t in TEXTS])
  code, _, err = _run(capsys, "--workdir", work, "--tasks", path, "--output", tmp_path / "r.json")
  assert code == 0, err
  metrics = json.loads((tmp_path / "r.json").read_text())["tasks"]["ppl"]["metrics"]
  ids = [tok.encode(t) + [EOS] for t in TEXTS]  # bos by the tokenizer's template, eos as training stores documents
  nll = sum(_hf_nll(model, i) for i in ids)
  n_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
  np.testing.assert_allclose(metrics["bits_per_byte"]["value"], nll / math.log(2) / n_bytes, rtol=2e-5)
  np.testing.assert_allclose(metrics["perplexity"]["value"], math.exp(nll / sum(len(i) - 1 for i in ids)), rtol=2e-5)


def test_generation_task_outputs_equal_maxlm_generate(tiny, tmp_path, capsys):
  """Greedy outputs of a generation task (run as one continuous batch) equal `maxlm generate` run on each prompt
  alone; exact match is scored on the regex-extracted answer."""
  _, work, _ = tiny
  records = [{"q": t[:int(n)], "answer": "x"} for t, n in zip(TEXTS, (12, 20, 7, 30), strict=True)]
  path = _write_task(tmp_path, "gen", {"type": "generate", "prompt": "{q}", "target": "answer", "max_tokens": 6,
                                       "stop": ["\n\n"], "regex": r"(\S+)"}, records)
  code, _, err = _run(capsys, "--workdir", work, "--tasks", path, "--output", tmp_path / "r.json")
  assert code == 0, err
  samples = json.loads((tmp_path / "r.json").read_text())["tasks"]["gen"]["samples"]
  for sample in samples:
    assert cli_main(["generate", "--workdir", str(work), "--prompt", sample["prompt"], "--max-tokens", "6",
                     "--stop", "\n\n"]) == 0
    alone = capsys.readouterr().out
    assert alone.rstrip("\n") == (sample["prompt"] + sample["output"]).rstrip("\n")  # generate echoes the prompt
    first = sample["output"].split()
    assert sample["prediction"] == (first[0] if first else "")
    assert sample["exact_match"] == float(sample["prediction"] == "x")


def test_fewshot_draws_are_reproducible_distinct_and_independent_of_limit(tmp_path):
  path = _write_task(tmp_path, "mc", {"type": "multiple_choice", "prompt": "Q {context}", "choices": "choices",
                                      "answer": "answer", "fewshot_delimiter": "\n--\n"}, _mc_records(5, seed=2),
                     _mc_records(9, seed=3))
  task = load_task(path)
  for i in range(5):
    shots = fewshot_examples(task, i, 4, seed=7)
    assert shots == fewshot_examples(load_task(path), i, 4, seed=7)  # a fresh load draws the same
    assert len({json.dumps(s) for s in shots}) == 4 and all(s in task.fewshot for s in shots)
    text = context(task, i, 4, seed=7)
    parts = text.split("\n--\n")
    assert len(parts) == 5 and parts[-1] == "Q " + task.records[i]["context"]
    for part, shot in zip(parts, shots, strict=False):
      assert part == f"Q {shot['context']} {shot['choices'][shot['answer']]}"
  draws = {tuple(json.dumps(s) for s in fewshot_examples(task, 0, 4, seed=s)) for s in range(10)}
  assert len(draws) > 1  # the seed matters
  with pytest.raises(TaskError, match="needs 10 examples but the task has only 9"):
    fewshot_examples(task, 0, 10, seed=0)


def test_metric_helpers_against_direct_computation():
  values = [1.0, 0.0, 1.0, 1.0, 0.0]
  mean, err = task_metrics.mean_stderr(values)
  assert mean == pytest.approx(statistics.mean(values))
  assert err == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
  assert task_metrics.choice_picks([-3.0, -4.0], ["a", "bbbbbb"]) == (0, 1)  # -4/6 > -3/1
  assert task_metrics.extract("so the answer is 42.", r"answer is (\d+)") == "42"
  assert task_metrics.extract("no number", r"answer is (\d+)") == ""
  assert task_metrics.exact_match(" 42\n", ["41", "42"]) and not task_metrics.exact_match("4", ["42"])


@pytest.mark.parametrize("spec, records, message", [
  ({"type": "ranking", "prompt": "{q}"}, [{"q": "a"}], "type must be one of"),
  ({"type": "generate", "prompt": "{q}"}, [{"q": "a"}], "type generate needs target"),
  ({"type": "generate", "prompt": "{q}", "target": "a", "colour": 1}, [{"q": "a", "a": "b"}], "unknown setting"),
  ({"type": "generate", "prompt": "{q} {z}", "target": "a"}, [{"q": "a", "a": "b"}], "lacks"),
  ({"type": "multiple_choice", "prompt": "{q}", "choices": "c", "answer": "a"}, [{"q": "x", "c": ["y"], "a": 0}],
   "at least two strings"),
  ({"type": "multiple_choice", "prompt": "{q}", "choices": "c", "answer": "a"}, [{"q": "x", "c": ["y", "z"], "a": 5}],
   "answer index 5"),
  ({"type": "generate", "prompt": "{q}", "target": "a", "regex": "("}, [{"q": "a", "a": "b"}], "does not compile"),
])
def test_bad_task_files_are_one_line_errors(tiny, tmp_path, capsys, spec, records, message):
  _, work, _ = tiny
  path = _write_task(tmp_path, "bad", spec, records)
  code, _, err = _run(capsys, "--workdir", work, "--tasks", path)
  assert code == 1 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_task_flag_errors(tiny, tmp_path, capsys):
  _, work, _ = tiny
  path = _write_task(tmp_path, "mc", {"type": "multiple_choice", "prompt": "{context}", "choices": "choices",
                                      "answer": "answer"}, _mc_records(2, seed=0))
  code, _, err = _run(capsys, "--workdir", work, "--tasks", path, "--num-fewshot", 1)
  assert code == 1 and "no fewshot_data" in err
  code, _, err = _run(capsys, "--workdir", work, "--tasks", tmp_path / "missing.yaml")
  assert code == 1 and "no such task file" in err
  code, _, err = _run(capsys, "--workdir", work, "--tasks", path, "--data", path)
  assert code == 2 and "separate run" in err
  (tmp_path / "broken.jsonl").write_text('{"context": "a"\n')
  (tmp_path / "broken.json").write_text(json.dumps({"type": "perplexity", "text": "t", "data": "broken.jsonl"}))
  code, _, err = _run(capsys, "--workdir", work, "--tasks", tmp_path / "broken.json")
  assert code == 1 and "broken.jsonl:1: not JSON" in err


def test_training_logs_task_metrics_equal_to_maxlm_eval_on_the_checkpoint(tmp_path, capsys):
  """train.eval_tasks runs every eval: eval_<task>_<metric> lands in metrics.jsonl beside eval_loss at each eval
  step, and the last equals `maxlm eval --tasks` on the saved final checkpoint; a bad task path fails before
  training."""
  from helpers import SMALL_TRAIN

  from maxlm.config import ConfigError, load_config
  from maxlm.metrics import read_metrics
  from maxlm.train.loop import train

  mc = _write_task(tmp_path, "mc", {"type": "multiple_choice", "prompt": "{context}", "choices": "choices",
                                    "answer": "answer"}, _mc_records(4, seed=5))
  ppl = _write_task(tmp_path, "ppl", {"type": "perplexity", "text": "body"}, [{"body": t} for t in TEXTS[:2]])
  args = [*SMALL_TRAIN, "--config.train.steps=4", "--config.train.eval_every=2", "--config.train.checkpoint_every=4",
          f"--config.train.eval_tasks={mc},{ppl}"]
  work = tmp_path / "run"
  train(load_config("tiny", args), work, devices=jax.devices()[:1])
  records = [r for r in read_metrics(work) if "eval_loss" in r]
  assert [r["step"] for r in records] == [2, 4]
  assert all("eval_mc_acc" in r and "eval_mc_acc_norm" in r and "eval_ppl_bits_per_byte" in r for r in records)
  code, _, err = _run(capsys, "--workdir", work, "--tasks", mc, ppl, "--seq-len", 64, "--output", tmp_path / "r.json")
  assert code == 0, err
  final = json.loads((tmp_path / "r.json").read_text())["tasks"]
  assert records[-1]["eval_mc_acc"] == pytest.approx(final["mc"]["metrics"]["acc"]["value"])
  assert records[-1]["eval_ppl_bits_per_byte"] == pytest.approx(final["ppl"]["metrics"]["bits_per_byte"]["value"],
                                                                rel=1e-5)
  with pytest.raises(ConfigError, match="train.eval_tasks: --tasks .*missing.yaml: no such task file"):
    train(load_config("tiny", [*SMALL_TRAIN, f"--config.train.eval_tasks={tmp_path / 'missing.yaml'}"]),
          tmp_path / "bad", devices=jax.devices()[:1])
  assert not (tmp_path / "bad" / "checkpoints").exists() or not any((tmp_path / "bad" / "checkpoints").iterdir())
