"""`maxlm curate`: raw text -> normalized, deduplicated, language- and quality-filtered JSONL shards.

Documents stream through the stages in order of cost: read (bad records counted by reason), normalize, exact
dedup, language, quality, near dedup (MinHash + LSH; only documents that survived the cheaper filters are
indexed), PII redaction. Records go in windows of up to 256: the pure stages run first, the near-dedup
candidates of a window are shingled and signed in one vectorised batch, then every record is committed (counted,
indexed, written) in stream order, so outputs, stats and resume points are those of one-at-a-time processing.
Kept documents go to `DIR/part-NNNNN.jsonl` shards of `curate.shard_docs` each.

Resumable: after every completed shard, what it added to the pipeline state (records consumed, exact-dedup keys,
the LSH index's new representatives, the stats) is appended to a log beside the shards (curate/resume.py). A rerun
with the same inputs and config continues after the last completed shard: completed shards are neither redone nor
rewritten. Memory is bounded by the dedup
state (16 B per exact key, ~1.5 KB per kept document's signature and band keys), never by the texts.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipelines import sources
from data_pipelines.curate import dedup, minhash, normalize, pii, quality, reader, resume
from data_pipelines.curate.language import LanguageFilter
from data_pipelines.extras import MissingExtra, require
from data_pipelines.fileio import atomic_write

log = logging.getLogger(__name__)

STAGES = ("read", "normalize", "exact_dedup", "language", "quality", "near_dedup", "pii")
STATE_FILE = resume.STATE_FILE  # the names `maxlm tokenize` and training use to recognise a curate output
STATS_FILE = sources.CURATE_STATS_FILE
_KEY_BYTES = 16  # an exact-dedup key: normalize.dedup_key's digest
# Records analysed (pure stages) and then signed for near dedup as one batch, before they are committed in order;
# a window also closes at this many characters, which bounds the batch's scratch memory.
_WINDOW_DOCS = 256
_WINDOW_CHARS = 4 << 20


def _pair() -> list[int]:
  """[documents, bytes] of one stage."""
  return [0, 0]


def _quad() -> list[int]:
  """[documents in, bytes in, documents out, bytes out] of one source."""
  return [0, 0, 0, 0]


@dataclasses.dataclass
class Stats:
  """Documents and bytes into / out of each stage, drops per reason, kept documents per language and source."""
  stage_in: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(_pair))
  stage_out: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(_pair))
  dropped: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(collections.Counter))
  languages: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  language_bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  sources: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(_quad))
  pii: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def raw(self) -> dict:
    """Every counter as plain JSON (dicts of ints and [int] lists): what the resume log records."""
    return {"stage_in": dict(self.stage_in), "stage_out": dict(self.stage_out),
            "dropped": {k: dict(v) for k, v in self.dropped.items()}, "languages": dict(self.languages),
            "language_bytes": dict(self.language_bytes), "sources": dict(self.sources), "pii": dict(self.pii)}

  @classmethod
  def from_raw(cls, raw: dict) -> Stats:
    """The inverse of raw()."""
    stats = cls()
    stats.stage_in.update(raw.get("stage_in", {}))
    stats.stage_out.update(raw.get("stage_out", {}))
    for stage, reasons in raw.get("dropped", {}).items():
      stats.dropped[stage].update(reasons)
    stats.languages.update(raw.get("languages", {}))
    stats.language_bytes.update(raw.get("language_bytes", {}))
    stats.sources.update(raw.get("sources", {}))
    stats.pii.update(raw.get("pii", {}))
    return stats

  def to_json(self) -> dict:
    def docs_bytes(d):
      return {k: {"documents": v[0], "bytes": v[1]} for k, v in d.items()}
    return {
      "stages": {s: {"in": docs_bytes(self.stage_in).get(s), "out": docs_bytes(self.stage_out).get(s),
                     "dropped": dict(self.dropped.get(s, {}))} for s in STAGES if s in self.stage_in},
      "languages": {k: {"documents": n, "bytes": self.language_bytes[k]} for k, n in self.languages.most_common()},
      "sources": {k: {"documents_in": v[0], "bytes_in": v[1], "documents_out": v[2], "bytes_out": v[3]}
                  for k, v in self.sources.items()},
      "pii_redactions": dict(self.pii),
    }


class _Stages:
  """The configured stages, built once (the language model and MinHash permutations load here)."""

  def __init__(self, cfg):
    self.cfg = cfg
    if cfg.normalize.enabled and cfg.normalize.fix_mojibake:
      require("curate", "ftfy")  # a missing extra fails before any input is read
    self.language = (LanguageFilter(_codes(cfg.language.keep), cfg.language.min_confidence)
                     if cfg.language.enabled else None)
    fields = {f.name for f in dataclasses.fields(quality.QualityRules)}
    overrides = {k: (None if v < 0 else v) for k, v in cfg.quality.to_dict().items() if k in fields}
    self.rules = quality.QualityRules(**overrides)
    nd = cfg.near_dedup
    self.hasher = minhash.MinHasher(num_perm=nd.num_perm, seed=nd.seed)

  def new_index(self) -> dedup.NearDupIndex:
    nd = self.cfg.near_dedup
    if nd.bands > 0:
      return dedup.NearDupIndex(nd.num_perm, nd.bands, nd.rows, nd.threshold, verify=True)
    return dedup.NearDupIndex.for_threshold(nd.threshold, nd.num_perm, verify=True)


def _codes(keep: str) -> list[str]:
  return [c.strip() for c in keep.split(",") if c.strip()]


def config_fingerprint(cfg, inputs: Sequence[str]) -> str:
  """What a resumed run must share with the interrupted one: the curate config and the inputs."""
  blob = json.dumps({"curate": cfg.to_dict(), "inputs": list(inputs)}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _source_key(source: str) -> str:
  """Per-source stats key: the file (JSONL line numbers dropped)."""
  head, _, tail = source.rpartition(":")
  return head if head and tail.isdigit() else source


def _resumed_state(state_log: resume.StateLog, stages: _Stages) -> dict:
  """The pipeline state after the log's finished shards (a fresh one for an empty log)."""
  state = {"consumed": 0, "shards": 0, "next_id": 0, "done": False, "exact": set(), "new_exact": [],
           "index": stages.new_index(), "kept_saved": 0, "stats_raw": None}
  for record in state_log.records():
    arrays = state_log.arrays(record)
    state["exact"].update(bytes(row) for row in arrays["exact"])
    state["index"].restore(arrays["ids"], arrays["signatures"])
    state["stats_raw"] = resume.plus(state["stats_raw"], record["stats"])
    state.update({k: record[k] for k in ("consumed", "shards", "next_id", "done")})
  state["kept_saved"] = len(state["index"])
  state["stats"] = Stats.from_raw(json.loads(json.dumps(state["stats_raw"] or {})))  # a copy: stats_raw stays put
  state["log"] = state_log
  return state


