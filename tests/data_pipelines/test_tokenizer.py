"""The BPE tokenizer round-trips any text exactly; training is atomic; loading fails clearly."""

import tracemalloc

import helpers
import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipelines import sources, tokenizer
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


# The trainer's limit on one input "sentence", in UTF-8 bytes (longer ones are silently dropped by sentencepiece).
MAX_SENTENCE_BYTES = 4 * tokenizer._TRAIN_SENTENCE_BYTES


# Where str.splitlines() ends a line (its documentation's table); "\r\n" ends one line.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


@settings(max_examples=300, deadline=None)
@given(text=st.lists(st.sampled_from([*"ab \té😀", *LINE_BREAKS, "\r\n"])).map("".join),
       max_chars=st.integers(1, 12))
def test_line_pieces_are_the_lines_cut_to_size(text, max_chars):
  pieces = list(tokenizer._line_pieces(text, max_chars))
  assert "".join(pieces) == text and all(pieces)
  assert all(len(p) <= max_chars or p == "\r\n" for p in pieces)
  # Glued back up to each piece that ends in a line break, they are exactly str.splitlines(keepends=True).
  lines, current = [], ""
  for piece in pieces:
    current += piece
    if piece[-1] in LINE_BREAKS:
      lines.append(current)
      current = ""
  assert lines + ([current] if current else []) == text.splitlines(keepends=True)


def test_a_giant_single_line_is_sampled_whole_in_trainer_sized_sentences():
  one_line = " ".join(p.replace("\n", " ") for lang in helpers.PROSE_LANGUAGES for p in helpers.prose_paragraphs(lang))
  sentences = list(tokenizer._training_sentences([one_line], max_bytes=1 << 30))
  assert "".join(sentences) == one_line
  assert max(len(s.encode()) for s in sentences) <= MAX_SENTENCE_BYTES
  # A document may give at most a quarter of the budget, so a giant one leaves room for the rest.
  budget = len(one_line.encode())
  sentences = list(tokenizer._training_sentences([one_line, "the second document"], max_bytes=budget))
  assert sentences[-1] == "the second document"
  assert budget // 4 <= sum(len(s.encode()) for s in sentences[:-1]) <= budget // 4 + MAX_SENTENCE_BYTES


def test_a_tokenizer_trains_on_a_corpus_of_one_giant_line(tmp_path):
  lines = {lang: " ".join(p.replace("\n", " ") for p in helpers.prose_paragraphs(lang)) for lang in ("en", "de")}
  tok = train_tokenizer([lines["en"] + " " + lines["de"]], 2000, tmp_path / "giant")
  assert tok.vocab_size == 2000
  assert tok.decode(tok.encode(lines["de"][:5000])) == lines["de"][:5000]
  # Learned from the whole line, not its first kilobyte: many pieces occur only in its second, German half.
  pieces = [tok.id_to_piece(i).replace("\u2581", " ") for i in range(tok.vocab_size)]
  german_only = [p for p in pieces if len(p.strip()) >= 3 and p in lines["de"] and p not in lines["en"]]
  assert len(german_only) >= 100, german_only


def test_errors_of_the_texts_themselves_pass_through_training(tmp_path):
  def texts():
    yield from TRICKY * 20
    raise sources.BadRecordError("x.jsonl:7: invalid UTF-8 at byte offset 3", "invalid_utf8", "x.jsonl:7")
  with pytest.raises(sources.BadRecordError, match=r"^x\.jsonl:7: invalid UTF-8"):
    train_tokenizer(texts(), 300, tmp_path / "bad")
  with pytest.raises(ValueError, match="no text to train a tokenizer on"):
    train_tokenizer(["", ""], 300, tmp_path / "empty")
  assert not list(tmp_path.iterdir())


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.sampled_from(TRICKY[1:] + ["word", "x", "12", "\u2581", "é"]), max_size=30),
       seps=st.lists(st.sampled_from(["", " ", "  ", "\n", " \n ", "\t"]), min_size=30, max_size=30),
       max_chars=st.integers(1, 40))
def test_encode_array_in_pieces_gives_the_ids_of_one_encode(tok, parts, seps, max_chars):
  text = "".join(part + sep for part, sep in zip(parts, seps))
  ids = tok.encode_array(text, max_chars)
  assert ids.dtype == np.int32 and ids.tolist() == tok.encode(text)


def test_encode_array_holds_one_piece_at_a_time(tok):
  text = " ".join(p.replace("\n", " ") for p in helpers.prose_paragraphs("it")) * 10  # ~270 KB
  tracemalloc.start()
  try:
    peaks = []  # above what was held before: Python allocations made while encoding
    for encode in (tok.encode, lambda t: tok.encode_array(t, max_chars=1 << 13)):
      tracemalloc.reset_peak()
      before = tracemalloc.get_traced_memory()[0]
      ids = encode(text)
      peaks.append(tracemalloc.get_traced_memory()[1] - before)
  finally:
    tracemalloc.stop()
  assert ids.tolist() == tok.encode(text)
  assert peaks[1] < peaks[0] / 3, peaks  # int32 arrays (the pieces, then joined) vs a list of Python ints


def test_encode_array_of_a_model_with_a_dummy_prefix_is_one_encode(tmp_path):
  spm.SentencePieceTrainer.train(sentence_iterator=iter(helpers.prose_paragraphs("en")),
                                 model_prefix=str(tmp_path / "m"), vocab_size=400, add_dummy_prefix=True,
                                 remove_extra_whitespaces=False, minloglevel=2)
  dummy_prefix = Tokenizer(tmp_path / "m.model")  # puts a "\u2581" before every text it encodes, even " the"
  text = " ".join(helpers.prose_paragraphs("en")[:3])
  cut = text.index(" ", 20)
  assert dummy_prefix.encode(text[:cut]) + dummy_prefix.encode(text[cut:]) != dummy_prefix.encode(text)
  assert dummy_prefix.encode_array(text, max_chars=16).tolist() == dummy_prefix.encode(text)
