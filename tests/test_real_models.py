"""A real model end to end: SmolLM2-135M-Instruct (Q4_1 GGUF) through `maxlm convert --from-gguf` against
transformers loading the same file (its own GGUF reader and dequantizer, float32).

The model comes from scripts/fetch_models.py (downloaded, verified and converted once into $MAXLM_MODELS, then
reused), and so does transformers' import of it (`from_pretrained(dir, gguf_file=...)`, saved once as float32
safetensors: it loads in a second instead of ~20 s); both are loaded once per module. Tokenizer and chat-template
parity are tested elsewhere (the tokenizer tests).
"""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import fetch_models, prose_documents

from data_pipelines.tokenizer import encode_prompt
from maxlm.cli import main as cli_main
from maxlm.serve.engine import Engine
from maxlm.serve.request import SamplingParams
from maxlm.workdir import load_model, load_workdir_config, restore_params

KEY = "smollm2-135m"
PROMPT = "The GNU General Public License is a free, copyleft license for"
NEW_TOKENS = 32
# A small KV cache (the model's context is 8192), and all 32 steps in one decode call: one decode program to compile.
SERVE = ("--config.serve.max_len=64", "--config.serve.max_batch=1", f"--config.serve.decode_steps={NEW_TOKENS}")


@pytest.fixture(scope="module")
def gguf_file():
  return fetch_models().fetch_gguf(KEY)


@pytest.fixture(scope="module")
def workdir(gguf_file):
  return fetch_models().fetch_workdir(KEY)


@pytest.fixture(scope="module")
def hf(gguf_file):
  """(model, tokenizer) of transformers' own GGUF import (float32), saved once by fetch_transformers."""
  folder = fetch_models().fetch_transformers(KEY)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  return model, transformers.AutoTokenizer.from_pretrained(folder)


def test_logits_match_transformers_on_a_padded_batch(workdir, hf):
  model, tok = hf
  texts = [doc[:n] for doc, n in zip(prose_documents("en", 400, 3), (300, 170, 60))]
  rows = [tok(t, add_special_tokens=False).input_ids for t in texts]
  lengths = [len(r) for r in rows]
  assert len(set(lengths)) == 3, lengths  # rows of different lengths, right-padded
  seq = max(lengths)
  tokens = np.zeros((3, seq), np.int64)
  mask = np.zeros((3, seq), np.int64)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], mask[i, :len(r)] = r, 1
  with torch.no_grad():
    ref = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
  ours, _, _ = load_model(workdir, devices=jax.devices()[:1])
  positions = np.broadcast_to(np.arange(seq), (3, seq))
  out = np.asarray(ours(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)), np.float32)
  assert out.shape == ref.shape == (3, seq, model.config.vocab_size)
  real = mask.astype(bool)
  scale = np.abs(ref[real]).max()
  err = np.abs(out - ref)[real].max()
  assert scale > 5, scale  # real logits, not a degenerate model
  assert err <= 1e-4 * scale, f"max |maxlm - transformers| = {err:.3g} at logit scale {scale:.3g}"


@pytest.fixture(scope="module")
def hf_greedy(hf):
  """transformers' 32 greedy tokens after PROMPT (its tokenizer's encoding: no bos for SmolLM2)."""
  model, tok = hf
  ids = tok(PROMPT).input_ids
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=NEW_TOKENS)
  return ids, out[0, len(ids):].tolist()


def test_greedy_generation_matches_transformers(workdir, hf_greedy):
  ids, ref = hf_greedy
  engine = Engine.from_workdir(str(workdir), SERVE)
  prompt = encode_prompt(engine.tokenizer, PROMPT)
  assert prompt == ids  # maxlm encodes the prompt as the model's own tokenizer does (SmolLM2: no bos)
  got = engine.generate([prompt], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))[0]
  assert len(ref) == NEW_TOKENS and len(set(ref)) > 8  # a real continuation, no eos before 32 tokens
  assert got == ref, f"maxlm {got}\ntransformers {ref}"


def test_generate_cli_prints_transformers_greedy_text(workdir, hf, hf_greedy, capsys):
  _, ref = hf_greedy
  assert cli_main(["generate", f"--workdir={workdir}", f"--prompt={PROMPT}", f"--max-tokens={NEW_TOKENS}",
                   *SERVE]) == 0
  assert capsys.readouterr().out == PROMPT + hf[1].decode(ref) + "\n"


@pytest.mark.slow  # writes and re-imports a 540 MB float32 GGUF
def test_f32_gguf_export_round_trips_exactly(workdir, gguf_file, tmp_path):
  from maxlm.convert.gguf import convert_from_gguf, convert_to_gguf
  exported = convert_to_gguf(workdir, tmp_path / "smollm2-f32.gguf", dtype="f32")
  # The exported tensors are the source file's, dequantized exactly (the gguf package's own dequantizer).
  source = {t.name: t for t in gguf.GGUFReader(gguf_file).tensors}
  for t in gguf.GGUFReader(exported).tensors:
    assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
    want = gguf.quants.dequantize(source[t.name].data, source[t.name].tensor_type)
    np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), want, err_msg=t.name)
  assert {t.name for t in gguf.GGUFReader(exported).tensors} == set(source)
  convert_from_gguf(exported, tmp_path / "again")
  cfg = load_workdir_config(workdir)
  _, original = restore_params(workdir, cfg)
  _, again = restore_params(tmp_path / "again", load_workdir_config(tmp_path / "again"))
  assert jax.tree.structure(again) == jax.tree.structure(original)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(original), jax.tree.leaves(again)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)