def curate(inputs: Sequence[str], output: str | Path, cfg, *, progress: bool = True) -> dict:
  """Runs the pipeline from `inputs` into `output`, resuming after the last completed shard; returns stats."""
  output = Path(output)
  output.mkdir(parents=True, exist_ok=True)
  stages = _Stages(cfg)
  state_log = resume.StateLog(output, config_fingerprint(cfg, inputs))
  if state_log.exists():
    state = _resumed_state(state_log, stages)
    if state["done"]:
      log.info("%s is already complete (%d shards)", output, state["shards"])
      return state["stats"].to_json()
    log.info("resuming %s after %d completed shards (%d input records)", output, state["shards"],
             state["consumed"])
  elif any(output.glob("part-*.jsonl")):
    raise ValueError(f"{output} already holds shards but no curate state (or one from an older maxlm); use a new "
                     "--output")
  else:
    state_log.start()
    state = _resumed_state(state_log, stages)

  stats: Stats = state["stats"]
  warned: set[str] = set()
  shard: list[str] = []
  bar = _progress(progress)
  t0 = time.perf_counter()
  consumed = 0
  window: list[tuple[int, reader.Record]] = []
  window_bytes = 0

  def run_window() -> None:
    """Analyse the window (pure), sign its near-dedup candidates in one batch, then commit records in order."""
    nonlocal shard
    plans = _analyse_window(window, stages, state["exact"])
    signatures, keys = _sign(plans, stages, state["index"])
    for (number, record), plan in zip(window, plans, strict=True):
      kept = _process(record, plan, signatures, keys, stages, state, stats, warned)
      if kept is not None:
        shard.append(kept)
      bar.update(1)
      if len(shard) >= cfg.shard_docs:
        _flush(output, shard, state, number)
        shard = []
    window.clear()

  for consumed, record in enumerate(reader.read_records(
      inputs, text_field=cfg.text_field, max_doc_bytes=int(cfg.max_doc_mb * 2**20)), start=1):
    if consumed <= state["consumed"]:
      continue  # finished in an earlier run: already in a completed shard or counted
    window.append((consumed, record))
    window_bytes += len(record.doc.text) if record.doc is not None else 0
    if len(window) >= _WINDOW_DOCS or window_bytes >= _WINDOW_CHARS:
      run_window()
      window_bytes = 0
  run_window()
  _flush(output, shard, state, consumed, done=True)
  bar.close()
  result = stats.to_json()
  result["shards"] = state["shards"]
  result["seconds"] = time.perf_counter() - t0
  atomic_write(output / STATS_FILE, json.dumps(result, indent=2).encode())
  try:
    _plot(result, output / "stats.png")
  except MissingExtra as e:
    log.warning("no stats.png: %s", e)
  return result


