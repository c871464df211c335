"""`maxlm generate` over a workdir: the printed completion (or chat answer) is the engine's; bad arguments are clear
errors."""

import json
import shutil

import pytest
import transformers
from helpers import build_model, byte_level_bpe_json, small_config

from data_pipelines.tokenizer import load_tokenizer
from maxlm.cli import main
from maxlm.config import to_json
from maxlm.generate import sample_tokens
from maxlm.serve.engine import Engine
from maxlm.train.checkpoint import Checkpointer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir as `maxlm convert` writes one: config.json, a parameters-only checkpoint and tokenizer/."""
  workdir = tmp_path_factory.mktemp("gen") / "w"
  cfg = small_config("--config.model.init_std=0.2")
  (workdir / "tokenizer").mkdir(parents=True)
  (workdir / "tokenizer" / "tokenizer.json").write_text(byte_level_bpe_json(["<s>", "</s>"], False, 300))
  (workdir / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
  (workdir / "config.json").write_text(to_json(cfg))
  graphdef, params = build_model(cfg, seed=1)
  ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
  ckpt.save_params(1, params, json.loads(to_json(cfg)))
  ckpt.close()
  return workdir, graphdef, params


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nBe helpful.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_workdir(workdir):
  """The workdir with a ChatML tokenizer whose end of turn (<|im_end|>) is not its eos (<|endoftext|>)."""
  path = workdir[0].parent / "chat"
  shutil.copytree(workdir[0], path)
  tok_dir = path / "tokenizer"
  (tok_dir / "tokenizer.json").write_text(byte_level_bpe_json(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], False,
                                                              300))
  (tok_dir / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "chat_template": CHATML}))
  return path, workdir[1], workdir[2]


def test_generate_prints_the_greedy_completion(workdir, capsys):
  """The prompt is encoded as transformers' tokenizer of the workdir encodes it (this one adds no bos)."""
  path, graphdef, params = workdir
  assert main(["generate", f"--workdir={path}", "--prompt=hello wor", "--max-tokens=12"]) == 0
  out = capsys.readouterr().out
  tok = load_tokenizer(path / "tokenizer")
  prompt = transformers.AutoTokenizer.from_pretrained(str(path / "tokenizer"))("hello wor")["input_ids"]
  ref = sample_tokens(graphdef, params, prompt, 12, max_len=128, temperature=0, eos_id=tok.eos_id,
                      vocab_limit=tok.vocab_size)
  assert out == "hello wor" + tok.decode(ref) + "\n"


@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_chat_answers_through_the_chat_template(chat_workdir, capsys, monkeypatch, system):
  """--chat: the engine gets exactly apply_chat_template's ids, stops at <|im_end|>, and only the answer prints."""
  path, graphdef, params = chat_workdir
  seen, add_request = [], Engine.add_request

  def recording(self, request):
    seen.append((self, request))
    add_request(self, request)

  monkeypatch.setattr(Engine, "add_request", recording)
  question = "What is 2+2?"
  args = ["generate", f"--workdir={path}", f"--chat={question}", "--max-tokens=12"]
  assert main(args + ([] if system is None else [f"--system={system}"])) == 0
  out = capsys.readouterr().out
  ref_tok = transformers.AutoTokenizer.from_pretrained(str(path / "tokenizer"))
  messages = [{"role": "user", "content": question}]
  if system is not None:
    messages.insert(0, {"role": "system", "content": system})
  prompt = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
  (engine, request), = seen
  end_of_turn = ref_tok.convert_tokens_to_ids("<|im_end|>")
  assert request.prompt_ids == prompt and engine.eos_id == end_of_turn != ref_tok.eos_token_id
  ref = sample_tokens(graphdef, params, prompt, 12, max_len=128, temperature=0, eos_id=end_of_turn,
                      vocab_limit=ref_tok.vocab_size)
  assert out == ref_tok.decode(ref, skip_special_tokens=True) + "\n"


def test_chat_argument_errors(workdir, chat_workdir, capsys):
  with pytest.raises(SystemExit) as exit_:
    main(["generate", f"--workdir={chat_workdir[0]}", "--chat=hi", "--prompt=hi"])
  assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
  assert main(["generate", f"--workdir={chat_workdir[0]}", "--prompt=hi", "--system=be nice"]) == 2
  assert "--system is the system message of a --chat question" in capsys.readouterr().err
  assert main(["generate", f"--workdir={workdir[0]}", "--chat=hi"]) == 1  # its tokenizer has no chat template
  err = capsys.readouterr().err
  assert "has no chat template" in err and "Traceback" not in err


def test_generate_errors_name_the_problem(workdir, tmp_path, capsys):
  path = workdir[0]
  assert main(["generate", f"--workdir={tmp_path / 'missing'}", "--prompt=x"]) == 1
  assert "no config.json" in capsys.readouterr().err
  assert main(["generate", f"--workdir={path}", "--prompt=x", "--max-tokens=500"]) == 1
  assert "--max-tokens" in capsys.readouterr().err
  assert main(["generate", f"--workdir={path}", "--prompt=x", "--config.serve.weights=int3"]) == 1
  assert "serve.weights" in capsys.readouterr().err


def test_a_serving_mesh_that_cannot_shard_the_model_is_a_clear_error(workdir, capsys):
  path = workdir[0]
  assert main(["generate", f"--workdir={path}", "--prompt=x", "--config.mesh.data=1", "--config.mesh.tensor=4",
               "--config.serve.devices=4"]) == 1
  err = capsys.readouterr().err
  assert "serve.devices=4" in err and "model.num_kv_heads=2 is not divisible by the 4 devices" in err
  assert "Traceback" not in err


def test_a_draft_whose_vocabulary_differs_in_one_piece_is_refused(workdir, tmp_path, capsys):
  """A draft tokenizer that encodes a sample sentence as the target's does, with one special piece renamed: refused
  (a vocabulary is compared piece by piece), naming the piece."""
  path = workdir[0]
  draft = tmp_path / "draft"
  shutil.copytree(path, draft)
  (draft / "tokenizer" / "tokenizer.json").write_text(byte_level_bpe_json(["<s>", "<x>"], False, 300))
  (draft / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<x>"}))
  target_tok, draft_tok = load_tokenizer(path / "tokenizer"), load_tokenizer(draft / "tokenizer")
  sample = "The quick brown fox, 123!"
  assert target_tok.encode(sample) == draft_tok.encode(sample) and target_tok.vocab_size == draft_tok.vocab_size
  assert [i for i in range(target_tok.vocab_size) if target_tok.id_to_piece(i) != draft_tok.id_to_piece(i)] == [1]
  assert main(["generate", f"--workdir={path}", f"--draft-workdir={draft}", "--prompt=x"]) == 1
  err = capsys.readouterr().err
  assert "tokenizers differ" in err and "id 1 is '</s>' vs '<x>'" in err and "Traceback" not in err
