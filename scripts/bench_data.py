"""Data pipeline benchmarks on real text (installed here, or committed), one section per pipeline part.

Sections (`--sections`, default all):
  curate   MB/s of each `maxlm curate` stage (normalize, exact dedup, language id, quality, near dedup, PII) and of
           the whole `curate()` pipeline end to end, on multilingual prose (English, German, Spanish, Italian: the
           Debian fortunes if installed, else the tests' prose fixture, tests/data_pipelines/fixtures/prose) and
           the default corpus (Python stdlib sources and docs, `data_pipelines.sources.default_documents`).
  minhash  Near-duplicate detection with ground truth: real documents (default corpus, chunked) plus planted
           near-duplicates at several Jaccard levels, ours (the pipeline's batched MinHash + LSH) vs datasketch
           (MinHash + MinHashLSH) at the same threshold and num_perm: recall, precision and docs/s on one core.
  loader   `maxlm tokenize` of two real sources (default corpus, that prose) into ArrayRecord shards, then the grain
           loader's packed tokens/s over their 70/30 mixture vs the tokens/s a tiny training run consumes from
           the same shards (target >= 10x), and the cost of a save/restore of the loader state.

Run:  python scripts/bench_data.py            (smoke run: --quick)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from bench_host import cpu_model, machine, parse_sections  # noqa: E402  (scripts/ is on sys.path when a benchmark runs)

from data_pipelines import sources  # noqa: E402
from data_pipelines.curate import dedup, minhash, normalize, pii, pipeline, quality  # noqa: E402
from data_pipelines.curate.language import LanguageFilter  # noqa: E402

FORTUNES = sources.FORTUNES_DIR
# The committed prose the tests use (CC0; see its README): the fallback where the fortunes packages are not installed.
PROSE_FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "data_pipelines" / "fixtures" / "prose"
_WORDS = re.compile(r"\w+")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
  p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
  p.add_argument("--corpus-mb", type=float, default=16.0, help="default-corpus megabytes for the curate section")
  p.add_argument("--docs", type=int, default=20000, help="documents of the minhash section (base + planted)")
  p.add_argument("--threshold", type=float, default=None, help="near-dup Jaccard threshold (default: the config's)")
  p.add_argument("--num-perm", type=int, default=128)
  p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is kept)")
  p.add_argument("--out", default=None, help="JSON path (default bench_results/bench_data[_quick].json)")
  args = p.parse_args(argv)
  if args.quick:
    args.corpus_mb, args.docs, args.repeats = 2.0, 3000, 1
  args.sections = parse_sections(p, args.sections, SECTIONS)
  args.out = args.out or f"bench_results/bench_data{'_quick' if args.quick else ''}.json"
  return args


def _curate_config(overrides: list[str] | None = None):
  """The curate config of the `tiny` preset (the defaults of configs/base.py) with overrides."""
  from maxlm.config import load_config  # noqa: PLC0415

  return load_config("tiny", [f"--config.curate.{o}" for o in overrides or []]).curate


def _pin_one_core() -> int | None:
  """Restrict this process to one CPU (the first allowed): single-thread timings; returns it (None if unsupported)."""
  if not hasattr(os, "sched_setaffinity"):
    return None
  core = min(os.sched_getaffinity(0))
  os.sched_setaffinity(0, {core})
  return core


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
  """Fastest wall time of `repeats` runs of fn (the least disturbed by the rest of the machine)."""
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


# ---------------------------------------------------------------------------------------------------------------
# Corpora


def prose_documents(min_chars: int = 1500) -> tuple[str, dict[str, list[str]]]:
  """("fortunes" or "prose", documents of consecutive records (>= min_chars) per language): the Debian fortunes
  where the fortunes, fortunes-de, -es and -it packages are installed, else the test suite's prose fixture."""
  if all((FORTUNES / sub).is_dir() for sub in ("de", "es")):
    return "fortunes", fortune_documents(min_chars)
  groups = {}
  for path in sorted(PROSE_FIXTURE.glob("*.txt")):
    current: list[str] = []
    groups[path.stem] = []
    for record in path.read_text(encoding="utf-8").split("\n\n"):
      current.append(record.strip("\n"))
      if sum(map(len, current)) >= min_chars:
        groups[path.stem].append("\n\n".join(current))
        current = []
  return "prose", groups


