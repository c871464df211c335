"""Chat templates render (and encode) exactly as transformers' apply_chat_template, and fail with clear errors."""

import inspect
import json

import pytest
import transformers
from helpers import byte_level_bpe_json, fetch_models

from data_pipelines.chat_template import (
  ChatTemplateError,
  chat_messages,
  chat_prompt_ids,
  end_of_turn_id,
  load_chat_template,
  template_of,
)
from data_pipelines.tokenizer import load_tokenizer, train_tokenizer

CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
MISTRAL = ["<s>", "</s>", "[INST]", "[/INST]"]

# SmolLM2-style ChatML with a default system message (the real one is read from the GGUF below).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama-3: bos_token from the special tokens, contents trimmed, a whitespace-controlled multi-line template.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim %}
    {{- content + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
# Mistral-style: roles must alternate, anything else raises through raise_exception.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# Qwen2.5-style tools: tojson (no HTML escaping, non-ASCII kept, indent), namespace, loop controls, tool calls of an
# assistant message whose content is None (the key is dropped), a {% generation %} block, strftime_now, block tags
# indented without whitespace control (lstrip_blocks, trim_blocks).
TOOLS_TEMPLATE = """
{%- if tools %}
<|im_start|>system
Today is {{ strftime_now('%Y') }}. You may call:
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}<|im_end|>
{% endif %}
{%- set ns = namespace(turns=0, skipped=0) %}
{%- for message in messages %}
  {%- if message.role == 'system' and tools %}{% set ns.skipped = ns.skipped + 1 %}{% continue %}{% endif %}
  {%- if ns.turns >= 6 %}{% break %}{% endif %}
  {%- set ns.turns = ns.turns + 1 %}
<|im_start|>{{ message.role }}
{% if message.role == 'assistant' %}{% generation %}{{ message.content }}{% endgeneration %}{% else
  %}{{ message.content }}{% endif %}
  {%- if message.content is not defined %}(no content){% endif %}

    {% if message.role == 'tool' %}
    (a tool's output)
    {% endif %}
  {%- for call in message.tool_calls | default([]) %}
<tool_call>
{{ call.function | tojson(indent=2, sort_keys=true) }}
</tool_call>
  {%- endfor %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}
{{- ns.skipped }}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Wetter für <Ort> & \"Zeit\" — 天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "  Be terse.  "}, {"role": "user", "content": "What is 2+2?\n"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And <b>3+3</b>? ü 😀"}],
]
TOOL_CONVERSATION = [
    {"role": "system", "content": "skipped with tools"}, {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"}]


def _checkpoint(path, specials, config):
  """A tokenizer directory: a byte-level BPE over `specials` and tokenizer_config.json = config."""
  path.mkdir(parents=True, exist_ok=True)
  (path / "tokenizer.json").write_text(byte_level_bpe_json(specials, add_bos=False), encoding="utf-8")
  (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def smollm2_template():
  """The real SmolLM2-135M-Instruct chat template, read from its GGUF by the gguf package."""
  import gguf  # noqa: PLC0415

  field = gguf.GGUFReader(fetch_models().fetch_gguf("smollm2-135m")).get_field("tokenizer.chat_template")
  return field.contents()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, smollm2_template):
  """{name: (tokenizer dir, transformers' tokenizer of it)} for each template under test."""
  root = tmp_path_factory.mktemp("chat")
  chatml = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
            "unk_token": "<|endoftext|>"}
  dirs = {
      "smollm2": _checkpoint(root / "smollm2", CHATML, {**chatml, "chat_template": smollm2_template}),
      "chatml": _checkpoint(root / "chatml", CHATML, {**chatml, "eos_token": "<|endoftext|>",
                                                      "chat_template": CHATML_TEMPLATE}),
      "llama3": _checkpoint(root / "llama3", LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                                      "chat_template": LLAMA3_TEMPLATE}),
      "mistral": _checkpoint(root / "mistral", MISTRAL, {"bos_token": "<s>", "eos_token": "</s>",
                                                         "chat_template": MISTRAL_TEMPLATE}),
      "tools": _checkpoint(root / "tools", CHATML, {"eos_token": "<|im_end|>", "chat_template": TOOLS_TEMPLATE}),
  }
  return {name: (path, transformers.AutoTokenizer.from_pretrained(str(path))) for name, path in dirs.items()}


@pytest.mark.parametrize("name", ["smollm2", "chatml", "llama3", "mistral"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_renders_as_apply_chat_template(checkpoints, name, add_generation_prompt):
  path, ref = checkpoints[name]
  template = load_chat_template(path)
  for messages in CONVERSATIONS[:1] if name == "mistral" else CONVERSATIONS:
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert template.render(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_tools_tojson_namespace_and_loop_controls_render_as_transformers(checkpoints, add_generation_prompt):
  path, ref = checkpoints["tools"]
  template = load_chat_template(path)
  for messages, tools in ((TOOL_CONVERSATION, TOOLS), (CONVERSATIONS[1] * 4, None)):
    expected = ref.apply_chat_template(messages, tools=tools, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)
    assert template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt) == expected
  rendered = template.render(TOOL_CONVERSATION, tools=TOOLS)
  assert '"Wetter für <Ort> & \\"Zeit\\" — 天气"' in rendered and "(no content)" in rendered


@pytest.mark.parametrize("name", ["smollm2", "chatml", "llama3"])
def test_chat_prompt_ids_are_apply_chat_templates(checkpoints, name):
  """The rendered prompt's special tokens encode as their ids and no bos is added beyond the template's own."""
  path, ref = checkpoints[name]
  tok = load_tokenizer(path)
  for messages in (*CONVERSATIONS, chat_messages("Why? <|im_end|> stays text?", system="Be kind.")):
    expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat_prompt_ids(tok, template_of(tok), messages) == expected


def test_end_of_turn_is_the_token_after_an_assistant_message(checkpoints):
  expected = {"smollm2": "<|im_end|>", "chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}
  for name, token in expected.items():
    path, ref = checkpoints[name]
    tok = load_tokenizer(path)
    assert end_of_turn_id(tok, template_of(tok)) == ref.convert_tokens_to_ids(token), name
  path = _checkpoint(checkpoints["chatml"][0].parent / "plain", CHATML, {
      "eos_token": "<|endoftext|>",
      "chat_template": "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"})
  tok = load_tokenizer(path)
  assert end_of_turn_id(tok, template_of(tok)) is None  # no special token: generation stops at eos


def test_named_templates_and_template_files_are_chosen_as_transformers_does(tmp_path, checkpoints):
  named = [{"name": "default", "template": CHATML_TEMPLATE}, {"name": "tool_use", "template": TOOLS_TEMPLATE}]
  path = _checkpoint(tmp_path / "named", CHATML, {"eos_token": "<|im_end|>", "chat_template": named})
  ref = transformers.AutoTokenizer.from_pretrained(str(path))
  messages = CONVERSATIONS[0]
  assert load_chat_template(path).render(messages) == ref.apply_chat_template(messages, tokenize=False)
  assert load_chat_template(path, tools=True).render(messages, tools=TOOLS) == ref.apply_chat_template(
      messages, tools=TOOLS, tokenize=False)
  with pytest.raises(ChatTemplateError, match=r"named/tokenizer_config\.json has no chat template named 'x' "
                                              r"\(it has default, tool_use\)"):
    load_chat_template(path, "x")
  # chat_template.jinja beside the tokenizer wins over tokenizer_config.json's.
  (path / "chat_template.jinja").write_text(LLAMA3_TEMPLATE.replace("bos_token", "'<|im_start|>'"))
  ref = transformers.AutoTokenizer.from_pretrained(str(path))
  assert load_chat_template(path).render(messages) == ref.apply_chat_template(messages, tokenize=False)


def test_template_errors_name_the_problem(tmp_path, checkpoints):
  path, ref = checkpoints["mistral"]
  bad_roles = [{"role": "assistant", "content": "first"}]
  with pytest.raises(Exception, match="roles must alternate"):
    ref.apply_chat_template(bad_roles, tokenize=False)
  with pytest.raises(ChatTemplateError, match=r"mistral/tokenizer_config\.json failed: Conversation roles must "
                                              r"alternate"):
    load_chat_template(path).render(bad_roles)
  with pytest.raises(ChatTemplateError, match="cannot render a chat of no messages"):
    load_chat_template(path).render([])

  missing = _checkpoint(tmp_path / "base", CHATML, {"eos_token": "<|endoftext|>"})
  with pytest.raises(ChatTemplateError, match=r"base'? has no chat template .*may not be a chat model"):
    load_chat_template(missing)
  broken = _checkpoint(tmp_path / "broken", CHATML, {"eos_token": "<|endoftext|>",
                                                     "chat_template": "line one\n{% for m in messages %}{{ m }"})
  with pytest.raises(ChatTemplateError, match=r"broken/tokenizer_config\.json is not valid Jinja \(line 2\)"):
    load_chat_template(broken).render(CONVERSATIONS[0])
  wrong = _checkpoint(tmp_path / "wrong", CHATML, {"eos_token": "<|endoftext|>", "chat_template": 3})
  with pytest.raises(ChatTemplateError, match="chat_template must be a string or a list"):
    load_chat_template(wrong)
  # The sandbox: no way to Python internals, and namespaces refuse underscore names.
  escape = _checkpoint(tmp_path / "escape", CHATML, {"eos_token": "<|endoftext|>",
                                                     "chat_template": "{{ messages.__class__.__mro__ }}"})
  with pytest.raises(ChatTemplateError, match="escape/tokenizer_config.json failed"):
    load_chat_template(escape).render(CONVERSATIONS[0])
  dunder = _checkpoint(tmp_path / "dunder", CHATML, {"eos_token": "<|endoftext|>",
                                                     "chat_template": "{% set ns = namespace(_x=1) %}"})
  with pytest.raises(ChatTemplateError, match="cannot set the namespace attribute '_x'"):
    load_chat_template(dunder).render(CONVERSATIONS[0])


def test_chat_needs_a_tokenizer_json(tmp_path):
  spm = train_tokenizer([inspect.getsource(json)], 400, tmp_path / "spm")
  with pytest.raises(ChatTemplateError, match="chat needs a Hugging Face tokenizer"):
    template_of(spm)
