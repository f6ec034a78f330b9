"""nanoft/tokenizer.py and nanoft/chat_template.py against transformers' AutoTokenizer, and the sandbox."""

import json
import shutil

import pytest
import transformers
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from nanoft.errors import UserError
from nanoft.tokenizer import Tokenizer

# Llama 3.1's template, cut to the system/user/assistant turns and the tools block (tojson, strftime_now).
LLAMA3_CHAT_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You have access to the following functions.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role not in ['user', 'assistant'] %}
        {{- raise_exception("Only user and assistant roles are supported after the system message") }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of Japan?"},
        {"role": "assistant", "content": "Tokyo"},
        {"role": "user", "content": "  And of Peru, señor? 🙂 1234  "},
    ],
    [
        {"role": "user", "content": "tabs\tand\nnewlines\n\n<|im_end|> inside the text"},
        {"role": "assistant", "content": "ok"},
    ],
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather at a place <in °C>",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def reference_ids(reference, messages, **kwargs):
    return reference.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return Tokenizer.from_pretrained(smollm2_dir), transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def llama3_dir(smollm2_dir, tmp_path_factory):
    """A Llama-3-style tokenizer: SmolLM2's BPE plus Llama 3's special tokens and chat template."""
    path = tmp_path_factory.mktemp("llama3")
    backend = BackendTokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in LLAMA3_SPECIAL_TOKENS]
    )
    backend.save(str(path / "tokenizer.json"))
    # As in Llama 3's first release: eos_token says <|end_of_text|>, but a turn ends with <|eot_id|>.
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    ids = {token: backend.token_to_id(token) for token in LLAMA3_SPECIAL_TOKENS}
    generation_config = {"eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}
    (path / "generation_config.json").write_text(json.dumps(generation_config))
    return path


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chatml_ids_equal_transformers(smollm2, messages, add_generation_prompt):
    ours, reference = smollm2
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == reference_ids(reference, messages, add_generation_prompt=add_generation_prompt)
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == reference.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )


@pytest.mark.parametrize("messages", CONVERSATIONS[:2])
@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL]])
def test_llama3_template_ids_equal_transformers(llama3_dir, messages, tools):
    ours = Tokenizer.from_pretrained(llama3_dir)
    reference = transformers.AutoTokenizer.from_pretrained(llama3_dir)
    ids = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, tools=tools)
    assert ids == reference_ids(reference, messages, add_generation_prompt=True, tools=tools)
    assert ids[0] == ours.bos_id == reference.convert_tokens_to_ids("<|begin_of_text|>")
    fixed_date = ours.apply_chat_template(messages, date_string="26 Jul 2024")
    assert fixed_date == reference.apply_chat_template(messages, tokenize=False, date_string="26 Jul 2024")


def test_special_ids_come_from_the_config_files(smollm2, llama3_dir):
    smol, _ = smollm2
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.eos_ids, smol.add_bos) == (1, 2, 2, {2}, False)
    assert smol.vocab_size == 49152
    llama3 = Tokenizer.from_pretrained(llama3_dir)
    eot, end_of_text = (llama3.backend.token_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>"))
    assert llama3.eos_id == eot  # the template's end of turn, not the declared eos_token
    assert llama3.eos_ids == {eot, end_of_text}
    assert llama3.pad_id == eot  # no pad token: falls back to eos


def test_encode_decode_and_offsets_equal_transformers(smollm2):
    ours, reference = smollm2
    text = "Héllo  world, 2024!\n\tdef f(x): return x**2  # ok <|im_end|>"
    ids, offsets = ours.encode_with_offsets(text)
    expected = reference(text, add_special_tokens=False, return_offsets_mapping=True)
    assert ids == expected["input_ids"] == ours.encode(text)
    assert offsets == [tuple(span) for span in expected["offset_mapping"]]
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_chat_template_file_and_named_templates(smollm2_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, tmp_path / name)
    messages = [{"role": "user", "content": "hi"}]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": "D{{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "T"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(messages) == "Dhi"
    (tmp_path / "chat_template.jinja").write_text(
        "J{{ messages[0]['content'] }}{% generation %}!{% endgeneration %}"
    )
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(messages) == "Jhi!"
    assert (
        transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False)
        == "Jhi!"
    )


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ dict.mro()[1].__subclasses__() }}",
        "{% set ns = namespace(__class__=1) %}",
        "{{ messages.append({'role': 'user'}) }}",
    ],
)
def test_untrusted_template_cannot_run_code(smollm2_dir, template):
    tokenizer = Tokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = template
    with pytest.raises(UserError, match="sandbox forbids|no attribute 'mro'"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_errors_are_one_line_user_errors(llama3_dir):
    tokenizer = Tokenizer.from_pretrained(llama3_dir)
    with pytest.raises(UserError, match="Only user and assistant roles"):
        tokenizer.apply_chat_template([{"role": "system", "content": "a"}, {"role": "tool", "content": "b"}])
    with pytest.raises(UserError, match="empty conversation"):
        tokenizer.apply_chat_template([])
    tokenizer.chat_template = "{% for m in messages %}"
    with pytest.raises(UserError, match="syntax error"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_or_broken_tokenizer_is_explained(tmp_path):
    with pytest.raises(UserError, match="tokenizer.json: not found"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot be read"):
        Tokenizer.from_pretrained(tmp_path)


def test_tiny_tokenizer_fixture_ends_turns_with_its_end_token(tiny_tokenizer_dir):
    tokenizer = Tokenizer.from_pretrained(tiny_tokenizer_dir)
    end = tokenizer.backend.token_to_id("<|end|>")
    assert tokenizer.eos_id == end and tokenizer.eos_ids == {end, tokenizer.backend.token_to_id("</s>")}
    reference = transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    messages = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]
    assert tokenizer.apply_chat_template(messages, tokenize=True) == reference_ids(reference, messages)
