"""SFT samples encode as transformers (apply_chat_template's assistant masks) and TRL (its formats and eos) do."""

import json
import shutil

import numpy as np
import pytest
import transformers
from helpers import byte_level_bpe_json, fetch_models

from data_pipelines.chat_template import ChatTemplate, load_chat_template
from data_pipelines.sft import SFTDataError, SFTExample, assistant_char_spans, encode_sample, load_sft_jsonl
from data_pipelines.tokenizer import load_tokenizer

# SmolLM2's ChatML template with its assistant text (content and <|im_end|>) in {% generation %} blocks: it renders
# exactly as the stock template, and transformers' assistant_masks of it are the reference masks.
MARKED_SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
    "{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama-3's template (bos from the special tokens, contents trimmed) and the same with generation blocks.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
LLAMA3 = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}{BODY}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
LLAMA3_STOCK = LLAMA3.replace("{BODY}", "{{ message['content'] | trim + '<|eot_id|>' }}")
LLAMA3_MARKED = LLAMA3.replace("{BODY}", "{% if message['role'] == 'assistant' %}{% generation %}"
                               "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
                               "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}")

CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "What color is the sky?"},
                 {"role": "assistant", "content": "It is blue."}],
    "system_multi_turn": [{"role": "system", "content": "You answer in one line."},
                          {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"},
                          {"role": "user", "content": "Another one?"},
                          {"role": "assistant", "content": "11, and then 13."}],
    "unicode": [{"role": "user", "content": "Ünïcödé: 日本語で答えて 🙂"},
                {"role": "assistant", "content": "はい、日本語です 🙂 — ça va?"},
                {"role": "user", "content": "Merci!\n\nTab\there"}, {"role": "assistant", "content": "De rien.\n"}],
    "spaces": [{"role": "user", "content": "  padded question  "},
               {"role": "assistant", "content": "  padded answer  "}],
    "code": [{"role": "system", "content": "Code only."}, {"role": "user", "content": "Print hi in Python"},
             {"role": "assistant", "content": "```python\nprint('hi')\n```"}],
}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  """(maxlm tokenizer, stock template, transformers tokenizer, tokenizer dir with MARKED_SMOLLM2) of SmolLM2."""
  src = fetch_models().fetch_transformers("smollm2-135m")
  marked = tmp_path_factory.mktemp("smollm2_marked")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(src / name, marked / name)
  (marked / "chat_template.jinja").write_text(MARKED_SMOLLM2, encoding="utf-8")
  return load_tokenizer(src), load_chat_template(src), transformers.AutoTokenizer.from_pretrained(str(src)), marked


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
  """(maxlm tokenizer, transformers tokenizer) of a small Llama-3-style byte-level BPE that starts texts with bos."""
  path = tmp_path_factory.mktemp("llama3")
  (path / "tokenizer.json").write_text(byte_level_bpe_json(LLAMA3_SPECIALS, add_bos=True), encoding="utf-8")
  config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_STOCK}
  (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
  return load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(str(path))


def _hf_masked(hf, messages, template):
  """transformers' (input_ids, assistant_masks) of the chat under template."""
  out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                               chat_template=template)
  return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


