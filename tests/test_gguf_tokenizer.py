"""GGUF tokenizer metadata <-> tokenizer.json: parity with transformers' GGUF tokenizer and the original tokenizers.

References: transformers' own GGUF tokenizer loader (AutoTokenizer.from_pretrained(dir, gguf_file=...)) on the real
SmolLM2 file and on synthetic files; the original tokenizers the synthetic files are made from (transformers'
Qwen2Tokenizer, sentencepiece itself, a Llama-3-style tokenizer.json); the real file's own metadata for the export.
transformers' sentencepiece GGUF tokenizer differs from sentencepiece on text that starts with a space and ignores
tokenizer.ggml.add_space_prefix=false (it always prefixes), so sentencepiece is the reference there.
"""

import inspect
import io
import json
import pathlib
import textwrap
import unicodedata

import gguf
import pytest
import sentencepiece as spm
import tokenizers
import transformers
from helpers import byte_level_bpe_json, fetch_models
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers, trainers

from data_pipelines.tokenizer import HFTokenizer, load_tokenizer, train_tokenizer
from maxlm.convert.gguf_tokenizer import write_tokenizer
from maxlm.convert.gguf_tokenizer_export import add_tokenizer_metadata
from maxlm.convert.hf_config import UnsupportedModelError

# English, German umlauts, Chinese, Python with tabs and indentation, emoji, runs of spaces and newlines, digits.
TEXT = ("The quick brown fox doesn't jump; it's 2024 and we'll see.\n"
        "Grüße aus München: Äpfel, Öl, Übermut und die Straße.\n"
        "中文分词测试：你好，世界！机器学习很有趣。\n"
        "def mean(xs):\n\tif not xs:\n\t\treturn 0.0  # empty\n    return sum(xs) / len(xs)\n\n"
        "emoji 🙂👍🏽🇩🇪 ok\n"
        "runs:    four spaces,\t\ttabs,\n\n\n\nfour newlines\r\n"
        "digits 1234567 and 3.14159, 99% of 42\n   trailing  ")
CHAT = "<|im_start|>user\nGrüße 1234567<|im_end|>\n<|im_start|>assistant\n你好<|endoftext|>"


def gguf_field(reader: gguf.GGUFReader, key: str):
  field = reader.fields.get(key)
  return None if field is None else field.contents()


def write_gguf(path: pathlib.Path, arch: str, fill) -> pathlib.Path:
  """A metadata-only GGUF file: the hyperparameters a loader wants, then fill(writer) adds the tokenizer."""
  writer = gguf.GGUFWriter(str(path), arch=arch)
  writer.add_context_length(64)
  writer.add_embedding_length(8)
  writer.add_block_count(1)
  writer.add_feed_forward_length(16)
  writer.add_head_count(2)
  fill(writer)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def gguf_reference(path: pathlib.Path):
  """transformers' tokenizer for a GGUF file."""
  return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def ours(tok_dir: pathlib.Path) -> tokenizers.Tokenizer:
  return tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def encode(tok: tokenizers.Tokenizer, text: str) -> list[int]:
  return tok.encode(text, add_special_tokens=False).ids


# --- the real SmolLM2 file ---


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  """(path, reader, our tokenizer directory, transformers' tokenizer) of SmolLM2-135M-Instruct."""
  path = fetch_models().fetch_gguf("smollm2-135m")
  reader = gguf.GGUFReader(path)
  out = tmp_path_factory.mktemp("smollm2")
  write_tokenizer(reader, out)
  return path, reader, out, gguf_reference(path)


def test_smollm2_encodes_and_decodes_as_transformers(smollm2):
  _, _, out, ref = smollm2
  tok = ours(out)
  for text in (TEXT, CHAT, TEXT + CHAT + TEXT):
    ids = encode(tok, text)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids) == text
  # individual digits (the smollm pre-tokenizer), special tokens whole
  assert [tok.id_to_token(i) for i in encode(tok, " 1234567")] == ["Ġ", *"1234567"]
  assert encode(tok, "<|im_end|>") == [ref.convert_tokens_to_ids("<|im_end|>")]


