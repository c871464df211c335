"""The Colab quickstart (notebooks/quickstart.ipynb) runs top to bottom here and each step does what it says."""

import json
import math
from pathlib import Path

import pytest

from maxlm.metrics import read_metrics

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"
# Llama-3-8B as published (meta-llama/Meta-Llama-3-8B config.json): the reference for the plan's parameter bytes.
LLAMA3_8B = {"layers": 32, "hidden": 4096, "mlp": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256}


def _llama3_8b_params() -> tuple[int, int]:
  """(all parameters, RMSNorm scales) of Llama-3-8B, counted from its published shape."""
  h, m, layers, vocab = LLAMA3_8B["hidden"], LLAMA3_8B["mlp"], LLAMA3_8B["layers"], LLAMA3_8B["vocab"]
  head_dim = h // LLAMA3_8B["heads"]
  kv = LLAMA3_8B["kv_heads"] * head_dim
  per_layer = h * h + 2 * h * kv + h * h + 3 * h * m + 2 * h  # q, k, v, o; gate, up, down; two norms
  norms = layers * 2 * h + h
  return layers * per_layer + 2 * vocab * h + h, norms


def _text(cell) -> str:
  """What a cell printed to stdout and its plain-text results (not the kernel's log lines on stderr)."""
  parts = []
  for out in cell.get("outputs", []):
    if out["output_type"] == "stream" and out["name"] == "stdout":
      parts.append(out["text"])
    elif "data" in out and "text/plain" in out["data"]:
      parts.append(out["data"]["text/plain"])
  return "".join(parts)


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.outputs == [] and c.execution_count is None for c in code)


@pytest.mark.slow  # ~4.5 min here: trains the tiny default for 200 steps; runs in the slow job of .ci/run
def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  monkeypatch.setenv("MAXLM_CACHE", str(tmp_path / "cache"))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError naming the cell if any cell fails
  cells = {c.get("id"): c for c in nb.cells}

  # Training: the loss the run wrote falls well below where it started, and the plot was drawn inline.
  records = read_metrics(tmp_path / "runs" / "tiny")
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 200 and all(math.isfinite(x) for x in losses)
  assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 1.5, (losses[:20], losses[-20:])
  assert any("image/png" in out.get("data", {}) for out in cells["plot"].outputs)
  assert f"-> {losses[-1]:.3f} at step 200" in _text(cells["plot"])

  # Generation (the command's output, log lines included): the prompt, then new text.
  generated = _text(cells["generate"])
  assert "def " in generated and generated.split("def ", 1)[1].strip(), generated

  # Serving: an OpenAI-style completion (https://platform.openai.com/docs/api-reference/completions/object).
  lines = _text(cells["serve"]).splitlines()
  assert lines[0] == "served: ['tiny'] HTTP 200"
  completion = json.loads(lines[1])
  assert completion["object"] == "text_completion" and completion["model"] == "tiny"
  choice, usage = completion["choices"][0], completion["usage"]
  assert choice["text"] and choice["finish_reason"] in ("length", "stop")
  assert 0 < usage["completion_tokens"] <= 32
  assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

  # Plan: FITS, and the parameter bytes per device are Llama-3-8B's float32 bytes over 256 chips (RMSNorm scales,
  # which the fsdp rules leave whole, are on every chip).
  assert "FITS" in _text(cells["plan"]) and "DOES NOT FIT" not in _text(cells["plan"])
  plan = json.loads((tmp_path / "plan.json").read_text())
  total, norms = _llama3_8b_params()
  assert plan["config"]["num_params"] == total == 8_030_261_248
  assert plan["bytes"]["parameters"] == 4 * ((total - norms) // 256 + norms)
