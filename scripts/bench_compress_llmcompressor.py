"""The llm-compressor side of bench_compress.py: the same GPTQ int4 g128 and SparseGPT 50% jobs, on the same model,
calibration windows and held-out documents, run with vLLM's llm-compressor (`oneshot`, torch on CPU) in a venv of
its own (it pins torch, transformers and compressed-tensors, none of which maxlm's env needs).

This file has two halves:
  driver  (maxlm's Python; imports only the standard library and numpy at module level)
          ensure_llmc_venv(root) builds `root/llmcompressor-venv` with the exact versions in LLMC_PINS (once; ~1.5 GB,
          about a minute: torch is the local CPU wheel) and records what got installed; llmc_row(...) writes the
          calibration windows and held-out documents, runs the job there as a child process and measures its wall
          time and peak RSS (os.wait4's ru_maxrss) as bench_posttrain.run does.
  job     (`<venv>/bin/python bench_compress_llmcompressor.py job --folder HF_DIR --calib CALIB.npy --heldout
          HELDOUT.npz --method none|gptq|sparsegpt --out DIR`) loads the transformers folder in float32 on CPU, runs
          `oneshot` (not for `none`: the float baseline), times it, scores the held-out documents and prints one JSON
          line {"method", "seconds", "perplexity", "tokens", "llmcompressor_version", "torch_version", ...}.

The jobs, set to maxlm's defaults (maxlm/compress/gptq.py, sparsegpt.py) as far as llm-compressor's API allows:
  gptq       GPTQModifier on every Linear in the decoder layers (q/k/v/o, gate/up/down; lm_head and the embedding,
             tied, stay float, as maxlm leaves them): int4, asymmetric (zero point), groups of 128 input channels per
             output channel, min/max with 0 inside the range, no act-order, dampening 0.01 of the mean Hessian
             diagonal, block 128. SmolLM2's q/k/v/gate/up have 576 inputs (4.5 groups), which llm-compressor's
             "group" strategy refuses (W4A16 / W4A16_ASYM fail at initialize); its "block" strategy with blocks of
             [1, 128] is the same grouping with a short last group of 64, whose min/max it takes over the group
             zero-padded to 128, as maxlm does (0 is in every range, so the padding changes nothing).
             The one difference llm-compressor's API cannot remove: it takes every group's scale and zero point
             from the weights before the sweep (its memoryless min/max weight observer runs before GPTQ), where maxlm
             and the IST-DASLab reference take them when the sweep reaches the group's first input, from the weights
             with the earlier inputs' error compensation applied. Code ranges differ only by an offset (signed
             [-8, 7] with the zero point in it, maxlm unsigned [0, 15]); same rounding (half to even).
  sparsegpt  SparseGPTModifier(sparsity=0.5, mask_structure="0:0") on the same seven Linears of every decoder layer:
             one OBS-score threshold per block of 128 inputs, dampening 0.01, block 128: maxlm's algorithm.
  both       the sequential pipeline: layer by layer, one pass of the calibration states through the float layer
             records its Hessians, a second pass through the compressed layer gives the next layer's inputs (maxlm
             does the same). Calibration is CALIB.npy's windows as given (no re-tokenization, no shuffling), in
             batches of --batch-size rows. Their Hessians are normalized by samples, maxlm's by tokens: a constant
             factor, which the relative dampening and the sweep cancel.
Perplexity: the compressed model as oneshot leaves it in memory, fake-quantized: GPTQ writes the dequantized
values (scale * (q - zero), float32) into each weight, and compressed-tensors' forward re-applies the same
quantize-dequantize (idempotent on those values); pruned weights hold exact zeros. Held-out documents are scored in
non-overlapping windows of --seq-len input tokens (maxlm.eval.windows.rolling_windows with stride = seq_len): every
token after a document's first is predicted once; exp(sum of NLL / targets).

Run:  python scripts/bench_compress_llmcompressor.py --methods none,gptq,sparsegpt --samples 8 --calib-seq 256 \
          --eval-tokens 4000 --eval-seq 256             (a smoke run; bench_compress.py calls llmc_row)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import side_venv  # noqa: E402  (standard library only: importable in either venv)

# The newest llm-compressor on PyPI (it accepts torch 2.10-2.14 and transformers 5.15-5.17) and what pip resolved with
# it here. torch is pinned to the machine's local CPU wheel (2.13.0+cpu): unpinned, pip would fetch the CUDA build.
LLMC_PINS = ("llmcompressor==0.14.0.1", "compressed-tensors==0.19.0", "torch==2.13.0", "transformers==5.17.0",
             "accelerate==1.16.0", "datasets==5.2.0", "auto-round==0.15.1", "numpy==2.4.6", "safetensors==0.8.0",
             "tokenizers==0.23.3")
VERSIONED = ("llmcompressor", "compressed-tensors", "torch", "transformers", "accelerate", "datasets", "auto-round",
             "numpy", "safetensors", "tokenizers")
DEFAULT_ROOT = Path.home() / ".cache" / "maxlm"
METHODS = ("none", "gptq", "sparsegpt")
CALIBRATION_PACKAGES = ("email", "http", "json", "logging", "unittest")  # bench_compress.py's


CUDA_PROBE = ("import importlib.metadata as m\nprint('\\n'.join(d.metadata['Name'] for d in m.distributions() if "
              "d.metadata['Name'].lower().startswith(('nvidia-cu', 'nvidia-nccl', 'triton'))))")


def _verify_cpu_torch(python: Path, versions: dict) -> None:
  """VenvUnavailable when pip brought in CUDA libraries (a torch other than the local CPU wheel)."""
  cuda = side_venv.check([str(python), "-c", CUDA_PROBE], "listing CUDA packages").split()
  if cuda or "+cpu" not in (versions.get("torch") or ""):
    raise side_venv.VenvUnavailable(f"pip installed torch {versions.get('torch')} with {cuda}: not the local CPU "
                                    "wheel")


def ensure_llmc_venv(root: Path) -> Path:
  """The python of `root/llmcompressor-venv` with the exact versions in LLMC_PINS (side_venv.ensure_venv), torch
  the local CPU wheel."""
  return side_venv.ensure_venv(root, "llmcompressor-venv", LLMC_PINS, VERSIONED,
                               "llmcompressor, llmcompressor.modifiers.gptq, llmcompressor.modifiers.pruning",
                               _verify_cpu_torch)


def llmc_versions(root: Path) -> dict[str, str | None]:
  """The versions recorded when `root/llmcompressor-venv` was built ({} if it is not built)."""
  return side_venv.recorded_versions(root, "llmcompressor-venv")


def write_heldout(path: Path, docs: list[np.ndarray]) -> Path:
  """The documents as an .npz: `tokens` (all of them laid end to end, int32) and `lengths` (int64)."""
  lengths = np.asarray([len(d) for d in docs], np.int64)
  tokens = np.concatenate([np.asarray(d, np.int32) for d in docs]) if docs else np.zeros(0, np.int32)
  np.savez(path, tokens=tokens, lengths=lengths)
  return path


def read_heldout(path: Path) -> list[np.ndarray]:
  """The documents written by `write_heldout`."""
  with np.load(path) as z:
    tokens, lengths = z["tokens"], z["lengths"]
  return np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else []


def llmc_row(folder: Path, calib: np.ndarray, heldout_docs: list[np.ndarray], seq_len: int, method: str, work: Path,
             venv_root: Path, batch_size: int = 8, threads: int | None = None) -> dict[str, Any]:
  """One llm-compressor row: `method` (none, gptq or sparsegpt) on the transformers folder `folder`, calibrated on
  `calib` (int32 [samples, calib_seq]), scored on `heldout_docs` in windows of `seq_len`; run as a child process
  in the venv under `venv_root`. Returns the job's perplexity, tokens, compression seconds (`oneshot`'s wall time)
  and versions, with command_seconds (the child's wall time, loading and scoring included) and peak_rss_gib; or
  {"missing": reason} when the venv cannot be built or the job fails."""
  if method not in METHODS:
    return {"missing": f"unknown method {method!r}; expected one of {METHODS}"}
  try:
    python = ensure_llmc_venv(venv_root)
  except (side_venv.VenvUnavailable, OSError) as e:
    return {"missing": f"the llm-compressor venv could not be built: {e}"}
  work = Path(work)
  work.mkdir(parents=True, exist_ok=True)
  calib_path, heldout_path = work / "llmc-calib.npy", work / "llmc-heldout.npz"
  np.save(calib_path, np.asarray(calib, np.int32))
  write_heldout(heldout_path, heldout_docs)
  log = work / f"llmc-{method}.log"
  env = side_venv.child_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                            TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES="")
  cmd = [str(python), str(Path(__file__).resolve()), "job", f"--folder={folder}", f"--calib={calib_path}",
         f"--heldout={heldout_path}", f"--method={method}", f"--seq-len={seq_len}", f"--batch-size={batch_size}",
         f"--out={work / f'llmc-{method}'}"]
  if threads:
    cmd.append(f"--threads={threads}")
  res = side_venv.run_child(cmd, log, env)
  out = side_venv.last_json(log.read_text(errors="replace"), "perplexity")
  if res["exit_code"] != 0 or out is None:
    last = (log.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]
    return {"missing": f"the llm-compressor job failed (exit {res['exit_code']}; see {log}): {last[:300]}"}
  return {**out, "command_seconds": res["seconds"], "peak_rss_gib": res["peak_rss_gib"],
          "versions": llmc_versions(venv_root)}


# ---------------------------------------------------------------------------------------------------------------------
# The job: runs inside the llm-compressor venv.


def rolling_windows(num_tokens: int, seq_len: int) -> list[tuple[int, int, int]]:
  """(start, end, first_scored) of a document's windows, as maxlm.eval.windows.rolling_windows with stride = seq_len:
  inputs doc[start:end - 1] predict doc[start + 1:end]; targets before first_scored only give context (with stride =
  seq_len there are none: the windows do not overlap and the first scores from the document's second token)."""
  windows, scored = [], 1
  while scored < num_tokens:
    end = min(num_tokens, scored + seq_len)
    windows.append((max(0, end - 1 - seq_len), end, scored))
    scored = end
  return windows


def perplexity(model: Any, docs: list[np.ndarray], seq_len: int, batch_size: int = 4) -> tuple[float, int]:
  """(sum of NLL in float64, number of scored targets) of `model` (a transformers causal LM) on `docs`, in
  right-padded batches of windows (causal attention: padding after a row's tokens changes none of its logits)."""
  import torch

  plan = [(i, w) for i, d in enumerate(docs) for w in rolling_windows(len(d), seq_len)]
  plan.sort(key=lambda p: p[1][1] - p[1][0])  # similar lengths together: less padding
  nll, count = 0.0, 0
  with torch.no_grad():
    for first in range(0, len(plan), batch_size):
      rows = plan[first:first + batch_size]
      width = max(end - 1 - start for _, (start, end, _) in rows)
      inputs = torch.zeros((len(rows), width), dtype=torch.long)
      targets = torch.zeros((len(rows), width), dtype=torch.long)
      weights = torch.zeros((len(rows), width), dtype=torch.bool)
      for r, (i, (start, end, scored)) in enumerate(rows):
        doc = torch.from_numpy(np.asarray(docs[i], np.int64))
        k = end - 1 - start
        inputs[r, :k], targets[r, :k] = doc[start:end - 1], doc[start + 1:end]
        weights[r, scored - 1 - start:k] = True
      logits = model(input_ids=inputs, use_cache=False).logits.float()
      token_nll = -torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
      nll += float(token_nll[weights].double().sum())
      count += int(weights.sum())
  return nll, count


def gptq_modifier() -> Any:
  """GPTQ as maxlm's default: int4, asymmetric, group 128 (as [1, 128] blocks: see the module docstring), min/max,
  no act-order, damp 0.01, block 128, on the decoder layers' Linears (lm_head, tied to the embedding, stays float)."""
  from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
  from llmcompressor.modifiers.gptq import GPTQModifier

  weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="block", block_structure=[1, 128],
                             dynamic=False, observer="memoryless_minmax", actorder=None)
  scheme = QuantizationScheme(targets=["Linear"], weights=weights)
  return GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], actorder=None, block_size=128,
                      dampening_frac=0.01)