def _drop(stats: Stats, stage: str, reason: str, source: str, warned: set[str]) -> None:
  stats.dropped[stage][reason] += 1
  if reason not in warned:  # one warning per reason, not per document
    warned.add(reason)
    log.warning("dropping documents: %s (%s; first: %s); counted in stats.json", reason, stage, source)


@dataclasses.dataclass
class _Plan:
  """What the pure stages decided for one readable record, computed ahead of the in-order commit."""
  text: str  # after normalization
  stop: str | None = None  # stage that drops the record (None: it reaches near dedup or the end)
  why: str | None = None  # its drop reason
  key: bytes | None = None  # exact-dedup key
  lang: str | None = None
  row: int = -1  # row of its signature in the window's batch (near dedup only)


def _analyse_window(window: list, stages: _Stages, exact: set) -> list[_Plan | None]:
  """Plans of a window's records: normalize, exact dedup (predicted), language and quality, without changing state.

  A record is an exact duplicate at commit iff its key is in `exact` now or was added by an earlier record of the
  window, i.e. an earlier record that reached exact dedup; so the prediction is exact and the expensive stages run
  only for records that will need them, as before. Records reaching near dedup get consecutive signature rows.
  """
  c = stages.cfg
  plans: list[_Plan | None] = []
  window_keys: set[bytes] = set()
  rows = 0
  for _, (doc, _, _) in window:
    if doc is None:
      plans.append(None)
      continue
    plan = _Plan(doc.text)
    plans.append(plan)
    if c.normalize.enabled:
      plan.text = normalize.normalize(plan.text, fix_mojibake=c.normalize.fix_mojibake)
      if not plan.text:
        plan.stop, plan.why = "normalize", "empty_after_normalize"
        continue
    if c.exact_dedup.enabled:
      plan.key = normalize.dedup_key(plan.text, normalized=c.normalize.enabled)
      if plan.key in exact or plan.key in window_keys:
        plan.stop, plan.why = "exact_dedup", "exact_duplicate"
        continue
      window_keys.add(plan.key)
    if stages.language is not None:
      plan.lang, why = stages.language.keep_reason(plan.text)
      if why:
        plan.stop, plan.why = "language", why
        continue
    if c.quality.enabled:
      why = quality.check(plan.text, stages.rules, language=plan.lang)
      if why:
        plan.stop, plan.why = "quality", why
        continue
    if c.near_dedup.enabled:
      plan.row = rows
      rows += 1
  return plans


def _sign(plans: list[_Plan | None], stages: _Stages, index: dedup.NearDupIndex):
  """MinHash signatures and LSH band keys of the window's near-dedup candidates, in one vectorised batch."""
  texts = [plan.text for plan in plans if plan is not None and plan.row >= 0]
  if not texts:
    return None, None
  nd = stages.cfg.near_dedup
  signatures = stages.hasher.text_signatures(texts, nd.shingle_size, nd.shingle_unit)
  return signatures, dedup.band_keys(signatures, index.bands, index.rows)


