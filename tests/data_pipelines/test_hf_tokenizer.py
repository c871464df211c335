"""Hugging Face tokenizer.json checkpoints: parity with transformers, special ids, corpus building."""

import inspect
import json
import shutil

import pytest
import tokenizers
import tokenizers.processors
from helpers import byte_level_bpe_json, fetch_models

from data_pipelines.corpus import prepare_corpus
from data_pipelines.sources import Document
from data_pipelines.tokenized import encode_documents
from data_pipelines.tokenizer import (
  HFTokenizer,
  Tokenizer,
  encode_prompt,
  load_tokenizer,
  train_tokenizer,
)

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "ünïcödé — “quotes” Ελληνικά 中文 日本語 emoji 😀👍🏽 👨‍👩‍👧",
    "def f(x):\n\tif x:\n        return  x   # spaces\n\n\n",
    "  leading and trailing  \r\nwindows\rline\x00nul",
    "literal <|begin_of_text|> and <|end_of_text|> and <|endoftext|> are just text",
]


@pytest.fixture(scope="module")
def llama_json():
  return byte_level_bpe_json(LLAMA_SPECIALS, add_bos=True)


@pytest.fixture(scope="module")
def qwen_json():
  return byte_level_bpe_json(QWEN_SPECIALS, add_bos=False)


def _checkpoint(path, tokenizer_json, tok_config=None, model_config=None):
  """A checkpoint-like directory with tokenizer.json and optional tokenizer_config/config.json."""
  path.mkdir(parents=True, exist_ok=True)
  (path / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
  for name, config in (("tokenizer_config.json", tok_config), ("config.json", model_config)):
    if config is not None:
      (path / name).write_text(json.dumps(config), encoding="utf-8")
  return path


@pytest.fixture
def llama_dir(tmp_path, llama_json):
  # Llama-3-instruct-like: a dict-form eos in tokenizer_config, a list of stop ids in config.json.
  return _checkpoint(
      tmp_path / "llama", llama_json,
      {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>",
                                                       "lstrip": False, "special": True}},
      {"bos_token_id": 0, "eos_token_id": [2, 1], "pad_token_id": None})