def sparsegpt_modifier() -> Any:
  """SparseGPT at 50% unstructured, damp 0.01, block 128, on every Linear inside the decoder layers."""
  from llmcompressor.modifiers.pruning import SparseGPTModifier

  return SparseGPTModifier(sparsity=0.5, mask_structure="0:0", targets=[r"re:model\.layers\.\d+$"],
                           ignore=["re:.*lm_head"], block_size=128, dampening_frac=0.01)


def _check_compressed(model: Any, method: str) -> dict[str, Any]:
  """What the compressed decoder Linears hold: their sparsity (sparsegpt), or the most distinct values in any group
  of 128 inputs of one output channel (gptq: at most 16), and how many Linears there are."""
  import torch

  linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
  out: dict[str, Any] = {"linears": len(linears)}
  with torch.no_grad():
    if method == "sparsegpt":
      zeros = sum(int((m.weight == 0).sum()) for _, m in linears)
      out["sparsity"] = zeros / sum(m.weight.numel() for _, m in linears)
    elif method == "gptq":
      most = 0
      for _, m in linears:
        w = m.weight.detach().float()
        for group in torch.split(w[:4], 128, dim=1):  # a few output channels of each weight: enough to check
          most = max(most, max(int(torch.unique(row).numel()) for row in group))
      out["max_distinct_per_group"] = most
  return out


