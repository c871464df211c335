"""`maxlm eval`: perplexity / bits per byte against transformers on the same tokens, rolling windows scoring every
token exactly once (numpy), a limited-receptive-field model scored in windows equal to one full pass, and errors."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import TINY_BOS, TINY_EOS, TINY_VOCAB, import_tiny_hf_model, tiny_hf_model

from maxlm.cli import main as cli_main
from maxlm.eval.loglikelihood import RowScores, score_documents
from maxlm.eval.windows import rolling_windows

VOCAB, BOS, EOS = TINY_VOCAB, TINY_BOS, TINY_EOS
_hf_model, _import = tiny_hf_model, import_tiny_hf_model  # (also imported from here by test_eval_tasks.py)
TEXTS = [
  "def add(a, b):\n    return a + b\n",
  "import json\nprint(json.dumps({'x': [1, 2, 3]}))\n",
  "The quick brown fox jumps over the lazy dog. Ünïcödé bytes count: € and 🙂.",
  "for i in range(10):\n    if i % 2:\n        continue\n    print(i)\n",
]


def _hf_nll(model, ids: list[int]) -> float:
  """Summed NLL (nats) of ids[1:] given the preceding ids, in one transformers forward pass."""
  with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0, :-1].double()
  return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """(hf model, workdir, tokenizer) of a random tiny Llama imported into maxlm."""
  model = _hf_model("llama")
  work, tok = _import(model, tmp_path_factory.mktemp("llama"))
  return model, work, tok


def _eval(capsys, *args) -> tuple[int, str, str]:
  code = cli_main(["eval", "--quiet", *map(str, args)])
  out = capsys.readouterr()
  return code, out.out, out.err


def test_perplexity_and_bits_per_byte_equal_transformers(llama, tmp_path, capsys):
  """Text file and JSONL sources, one window each: NLL, token count, perplexity and bpb against transformers."""
  model, work, tok = llama
  (tmp_path / "one.txt").write_text(TEXTS[2], encoding="utf-8")
  with open(tmp_path / "many.jsonl", "w", encoding="utf-8") as f:
    for i, text in enumerate(TEXTS):
      f.write(json.dumps({"body": text, "id": i}) + "\n")
  code, out, err = _eval(capsys, "--workdir", work, "--data", f"txt={tmp_path / 'one.txt'}", tmp_path / "many.jsonl",
                         "--text-field", "body", "--output", tmp_path / "r.json")
  assert code == 0, err
  report = json.loads((tmp_path / "r.json").read_text())
  for name, texts in (("txt", TEXTS[2:3]), ("many", TEXTS)):
    ids = [tok.encode(t) + [EOS] for t in texts]  # the template prepends bos, as training saw documents
    assert all(i[0] == BOS for i in ids)
    nll = sum(_hf_nll(model, i) for i in ids)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    got = report["sources"][name]
    assert got["documents"] == len(texts) and got["tokens"] == sum(len(i) - 1 for i in ids)
    assert got["bytes"] == n_bytes
    np.testing.assert_allclose(got["nll"], nll, rtol=2e-5)
    np.testing.assert_allclose(got["perplexity"], math.exp(nll / got["tokens"]), rtol=2e-5)
    np.testing.assert_allclose(got["bits_per_byte"], nll / math.log(2) / n_bytes, rtol=2e-5)
  assert report["total"]["tokens"] == report["sources"]["txt"]["tokens"] + report["sources"]["many"]["tokens"]
  assert report["machine"]["backend"] == "cpu" and report["machine"]["devices"] >= 1
  assert "many" in out and "perplexity" in out and "total" in out


def test_tokenized_split_scores_the_same_documents_as_their_text(llama, tmp_path, capsys):
  """`maxlm tokenize` with the workdir's tokenizer, both splits: together they equal the JSONL's text scores."""
  _, work, _ = llama
  data = tmp_path / "docs.jsonl"
  data.write_text("".join(json.dumps({"text": t * (1 + i)}) + "\n" for i, t in enumerate(TEXTS * 3)))
  assert cli_main(["tokenize", "--quiet", "--output", str(tmp_path / "tok"), f"docs={data}",
                   f"--config.tokenize.tokenizer={work / 'tokenizer'}", "--config.tokenize.eval_fraction=0.5"]) == 0
  capsys.readouterr()
  code, _, err = _eval(capsys, "--workdir", work, "--data", data, "--output", tmp_path / "text.json")
  assert code == 0, err
  text = json.loads((tmp_path / "text.json").read_text())["total"]
  totals = []
  for split in ("train", "eval"):
    code, _, err = _eval(capsys, "--workdir", work, "--tokenized", tmp_path / "tok", "--split", split,
                         "--output", tmp_path / f"{split}.json")
    assert code == 0, err
    totals.append(json.loads((tmp_path / f"{split}.json").read_text())["total"])
  assert all(t["documents"] > 0 for t in totals)
  for key in ("documents", "tokens", "bytes"):
    assert sum(t[key] for t in totals) == text[key], key
  np.testing.assert_allclose(sum(t["nll"] for t in totals), text["nll"], rtol=1e-5)


@pytest.mark.parametrize("seq_len, stride", [(16, 4), (16, 8), (12, 5)])
def test_windows_of_a_limited_receptive_field_model_equal_one_full_pass(seq_len, stride, tmp_path, capsys):
  """Mistral with a 4-token attention window and 2 layers sees at most 7 tokens back; with seq_len - stride + 1 >= 8
  tokens of context for every scored token (and RoPE's relative positions), windows equal transformers' full pass."""
  model = _hf_model("mistral", seed=1, sliding_window=4)
  work, tok = _import(model, tmp_path)
  text = TEXTS[1] + TEXTS[3]
  (tmp_path / "doc.txt").write_text(text)
  ids = tok.encode(text) + [EOS]
  assert len(ids) > 3 * seq_len  # several windows
  code, _, err = _eval(capsys, "--workdir", work, "--data", tmp_path / "doc.txt", "--seq-len", seq_len,
                       "--stride", stride, "--batch-size", 8, "--output", tmp_path / "r.json")
  assert code == 0, err
  got = json.loads((tmp_path / "r.json").read_text())["total"]
  assert got["tokens"] == len(ids) - 1
  np.testing.assert_allclose(got["nll"], _hf_nll(model, ids), rtol=5e-5)


def _bigram_scorer(table: np.ndarray):
  """A numpy 'model' whose next-token log-probabilities depend on the previous token only."""
  def score(inputs, targets, weights):
    logp = table[inputs, targets]
    return RowScores((logp * weights).sum(1), weights.sum(1), np.ones(len(inputs), bool))
  return score


@pytest.mark.parametrize("seed", range(6))
def test_rolling_windows_score_every_token_once_with_enough_context(seed):
  """Random lengths, seq_len and stride: each target j >= 1 is scored by exactly one window, whose inputs end at
  j - 1 and reach back min(j, seq_len - stride + 1) tokens or more; no window exceeds seq_len inputs."""
  rng = np.random.default_rng(seed)
  for _ in range(50):
    n, seq_len = int(rng.integers(0, 200)), int(rng.integers(1, 40))
    stride = int(rng.integers(1, seq_len + 1))
    hits = np.zeros(n, int)
    for w in rolling_windows(n, seq_len, stride):
      assert 0 <= w.start < w.first_scored < w.end <= n and w.length <= seq_len
      for j in range(w.first_scored, w.end):
        hits[j] += 1
        assert j - w.start >= min(j, seq_len - stride + 1)
    assert hits[:1].sum() == 0 and np.all(hits[1:] == 1), (n, seq_len, stride)


@pytest.mark.parametrize("seed", range(4))
def test_rolling_nll_of_a_bigram_model_equals_its_direct_sum(seed):
  """score_documents with any stride and batch size equals the document's bigram log-likelihood summed in numpy,
  and counts len(doc) - 1 tokens per document."""
  rng = np.random.default_rng(seed)
  vocab = 11
  table = np.log(rng.dirichlet(np.ones(vocab), size=vocab))
  docs = [rng.integers(0, vocab, int(n)).astype(np.int32) for n in rng.integers(1, 90, 7)]
  seq_len = int(rng.integers(2, 30))
  scores = score_documents(_bigram_scorer(table), docs, seq_len=seq_len, stride=int(rng.integers(1, seq_len + 1)),
                           batch_size=int(rng.integers(1, 6)))
  np.testing.assert_array_equal(scores.tokens, [len(d) - 1 for d in docs])
  np.testing.assert_allclose(scores.nll, [-table[d[:-1], d[1:]].sum() for d in docs], rtol=1e-12)


@pytest.mark.parametrize("args, code, message", [
  (["--data", "MISSING"], 1, "matches no files"),
  (["--data", "EMPTY"], 1, "holds no documents"),
  ([], 2, "nothing to evaluate"),
  (["--data", "DOC", "--stride", "0"], 2, "--stride must be >= 1"),
  (["--data", "DOC", "--seq-len", "8", "--stride", "9"], 2, "--stride must be in [1, --seq-len=8]"),
  (["--data", "DOC", "--seq-len", "4096"], 2, "longer than the model's context"),
  (["--data", "DOC", "--split", "train"], 2, "--split applies to --tokenized"),
  (["--tokenized", "MISSING"], 1, "no manifest.json"),
])
def test_bad_input_is_a_one_line_error(llama, tmp_path, capsys, args, code, message):
  _, work, _ = llama
  (tmp_path / "empty.jsonl").write_text("\n")
  (tmp_path / "doc.txt").write_text(TEXTS[0])
  paths = {"MISSING": tmp_path / "nope", "EMPTY": tmp_path / "empty.jsonl", "DOC": tmp_path / "doc.txt"}
  got, out, err = _eval(capsys, "--workdir", work, *[paths.get(a, a) for a in args])
  assert (got, out) == (code, "")
  assert err.startswith("maxlm eval: ") and message in err and err.count("\n") == 1, err


def test_a_missing_workdir_is_named(tmp_path, capsys):
  (tmp_path / "doc.txt").write_text(TEXTS[0])
  code, _, err = _eval(capsys, "--workdir", tmp_path / "nope", "--data", tmp_path / "doc.txt")
  assert code == 1 and "nope: no config.json (not a maxlm workdir)" in err and "Traceback" not in err


def test_continuation_logprobs_equal_transformers_full_forward(llama):
  """score_continuations (packed trees of shared contexts, batched, contexts longer than the window truncated on the
  left) equals the continuation's log-probability summed from one transformers forward pass over the same kept
  tokens, and `greedy` says whether every continuation token is that pass's argmax."""
  from maxlm import sharding
  from maxlm.eval.continuations import score_continuations
  from maxlm.eval.loglikelihood import WindowScorer
  from maxlm.workdir import load_model

  hf_model, work, _ = llama
  model, cfg, _ = load_model(work)
  scorer = WindowScorer(model, sharding.config_rules(cfg))
  rng = np.random.default_rng(0)
  seq_len = 40
  requests = [(rng.integers(2, VOCAB, int(n)).tolist(), rng.integers(2, VOCAB, int(m)).tolist())
              for n, m in zip(rng.integers(1, 70, 11), rng.integers(1, 9, 11), strict=True)]
  # choices sharing a context (one tree), one of them a prefix of another, and a shared context too long for the
  # window (each choice keeps its own left-truncated context, so the trees differ by continuation length)
  shared, long_ctx = rng.integers(2, VOCAB, 12).tolist(), rng.integers(2, VOCAB, 60).tolist()
  requests += [(shared, [5, 6, 7]), (shared, [5, 6]), (shared, [9]), (shared, rng.integers(2, VOCAB, 8).tolist()),
               (long_ctx, [3, 4]), (long_ctx, [8, 4]), (long_ctx, [3, 4, 5])]
  # a continuation that is exactly the model's greedy choice, so `greedy` is checked both ways
  ctx = requests[0][0][:seq_len]
  with torch.no_grad():
    requests.append((ctx, [int(hf_model(torch.tensor([ctx])).logits[0, -1].argmax())]))
  got = score_continuations(scorer, requests, seq_len=seq_len, batch_size=scorer.row_multiple)
  for (ctx, cont), lp, greedy in zip(requests, got.logprob, got.greedy, strict=True):
    kept = [*ctx, *cont][-(seq_len + 1):]
    with torch.no_grad():
      logp = torch.log_softmax(hf_model(torch.tensor([kept[:-1]])).logits[0].double(), -1)
    targets = torch.tensor(kept[1:])[-len(cont):]
    rows = logp[-len(cont):]
    want = float(rows.gather(1, targets[:, None]).sum())
    assert lp == pytest.approx(want, abs=2e-4)
    assert bool(greedy) == bool(torch.all(rows.argmax(-1) == targets))
  assert got.greedy[-1]
