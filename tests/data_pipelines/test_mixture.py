"""Token-shard mixtures: proportions, exact packing, curriculum, and resume onto a different host count."""

import json

import helpers
import numpy as np
import pytest

from data_pipelines import mixture, tokenized
from data_pipelines.loader import HostBatches

SEQ_LEN = 32
# Token id ranges per source, so every target token says which source it came from.
RANGES = {"web": (10, 500), "code": (500, 1000)}


def _write(root, docs_by_source):
  """A tokenized directory (no tokenizer) holding docs_by_source[name][split] via the real shard writer."""
  return helpers.write_token_shards(root, docs_by_source, lambda name, d: 3 * len(d) if name == "web" else len(d))


def _docs(name, n, rng, max_len=120):
  lo, hi = RANGES[name]
  return [rng.integers(lo, hi, rng.integers(2, max_len)) for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("mix")
  rng = np.random.default_rng(0)
  # Short web documents, long code ones: token shares and piece shares differ.
  docs = {"web": {"train": _docs("web", 150, rng, max_len=24), "eval": _docs("web", 5, rng)},
          "code": {"train": _docs("code", 60, rng, max_len=300), "eval": []}}
  manifest = _write(root, docs)
  splits = {n: tokenized.load_split(root, n, "train", manifest) for n in docs}
  return root, splits, docs


def _source_of(tokens):
  return np.where(tokens >= RANGES["code"][0], 1, 0)


def _segments(batch):
  """(inputs, targets) of every packed segment of a batch."""
  out = []
  for row in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][row]
    for s in np.unique(seg[seg > 0]):
      m = seg == s
      np.testing.assert_array_equal(batch["positions"][row][m], np.arange(m.sum()))  # restart per segment
      out.append((tuple(batch["inputs"][row][m]), tuple(batch["targets"][row][m])))
  return out


def _expected_pieces(docs):
  """Every (inputs, targets) piece of documents cut at SEQ_LEN: each target token exactly once."""
  pieces = []
  for d in docs:
    for start in range(0, max(len(d) - 1, 0), SEQ_LEN):
      chunk = d[start:start + SEQ_LEN + 1]
      pieces.append((tuple(chunk[:-1]), tuple(chunk[1:])))
  return pieces


@pytest.mark.parametrize("unit", ["tokens", "documents"])
def test_mixture_proportions_hold_over_many_batches(data, unit):
  _, splits, _ = data
  mix = mixture.Mixture([splits["web"], splits["code"]], [0.7, 0.3], weight_unit=unit)
  it = mix.iterator(seq_len=SEQ_LEN, batch_size=8, seed=1)
  tokens, pieces = np.zeros(2), np.zeros(2)
  for _ in range(150):
    b = next(it)
    real = b["segment_ids"] > 0
    tokens += np.bincount(_source_of(b["targets"][real]), minlength=2)
    for _, targets in _segments(b):
      pieces[_source_of(np.asarray(targets[:1]))[0]] += 1
  share = (tokens if unit == "tokens" else pieces) / (tokens if unit == "tokens" else pieces).sum()
  assert share[0] == pytest.approx(0.7, abs=0.03), share
  other = (pieces if unit == "tokens" else tokens) / (pieces if unit == "tokens" else tokens).sum()
  assert abs(other[0] - 0.7) > 0.05  # the units differ (code documents are longer): the weights are not a no-op


@pytest.mark.parametrize("curriculum", ["none", "length"])
def test_one_epoch_packs_every_piece_exactly_once_across_streams(data, curriculum):
  _, splits, docs = data
  mix = mixture.Mixture([splits["web"]], [1.0], curriculum=curriculum)
  seen = []
  for j in range(3):
    for b in mix.iterator(seq_len=SEQ_LEN, batch_size=6, seed=3, shard_index=j, shard_count=3, num_epochs=1):
      seen += _segments(b)
  assert sorted(seen) == sorted(_expected_pieces(docs["web"]["train"]))