def job(folder: Path, calib_path: Path, heldout_path: Path, method: str, seq_len: int, batch_size: int,
        out_dir: Path | None, threads: int | None = None) -> dict[str, Any]:
  """Compresses the model in `folder` with llm-compressor (`method`; none: no compression) and scores it."""
  import importlib.metadata

  import torch
  from transformers import AutoModelForCausalLM

  if threads:
    torch.set_num_threads(threads)
  calib = np.load(calib_path)
  docs = read_heldout(heldout_path)
  t0 = time.perf_counter()
  model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map=None)
  model.eval()
  load_s = time.perf_counter() - t0
  seconds = 0.0
  record: dict[str, Any] = {}
  if method != "none":
    from datasets import Dataset
    from llmcompressor import oneshot

    data = Dataset.from_dict({"input_ids": calib.astype(np.int64).tolist(),
                              "attention_mask": np.ones_like(calib, dtype=np.int64).tolist()})
    recipe = gptq_modifier() if method == "gptq" else sparsegpt_modifier()
    t1 = time.perf_counter()
    model = oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(calib),
                    max_seq_length=calib.shape[1], batch_size=batch_size, shuffle_calibration_samples=False,
                    pipeline="sequential", output_dir=None, log_dir=None)
    seconds = time.perf_counter() - t1
    record = _check_compressed(model, method)
  t2 = time.perf_counter()
  nll, count = perplexity(model, docs, seq_len)
  eval_s = time.perf_counter() - t2
  result = {"method": method, "seconds": seconds, "perplexity": float(np.exp(nll / count)), "tokens": count,
            "nll": nll, "llmcompressor_version": importlib.metadata.version("llmcompressor"),
            "torch_version": torch.__version__, "compressed_tensors_version": importlib.metadata.version(
              "compressed-tensors"), "transformers_version": importlib.metadata.version("transformers"),
            "calibration": list(calib.shape), "documents": len(docs), "seq_len": seq_len, "load_s": load_s,
            "eval_s": eval_s, "threads": torch.get_num_threads(), **record}
  if out_dir is not None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
  return result