def fortune_documents(min_chars: int = 1500) -> dict[str, list[str]]:
  """Fortunes grouped into documents of consecutive records (>= min_chars), per language; offensive ones skipped."""
  groups = {"en": [], "de": [], "es": [], "it": []}
  italian = {"italia", "leggi", "definizioni", "formiche", "itatrek", "misfortune", "it"}
  for path in sorted(FORTUNES.rglob("*")):
    rel = path.relative_to(FORTUNES)
    if not path.is_file() or path.suffix in (".dat", ".u8") or "off" in rel.parts or path.name.endswith("-pre"):
      continue
    lang = rel.parts[0] if rel.parts[0] in ("de", "es", "it") else ("it" if rel.name in italian else "en")
    current: list[str] = []
    for record in sources.fortune_records(path):
      current.append(record)
      if sum(map(len, current)) >= min_chars:
        groups[lang].append("\n\n".join(current))
        current = []
  return groups


def corpus_documents(max_mb: float) -> list[str]:
  """Default-corpus documents (stdlib sources and Python docs) up to max_mb megabytes."""
  return [doc.text for doc in sources.default_documents(int(max_mb * 2**20))]


# ---------------------------------------------------------------------------------------------------------------
# Section: curate


def bench_curate(args: argparse.Namespace) -> dict:
  """MB/s of each curate stage function on multilingual prose and the default corpus, and of curate() end to end."""
  cfg = _curate_config()
  prose_name, prose = prose_documents()
  corpora = {f"{prose_name}-{lang}": docs for lang, docs in prose.items() if docs}
  corpora["default-corpus"] = corpus_documents(args.corpus_mb)
  if args.quick:
    corpora = {k: v[:400] for k, v in corpora.items()}
  language = LanguageFilter([], cfg.language.min_confidence)
  rules = pipeline._Stages(cfg).rules
  nd = cfg.near_dedup
  hasher = minhash.MinHasher(nd.num_perm, nd.seed)
  rows = []
  for name, raw in corpora.items():
    texts = [normalize.normalize(t) for t in raw]
    texts = [t for t in texts if t]
    mb_raw = sum(len(t.encode("utf-8")) for t in raw) / 1e6
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6

    def near_dedup(texts=texts) -> None:
      index = dedup.NearDupIndex.for_threshold(nd.threshold, nd.num_perm)
      for start in range(0, len(texts), pipeline._WINDOW_DOCS):  # the pipeline's batches
        sigs = hasher.text_signatures(texts[start:start + pipeline._WINDOW_DOCS], nd.shingle_size, nd.shingle_unit)
        keys = dedup.band_keys(sigs, index.bands, index.rows)
        for i, (sig, key) in enumerate(zip(sigs, keys)):
          index.add(start + i, sig, key)

    def exact(texts=texts) -> None:
      seen: set[bytes] = set()
      for t in texts:
        seen.add(normalize.dedup_key(t, normalized=True))

    stages = {
      "normalize": (lambda raw=raw: [normalize.normalize(t) for t in raw], mb_raw),
      "exact_dedup": (exact, mb),
      "language": (lambda texts=texts: [language.keep_reason(t) for t in texts], mb),
      "quality": (lambda texts=texts: [quality.check(t, rules) for t in texts], mb),
      "near_dedup": (near_dedup, mb),
      "pii": (lambda texts=texts: [pii.redact(t) for t in texts], mb),
    }
    row = {"corpus": name, "documents": len(raw), "mb": mb_raw}
    for stage, (fn, size) in stages.items():
      row[f"{stage}_mb_s"] = size / _best_seconds(fn, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
      path = Path(tmp) / "docs.jsonl"
      path.write_text("".join(json.dumps({"text": t}) + "\n" for t in raw))
      full = _curate_config(["pii.enabled=true"])
      t = time.perf_counter()
      stats = pipeline.curate([str(path)], Path(tmp) / "out", full, progress=False)
      row["curate_mb_s"] = mb_raw / (time.perf_counter() - t)
    row["kept_documents"] = sum(v["documents"] for v in stats["languages"].values())
    rows.append(row)
    print(f"[curate] {name}: {len(raw)} docs, {mb_raw:.1f} MB, end to end {row['curate_mb_s']:.2f} MB/s", flush=True)
  stage_names = ["normalize", "exact_dedup", "language", "quality", "near_dedup", "pii", "curate"]
  lines = ["| corpus | docs | MB | " + " | ".join(f"{s} MB/s" for s in stage_names) + " | kept |",
           "|---|---:|---:|" + "---:|" * (len(stage_names) + 1)]
  for r in rows:
    lines.append(f"| {r['corpus']} | {r['documents']} | {r['mb']:.1f} | "
                 + " | ".join(f"{r[f'{s}_mb_s']:.2f}" for s in stage_names) + f" | {r['kept_documents']} |")
  note = ("stage = its function alone over every normalized document of the corpus (best of "
          f"{args.repeats}); curate = `curate()` end to end (read JSONL .. write shards, PII on), one run")
  return {"rows": rows, "table": "\n".join(lines), "note": note}


# ---------------------------------------------------------------------------------------------------------------
# Section: minhash


def _planted_corpus(num_docs: int, words_per_doc: int, threshold: float, rng: np.random.Generator):
  """Shuffled texts: default-corpus chunks plus near-duplicates planted at Jaccard levels around the threshold."""
  base: list[list[str]] = []
  seen: set[tuple[str, ...]] = set()
  num_base = int(num_docs * 0.7)
  for doc in sources.default_documents(None):
    words = doc.text.split()
    for start in range(0, len(words) - words_per_doc + 1, words_per_doc):
      chunk = words[start:start + words_per_doc]
      head = tuple(chunk[:40])
      if head in seen:  # crude: skip chunks that repeat an earlier chunk's opening
        continue
      seen.add(head)
      base.append(chunk)
    if len(base) >= num_base:
      break
  base = base[:num_base]
  levels = (0.5, 0.7, 0.8, 0.85, 0.9, 0.95)
  planted = []
  for i in range(num_docs - len(base)):
    source = int(rng.integers(len(base)))
    level = levels[i % len(levels)]
    words = list(base[source])
    # Replacing k scattered words breaks ~5k word-5-grams: J ~ (n - 5k) / (n + 5k).
    k = max(1, int(round(len(words) * (1 - level) / (5 * (1 + level)))))
    for pos in rng.choice(len(words), size=k, replace=False):
      words[pos] = f"planted{int(rng.integers(1 << 40))}"
    planted.append((" ".join(words), source, level))
  texts = [" ".join(w) for w in base] + [t for t, _, _ in planted]
  order = rng.permutation(len(texts))
  return [texts[i] for i in order], levels


def _truth(sets: list[np.ndarray], threshold: float) -> tuple[set[tuple[int, int]], int]:
  """All pairs (later, earlier) with exact Jaccard >= threshold, via a sparse shingle-incidence product."""
  from scipy import sparse  # noqa: PLC0415

  vocab, inverse = np.unique(np.concatenate(sets), return_inverse=True)
  sizes = np.array([len(s) for s in sets])
  rows = np.repeat(np.arange(len(sets)), sizes)
  incidence = sparse.csr_matrix((np.ones(len(rows), np.int32), (rows, inverse)), shape=(len(sets), len(vocab)))
  shared = sparse.triu(incidence @ incidence.T, k=1).tocoo()
  a, b, inter = shared.row, shared.col, shared.data
  jac = inter / (sizes[a] + sizes[b] - inter)
  keep = jac >= threshold
  return {(int(j), int(i)) for i, j in zip(a[keep], b[keep])}, int(len(a))


def _ours(texts: list[str], threshold: float, num_perm: int) -> tuple[list[list[int]], float]:
  """The pipeline's near dedup: batched shingles + signatures + band keys, index.add per document in order."""
  t = time.perf_counter()
  hasher = minhash.MinHasher(num_perm)
  index = dedup.NearDupIndex.for_threshold(threshold, num_perm)
  found: list[list[int]] = []
  batch = pipeline._WINDOW_DOCS
  for start in range(0, len(texts), batch):
    sigs = hasher.text_signatures(texts[start:start + batch])
    keys = dedup.band_keys(sigs, index.bands, index.rows)
    for i, (sig, key) in enumerate(zip(sigs, keys)):
      rep = index.add(start + i, sig, key)
      found.append([] if rep is None else [rep])
  return found, time.perf_counter() - t


def _ours_per_doc(texts: list[str], threshold: float, num_perm: int) -> float:
  """Seconds of the unbatched per-document path (shingles + signature + add), for reference."""
  t = time.perf_counter()
  hasher = minhash.MinHasher(num_perm)
  index = dedup.NearDupIndex.for_threshold(threshold, num_perm)
  for i, text in enumerate(texts):
    index.add(i, hasher.signature(minhash.shingles(text)))
  return time.perf_counter() - t


def _datasketch(texts: list[str], threshold: float, num_perm: int, shared: bool = False):
  """datasketch MinHash (update_batch over the same word 5-grams, as bytes) + MinHashLSH query / insert.

  As documented, MinHash(num_perm) per document (which draws its permutations each time); shared=True passes one
  set of permutations to every MinHash instead (a faster use of the same API)."""
  try:
    import datasketch  # noqa: PLC0415
  except ImportError:
    raise SystemExit("the minhash section needs datasketch: pip install 'datasketch>=1.6,<3' "
                     "(or pip install -e '.[dev]')") from None
  t = time.perf_counter()
  lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm)
  template = datasketch.MinHash(num_perm=num_perm)  # its permutations are shared, not regenerated per document
  permutations, scheme = template.permutations, template.scheme
  found: list[list[int]] = []
  for i, text in enumerate(texts):
    words = _WORDS.findall(text.lower())
    grams = [" ".join(words[j:j + 5]).encode("utf-8") for j in range(max(1, len(words) - 4))] if words else []
    if shared:
      m = datasketch.MinHash(num_perm=num_perm, permutations=permutations, scheme=scheme)
    else:
      m = datasketch.MinHash(num_perm=num_perm)
    m.update_batch(grams)
    hits = lsh.query(m)
    if hits:
      found.append(sorted(hits))
    else:
      lsh.insert(i, m)
      found.append([])
  return found, time.perf_counter() - t


