"""`maxlm curate` end to end: planted duplicates, languages, bad records and PII land where they should; an
interrupted run resumes without redoing completed shards and ends identical to an uninterrupted one."""

import json
import logging
import random

import helpers
import pytest

from data_pipelines.curate import pipeline, resume
from maxlm.cli import main
from maxlm.config import load_config


def _cfg(*overrides):
  return load_config("tiny", [f"--config.curate.{o}" for o in overrides]).curate


def _near_copy(text: str, rng: random.Random, fraction: float = 0.02) -> str:
  """The text with a few words replaced: word-5-gram Jaccard with the original stays around 0.8-0.9."""
  words = text.split(" ")
  for i in rng.sample(range(len(words)), max(1, int(len(words) * fraction))):
    words[i] = "zzz" + words[i]
  return " ".join(words)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """JSONL of English prose with planted exact and near duplicates, German documents, PII and bad lines."""
  rng = random.Random(0)
  english = helpers.prose_documents("en", min_chars=1500, limit=13)
  german = helpers.prose_documents("de", min_chars=1500, limit=3)
  docs = list(english[:12])
  docs.append(english[0])  # exact duplicate
  docs.append("  " + english[1].upper().replace("\n", "\n\n") + "  ")  # exact after case/whitespace folding
  docs += [_near_copy(english[2], rng), _near_copy(english[3], rng)]  # near duplicates
  docs += german
  docs.append(english[12] + "\nWrite to jane.doe@example.org or call +1 415 555 0134 from 192.168.1.20.")
  path = tmp_path_factory.mktemp("raw") / "docs.jsonl"
  lines = [json.dumps({"text": d}) for d in docs] + ['{"text": "unterminated', '{"body": "no text"}']
  path.write_text("\n".join(lines) + "\n")
  return {"path": str(path), "english": english, "german": german, "total": len(lines)}


def _kept(output):
  return [json.loads(line) for f in sorted(output.glob("part-*.jsonl")) for line in f.read_text().splitlines()]