def _runs(mask):
  """[start, end) of each run of True in mask."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
  return list(zip(edges[::2], edges[1::2], strict=True))


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_generation_blocks_give_transformers_assistant_masks(smollm2, name):
  tokenizer, _, hf, marked = smollm2
  messages = CONVERSATIONS[name]
  example = encode_sample({"messages": messages}, tokenizer, load_chat_template(marked), "chat.jsonl:1")
  ids, mask = _hf_masked(hf, messages, MARKED_SMOLLM2)
  assert example.tokens.dtype == np.int32 and example.mask.dtype == bool
  assert example.tokens.tolist() == ids
  assert example.mask.tolist() == mask


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_stock_smollm2_template_trains_each_assistant_turn(smollm2, name):
  tokenizer, template, hf, _ = smollm2
  messages = CONVERSATIONS[name]
  example = encode_sample({"messages": messages}, tokenizer, template, "chat.jsonl:1")
  assert example.tokens.tolist() == list(hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
  # The marked template renders the same text, so its transformers masks are the reference here too.
  assert hf.apply_chat_template(messages, tokenize=False) == hf.apply_chat_template(
      messages, tokenize=False, chat_template=MARKED_SMOLLM2)
  assert example.mask.tolist() == _hf_masked(hf, messages, MARKED_SMOLLM2)[1]
  answers = [m["content"] for m in messages if m["role"] == "assistant"]
  runs = _runs(example.mask)
  assert len(runs) == len(answers)  # one run per assistant turn, so no user or system token is trained on
  for (start, end), answer in zip(runs, answers, strict=True):
    text = hf.decode(example.tokens[start:end].tolist())
    if answer[0].isspace():  # its first token also holds the header's newline (masked as transformers masks it)
      assert text == "\n" + answer + "<|im_end|>"
    else:
      assert text == answer + "<|im_end|>"


def test_stock_llama3_template_with_bos_matches_its_marked_twin(llama3):
  tokenizer, hf = llama3
  messages = CONVERSATIONS["system_multi_turn"] + CONVERSATIONS["spaces"]
  example = encode_sample({"messages": messages}, tokenizer, ChatTemplate(LLAMA3_STOCK, "llama3", {
      "bos_token": "<|begin_of_text|>"}), "chat.jsonl:1")
  ids, mask = _hf_masked(hf, messages, LLAMA3_MARKED)
  assert example.tokens.tolist() == ids and ids[0] == hf.bos_token_id
  assert example.mask.tolist() == mask and any(mask)


def test_assistant_char_spans_are_the_assistant_text(smollm2):
  _, template, _, marked = smollm2
  messages = CONVERSATIONS["system_multi_turn"]
  for tpl in (template, load_chat_template(marked)):
    text, spans = assistant_char_spans(tpl, messages)
    assert text == template.render(messages)
    assert [text[a:b] for a, b in spans] == ["7<|im_end|>", "11, and then 13.<|im_end|>"]


def test_plain_prompt_completion_trains_the_completion_and_eos(smollm2, llama3):
  prompt, completion = "The sky is", " blue, mostly."
  for tokenizer, hf in (smollm2[0], smollm2[2]), llama3:
    example = encode_sample({"prompt": prompt, "completion": completion, "id": 7}, tokenizer, None, "pc.jsonl:1")
    head = hf(prompt)["input_ids"]  # with bos where the tokenizer adds it (Llama-3 style), else none (SmolLM2)
    tail = hf(completion, add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
    assert example.tokens.tolist() == head + tail
    assert example.mask.tolist() == [False] * len(head) + [True] * len(tail)
    assert hf.decode(example.tokens[example.mask].tolist()) == completion + hf.eos_token


def test_conversational_prompt_completion_trains_only_the_completions_assistant_text(smollm2):
  tokenizer, template, hf, marked = smollm2
  prompt = CONVERSATIONS["system_multi_turn"][:4]  # holds an assistant turn, which is not trained on
  completion = [{"role": "assistant", "content": "11, and then 13."}]
  for tpl in (template, load_chat_template(marked)):
    example = encode_sample({"prompt": prompt, "completion": completion}, tokenizer, tpl, "pc.jsonl:3")
    ids, assistant = _hf_masked(hf, prompt + completion, MARKED_SMOLLM2)
    prompt_len = len(hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"])
    assert example.tokens.tolist() == ids
    assert example.mask.tolist() == [a and i >= prompt_len for i, a in enumerate(assistant)]  # TRL's two masks
    assert hf.decode(example.tokens[example.mask].tolist()) == "11, and then 13.<|im_end|>"


def test_text_trains_every_token_but_the_first(smollm2, llama3):
  text = "Plain text: no roles, 日本語 too.\n"
  for tokenizer, hf in (smollm2[0], smollm2[2]), llama3:
    example = encode_sample({"text": text}, tokenizer, None, "lm.jsonl:1")
    assert example.tokens.tolist() == hf(text)["input_ids"] + [hf.eos_token_id]
    assert example.mask.tolist() == [False] + [True] * (len(example.tokens) - 1)


def _write(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


GOOD = json.dumps({"messages": CONVERSATIONS["one_turn"]})
BAD = {
    "bad_json": ('{"text": "unterminated', "not valid JSON"),
    "not_an_object": ('["text", "a list"]', "must be a JSON object, got a list"),
    "no_format": ('{"question": "q", "answer": "a"}', "no 'messages', 'prompt' + 'completion' or 'text' key"),
    "two_formats": ('{"text": "t", "messages": []}', "mixes the messages and text formats"),
    "missing_completion": ('{"prompt": "The sky is"}', "without 'completion'"),
    "missing_prompt": ('{"completion": " blue"}', "without 'prompt'"),
    "text_not_a_string": ('{"text": 3}', "'text' must be a string, got a int"),
    "empty_text": ('{"text": ""}', "'text' is empty"),
    "messages_not_a_list": ('{"messages": "hi"}', "'messages' must be a non-empty list of messages, got a str"),
    "empty_messages": ('{"messages": []}', "'messages' must be a non-empty list of messages, got an empty list"),
    "message_not_an_object": ('{"messages": ["hi"]}', "messages[0] must be an object"),
    "no_role": ('{"messages": [{"content": "hi"}]}', "messages[0] must have a role"),
    "content_not_a_string": ('{"messages": [{"role": "user", "content": 5}]}', "messages[0] (user) must have a "
                             "content string"),
    "mixed_prompt_completion": ('{"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}',
                                "'prompt' must be a non-empty list of messages, got a str"),
    "no_assistant": ('{"messages": [{"role": "user", "content": "hi"}]}', "no token to train on"),
    "completion_of_user": ('{"prompt": [{"role": "user", "content": "q"}], '
                           '"completion": [{"role": "user", "content": "a"}]}',
                           "does not render the prompt (with its generation prompt) as the start of prompt + "
                           "completion"),
    "assistant_first": ('{"messages": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "q"}]}',
                        "starts with an assistant message"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_lines_name_file_line_and_problem(smollm2, tmp_path, case):
  tokenizer, template, _, _ = smollm2
  line, why = BAD[case]
  path = _write(tmp_path / "chat.jsonl", [GOOD, line])
  with pytest.raises(SFTDataError) as info:
    load_sft_jsonl([path], tokenizer, template)
  assert str(info.value).startswith(f"{path}:2: ") and why in str(info.value), str(info.value)


def test_conversations_need_a_chat_template(smollm2, tmp_path):
  tokenizer = smollm2[0]
  path = _write(tmp_path / "chat.jsonl", ['{"text": "fine without one"}', GOOD])
  with pytest.raises(SFTDataError, match=r"chat\.jsonl:2: .*the tokenizer has no chat template"):
    load_sft_jsonl([path], tokenizer, None)


def test_a_template_that_does_not_render_incrementally_is_refused(smollm2):
  # Only the last assistant message keeps its content (as reasoning templates drop earlier thoughts).
  source = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  template = ChatTemplate(source, "dropping", {})
  with pytest.raises(SFTDataError, match=r"x\.jsonl:4: the chat template does not render conversations "
                                         r"incrementally \(at message 2"):
    encode_sample({"messages": CONVERSATIONS["system_multi_turn"]}, smollm2[0], template, "x.jsonl:4")


def test_load_keeps_file_and_line_order(smollm2, tmp_path):
  tokenizer, template, _, _ = smollm2
  first = [json.dumps({"text": f"document {i}"}) for i in range(3)]
  second = [json.dumps({"prompt": f"q{i}", "completion": f" a{i}"}) for i in range(2)]
  a = _write(tmp_path / "a.jsonl", [first[0], "", first[1], "  ", first[2]])  # blank lines are skipped
  b = _write(tmp_path / "b.jsonl", [*second, GOOD])
  examples = load_sft_jsonl([a, str(b)], tokenizer, template)
  expected = [encode_sample(json.loads(line), tokenizer, template, "-") for line in [*first, *second, GOOD]]
  assert len(examples) == len(expected) == 6
  for got, want in zip(examples, expected, strict=True):
    assert isinstance(got, SFTExample)
    assert got.tokens.tolist() == want.tokens.tolist() and got.mask.tolist() == want.mask.tolist()
  with pytest.raises(SFTDataError, match="no SFT samples"):
    load_sft_jsonl([_write(tmp_path / "empty.jsonl", [""])], tokenizer, template)