@pytest.fixture
def qwen_dir(tmp_path, qwen_json):
  # Qwen2-like: bos_token null (config.json's bos_token_id is a leftover), pad = eos.
  return _checkpoint(
      tmp_path / "qwen", qwen_json,
      {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
      {"bos_token_id": 0, "eos_token_id": 0})


@pytest.fixture(params=["llama", "qwen"])
def any_dir(request):
  return request.getfixturevalue(f"{request.param}_dir")


def test_special_ids(llama_dir, qwen_dir):
  llama = load_tokenizer(llama_dir)
  assert isinstance(llama, HFTokenizer)
  assert (llama.bos_id, llama.eos_id, llama.pad_id) == (0, 1, None)
  assert llama.vocab_size == 600 and llama.path == llama_dir / "tokenizer.json"
  assert llama.id_to_piece(1) == "<|end_of_text|>"
  qwen = load_tokenizer(qwen_dir)
  assert (qwen.bos_id, qwen.eos_id, qwen.pad_id) == (None, 0, 0)


@pytest.mark.parametrize("text", TEXTS)
def test_exact_round_trip(any_dir, text):
  tok = load_tokenizer(any_dir)
  ids = tok.encode(text)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text


def test_encode_matches_transformers_and_adds_no_bos(llama_dir):
  transformers = pytest.importorskip("transformers")
  tok = load_tokenizer(llama_dir)
  file = str(llama_dir / "tokenizer.json")
  ref = transformers.PreTrainedTokenizerFast(tokenizer_file=file)
  for text in TEXTS[:-1]:
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
  # Special-token strings in a document are plain text: transformers' split_special_tokens mode.
  split = transformers.PreTrainedTokenizerFast(tokenizer_file=file, split_special_tokens=True)
  assert tok.encode(TEXTS[-1]) == split.encode(TEXTS[-1], add_special_tokens=False)
  assert ref.encode(TEXTS[-1], add_special_tokens=False) != tok.encode(TEXTS[-1])
  assert not {0, 1, 2} & set(tok.encode(TEXTS[-1]))
  # The post-processor prepends bos; encode must not.
  assert ref.encode(TEXTS[1])[0] == 0 and tok.encode(TEXTS[1])[0] != 0
  assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
  assert tok.encode_batch(TEXTS, num_threads=1) == tok.encode_batch(TEXTS)


def test_decode_drops_specials_and_rejects_out_of_range(llama_dir):
  tok = load_tokenizer(llama_dir)
  ids = tok.encode("hello world")
  assert tok.decode([0, *ids, 2, 1]) == "hello world"
  for bad in (600, -1):
    with pytest.raises(ValueError, match=r"outside the tokenizer vocabulary \[0, 600\)"):
      tok.decode([*ids, bad])
  with pytest.raises(ValueError, match="not in the vocabulary"):
    tok.id_to_piece(600)


# llama_json's post_processor prepends <|begin_of_text|> (id 0) whatever the configs name as bos.
@pytest.mark.parametrize(("tok_config", "model_config", "ids"), [
    ({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, None, (0, 2)),
    ({"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": {"content": "<|eot_id|>"}},
     {"bos_token_id": 1, "eos_token_id": 1}, (0, 2)),  # tokenizer_config.json wins.
    (None, {"bos_token_id": 0, "eos_token_id": [2, 1]}, (0, 2)),  # First of a list.
    ({}, {"bos_token_id": None, "eos_token_id": 1}, (0, 1)),
    ({"eos_token": None}, {"eos_token_id": 1}, (0, 1)),  # eos falls back to config.json.
    ({"bos_token": None}, {"bos_token_id": 0, "eos_token_id": 1}, (0, 1)),
    ({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": False},
     None, (None, 1)),  # add_bos_token overrides the post_processor.
])
def test_special_ids_resolution(tmp_path, llama_json, tok_config, model_config, ids):
  tok = load_tokenizer(_checkpoint(tmp_path / "ckpt", llama_json, tok_config, model_config))
  assert (tok.bos_id, tok.eos_id) == ids


# (post_processor prepends bos, tokenizer_config.json): every way a checkpoint says what a prompt gets around it.
PROMPT_SETTINGS = {
    "template_bos": (True, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}),
    "smollm2_bos_token_only": (False, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}),
    "add_bos_false_overrides_template": (
        True, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": False}),
    "add_bos_true_without_template": (
        False, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True}),
    "add_eos_true_with_template": (
        True, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_eos_token": True}),
    "add_eos_true_add_bos_false": (
        True, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": False,
               "add_eos_token": True}),
    "add_bos_true_but_no_bos_token": (False, {"bos_token": None, "eos_token": "<|end_of_text|>",
                                              "add_bos_token": True}),
}


@pytest.mark.parametrize("case", sorted(PROMPT_SETTINGS))
def test_prompts_encode_as_the_checkpoints_own_tokenizer(tmp_path, llama_json, case):
  """encode_prompt == transformers' tokenizer(text)["input_ids"] with the checkpoint's add_bos/add_eos settings, as
  llama.cpp's converter (gguf.SpecialVocab) reads them from tokenizer.json's post_processor and tokenizer_config.json
  (transformers 5 itself ignores tokenizer_config's add_*_token once a tokenizer.json exists, so they are passed)."""
  import gguf  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  template, tok_config = PROMPT_SETTINGS[case]
  tokenizer_json = llama_json if template else byte_level_bpe_json(LLAMA_SPECIALS, add_bos=False)
  path = _checkpoint(tmp_path / case, tokenizer_json, tok_config)
  settings = gguf.SpecialVocab(path, load_merges=False).add_special_token
  ref = transformers.AutoTokenizer.from_pretrained(
      str(path), add_bos_token=settings.get("bos", False), add_eos_token=settings.get("eos", False))
  if "add_bos_token" not in tok_config and "add_eos_token" not in tok_config:
    ref = transformers.AutoTokenizer.from_pretrained(str(path))  # no settings to pass: the files alone decide
  tok = load_tokenizer(path)
  for text in ["", *TEXTS[1:-1]]:
    assert encode_prompt(tok, text) == ref(text)["input_ids"], (case, text)
  ids = encode_prompt(tok, "x")
  assert tok.add_bos == (ids[0] == 0) and tok.add_eos == (ids[-1] == tok.eos_id)
  # A stored document is its prompt encoding then exactly one eos.
  (doc,) = [ids for _, ids in encode_documents([Document("x = 1", "d")], tok)]
  prompt = encode_prompt(tok, "x = 1")
  assert doc.tolist() == (prompt if tok.add_eos else [*prompt, tok.eos_id])


def test_a_post_processor_adding_more_than_bos_and_eos_is_refused(tmp_path):
  tok = tokenizers.Tokenizer.from_str(byte_level_bpe_json(LLAMA_SPECIALS, add_bos=False))
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<|begin_of_text|> <|eot_id|> $A", special_tokens=[("<|begin_of_text|>", 0), ("<|eot_id|>", 2)])
  path = _checkpoint(tmp_path / "odd", tok.to_str(), {"eos_token": "<|end_of_text|>"})
  with pytest.raises(ValueError, match=r"odd/tokenizer\.json.*post_processor adds \[0, 2\] before"):
    load_tokenizer(path)
  path = _checkpoint(tmp_path / "flag", byte_level_bpe_json(LLAMA_SPECIALS, add_bos=False),
                     {"eos_token": "<|end_of_text|>", "add_bos_token": "yes"})
  with pytest.raises(ValueError, match=r"flag/tokenizer_config\.json.*add_bos_token must be true or false"):
    load_tokenizer(path)


@pytest.fixture(scope="module")
def smollm2_gguf_tokenizer(tmp_path_factory):
  """transformers' tokenizer of the real SmolLM2 GGUF, and the same tokenizer saved as a checkpoint directory."""
  import transformers  # noqa: PLC0415

  gguf_path = fetch_models().fetch_gguf("smollm2-135m")
  ref = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
  out = tmp_path_factory.mktemp("smollm2")
  ref.save_pretrained(out)
  return ref, out


def test_smollm2_prompts_get_no_bos(smollm2_gguf_tokenizer):
  """The issue's case: SmolLM2's tokenizer has a bos token but adds none (GGUF add_bos_token false)."""
  ref, path = smollm2_gguf_tokenizer
  assert ref.add_bos_token is False and ref.bos_token == "<|im_start|>"
  tok = load_tokenizer(path)
  prompt = "The GNU General Public License is a free, copyleft license for"
  ids = encode_prompt(tok, prompt)
  assert ids == ref(prompt)["input_ids"] and ids[0] != ref.bos_token_id and tok.bos_id is None
  assert tok.eos_id == ref.eos_token_id


def test_missing_or_bad_specials_error_with_path(tmp_path, llama_json):
  no_eos = _checkpoint(tmp_path / "no_eos", llama_json)
  with pytest.raises(ValueError, match=r"no_eos/tokenizer\.json.*no eos token"):
    load_tokenizer(no_eos)
  no_eos = _checkpoint(tmp_path / "null_eos", llama_json, {"eos_token": None},
                       {"eos_token_id": []})
  with pytest.raises(ValueError, match=r"null_eos/tokenizer\.json.*no eos token"):
    load_tokenizer(no_eos)
  unknown = _checkpoint(tmp_path / "unknown", llama_json, {"eos_token": "</s>"})
  with pytest.raises(ValueError, match=r"unknown/tokenizer_config\.json.*'</s>' is not in"):
    load_tokenizer(unknown)
  out_of_range = _checkpoint(tmp_path / "range", llama_json, None, {"eos_token_id": 600})
  with pytest.raises(ValueError, match=r"range/config\.json.*eos_token_id 600"):
    load_tokenizer(out_of_range)
  bad_json = _checkpoint(tmp_path / "bad_json", llama_json)
  (bad_json / "config.json").write_text("{oops", encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad_json/config\.json.*not valid JSON"):
    load_tokenizer(bad_json)


def test_directory_and_file_paths_agree(llama_dir, tmp_path):
  by_dir, by_file = load_tokenizer(llama_dir), load_tokenizer(llama_dir / "tokenizer.json")
  assert type(by_dir) is type(by_file) is HFTokenizer
  assert by_dir.path == by_file.path and by_dir.sha256 == by_file.sha256
  assert by_dir.encode(TEXTS[3]) == by_file.encode(TEXTS[3])
  # tokenizer.json is preferred over a tokenizer.model beside it.
  (llama_dir / "tokenizer.model").write_bytes(b"not read")
  assert isinstance(load_tokenizer(llama_dir), HFTokenizer)
  # Any special-id change re-keys caches; an identical copy elsewhere does not.
  (llama_dir / "config.json").write_text(json.dumps({"eos_token_id": 2}), encoding="utf-8")
  (llama_dir / "tokenizer_config.json").unlink()
  assert load_tokenizer(llama_dir).sha256 != by_dir.sha256
  copy = shutil.copytree(llama_dir, tmp_path / "copy")
  assert load_tokenizer(copy).sha256 == load_tokenizer(llama_dir).sha256


def test_sentencepiece_directory_and_file_errors(tmp_path):
  spm = train_tokenizer([inspect.getsource(json)], 400, tmp_path / "spm")
  ckpt = tmp_path / "mistral"
  ckpt.mkdir()
  shutil.copy(spm.path, ckpt / "tokenizer.model")
  tok = load_tokenizer(ckpt)
  assert isinstance(tok, Tokenizer) and tok.sha256 == spm.sha256
  assert (tok.bos_id, tok.eos_id) == (2, 3)

  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="empty.*neither tokenizer.json nor tokenizer.model"):
    load_tokenizer(empty)
  with pytest.raises(FileNotFoundError, match="missing.json"):
    load_tokenizer(tmp_path / "missing.json")
  (tmp_path / "junk.json").write_text('{"model": 3}', encoding="utf-8")
  with pytest.raises(ValueError, match="junk.json.*not a Hugging Face tokenizer.json"):
    load_tokenizer(tmp_path / "junk.json")
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "tokenizer.json").write_bytes(b"\xff\xfe")
  with pytest.raises(ValueError, match="bad/tokenizer.json.*not a Hugging Face"):
    load_tokenizer(tmp_path / "bad")
  tiktoken = tmp_path / "llama3" / "tokenizer.model"
  tiktoken.parent.mkdir()
  tiktoken.write_bytes(b"IQ== 0\nIg== 1\nIw== 2\n")
  with pytest.raises(ValueError, match="not a sentencepiece model.*tiktoken.*tokenizer.json"):
    load_tokenizer(tiktoken.parent)