def test_each_stage_drops_what_was_planted(tmp_path, inputs, caplog):
  with caplog.at_level(logging.WARNING, logger="data_pipelines.curate.pipeline"):
    stats = pipeline.curate([inputs["path"]], tmp_path, _cfg("language.keep=en", "pii.enabled=true", "shard_docs=4"),
                            progress=False)
  st = stats["stages"]
  assert st["read"]["in"]["documents"] == inputs["total"]
  assert st["read"]["dropped"] == {"malformed_json": 1, "missing_field": 1}
  assert st["exact_dedup"]["dropped"] == {"exact_duplicate": 2}
  assert st["language"]["dropped"] == {"language_not_kept": len(inputs["german"])}
  assert st["near_dedup"]["dropped"] == {"near_duplicate": 2}
  kept = _kept(tmp_path)
  dropped = sum(sum(s["dropped"].values()) for s in st.values())
  assert len(kept) == inputs["total"] - dropped == sum(v["documents"] for v in stats["languages"].values())
  assert {r["language"] for r in kept} == {"en"}
  # Representatives are the first occurrences: every original English document survives (quality permitting).
  survivors = {r["source"].rsplit(":", 1)[1] for r in kept}
  assert {"1", "3", "4"} <= survivors
  redacted = next(r["text"] for r in kept if "<EMAIL>" in r["text"])
  assert "<PHONE>" in redacted and "<IP_ADDRESS>" in redacted and "jane.doe" not in redacted
  assert stats["pii_redactions"] == {"email": 1, "phone": 1, "ip_address": 1}
  assert (tmp_path / "stats.png").read_bytes()[:4] == b"\x89PNG"
  assert json.loads((tmp_path / "stats.json").read_text())["shards"] == stats["shards"] == -(-len(kept) // 4)
  # One warning per drop reason, naming its first record: the bad lines are the file's last two.
  warnings = {r.getMessage().split(":")[1].split("(")[0].strip(): r.getMessage() for r in caplog.records}
  assert f"first: {inputs['path']}:{inputs['total'] - 1})" in warnings["malformed_json"]
  assert f"first: {inputs['path']}:{inputs['total']})" in warnings["missing_field"]
  assert f"first: {inputs['path']}:13)" in warnings["exact_duplicate"]  # english[0] again, after the first 12


def test_interrupted_run_resumes_without_redoing_shards(tmp_path, inputs, monkeypatch):
  cfg = _cfg("language.keep=en", "shard_docs=2")
  pipeline.curate([inputs["path"]], tmp_path / "whole", cfg, progress=False)

  real_flush, calls = pipeline._flush, []

  def crash_after_two(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt("simulated crash")
    return real_flush(*args, **kwargs)

  monkeypatch.setattr(pipeline, "_flush", crash_after_two)
  out = tmp_path / "resumed"
  with pytest.raises(KeyboardInterrupt):
    pipeline.curate([inputs["path"]], out, cfg, progress=False)
  monkeypatch.setattr(pipeline, "_flush", real_flush)
  done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.jsonl")}
  assert len(done_before) == 2
  pipeline.curate([inputs["path"]], out, cfg, progress=False)
  assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.jsonl") if p.name in done_before} == done_before
  assert _kept(out) == _kept(tmp_path / "whole")
  assert (json.loads((out / "stats.json").read_text())["stages"]
          == json.loads((tmp_path / "whole" / "stats.json").read_text())["stages"])
  with pytest.raises(ValueError, match="other inputs or config"):
    pipeline.curate([inputs["path"]], out, _cfg("language.keep=en,de", "shard_docs=2"), progress=False)
  lines = (out / pipeline.STATE_FILE).read_bytes().split(b"\n", 1)
  header = {**json.loads(lines[0]), "version": 1}
  (out / pipeline.STATE_FILE).write_bytes(json.dumps(header).encode() + b"\n" + lines[1])
  with pytest.raises(ValueError, match="state version 1 from another maxlm version"):
    pipeline.curate([inputs["path"]], out, cfg, progress=False)


def _state_bytes(output):
  """Bytes of the resume state on disk: the log and the key files it names."""
  return (output / pipeline.STATE_FILE).stat().st_size + sum(
    p.stat().st_size for p in (output / resume.KEYS_DIR).iterdir())


def test_resume_state_is_appended_per_shard_and_a_torn_line_is_redone(tmp_path, monkeypatch):
  docs = helpers.prose_documents("en", min_chars=200, limit=40)
  assert len(docs) == 40
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  cfg = _cfg("shard_docs=1", "language.enabled=false", "quality.enabled=false")
  pipeline.curate([str(path)], tmp_path / "whole", cfg, progress=False)
  shards = len(list((tmp_path / "whole").glob("part-*.jsonl")))
  assert shards >= 30  # near-distinct documents: nearly one shard each

  real_flush, calls = pipeline._flush, []

  def crash_at_half(*args, **kwargs):
    calls.append(1)
    if len(calls) > shards // 2:
      raise KeyboardInterrupt("simulated crash")
    return real_flush(*args, **kwargs)

  monkeypatch.setattr(pipeline, "_flush", crash_at_half)
  out = tmp_path / "resumed"
  with pytest.raises(KeyboardInterrupt):
    pipeline.curate([str(path)], out, cfg, progress=False)
  monkeypatch.setattr(pipeline, "_flush", real_flush)
  half = _state_bytes(out)
  log_before = (out / pipeline.STATE_FILE).read_bytes()
  with open(out / pipeline.STATE_FILE, "ab") as f:
    f.write(b'{"consumed": 999, "shards": 9')  # a crash while appending: a torn last line
  pipeline.curate([str(path)], out, cfg, progress=False)
  assert _kept(out) == _kept(tmp_path / "whole")
  assert json.loads((out / "stats.json").read_text())["stages"] == json.loads(
    (tmp_path / "whole" / "stats.json").read_text())["stages"]
  assert (out / pipeline.STATE_FILE).read_bytes().startswith(log_before)  # appended to, never rewritten
  # Twice the shards, about twice the state: linear (the whole state written again per shard would be ~4x).
  full = _state_bytes(out)
  assert full == _state_bytes(tmp_path / "whole")
  assert 1.6 * half < full < 2.4 * half, (half, full)


def test_cli(tmp_path, inputs, capsys):
  assert main(["curate", "--quiet", "--output", str(tmp_path), "--config.curate.language.keep=en", inputs["path"]]) == 0
  assert "shard(s)" in capsys.readouterr().out
  assert main(["curate", "--quiet", "--output", str(tmp_path / "x"), "--config.curate.language.keep=english",
               inputs["path"]]) == 2
  assert "'english'" in capsys.readouterr().err