def _score(found: list[list[int]], truth: set[tuple[int, int]], sets: list[np.ndarray], threshold: float) -> dict:
  """Recall: documents with an earlier document at exact J >= threshold that were flagged; precision: flagged
  (document, match) pairs whose exact J >= threshold."""
  should = {later for later, _ in truth}
  flagged = [i for i, hits in enumerate(found) if hits]
  pairs = [(i, j) for i in flagged for j in found[i]]
  good = sum(1 for pair in pairs if pair in truth or minhash.exact_jaccard(sets[pair[0]], sets[pair[1]]) >= threshold)
  return {"flagged": len(flagged), "should_flag": len(should), "caught": len(should & set(flagged)),
          "recall": len(should & set(flagged)) / max(1, len(should)), "pairs": len(pairs),
          "precision": good / max(1, len(pairs))}


def bench_minhash(args: argparse.Namespace) -> dict:
  """_bench_minhash, with the CPU affinity it pins to one core restored afterwards (later sections use all)."""
  allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
  try:
    return _bench_minhash(args)
  finally:
    if allowed is not None:
      os.sched_setaffinity(0, allowed)


def _bench_minhash(args: argparse.Namespace) -> dict:
  """Ours vs datasketch on planted near-duplicates: recall / precision w.r.t. exact Jaccard and docs/s."""
  threshold = args.threshold or float(_curate_config().near_dedup.threshold)
  rng = np.random.default_rng(0)
  words_per_doc = 200
  texts, levels = _planted_corpus(args.docs, words_per_doc, threshold, rng)
  sets = minhash.shingles_batch(texts)
  truth, overlapping = _truth(sets, threshold)
  core = _pin_one_core()
  print(f"[minhash] {len(texts)} docs of {words_per_doc} words, planted levels {levels}, {len(truth)} pairs with "
        f"J >= {threshold} ({overlapping} pairs share a shingle); pinned to core {core}", flush=True)
  rows = []
  methods = (("maxlm (batched, as the pipeline)", _ours), ("datasketch", _datasketch),
             ("datasketch (shared permutations)", lambda *a: _datasketch(*a, shared=True)))
  for name, run in methods:
    best, found = float("inf"), None
    for _ in range(args.repeats):
      out, seconds = run(texts, threshold, args.num_perm)
      if seconds < best:
        best, found = seconds, out
    row = {"method": name, "seconds": best, "docs_per_s": len(texts) / best, **_score(found, truth, sets, threshold)}
    rows.append(row)
    print(f"[minhash] {name}: {row['docs_per_s']:,.0f} docs/s, recall {row['recall']:.4f}, "
          f"precision {row['precision']:.4f}", flush=True)
  per_doc = min(_ours_per_doc(texts, threshold, args.num_perm) for _ in range(args.repeats))
  rows.append({"method": "maxlm (per document, unbatched)", "seconds": per_doc, "docs_per_s": len(texts) / per_doc})
  ours, ds = rows[0], rows[1]
  ratios = {"recall_ratio": ours["recall"] / ds["recall"], "speed_ratio": ours["docs_per_s"] / ds["docs_per_s"],
            "speed_ratio_shared": ours["docs_per_s"] / rows[2]["docs_per_s"],
            "recall_target": 0.95, "speed_target": 3.0}
  lines = ["| method | docs/s | seconds | flagged | recall | precision |", "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    if "recall" in r:
      lines.append(f"| {r['method']} | {r['docs_per_s']:,.0f} | {r['seconds']:.2f} | {r['flagged']} | "
                   f"{r['caught']}/{r['should_flag']} = {r['recall']:.4f} | {r['precision']:.4f} |")
    else:
      lines.append(f"| {r['method']} | {r['docs_per_s']:,.0f} | {r['seconds']:.2f} | - | - | - |")
  lines.append("")
  lines.append(f"our recall / datasketch recall = {ratios['recall_ratio']:.3f} (target >= 0.95); "
               f"our docs/s / datasketch docs/s = {ratios['speed_ratio']:.2f}x (target >= 3); "
               f"vs datasketch with shared permutations {ratios['speed_ratio_shared']:.2f}x")
  note = (f"{len(texts)} docs ({words_per_doc}-word default-corpus chunks + 30% planted mutants), word 5-grams, "
          f"threshold {threshold}, num_perm {args.num_perm}, one core, best of {args.repeats}; recall over documents "
          "with an earlier document at exact J >= threshold, precision over flagged (document, match) pairs")
  return {"rows": rows, "ratios": ratios, "table": "\n".join(lines), "note": note, "threshold": threshold,
          "levels": list(levels), "true_pairs": len(truth)}


# ---------------------------------------------------------------------------------------------------------------
# loader


def _write_jsonl(path: Path, texts: list[str]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for t in texts:
      f.write(json.dumps({"text": t}) + "\n")


def _loader_rate(make_iter: Callable[[], object], batches: int) -> tuple[float, float]:
  """(real target tokens/s, share of batch slots holding tokens) over `batches` batches after a warm-up one."""
  it = make_iter()
  next(it)
  real = slots = 0
  t0 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
    real += int((b["segment_ids"] > 0).sum())
    slots += b["segment_ids"].size
  return real / (time.perf_counter() - t0), real / slots


def bench_loader(args: argparse.Namespace) -> dict:
  """Token-shard loader tokens/s (two real sources mixed 70/30) vs the tokens/s the tiny training run consumes."""
  from data_pipelines import loader, mixture, tokenized  # noqa: PLC0415
  from maxlm.config import load_config  # noqa: PLC0415
  from maxlm.metrics import read_metrics  # noqa: PLC0415
  from maxlm.train import loop  # noqa: PLC0415

  cfg = load_config("tiny", ["--config.tokenize.shard_mb=1"])
  seq_len, batch_size = cfg.data.seq_len, cfg.data.batch_size
  streams = loader.default_streams(batch_size, 1)
  batches, steps = (30, 6) if args.quick else (300, 16)
  prose_name, prose = prose_documents()
  spec = f"docs=0.7,{prose_name}=0.3"
  with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
    tmp = Path(tmp)
    _write_jsonl(tmp / "curated" / "docs" / "part-00000.jsonl", corpus_documents(1.0 if args.quick else 4.0))
    _write_jsonl(tmp / "curated" / prose_name / "part-00000.jsonl", [t for texts in prose.values() for t in texts])
    t0 = time.perf_counter()
    manifest = tokenized.tokenize([str(tmp / "curated" / "docs"), str(tmp / "curated" / prose_name)], tmp / "tok",
                                  cfg.tokenize, vocab_size=cfg.model.vocab_size, progress=False)
    tokenize_s = time.perf_counter() - t0
    text_mb = sum(e["text_bytes"] for e in manifest["sources"].values()) / 1e6
    tokens = sum(e["splits"]["train"]["tokens"] for e in manifest["sources"].values())
    data = mixture.load(str(tmp / "tok"), spec)

    def host_batches():
      return loader.HostBatches(data.mixture, seq_len=seq_len, batch_size=batch_size, seed=0,
                                num_packing_bins=cfg.data.num_packing_bins, num_streams=streams)

    loader_tok_s, packed = _loader_rate(host_batches, batches)
    t0 = time.perf_counter()
    it = host_batches()
    for _ in range(5):
      next(it)
    state = json.loads(json.dumps(it.get_state()))  # through JSON, as in the checkpoint
    resumed = host_batches()
    resumed.set_state(state)
    next(resumed)
    resume_s = time.perf_counter() - t0

    train_cfg = load_config("tiny", [
      f"--config.data.tokenized={tmp / 'tok'}", f"--config.data.mixture={spec}", f"--config.train.steps={steps}",
      "--config.train.eval_every=0", f"--config.train.checkpoint_every={steps}", "--config.train.sample_tokens=0",
      "--config.train.progress_bar=false", "--config.train.log_every=1", "--config.train.async_checkpointing=false",
      f"--config.data.cache_dir={tmp / 'cache'}"])
    loop.train(train_cfg, tmp / "run")
    rates = [r["tokens_per_sec"] for r in read_metrics(tmp / "run")
             if "tokens_per_sec" in r and not r.get("compile_step")]
    train_tok_s = float(np.median(rates))
  ratio = loader_tok_s / train_tok_s
  rows = [
    {"what": "tokenize (train BPE, encode, write shards)", "rate": f"{text_mb / tokenize_s:.2f} MB/s",
     "note": f"{text_mb:.1f} MB -> {tokens:,} train tokens in {tokenize_s:.1f} s"},
    {"what": f"loader: token shards, {spec}, {streams} streams", "rate": f"{loader_tok_s:,.0f} tok/s",
     "note": f"{batches} batches of {batch_size}x{seq_len}; {packed:.1%} of slots hold tokens"},
    {"what": "tiny training consumes (median step)", "rate": f"{train_tok_s:,.0f} tok/s",
     "note": f"{len(rates)} steps after the compile step"},
    {"what": "loader / training", "rate": f"{ratio:.1f}x", "note": "target >= 10x"},
    {"what": "resume: 5 batches, state via JSON, restore, next batch", "rate": f"{resume_s:.2f} s", "note": ""},
  ]
  lines = ["| what | rate | note |", "|---|---:|---|"] + [f"| {r['what']} | {r['rate']} | {r['note']} |" for r in rows]
  note = (f"one process, {streams} loader streams on this host, no grain worker processes; training is configs/tiny.py "
          f"({cfg.model.num_layers} layers, d_model {cfg.model.d_model}) on the same shards")
  return {"rows": rows, "table": "\n".join(lines), "note": note, "loader_tokens_per_sec": loader_tok_s,
          "train_tokens_per_sec": train_tok_s, "loader_over_training": ratio, "target_ratio": 10.0,
          "packed_fraction": packed, "tokenize_mb_per_s": text_mb / tokenize_s, "resume_seconds": resume_s}


def _plot_loader(ax, result: dict) -> None:
  values = [result["loader_tokens_per_sec"], result["train_tokens_per_sec"]]
  ax.bar(["loader\n(token shards, mixture)", "tiny training\nconsumes"], values, color=["C0", "C1"])
  ax.set_yscale("log")
  ax.set_ylabel("tokens/s")
  ax.set_title(f"loader {result['loader_over_training']:.0f}x what training consumes (target >= 10x)")


# ---------------------------------------------------------------------------------------------------------------
# Sections and plots: adding a section is one line here (a plot is optional).

SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {
  "curate": bench_curate,
  "minhash": bench_minhash,
  "loader": bench_loader,
}


def _plot_curate(ax, result: dict) -> None:
  rows = result["rows"]
  stages = ["normalize", "exact_dedup", "language", "quality", "near_dedup", "pii", "curate"]
  width = 0.8 / len(rows)
  x = np.arange(len(stages))
  for i, r in enumerate(rows):
    ax.bar(x + i * width - 0.4 + width / 2, [r[f"{s}_mb_s"] for s in stages], width, label=r["corpus"])
  ax.set_xticks(x, stages, rotation=30, fontsize=8)
  ax.set_yscale("log")
  ax.set_ylabel("MB/s (one thread)")
  ax.set_title("curate stages")
  ax.legend(fontsize=7)


def _plot_minhash(ax, result: dict) -> None:
  rows = [r for r in result["rows"] if "recall" in r]
  names = [r["method"].replace(" (", "\n(") for r in rows]
  ax.bar(names, [r["docs_per_s"] for r in rows], color=["C0", "C1", "C2"][:len(rows)])
  ax.tick_params(axis="x", labelsize=7)
  for i, r in enumerate(rows):
    ax.text(i, r["docs_per_s"], f"recall {r['recall']:.3f}\nprecision {r['precision']:.3f}", ha="center",
            va="bottom", fontsize=8)
  ax.set_ylabel("docs/s (shingle + sign + LSH, one core)")
  ax.set_title(f"near dedup at J >= {result['threshold']}: {result['ratios']['speed_ratio']:.1f}x faster")
  ax.margins(y=0.25)


PLOTS: dict[str, Callable] = {"curate": _plot_curate, "minhash": _plot_minhash, "loader": _plot_loader}


def plot(results: dict[str, dict], path: Path, title: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  names = [n for n in results if n in PLOTS]
  if not names:
    return
  fig = Figure(figsize=(6.5 * len(names), 4.5), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(names), squeeze=False)[0]
  for ax, name in zip(axes, names):
    PLOTS[name](ax, results[name])
  fig.suptitle(title, fontsize=9)
  fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
  t0 = time.perf_counter()
  args = parse_args(argv)
  logging.basicConfig(level=logging.ERROR)  # curate() warns once per drop reason: noise here
  print(f"{cpu_model()}; numpy {np.__version__}, python {platform.python_version()} ({os.cpu_count()} cores); "
        f"sections {', '.join(args.sections)}")
  results = {}
  for name in args.sections:
    results[name] = SECTIONS[name](args)
  for name, result in results.items():
    print(f"\n## {name}\n\n{result['table']}\n\n{result['note']}")
  runtime = time.perf_counter() - t0
  print(f"\ntotal runtime {runtime:.0f}s")
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  meta = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
          "numpy": np.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
          "machine": platform.machine(), "cpu_model": cpu_model(), "runtime_s": runtime}
  try:
    import datasketch  # noqa: PLC0415
    meta["datasketch"] = datasketch.__version__
  except ImportError:
    pass
  out.write_text(json.dumps({"meta": meta, "machine": machine(), **results}, indent=2, default=str))
  png = out.with_suffix(".png")
  plot(results, png, f"data pipeline on {platform.machine()} ({pathlib.Path(args.out).stem})")
  print(f"wrote {out} and {png}")


if __name__ == "__main__":
  main()