def test_prepare_corpus_with_hf_tokenizer(tmp_path, any_dir):
  texts = [f"document {i}: {t}" for i, t in enumerate(TEXTS * 3)]
  (tmp_path / "docs.jsonl").write_text(
      "".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
  kw = {"cache_dir": tmp_path / "cache", "max_corpus_bytes": None, "eval_fraction": 0.2,
        "tokenizer_path": str(any_dir)}
  paths = [str(tmp_path / "docs.jsonl")]
  c = prepare_corpus(paths, vocab_size=640, **kw)
  tok = c.tokenizer
  assert isinstance(tok, HFTokenizer) and "tokenizer.json (vocab 600)" in c.description
  decoded = []
  for split in (c.mixture.splits[0], c.eval_splits[0]):
    for i in range(len(split)):
      d = split[i].tolist()
      body = d[:-1] if tok.bos_id is None else d[1:-1]
      assert tok.bos_id is None or d[0] == tok.bos_id
      assert d[-1] == tok.eos_id and tok.eos_id not in body and tok.bos_id not in body
      assert body == tok.encode(tok.decode(d))
      decoded.append(tok.decode(d))
  assert sorted(decoded) == sorted(texts)
  assert not list((tmp_path / "cache").glob("tokenizer-*"))
  with pytest.raises(ValueError, match=r"vocab_size 600.*512"):
    prepare_corpus(paths, vocab_size=512, **kw)