def test_smollm2_special_tokens_config_and_chat_template(smollm2):
  _, reader, out, ref = smollm2
  tokens = gguf_field(reader, "tokenizer.ggml.tokens")
  ids = {k: gguf_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
  config = json.loads((out / "tokenizer_config.json").read_text())
  assert config["add_bos_token"] is gguf_field(reader, "tokenizer.ggml.add_bos_token") is False
  assert config["add_eos_token"] is False
  assert [config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")] == [
    tokens[ids["bos"]], tokens[ids["eos"]], tokens[ids["padding"]], tokens[ids["unknown"]]]
  assert [config[k] for k in ("bos_token", "eos_token", "pad_token")] == [ref.bos_token, ref.eos_token, ref.pad_token]
  assert json.loads((out / "config.json").read_text()) == {
    "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"]}
  template = gguf_field(reader, "tokenizer.chat_template")
  assert config["chat_template"] == (out / "chat_template.jinja").read_text() == template
  # maxlm's loader: no bos (add_bos_token false), eos from the file; special-token text encodes as plain text
  loaded = load_tokenizer(out)
  assert isinstance(loaded, HFTokenizer)
  assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (None, ids["eos"], ids["padding"],
                                                                             len(tokens))
  assert loaded.encode(TEXT) == ref.encode(TEXT, add_special_tokens=False)
  assert loaded.decode(loaded.encode(CHAT)) == CHAT
  # transformers reading our directory: the same ids, specials and template
  hf = transformers.AutoTokenizer.from_pretrained(str(out))
  assert hf.encode(TEXT + CHAT) == ref.encode(TEXT + CHAT)
  messages = [{"role": "user", "content": "Hallo"}]
  assert hf.apply_chat_template(messages, tokenize=False) == ref.apply_chat_template(messages, tokenize=False)


def test_smollm2_export_reproduces_the_files_metadata(smollm2, tmp_path):
  """tokenizer dir -> GGUF metadata gives the original file's; converting that back gives the same files."""
  _, reader, out, _ = smollm2
  path = write_gguf(tmp_path / "rt.gguf", "llama", lambda w: add_tokenizer_metadata(w, out))
  back = gguf.GGUFReader(path)
  for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id",
              "padding_token_id", "add_bos_token"):
    assert gguf_field(back, f"tokenizer.ggml.{key}") == gguf_field(reader, f"tokenizer.ggml.{key}"), key
  assert gguf_field(back, "tokenizer.chat_template") == gguf_field(reader, "tokenizer.chat_template")
  again = tmp_path / "again"
  write_tokenizer(back, again)
  for name in ("tokenizer.json", "config.json", "chat_template.jinja"):
    assert (again / name).read_bytes() == (out / name).read_bytes(), name


# --- synthetic files: qwen2 byte-level BPE ---

QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus() -> list[str]:
  return [inspect.getsource(json), inspect.getsource(textwrap), TEXT * 3, CHAT]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
  """(GGUF path, our directory, the original Qwen2 tokenizer) of a small byte-level BPE with Qwen2's pre-tokenizer."""
  from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

  trained = tokenizers.Tokenizer(models.BPE())
  trained.normalizer = normalizers.NFC()
  trained.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  trained.train_from_iterator(corpus(), trainers.BpeTrainer(
      vocab_size=700, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  vocab = trained.get_vocab()
  merges = [tuple(m) for m in json.loads(trained.to_str())["model"]["merges"]]
  tokens = sorted(vocab, key=vocab.get) + QWEN2_SPECIALS + ["<tool_call>"]
  types = [1] * len(vocab) + [3] * len(QWEN2_SPECIALS) + [4]
  ids = {t: i for i, t in enumerate(tokens)}
  template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"

  def fill(w: gguf.GGUFWriter) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(ids["<|endoftext|>"])
    w.add_eos_token_id(ids["<|im_end|>"])
    w.add_pad_token_id(ids["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(template)

  root = tmp_path_factory.mktemp("qwen2")
  path = write_gguf(root / "qwen2.gguf", "qwen2", fill)
  out = root / "tok"
  write_tokenizer(gguf.GGUFReader(path), out)
  original = Qwen2Tokenizer(vocab=ids, merges=merges, eos_token="<|im_end|>")  # as Qwen2.5-Instruct's
  original.add_special_tokens({"additional_special_tokens": QWEN2_SPECIALS[1:]})
  original.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
  assert [original.convert_tokens_to_ids(t) for t in tokens[-4:]] == list(range(len(vocab), len(tokens)))
  return path, out, original


def test_qwen2_matches_transformers_and_the_original(qwen2):
  path, out, original = qwen2
  ref, tok = gguf_reference(path), ours(out)
  for text in (TEXT, CHAT + "<tool_call>{}</tool_call>"):
    ids = encode(tok, text)
    assert ids == ref.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids) == text
  assert [tok.id_to_token(i) for i in encode(tok, "x 1234")] == ["x", "Ġ", *"1234"]  # single digits, as Qwen2's
  # Decomposed umlauts: Qwen2's tokenizer.json normalizes to NFC first (transformers' GGUF loader does not).
  decomposed = unicodedata.normalize("NFD", TEXT)
  assert decomposed != TEXT
  assert encode(tok, decomposed) == original.encode(decomposed, add_special_tokens=False) == encode(tok, TEXT)
  config = json.loads((out / "tokenizer_config.json").read_text())
  assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<|endoftext|>", "<|im_end|>", False)
  assert config["added_tokens_decoder"][str(original.convert_tokens_to_ids("<tool_call>"))]["special"] is False


def test_qwen2_round_trip(qwen2, tmp_path):
  _, out, _ = qwen2
  path = write_gguf(tmp_path / "rt.gguf", "qwen2", lambda w: (w.add_vocab_size(768), add_tokenizer_metadata(w, out)))
  back = gguf.GGUFReader(path)
  assert gguf_field(back, "tokenizer.ggml.pre") == "qwen2"
  tokens = gguf_field(back, "tokenizer.ggml.tokens")
  assert len(tokens) == 768 and tokens[-1] == "[PAD767]"  # padded to the model's vocabulary with unused tokens
  again = tmp_path / "again"
  write_tokenizer(back, again)
  first, second = ours(out), ours(again)
  for text in (TEXT, CHAT):
    assert encode(second, text) == encode(first, text)
  assert second.get_vocab_size() == 768


def test_qwen2_original_tokenizer_exports_as_the_gguf_vocabulary(qwen2, tmp_path):
  """The original Qwen2 tokenizer, saved as a Hugging Face import keeps it, exports as the file's metadata."""
  path, _, original = qwen2
  original.save_pretrained(tmp_path / "hf")
  ids = {"bos_token_id": original.convert_tokens_to_ids("<|endoftext|>"), "eos_token_id": original.eos_token_id}
  (tmp_path / "hf" / "config.json").write_text(json.dumps(ids))  # Qwen2's: bos_token null, eos im_end
  exported = gguf.GGUFReader(write_gguf(tmp_path / "e.gguf", "qwen2",
                                        lambda w: add_tokenizer_metadata(w, tmp_path / "hf")))
  reader = gguf.GGUFReader(path)
  for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "add_bos_token"):
    assert gguf_field(exported, f"tokenizer.ggml.{key}") == gguf_field(reader, f"tokenizer.ggml.{key}"), key


# --- synthetic files: sentencepiece vocabularies ---


def train_spm(dummy_prefix: bool) -> bytes:
  """A Llama-2-style sentencepiece BPE (byte fallback; with or without the dummy space prefix) with one
  user-defined piece."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus()), model_writer=model, model_type="bpe", vocab_size=600,
      character_coverage=0.9995, normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=dummy_prefix, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
      max_sentence_length=1 << 20, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=["<tool>"],
      minloglevel=2)
  return model.getvalue()


def spm_gguf(path: pathlib.Path, model: bytes) -> pathlib.Path:
  """The GGUF "llama" vocabulary of a sentencepiece model, as llama.cpp's converter writes it."""
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model)

  def fill(w: gguf.GGUFWriter) -> None:
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([int(p.type) for p in proto.pieces])
    w.add_bos_token_id(proto.trainer_spec.bos_id)
    w.add_eos_token_id(proto.trainer_spec.eos_id)
    w.add_unk_token_id(proto.trainer_spec.unk_id)
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)

  return write_gguf(path, "llama", fill)