def _process(record: reader.Record, plan: _Plan | None, signatures, keys, stages: _Stages, state: dict,
             stats: Stats, warned: set[str]) -> str | None:
  """One record through every stage in stream order, as its plan decided: the JSONL line, or None if dropped."""
  c = stages.cfg
  doc = record.doc
  stats.stage_in["read"][0] += 1
  if doc is None:
    _drop(stats, "read", record.reason, record.where, warned)
    return None
  text = doc.text
  size = len(text.encode("utf-8"))  # recounted only where a stage changes the text
  stats.stage_in["read"][1] += size  # a bad record's size is unknown: bytes count readable documents only
  src = stats.sources[_source_key(doc.source)]
  src[0] += 1
  src[1] += size
  _count(stats.stage_out, "read", size)

  if c.normalize.enabled:
    _count(stats.stage_in, "normalize", size)
    text = plan.text
    if plan.stop == "normalize":
      return _drop(stats, "normalize", plan.why, doc.source, warned)
    size = len(text.encode("utf-8"))
    _count(stats.stage_out, "normalize", size)
  if c.exact_dedup.enabled:
    _count(stats.stage_in, "exact_dedup", size)
    if plan.stop == "exact_dedup":
      return _drop(stats, "exact_dedup", plan.why, doc.source, warned)
    state["exact"].add(plan.key)
    state["new_exact"].append(plan.key)
    _count(stats.stage_out, "exact_dedup", size)
  lang = plan.lang
  if stages.language is not None:
    _count(stats.stage_in, "language", size)
    if plan.stop == "language":
      return _drop(stats, "language", plan.why, doc.source, warned)
    _count(stats.stage_out, "language", size)
  if c.quality.enabled:
    _count(stats.stage_in, "quality", size)
    if plan.stop == "quality":
      return _drop(stats, "quality", plan.why, doc.source, warned)
    _count(stats.stage_out, "quality", size)
  if c.near_dedup.enabled:
    _count(stats.stage_in, "near_dedup", size)
    doc_id = state["next_id"]
    state["next_id"] += 1
    if state["index"].add(doc_id, signatures[plan.row], keys[plan.row]) is not None:
      return _drop(stats, "near_dedup", "near_duplicate", doc.source, warned)
    _count(stats.stage_out, "near_dedup", size)
  if c.pii.enabled:
    _count(stats.stage_in, "pii", size)
    text, counts = pii.redact(text)
    stats.pii.update(counts)
    size = len(text.encode("utf-8"))
    _count(stats.stage_out, "pii", size)
  src[2] += 1
  src[3] += size
  stats.languages[lang or "und"] += 1
  stats.language_bytes[lang or "und"] += size
  record = {"text": text, "source": doc.source}
  if lang:
    record["language"] = lang
  return json.dumps(record, ensure_ascii=False)


def _count(table: dict, stage: str, nbytes: int) -> None:
  table[stage][0] += 1
  table[stage][1] += nbytes


def _flush(output: Path, lines: list[str], state: dict, consumed: int, done: bool = False):
  """Writes one shard, then appends what it added to the resume log (so a crash between the two redoes it)."""
  if lines:
    atomic_write(output / f"part-{state['shards']:05d}.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))
    state["shards"] += 1
  state["consumed"] = consumed
  state["done"] = done
  index: dedup.NearDupIndex = state["index"]
  ids, signatures = index.kept_since(state["kept_saved"])
  exact = np.frombuffer(b"".join(state["new_exact"]), np.uint8).reshape(-1, _KEY_BYTES)
  raw = state["stats"].raw()
  record = {k: state[k] for k in ("consumed", "shards", "next_id", "done")}
  state["log"].append({**record, "stats": resume.minus(raw, state["stats_raw"])},
                      {"exact": exact, "ids": ids, "signatures": signatures})
  state["new_exact"], state["kept_saved"], state["stats_raw"] = [], len(index), json.loads(json.dumps(raw))


def _progress(enabled: bool):
  return tqdm(unit="doc", desc="curate", smoothing=0.1, mininterval=1.0, disable=not enabled)


def _plot(stats: dict, path: Path) -> None:
  """Documents in/out per stage and kept documents per language, as a PNG."""
  FigureCanvasAgg = require("plot", "matplotlib.backends.backend_agg").FigureCanvasAgg
  Figure = require("plot", "matplotlib.figure").Figure

  fig = Figure(figsize=(11, 4), layout="constrained")
  FigureCanvasAgg(fig)
  ax_stage, ax_lang = fig.subplots(1, 2)
  names = list(stats["stages"])
  ins = [stats["stages"][s]["in"]["documents"] if stats["stages"][s]["in"] else 0 for s in names]
  outs = [stats["stages"][s]["out"]["documents"] if stats["stages"][s]["out"] else 0 for s in names]
  x = range(len(names))
  ax_stage.bar([i - 0.2 for i in x], ins, 0.4, label="in")
  ax_stage.bar([i + 0.2 for i in x], outs, 0.4, label="out")
  ax_stage.set_xticks(list(x), names, rotation=30, fontsize=8)
  ax_stage.set_ylabel("documents")
  ax_stage.set_title("documents per stage")
  ax_stage.legend()
  langs = list(stats["languages"])[:12]
  ax_lang.bar(langs, [stats["languages"][k]["documents"] for k in langs])
  ax_lang.set_title("kept documents per language")
  fig.savefig(path, dpi=100)