# ---------------------------------------------------------------------------------------------------------------------
# A stand-alone run (maxlm's Python): bench_compress.py's calibration windows and held-out documents, made small.


def maxlm_inputs(samples: int, calib_seq: int, eval_tokens: int) -> tuple[Path, np.ndarray, list[np.ndarray]]:
  """(transformers folder, calibration windows, held-out documents) of SmolLM2-135M as maxlm makes them: the windows
  `maxlm quantize --calibration <stdlib packages> --samples --seq-len` draws (seed 0), and the first pydoc topics
  encoded as maxlm stores documents ([bos] ids eos), `eval_tokens` scored tokens in all."""
  import sysconfig

  sys.path.insert(0, str(Path(__file__).resolve().parent))
  import fetch_models
  from real_bench import heldout

  from maxlm.compress.calibration import calibration_tokens
  from maxlm.workdir import load_workdir_tokenizer

  workdir = fetch_models.fetch_workdir("smollm2-135m")
  folder = fetch_models.fetch_transformers("smollm2-135m")
  tokenizer = load_workdir_tokenizer(workdir)
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  calib, _ = calibration_tokens(tokenizer, samples=samples, seq_len=calib_seq,
                                paths=[str(stdlib / p) for p in CALIBRATION_PACKAGES], seed=0)
  texts, _ = heldout.source()
  docs, _ = heldout.documents(tokenizer, texts, eval_tokens)
  return folder, calib, docs


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("mode", nargs="?", choices=("row", "job"), default="row",
                  help="row: build the venv and run the jobs in it (maxlm's Python); job: one job (llm-compressor "
                  "venv)")
  ap.add_argument("--folder", default=None, help="transformers folder (job)")
  ap.add_argument("--calib", default=None, help="int32 [samples, seq] .npy (job)")
  ap.add_argument("--heldout", default=None, help=".npz of tokens and lengths (job)")
  ap.add_argument("--method", choices=METHODS, default="gptq", help="job: what to run")
  ap.add_argument("--methods", default="none,gptq,sparsegpt", help="row: comma-separated methods")
  ap.add_argument("--out", default=None, help="job: directory for result.json")
  ap.add_argument("--seq-len", type=int, default=2048, help="held-out window length (job)")
  ap.add_argument("--batch-size", type=int, default=8, help="calibration rows per forward pass")
  ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
  ap.add_argument("--samples", type=int, default=8, help="row: calibration windows")
  ap.add_argument("--calib-seq", type=int, default=256, help="row: tokens per calibration window")
  ap.add_argument("--eval-seq", type=int, default=256, help="row: held-out window length")
  ap.add_argument("--eval-tokens", type=int, default=4000, help="row: held-out scored tokens")
  ap.add_argument("--work", default=None, help="row: directory for the data and the logs (default: a new one)")
  ap.add_argument("--venv-root", default=str(DEFAULT_ROOT), help="the venv is VENV_ROOT/llmcompressor-venv")
  args = ap.parse_args()
  if args.mode == "job":
    if not (args.folder and args.calib and args.heldout):
      ap.error("job needs --folder, --calib and --heldout")
    res = job(Path(args.folder), Path(args.calib), Path(args.heldout), args.method, args.seq_len, args.batch_size,
              Path(args.out) if args.out else None, args.threads)
    print(json.dumps(res), flush=True)
    return
  import tempfile

  work = Path(args.work or tempfile.mkdtemp(prefix="bench_compress_llmc-"))
  folder, calib, docs = maxlm_inputs(args.samples, args.calib_seq, args.eval_tokens)
  rows = {}
  for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
    rows[method] = llmc_row(folder, calib, docs, args.eval_seq, method, work, Path(args.venv_root),
                            batch_size=args.batch_size, threads=args.threads)
    print(f"{method}: {json.dumps(rows[method])}", flush=True)
  print(json.dumps({"work": str(work), "calibration": list(calib.shape), "documents": len(docs), "rows": rows},
                   indent=1))


if __name__ == "__main__":
  main()
