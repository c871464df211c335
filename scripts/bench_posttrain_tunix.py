"""The Tunix side of bench_posttrain.py's `speed` section: the same LoRA SFT job (SmolLM2-135M-Instruct, rank 16,
alpha 32 on q/k/v/o and gate/up/down, 8 rows x 64 tokens per step, lr 1e-3, float32 weights) in google-tunix (JAX,
Flax NNX, qwix LoRA, tunix.sft.PeftTrainer), in a venv of its own: Tunix needs safetensors<0.8 (maxlm's env has 0.8)
and pulls in datasets, grain, tensorflow-datasets and more that maxlm does not use.

This file has two halves:
  driver  (maxlm's Python; imports only the standard library at module level)
          ensure_tunix_venv(root) builds `root/tunix-venv` with the exact versions in TUNIX_PINS (once; ~1.6 GB, 2-3
          minutes) and records what got installed; tunix_row(...) runs the job there as a child process and measures
          its wall time and peak RSS (os.wait4's ru_maxrss) as bench_posttrain.run does.
  job     (`<tunix-venv>/bin/python bench_posttrain_tunix.py job ...`; imports tunix, jax, flax, qwix, optax, numpy,
          tokenizers) loads the transformers folder into Tunix's Llama3 with Tunix's safetensors loader, applies qwix
          LoRA, trains for --steps steps with PeftTrainer and prints one JSON line: {"step_s", "tokens_per_step",
          "tunix_version", "jax_version", ...}, step_s being the median step time without the first 2 steps.

Run:  python scripts/bench_posttrain_tunix.py --steps 12   (the text job of bench_posttrain.write_data; prints the row)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import side_venv  # noqa: E402  (standard library only: importable in either venv)

# Newest google-tunix on PyPI that runs on CPU with Python 3.11, and what pip resolved with it here. Everything else it
# pulls in (datasets, grain, tensorflow-datasets, ...) is left to pip; no torch is pulled in.
TUNIX_PINS = ("google-tunix==0.1.7", "jax[cpu]==0.10.2", "jaxlib==0.10.2", "flax==0.12.8", "qwix==0.1.8",
              "optax==0.2.8", "orbax-checkpoint==0.12.8", "numpy==2.4.6", "safetensors==0.7.0", "tokenizers==0.22.2",
              "transformers==5.12.1")
VERSIONED = ("google-tunix", "jax", "jaxlib", "flax", "qwix", "optax", "orbax-checkpoint", "numpy", "safetensors",
             "tokenizers", "transformers", "torch")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the TRL job's targets
DEFAULT_ROOT = Path.home() / ".cache" / "maxlm"




def ensure_tunix_venv(root: Path) -> Path:
  """The python of `root/tunix-venv` with the exact versions in TUNIX_PINS (side_venv.ensure_venv)."""
  return side_venv.ensure_venv(root, "tunix-venv", TUNIX_PINS, VERSIONED,
                               "tunix.sft.peft_trainer, tunix.models.llama3.model, qwix")


def tunix_versions(root: Path) -> dict[str, str | None]:
  """The versions recorded when `root/tunix-venv` was built ({} if it is not built)."""
  return side_venv.recorded_versions(root, "tunix-venv")


def tunix_row(folder: Path, text_jsonl: Path, steps: int, work: Path, venv_root: Path) -> dict[str, Any]:
  """The Tunix row of the speed table: the job on `folder` (a transformers SmolLM2 folder) and `text_jsonl`
  ({"text"} lines) for `steps` steps in the venv under `venv_root`, run as a child process. Returns tokens_per_sec,
  seconds (the child's wall time, loading and compiling included), peak_rss_gib (its max RSS), versions and the
  first and last loss; or {"missing": reason} when the venv cannot be built or the job fails."""
  try:
    python = ensure_tunix_venv(venv_root)
  except (side_venv.VenvUnavailable, OSError) as e:
    return {"missing": f"the Tunix venv could not be built: {e}"}
  work = Path(work)
  work.mkdir(parents=True, exist_ok=True)
  log = work / "tunix.log"
  env = side_venv.child_env(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [str(python), str(Path(__file__).resolve()), "job", f"--folder={folder}", f"--text={text_jsonl}",
         f"--steps={steps}"]
  res = side_venv.run_child(cmd, log, env)
  out = side_venv.last_json(log.read_text(errors="replace"), "step_s")
  if res["exit_code"] != 0 or out is None:
    last = (log.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]
    return {"missing": f"the Tunix job failed (exit {res['exit_code']}; see {log}): {last[:300]}"}
  return {"tokens_per_sec": out["tokens_per_step"] / out["step_s"], "seconds": res["seconds"],
          "peak_rss_gib": res["peak_rss_gib"], "versions": tunix_versions(venv_root),
          "step_cpu_s": out["step_cpu_s"], "first_loss": out["first_loss"], "last_loss": out["last_loss"],
          "steps": steps}


# ---------------------------------------------------------------------------------------------------------------------
# The job: runs inside the Tunix venv.


def _tokenize(folder: Path, text_jsonl: Path, seq_len: int, pad_id: int) -> tuple[Any, Any]:
  """Each {"text"} row's tokens (tokenizer.json, no special tokens added: SmolLM2's adds none) cut to `seq_len`, as
  TRL's SFTTrainer with max_length and no packing does: int32 ids [rows, seq_len] and a bool mask (False on padding)."""
  import numpy as np
  from tokenizers import Tokenizer

  texts = [json.loads(line)["text"] for line in text_jsonl.read_text().splitlines() if line.strip()]
  encoded = Tokenizer.from_file(str(folder / "tokenizer.json")).encode_batch(texts)
  tokens = np.full((len(texts), seq_len), pad_id, np.int32)
  mask = np.zeros((len(texts), seq_len), bool)
  for i, enc in enumerate(encoded):
    ids = enc.ids[:seq_len]
    tokens[i, :len(ids)], mask[i, :len(ids)] = ids, True
  return tokens, mask


