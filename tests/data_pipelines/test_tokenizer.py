"""The BPE tokenizer round-trips any text exactly; training is atomic; loading fails clearly."""

import pytest

from data_pipelines import sources
from data_pipelines.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

TRICKY = [
    "",
    " ",
    "\n",
    "\n\n\nx\n",
    "def f(x):\n\tif x:\n        return  x   # spaces\n\n\n",
    "  leading and trailing  ",
    "a\r\nb\rc",
    "tabs\t\t\tand\x00nul\x1b[0m",
    "ünïcödé — “quotes” Ελληνικά 中文 日本語",
    "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷",
    "1234567890 3.14159e-10",
    "<s></s><pad><unk> look like specials",
    "\u2581 literal space-mark \u2581\u2581 a\u2581b",
    "\ufeffbyte-order mark, zero\u200bwidth, e\u0301 combining, ＡＢ fullwidth",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = [d.text for d in sources.default_documents(384 << 10)] + TRICKY
  return train_tokenizer(texts, 512, tmp_path_factory.mktemp("tok") / "spm")


def test_special_ids(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  assert tok.vocab_size == 512
  assert tok.path.suffix == ".model" and tok.path.is_file()


@pytest.mark.parametrize("text", TRICKY)
def test_exact_round_trip(tok, text):
  ids = tok.encode(text)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text


def test_round_trip_of_unseen_code(tok):
  text = "class Foo:\n  def bar(self):\n\t\treturn {'k': [1, 2]}  \n\n# end\n"
  assert tok.decode(tok.encode(text)) == text
  assert tok.encode("") == []


def test_learns_whitespace_and_newline_pieces(tok):
  pieces = [tok.id_to_piece(i) for i in tok.encode("if x:\n        return y\n")]
  assert any(set(p) == {"\u2581"} and len(p) >= 4 for p in pieces), pieces  # indentation run
  assert not any(p.startswith("<0x0A>") for p in pieces)  # newline is a learned piece, not a byte


def test_encode_batch_matches_encode(tok):
  assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]
  assert tok.encode_batch(TRICKY, num_threads=1) == tok.encode_batch(TRICKY)


def test_decode_ignores_specials_and_rejects_out_of_range(tok):
  ids = tok.encode("hello world")
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]) == "hello world"
  with pytest.raises(ValueError, match="512"):
    tok.decode([*ids, 512])


def test_load_round_trip_and_errors(tok, tmp_path):
  again = load_tokenizer(tok.path)
  assert again.vocab_size == tok.vocab_size
  assert again.encode(TRICKY[4]) == tok.encode(TRICKY[4])
  with pytest.raises(FileNotFoundError, match="missing.model"):
    load_tokenizer(tmp_path / "missing.model")
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"definitely not a protobuf \xff\x00")
  with pytest.raises(ValueError, match="junk.model.*not a sentencepiece model"):
    load_tokenizer(junk)


def test_training_is_atomic_and_leaves_no_temp_files(tmp_path):
  texts = [d.text for d in sources.default_documents(128 << 10)]
  t = train_tokenizer(texts, 400, tmp_path / "m")
  assert isinstance(t, Tokenizer)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m.model", "m.vocab"]
  # Retraining over an existing model replaces it in place, with byte-identical contents.
  again = train_tokenizer(texts, 400, tmp_path / "m")
  assert again.sha256 == t.sha256
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m.model", "m.vocab"]
  lines = (tmp_path / "m.vocab").read_text(encoding="utf-8").split("\n")[:-1]
  assert len(lines) == 400 and all(len(line.split("\t")) == 2 for line in lines)


def test_bad_vocab_sizes(tmp_path):
  with pytest.raises(ValueError, match="at least 261"):
    train_tokenizer(["abc"], 100, tmp_path / "small")
  with pytest.raises(ValueError, match="could not train a 5000-piece"):
    train_tokenizer(["tiny corpus"] * 3, 5000, tmp_path / "big")
  assert not list(tmp_path.iterdir())
