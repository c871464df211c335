"""`maxlm curate`: raw text -> normalized, deduplicated, language- and quality-filtered JSONL shards.

Documents stream through the stages in order of cost: read (bad records counted by reason), normalize, exact
dedup, language, quality, near dedup (MinHash + LSH; only documents that survived the cheaper filters are
indexed), PII redaction. Kept documents go to `DIR/part-NNNNN.jsonl` shards of `curate.shard_docs` each.

Resumable: after every completed shard the pipeline state (records consumed, exact-dedup keys, the LSH index
and the stats) is saved atomically beside the shards. A rerun with the same inputs and config continues after
the last completed shard: completed shards are neither redone nor rewritten. Memory is bounded by the dedup
state (16 B per exact key, ~1.5 KB per kept document's signature and band keys), never by the texts.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import pickle
import time
from collections.abc import Sequence
from pathlib import Path

from data_pipelines.curate import dedup, minhash, normalize, pii, quality, reader
from data_pipelines.curate.language import LanguageFilter
from data_pipelines.fileio import atomic_write

log = logging.getLogger(__name__)

STAGES = ("read", "normalize", "exact_dedup", "language", "quality", "near_dedup", "pii")
STATE_FILE = ".curate_state.pkl"
_STATE_VERSION = 1


def _pair() -> list[int]:
  """[documents, bytes]; a module-level factory so the defaultdicts below pickle with the resume state."""
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


def curate(inputs: Sequence[str], output: str | Path, cfg, *, progress: bool = True) -> dict:
  """Runs the pipeline from `inputs` into `output`, resuming after the last completed shard; returns stats."""
  output = Path(output)
  output.mkdir(parents=True, exist_ok=True)
  fingerprint = config_fingerprint(cfg, inputs)
  stages = _Stages(cfg)
  state_path = output / STATE_FILE
  state = {"version": _STATE_VERSION, "fingerprint": fingerprint, "consumed": 0, "shards": 0, "next_id": 0,
           "done": False, "exact": set(), "index": stages.new_index(), "stats": Stats()}
  if state_path.exists():
    try:
      saved = pickle.loads(state_path.read_bytes())
    except Exception as e:  # noqa: BLE001  (any unreadable state is the same problem for the user)
      raise ValueError(f"{state_path}: unreadable curate state ({e}); delete it and the shards to start over")
    if saved.get("fingerprint") != fingerprint:
      raise ValueError(f"{output} holds a curate run with other inputs or config; use a new --output")
    state = saved
    if state["done"]:
      log.info("%s is already complete (%d shards)", output, state["shards"])
      return state["stats"].to_json()
    log.info("resuming %s after %d completed shards (%d input records)", output, state["shards"],
             state["consumed"])
  elif any(output.glob("part-*.jsonl")):
    raise ValueError(f"{output} already holds shards but no curate state; use a new --output")

  stats: Stats = state["stats"]
  warned: set[str] = set()
  shard: list[str] = []
  bar = _progress(progress)
  t0 = time.perf_counter()
  consumed = 0
  for consumed, (doc, reason) in enumerate(reader.read_records(
      inputs, text_field=cfg.text_field, max_doc_bytes=int(cfg.max_doc_mb * 2**20)), start=1):
    if consumed <= state["consumed"]:
      continue  # finished in an earlier run: already in a completed shard or counted
    kept = _process(doc, reason, stages, state, stats, warned)
    if kept is not None:
      shard.append(kept)
    bar.update(1)
    if len(shard) >= cfg.shard_docs:
      _flush(output, shard, state, consumed, state_path)
      shard = []
  _flush(output, shard, state, consumed, state_path, done=True)
  bar.close()
  result = stats.to_json()
  result["shards"] = state["shards"]
  result["seconds"] = time.perf_counter() - t0
  atomic_write(output / "stats.json", json.dumps(result, indent=2).encode())
  _plot(result, output / "stats.png")
  return result


def _drop(stats: Stats, stage: str, reason: str, source: str | None, warned: set[str]) -> None:
  stats.dropped[stage][reason] += 1
  if reason not in warned:  # one warning per reason, not per document
    warned.add(reason)
    log.warning("dropping documents: %s (%s; first: %s); counted in stats.json", reason, stage, source)


def _process(doc, reason: str, stages: _Stages, state: dict, stats: Stats, warned: set[str]) -> str | None:
  """One record through every stage: the JSONL line to write, or None if it was dropped."""
  c = stages.cfg
  stats.stage_in["read"][0] += 1
  if doc is None:
    _drop(stats, "read", reason, None, warned)
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
    text = normalize.normalize(text, fix_mojibake=c.normalize.fix_mojibake)
    if not text:
      return _drop(stats, "normalize", "empty_after_normalize", doc.source, warned)
    size = len(text.encode("utf-8"))
    _count(stats.stage_out, "normalize", size)
  if c.exact_dedup.enabled:
    _count(stats.stage_in, "exact_dedup", size)
    key = normalize.dedup_key(text, normalized=c.normalize.enabled)
    if key in state["exact"]:
      return _drop(stats, "exact_dedup", "exact_duplicate", doc.source, warned)
    state["exact"].add(key)
    _count(stats.stage_out, "exact_dedup", size)
  lang = None
  if stages.language is not None:
    _count(stats.stage_in, "language", size)
    lang, why = stages.language.keep_reason(text)
    if why:
      return _drop(stats, "language", why, doc.source, warned)
    _count(stats.stage_out, "language", size)
  if c.quality.enabled:
    _count(stats.stage_in, "quality", size)
    why = quality.check(text, stages.rules, language=lang)
    if why:
      return _drop(stats, "quality", why, doc.source, warned)
    _count(stats.stage_out, "quality", size)
  if c.near_dedup.enabled:
    _count(stats.stage_in, "near_dedup", size)
    nd = c.near_dedup
    signature = stages.hasher.signature(minhash.shingles(text, nd.shingle_size, nd.shingle_unit))
    doc_id = state["next_id"]
    state["next_id"] += 1
    if state["index"].add(doc_id, signature) is not None:
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


def _flush(output: Path, lines: list[str], state: dict, consumed: int, state_path: Path, done: bool = False):
  """Writes one shard, then the state that says it is complete (so a crash between the two redoes it)."""
  if lines:
    atomic_write(output / f"part-{state['shards']:05d}.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))
    state["shards"] += 1
  state["consumed"] = consumed
  state["done"] = done
  atomic_write(state_path, pickle.dumps(state))


class _NoBar:
  def update(self, n: int) -> None:
    pass

  def close(self) -> None:
    pass


def _progress(enabled: bool):
  if not enabled:
    return _NoBar()
  from tqdm import tqdm  # noqa: PLC0415
  return tqdm(unit="doc", desc="curate", smoothing=0.1, mininterval=1.0)


def _plot(stats: dict, path: Path) -> None:
  """Documents in/out per stage and kept documents per language, as a PNG."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

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