# Plain text (sentencepiece does not parse special tokens), with leading spaces and a literal U+2581.
SPM_TEXTS = (TEXT, " leading space", "  two\n", "x\u2581y")


@pytest.mark.parametrize("dummy_prefix", [True, False])
def test_sentencepiece_vocabulary_encodes_as_sentencepiece(dummy_prefix, tmp_path):
  model = train_spm(dummy_prefix)
  sp = spm.SentencePieceProcessor(model_proto=model)
  path = spm_gguf(tmp_path / "spm.gguf", model)
  write_tokenizer(gguf.GGUFReader(path), tmp_path / "tok")
  tok = ours(tmp_path / "tok")
  for text in SPM_TEXTS:
    ids = encode(tok, text)
    assert ids == sp.encode(text), text
    assert tok.decode(ids) == sp.decode(ids)
  config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
  assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
  assert config["add_bos_token"] is True and config["add_eos_token"] is False  # llama.cpp's sentencepiece defaults
  assert tok.encode("hi").ids == [sp.bos_id(), *sp.encode("hi")]
  if dummy_prefix:  # transformers' loader always prefixes a space, and matches sentencepiece where that is right
    ref = gguf_reference(path)
    assert encode(tok, TEXT) == ref.encode(TEXT, add_special_tokens=False)
    assert tok.decode(encode(tok, TEXT)) == ref.decode(encode(tok, TEXT)) == TEXT
  # A user-defined piece is matched whole (the text after it gets a space prefix as in llama.cpp; sentencepiece,
  # which matches it inside the prefixed text, adds none there).
  assert tok.id_to_token(encode(tok, "a<tool>b")[1]) == "<tool>" == sp.id_to_piece(sp.encode("a<tool>b")[1])
  # round trip through GGUF metadata: the same tokenizer.json
  back = write_gguf(tmp_path / "rt.gguf", "llama", lambda w: add_tokenizer_metadata(w, tmp_path / "tok"))
  write_tokenizer(gguf.GGUFReader(back), tmp_path / "again")
  assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()


def test_maxlm_sentencepiece_tokenizer_exports_and_imports(tmp_path):
  """maxlm's own tokenizer.model -> GGUF "llama" vocabulary -> tokenizer.json encoding as sentencepiece does."""
  src = tmp_path / "tokenizer"
  src.mkdir()
  trained = train_tokenizer(corpus(), 400, src / "tokenizer")
  path = write_gguf(tmp_path / "m.gguf", "llama", lambda w: (w.add_vocab_size(512), add_tokenizer_metadata(w, src)))
  reader = gguf.GGUFReader(path)
  assert gguf_field(reader, "tokenizer.ggml.model") == "llama"
  assert gguf_field(reader, "tokenizer.ggml.add_space_prefix") is False
  assert gguf_field(reader, "tokenizer.ggml.add_bos_token") is True
  write_tokenizer(reader, tmp_path / "out")
  loaded = load_tokenizer(tmp_path / "out")
  assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id) == (512, trained.bos_id, trained.eos_id,
                                                                             trained.pad_id)
  sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
  for text in SPM_TEXTS:
    assert loaded.encode(text) == sp.encode(text), text
    assert loaded.decode(loaded.encode(text)) == sp.decode(sp.encode(text))


# --- a Llama-3-style tokenizer.json (as imported from Hugging Face) ---