def test_length_curriculum_goes_from_short_to_long_and_reshuffles_each_epoch(data):
  _, splits, _ = data
  web = splits["web"]
  ranges = mixture.chunk_ranges(web.lengths, SEQ_LEN)
  src = mixture.grain.MapDataset.source(list(range(len(ranges))))
  staged = mixture.StagedShuffle(src, web.lengths[ranges[:, 0]].astype(float), stages=4, seed=0)
  n = len(staged)
  first, second = [staged[i] for i in range(n)], [staged[i] for i in range(n, 2 * n)]
  assert sorted(first) == sorted(second) == list(range(n))  # each epoch is a permutation
  assert first != second  # reshuffled
  lengths = web.lengths[ranges[first, 0]]
  stages = np.array_split(lengths, 4)
  assert all(a.max() <= b.min() for a, b in zip(stages, stages[1:]))  # stages in order of difficulty
  assert len(set(lengths[:n // 4])) > 1  # within a stage the order is shuffled, not sorted
  assert any(np.diff(stages[0]) < 0) or any(np.diff(stages[1]) < 0)


def _run(mix, process_count, steps, state=None, streams=4):
  """`steps` global batches (a sorted tuple of rows each) from `process_count` simulated hosts, and the merged state."""
  hosts = [HostBatches(mix, seq_len=SEQ_LEN, batch_size=8, seed=5, num_packing_bins=4, num_streams=streams,
                       process_index=p, process_count=process_count) for p in range(process_count)]
  if state:
    for h in hosts:
      h.set_state(state)
  out = []
  for _ in range(steps):
    rows = [r for h in hosts for r in map(tuple, np.concatenate([next(h)[k] for k in ("inputs", "segment_ids")], 1))]
    out.append(tuple(sorted(rows)))
  merged = {k: v for h in hosts for k, v in json.loads(json.dumps(h.get_state())).items()}
  return out, merged


@pytest.mark.parametrize("before,after", [(2, 2), (2, 4), (4, 1)])
def test_resume_on_a_different_host_count_yields_exactly_the_remaining_batches(data, before, after):
  _, splits, _ = data
  mix = mixture.Mixture([splits["web"], splits["code"]], [0.5, 0.5], curriculum="tokens_per_byte")
  reference, _ = _run(mix, 1, 14)
  first, state = _run(mix, before, 6)
  rest, _ = _run(mix, after, 8, state)
  assert first + rest == reference  # (14 x 8 rows: the reference crosses the small sources' epoch boundary)


def test_host_counts_that_do_not_divide_the_streams_are_refused(data):
  _, splits, _ = data
  mix = mixture.Mixture([splits["web"]], [1.0])
  with pytest.raises(ValueError, match="cannot be split evenly over 3 processes"):
    HostBatches(mix, seq_len=SEQ_LEN, batch_size=8, seed=0, num_packing_bins=4, num_streams=4, process_count=3)


def test_load_resolves_names_and_rejects_bad_specs(data, tmp_path):
  root, _, _ = data
  (root / tokenized.TOKENIZER_DIR).mkdir(exist_ok=True)
  assert mixture.parse_mixture(" web=3, code=1 ") == {"web": 3.0, "code": 1.0}
  for bad, msg in [("web=-1", "positive"), ("web=x", "not a number"), ("web=1,web=2", "twice")]:
    with pytest.raises(ValueError, match=msg):
      mixture.parse_mixture(bad)
  with pytest.raises(ValueError, match="unknown source.*books.*has web, code"):
    mixture.load(str(root), "books=1")
  with pytest.raises(tokenized.ManifestError, match="no manifest.json"):
    mixture.load(str(tmp_path), "web=1")


def test_eval_documents_come_round_robin_from_the_sources(data):
  root, splits, docs = data
  evals = [tokenized.load_split(root, n, "eval") for n in ("web", "code")]
  td = mixture.TokenizedData(mixture.Mixture([splits["web"]], [1.0]), evals, None, root, "")
  got = td.eval_docs(max_tokens=10**9)
  assert len(got) == len(docs["web"]["eval"])  # code has no eval documents: web's are all used
  np.testing.assert_array_equal(got[0], docs["web"]["eval"][0])
  with pytest.raises(ValueError, match="no eval documents"):
    mixture.TokenizedData(None, evals[1:], None, root, "").eval_docs(100)