def _median_step(marks: list[float]) -> float:
  """The median gap between consecutive step-end marks, leaving out steps 0 and 1 (compilation), as the TRL job does."""
  gaps = sorted(b - a for a, b in zip(marks[1:], marks[2:]))
  return gaps[len(gaps) // 2]


def job(folder: Path, text_jsonl: Path, steps: int, batch: int = 8, seq_len: int = 64, lr: float = 1e-3,
        rank: int = 16, alpha: float = 32.0) -> dict[str, Any]:
  """LoRA SFT of the Llama-architecture model in `folder` with Tunix for `steps` steps; its step times and losses."""
  import functools
  import importlib.metadata
  import resource

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import qwix
  from flax import nnx
  from tunix.models import safetensors_loader
  from tunix.models.llama3 import model as llama
  from tunix.models.llama3 import params as llama_params
  from tunix.sft import hooks, peft_trainer
  from tunix.sft import utils as sft_utils

  if steps < 4:
    raise ValueError("needs at least 4 steps (the first 2 are not timed)")
  t0 = time.perf_counter()
  hf = json.loads((folder / "config.json").read_text())
  if hf.get("model_type") != "llama":
    raise ValueError(f"{folder} is a {hf.get('model_type')} model; this job loads Llama ones")
  rope = hf.get("rope_parameters") or {}
  cfg = llama.ModelConfig(
    num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
    hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
    head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
    num_kv_heads=hf["num_key_value_heads"], rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10_000.0)),
    norm_eps=hf["rms_norm_eps"], weight_tying=bool(hf.get("tie_word_embeddings", False)))
  # Tunix 0.1.7's Llama3 attention calls apply_rope without the config's rope_theta (its default is 1e6): give it the
  # model's own (SmolLM2: 1e5) so the numbers match the model. Same cost either way.
  llama.apply_rope = functools.partial(llama.apply_rope, rope_theta=cfg.rope_theta)

  def key_mapping(c: Any) -> dict[str, Any]:
    """Tunix's Llama3 safetensors names; a tied checkpoint may hold the embedding as lm_head.weight only."""
    mapping = dict(llama_params._get_key_and_transform_mapping(c))
    if c.weight_tying:
      mapping[r"lm_head\.weight"] = ("embedder.input_embedding", None)
    return mapping

  base = safetensors_loader.load_and_create_model(str(folder), llama.Llama3, cfg, key_mapping, mesh=None,
                                                  dtype=jnp.float32)
  provider = qwix.LoraProvider(module_path=".*(" + "|".join(LORA_TARGETS) + ")", rank=rank, alpha=alpha)
  model = qwix.apply_lora_to_model(base, provider, rngs=nnx.Rngs(0), **base.get_model_input())
  trained = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  tokens, mask = _tokenize(folder, text_jsonl, seq_len, int(hf.get("pad_token_id") or 0))
  load_s = time.perf_counter() - t0
  load_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

  def batches() -> Any:
    for step in range(steps):
      rows = (step * batch + np.arange(batch)) % len(tokens)
      yield peft_trainer.TrainingInput(input_tokens=tokens[rows], input_mask=mask[rows])

  def model_inputs(x: Any) -> dict[str, Any]:
    return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
            "positions": sft_utils.build_positions_from_mask(x.input_mask),
            "attention_mask": sft_utils.make_causal_attn_mask(x.input_mask)}

  class Clock(hooks.TrainingHooks):
    """PeftTrainer calls on_train_step_end once a step's loss is on the host (a step late: Tunix overlaps the next
    step's dispatch with it), so consecutive calls are one step's time apart."""

    def __init__(self) -> None:
      self.ends: list[float] = []
      self.cpu: list[float] = []  # the process's CPU time (all threads): less sensitive to other load on the machine
      self.losses: list[Any] = []

    def on_train_step_end(self, train_ctx: Any, train_step: int, train_loss: Any) -> None:
      self.ends.append(time.perf_counter())
      self.cpu.append(time.process_time())
      self.losses.append(train_loss)

    def on_train_start(self, train_ctx: Any) -> None: ...

    def on_train_end(self, train_ctx: Any) -> None: ...

    def on_train_step_start(self, train_ctx: Any) -> None: ...

    def on_eval_step_start(self, train_ctx: Any) -> None: ...

    def on_eval_step_end(self, train_ctx: Any, eval_loss: Any) -> None: ...

  # TRL's defaults for the same job: AdamW (no weight decay), linear decay to 0, gradient norm clipped at 1.
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(optax.linear_schedule(lr, 0.0, steps), weight_decay=0.0))
  trainer = peft_trainer.PeftTrainer(model, optimizer, peft_trainer.TrainingConfig(
    eval_every_n_steps=steps + 1, max_steps=steps, pbar_description=None))
  trainer = trainer.with_gen_model_input_fn(model_inputs)
  clock = Clock()
  trainer.with_training_hooks(clock)
  t1 = time.perf_counter()
  trainer.train(batches())
  train_s = time.perf_counter() - t1
  if len(clock.ends) != steps:
    raise RuntimeError(f"expected {steps} step-end calls from PeftTrainer, got {len(clock.ends)}")
  losses = [float(np.asarray(v)) for v in clock.losses]
  return {"step_s": _median_step(clock.ends), "step_cpu_s": _median_step(clock.cpu),
          "tokens_per_step": batch * seq_len, "steps": steps, "first_step_s": clock.ends[0] - t1, "load_s": load_s,
          "train_s": train_s, "peak_rss_after_load_gib": load_rss_gib, "trained_params": int(trained),
          "first_loss": losses[0], "last_loss": losses[-1], "tunix_version": importlib.metadata.version("google-tunix"),
          "jax_version": jax.__version__, "flax_version": importlib.metadata.version("flax"),
          "qwix_version": importlib.metadata.version("qwix"), "devices": [str(d) for d in jax.devices()]}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("mode", nargs="?", choices=("row", "job"), default="row",
                  help="row: build the venv and run the job in it (maxlm's Python); job: the job itself (Tunix venv)")
  ap.add_argument("--folder", default=None, help="transformers folder (default: SmolLM2-135M-Instruct's, fetched)")
  ap.add_argument("--text", default=None, help="{'text'} jsonl (default: bench_posttrain.write_data's)")
  ap.add_argument("--steps", type=int, default=12)
  ap.add_argument("--work", default=None, help="directory for the data and the log (default: a new temporary one)")
  ap.add_argument("--venv-root", default=str(DEFAULT_ROOT), help="the venv is VENV_ROOT/tunix-venv")
  args = ap.parse_args()
  if args.mode == "job":
    if not (args.folder and args.text):
      ap.error("job needs --folder and --text")
    print(json.dumps(job(Path(args.folder), Path(args.text), args.steps)), flush=True)
    return
  import tempfile

  sys.path.insert(0, str(Path(__file__).resolve().parent))
  work = Path(args.work or tempfile.mkdtemp(prefix="bench_posttrain_tunix-"))
  if args.folder:
    folder = Path(args.folder)
  else:
    import fetch_models

    folder = fetch_models.fetch_transformers("smollm2-135m")
  if args.text:
    text = Path(args.text)
  else:
    import bench_posttrain

    text = bench_posttrain.write_data(work / "data", 256, 64)["text"]
  print(json.dumps(tunix_row(folder, text, args.steps, work, Path(args.venv_root)), indent=1))


if __name__ == "__main__":
  main()