def test_llama3_tokenizer_json_round_trip(tmp_path):
  src = tmp_path / "tokenizer"
  src.mkdir()
  specials = ["<|begin_of_text|>", "<|end_of_text|>"]
  (src / "tokenizer.json").write_text(byte_level_bpe_json(specials, add_bos=True))
  (src / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
  (src / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
  path = write_gguf(tmp_path / "l3.gguf", "llama", lambda w: add_tokenizer_metadata(w, src))
  reader = gguf.GGUFReader(path)
  assert gguf_field(reader, "tokenizer.ggml.pre") == "llama-bpe"
  assert gguf_field(reader, "tokenizer.ggml.add_bos_token") is True  # from the post-processor, as Llama 3's
  assert [gguf_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos")] == [0, 1]
  assert gguf_field(reader, "tokenizer.chat_template") == (src / "chat_template.jinja").read_text()
  write_tokenizer(reader, tmp_path / "out")
  original, tok = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json")), ours(tmp_path / "out")
  for text in (TEXT, "<|begin_of_text|>hi<|end_of_text|>"):
    assert tok.encode(text).ids == original.encode(text).ids  # with bos
    assert encode(tok, text) == encode(original, text)
  assert load_tokenizer(tmp_path / "out").bos_id == 0


# --- what is refused ---


def test_unsupported_tokenizers_are_named(tmp_path):
  def bpe(model: str, pre: str):
    def fill(w: gguf.GGUFWriter) -> None:
      w.add_tokenizer_model(model)
      w.add_tokenizer_pre(pre)
      w.add_token_list(["a", "b", "ab"])
      w.add_token_types([1, 1, 1])
      w.add_token_merges(["a b"])
    return gguf.GGUFReader(write_gguf(tmp_path / f"{model}-{pre}.gguf", "llama", fill))

  with pytest.raises(UnsupportedModelError, match="tokenizer.ggml.pre='tekken'"):
    write_tokenizer(bpe("gpt2", "tekken"), tmp_path / "x")
  with pytest.raises(UnsupportedModelError, match="tokenizer.ggml.model='t5'"):
    write_tokenizer(bpe("t5", "default"), tmp_path / "x")

  def export(tokenizer: tokenizers.Tokenizer):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    tokenizer.save(str(src / "tokenizer.json"))
    add_tokenizer_metadata(gguf.GGUFWriter(str(tmp_path / "unused.gguf"), arch="llama"), src)

  wordpiece = tokenizers.Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
  with pytest.raises(UnsupportedModelError, match="model type 'WordPiece'"):
    export(wordpiece)
  whitespace = tokenizers.Tokenizer(models.BPE({"a": 0}, []))
  whitespace.pre_tokenizer = pre_tokenizers.Whitespace()
  whitespace.decoder = tokenizers.decoders.ByteLevel()
  with pytest.raises(UnsupportedModelError, match="pre_tokenizer .*Whitespace"):
    export(whitespace)


# --- the real Qwen2.5 file (large: the slow job) ---


@pytest.mark.slow
def test_qwen25_coder_matches_transformers(tmp_path):
  path = fetch_models().fetch_gguf("qwen2.5-coder-0.5b")
  reader = gguf.GGUFReader(path)
  write_tokenizer(reader, tmp_path)
  ref, tok = gguf_reference(path), ours(tmp_path)
  text = TEXT + "<|im_start|>user\nWrite quicksort<|im_end|>\n<tool_call>{}</tool_call><|endoftext|>"
  ids = encode(tok, text)
  assert ids == ref.encode(text, add_special_tokens=False)
  assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids) == text
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  assert config["add_bos_token"] is gguf_field(reader, "tokenizer.ggml.add_bos_token") is False
  assert config["eos_token"] == gguf_field(reader, "tokenizer.ggml.tokens")[
    gguf_field(reader, "tokenizer.ggml.eos_token_id")]
  assert tok.get_vocab_size() == len(gguf_field(reader, "tokenizer.ggml.tokens"))
