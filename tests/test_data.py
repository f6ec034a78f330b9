"""data.py: formats, masking against transformers' assistant masks, packing against one-by-one losses,
dedup against datasketch, splits, cache, distributed batches and resume, bad input.

    python -m pytest tests/test_data.py -q -x

The tokenizers are tiny byte-level BPEs trained here on Python's own docstrings, saved as Hugging Face
directories with real chat templates (SmolLM2's ChatML with pad = eos, Llama 2's [INST] with BOS).
"""

import functools
import json
import pydoc
import re

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from family_templates import FAMILY_TEMPLATES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    prepare_data,
    record_tokens,
    split_train_val,
)
from nanoft.data_batches import Batches, pack_examples, token_counts
from nanoft.data_cache import TokenizedExamples
from nanoft.data_dedup import WordHashes, find_duplicates, minhash_signatures, shingle_hashes
from nanoft.data_records import Record
from nanoft.default_data import default_data_path
from nanoft.errors import UserError
from nanoft.loss import IGNORE_INDEX
from nanoft.model import ModelConfig, Transformer
from nanoft.tokenizer import Tokenizer

# SmolLM2-Instruct's template with transformers' {% generation %} marks around what the assistant writes, so
# transformers can compute the reference assistant mask; the marks do not change the rendered text.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def corpus() -> list[str]:
    return [pydoc.getdoc(obj) for obj in (str, dict, list, json, re, np.ndarray, torch.Tensor, pytest)]


def save_tokenizer(path, specials, config: dict, bos_processor: str | None = None):
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer)
    if bos_processor:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_processor} $A", special_tokens=[(bos_processor, backend.token_to_id(bos_processor))]
        )
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    return save_tokenizer(
        tmp_path_factory.mktemp("chatml"),
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>",
            "chat_template": CHATML_TEMPLATE,
        },
    )


@pytest.fixture(scope="module")
def chatml(chatml_dir):
    return Tokenizer.from_pretrained(chatml_dir)


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    path = save_tokenizer(
        tmp_path_factory.mktemp("llama2"),
        ["<unk>", "<s>", "</s>"],
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": LLAMA2_TEMPLATE},
        "<s>",
    )
    return Tokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A base model's tokenizer: BOS added by encode, no chat template."""
    path = save_tokenizer(
        tmp_path_factory.mktemp("base"),
        ["<unk>", "<s>", "</s>"],
        {"bos_token": "<s>", "eos_token": "</s>"},
        "<s>",
    )
    return Tokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def reference(chatml_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(chatml_dir / "tokenizer.json"),
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
        chat_template=CHATML_TEMPLATE,
    )


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@functools.cache
def vocabulary() -> list[str]:
    return re.findall(r"[a-z]+", " ".join(corpus()).lower())


def words(seed: int, n: int) -> str:
    vocabulary_words = vocabulary()
    rng = np.random.default_rng(seed)
    return " ".join(vocabulary_words[i] for i in rng.integers(0, len(vocabulary_words), n))


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    return [
        {
            "instruction": words(seed * 100_000 + 3 * i, 8),
            "input": words(seed * 100_000 + 3 * i + 1, 4) if i % 2 else "",
            "output": words(seed * 100_000 + 3 * i + 2, 12),
        }
        for i in range(n)
    ]


def prepare(paths, tokenizer, tmp_path, **kwargs):
    kwargs = {"seq_len": 256, "cache_dir": tmp_path / "cache", "log": lambda line: None, **kwargs}
    seq_len = kwargs.pop("seq_len")
    return prepare_data(paths, tokenizer, seq_len, **kwargs)


# ---------------------------------------------------------------- masking


CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871."},
]


def test_chat_mask_equals_transformers_assistant_mask(chatml, reference):
    ids, labels = record_tokens(Record("x:1", "chat", CONVERSATION), chatml, "chat", False)
    expected = reference.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ids == list(expected["input_ids"])
    assert [label != IGNORE_INDEX for label in labels] == [bool(m) for m in expected["assistant_masks"]]
    trained = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert (
        chatml.decode(trained, skip_special_tokens=False)
        == "Paris is the capital.<|im_end|>Rome, since 1871.<|im_end|>"
    )


def test_smollm2_template_trains_every_answer_and_its_end_of_turn(smollm2_dir):
    smollm2 = Tokenizer.from_pretrained(smollm2_dir)  # the built-in model's real tokenizer and template
    ids, labels = record_tokens(Record("x:1", "chat", CONVERSATION), smollm2, "chat", False)
    assert ids == smollm2.apply_chat_template(CONVERSATION, tokenize=True)
    trained = smollm2.decode([label for label in labels if label != IGNORE_INDEX], skip_special_tokens=False)
    assert trained == "Paris is the capital.<|im_end|>Rome, since 1871.<|im_end|>"
    assert smollm2.eos_id == smollm2.backend.token_to_id("<|im_end|>")


# ---------------------------------------------------------------- the families' own chat templates


@pytest.fixture(scope="module")
def family_tokenizer_dir(tmp_path_factory):
    """family_tokenizer_dir("qwen3"): a tiny BPE with the family's special tokens and chat template."""
    made = {}

    def get(family: str):
        if family not in made:
            spec = FAMILY_TEMPLATES[family]
            config = {**spec.tokens, "chat_template": spec.template}
            made[family] = save_tokenizer(tmp_path_factory.mktemp(family), spec.specials, config)
        return made[family]

    return get


def family_conversation(family: str) -> list[dict]:
    return CONVERSATION if FAMILY_TEMPLATES[family].system else CONVERSATION[1:]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("family", FAMILY_TEMPLATES)
def test_family_template_ids_equal_transformers(family_tokenizer_dir, family, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    path, spec = family_tokenizer_dir(family), FAMILY_TEMPLATES[family]
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path / "tokenizer.json"), chat_template=spec.template, **spec.tokens
    )
    messages = family_conversation(family)
    ours = Tokenizer.from_pretrained(path).apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    expected = reference.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert ours == list(expected)


@pytest.mark.parametrize("family", FAMILY_TEMPLATES)
def test_family_template_trains_each_answer_and_its_end_of_turn(family_tokenizer_dir, family):
    tokenizer = Tokenizer.from_pretrained(family_tokenizer_dir(family))
    end = FAMILY_TEMPLATES[family].end_of_turn
    assert tokenizer.eos_id == tokenizer.backend.token_to_id(end)
    messages = family_conversation(family)
    ids, labels = record_tokens(Record("x:1", "chat", messages), tokenizer, "chat", False)
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True)
    trained = tokenizer.decode(
        [label for label in labels if label != IGNORE_INDEX], skip_special_tokens=False
    )
    # Qwen3 writes an empty thinking block before the answer after the last question: the model writes it too.
    thinking = "<think>\n\n</think>\n\n" if family == "qwen3" else ""
    assert trained == f"Paris is the capital.{end}{thinking}Rome, since 1871.{end}"


def test_qwen3_thinking_is_trained_where_the_template_keeps_it(family_tokenizer_dir, tmp_path):
    """Qwen3's template drops the thinking of answers before the last question and writes the last answer's
    (`reasoning_content`, or <think> in the content) in front of it: each answer is trained as written."""
    qwen3 = Tokenizer.from_pretrained(family_tokenizer_dir("qwen3"))
    messages = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "<think>\nAdd the two.\n</think>\n\nIt is 4."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "It is 6.", "reasoning_content": "Add them again."},
    ]
    train, _, _ = prepare(write_jsonl(tmp_path / "thinking.jsonl", [{"messages": messages}]), qwen3, tmp_path)
    ids, targets = train.example(0)
    assert qwen3.decode(ids.tolist(), skip_special_tokens=False) == qwen3.apply_chat_template(messages)
    trained = qwen3.decode([t for t in targets.tolist() if t != IGNORE_INDEX], skip_special_tokens=False)
    assert trained == "It is 4.<|im_end|><think>\nAdd them again.\n</think>\n\nIt is 6.<|im_end|>"


def test_smollm3_no_think_trains_the_answers_after_their_empty_thinking(family_tokenizer_dir):
    """With /no_think, SmolLM3's template writes an empty thinking block into every assistant turn and its
    generation prompt: the model is prompted with it and learns only the answer."""
    smollm3 = Tokenizer.from_pretrained(family_tokenizer_dir("smollm3"))
    messages = [{"role": "system", "content": "You answer briefly. /no_think"}, *CONVERSATION[1:]]
    ids, labels = record_tokens(Record("x:1", "chat", messages), smollm3, "chat", False)
    assert "<think>\n\n</think>\nRome" in smollm3.decode(ids, skip_special_tokens=False)
    trained = smollm3.decode([label for label in labels if label != IGNORE_INDEX], skip_special_tokens=False)
    assert trained == "Paris is the capital.<|im_end|>Rome, since 1871.<|im_end|>"


def test_template_that_is_not_prefix_stable(chatml_dir, tmp_path):
    """A template whose text for the first turns changes with later ones (here: a message count on top), as
    templates that drop earlier reasoning do: each answer is found in the text instead."""
    path = save_tokenizer(
        tmp_path / "counting",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"eos_token": "<|im_end|>", "chat_template": "{{ messages | length }} messages\n" + CHATML_TEMPLATE},
    )
    counting = Tokenizer.from_pretrained(path)
    ids, labels = record_tokens(Record("x:1", "chat", CONVERSATION), counting, "chat", False)
    trained = counting.decode([label for label in labels if label != IGNORE_INDEX], skip_special_tokens=False)
    assert trained == "Paris is the capital.<|im_end|>Rome, since 1871.<|im_end|>"


def test_eos_is_trained_when_pad_is_eos(chatml, tmp_path):
    assert chatml.pad_id == chatml.eos_id  # the case that masks the EOS in trainers that mask every pad id
    rows = [
        {
            "messages": [
                {"role": "user", "content": words(i, 3 + 5 * i)},
                {"role": "assistant", "content": words(100 + i, 2 + i)},
            ]
        }
        for i in range(2)
    ]
    train, _, _ = prepare(write_jsonl(tmp_path / "chat.jsonl", rows), chatml, tmp_path, val_frac=0)
    batch = next(iter(Batches(train, batch_size=2, pad_id=chatml.pad_id, shuffle=False)))
    lengths = [len(train.example(index)[0]) for index in batch["sample_ids"]]
    assert lengths[0] != lengths[1]  # so one row is padded with the pad id, which is the EOS id
    for row, n in enumerate(lengths):
        ids, targets = batch["input_ids"][row], batch["targets"][row]
        answer_end = (ids[:n] == chatml.eos_id).nonzero().flatten()[-1]  # the <|im_end|> closing the answer
        assert targets[answer_end - 1] == chatml.eos_id  # predicted from the answer's last token: trained
        assert (ids[n:] == chatml.pad_id).all() and (targets[n - 1 :] == IGNORE_INDEX).all()


def test_json_array_with_byte_order_mark(chatml, tmp_path):
    path = tmp_path / "array.json"
    path.write_text("\ufeff" + json.dumps(alpaca_rows(3), indent=2), encoding="utf-8")
    train, _, report = prepare(path, chatml, tmp_path, val_frac=0)
    assert report.files[0]["records"] == 3 and report.files[0]["format"] == "alpaca"
    assert train.sources == [f"{path}:2", f"{path}:7", f"{path}:12"]  # the line each record starts on


def test_alpaca_prompt_for_base_model(base, tmp_path):
    rows = [
        {"instruction": "Name a color.", "input": "", "output": "Blue."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    ]
    train, _, report = prepare(
        write_jsonl(tmp_path / "a.jsonl", rows), base, tmp_path, val_frac=0, dedup=False
    )
    assert report.alpaca_style == "alpaca" and report.files[0]["format"] == "alpaca"
    for index, row in enumerate(rows):
        ids, targets = train.example(index)
        prompt = (ALPACA_PROMPT_WITH_INPUT if row["input"] else ALPACA_PROMPT).format(**row)
        assert ids.tolist() == [base.bos_id] + base.encode(prompt + row["output"]) + [base.eos_id]
        trained = targets[targets != IGNORE_INDEX].tolist()
        assert base.decode(trained, skip_special_tokens=False) == row["output"] + "</s>"
        n_prompt = len(base.encode(prompt)) + 1
        assert (targets[: n_prompt - 1] == IGNORE_INDEX).all()  # nothing of the prompt is a label


def test_alpaca_through_chat_template(chatml, tmp_path):
    rows = [{"instruction": "Name a color.", "input": "sky", "output": "Blue."}]
    train, _, report = prepare(write_jsonl(tmp_path / "a.json", rows), chatml, tmp_path, val_frac=0)
    assert report.alpaca_style == "chat"
    ids, targets = train.example(0)
    text = chatml.decode(ids.tolist(), skip_special_tokens=False)
    assert "<|im_start|>user\nName a color.\n\nsky<|im_end|>" in text
    assert (
        chatml.decode(targets[targets != IGNORE_INDEX].tolist(), skip_special_tokens=False)
        == "Blue.<|im_end|>"
    )
    forced, _, report = prepare(tmp_path / "a.json", chatml, tmp_path, val_frac=0, alpaca_style="alpaca")
    assert report.alpaca_style == "alpaca" and "### Response:" in chatml.decode(forced.example(0)[0].tolist())


def test_llama2_template_sharegpt_multi_turn(llama2, tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Be terse."},
                {"from": "human", "value": "Hi there"},
                {"from": "gpt", "value": "Hello."},
                {"from": "human", "value": "Bye"},
                {"from": "gpt", "value": "Goodbye."},
            ]
        }
    ]
    train, _, report = prepare(write_jsonl(tmp_path / "sg.jsonl", rows), llama2, tmp_path, val_frac=0)
    assert report.files[0]["format"] == "sharegpt"
    ids, targets = train.example(0)
    assert ids[0] == llama2.bos_id and "<<SYS>>" in llama2.decode(ids.tolist(), skip_special_tokens=False)
    trained = llama2.decode(targets[targets != IGNORE_INDEX].tolist(), skip_special_tokens=False)
    assert trained.replace(" ", "") == "Hello.</s>Goodbye.</s>"  # both turns and both EOS, no prompt


def test_train_on_everything(chatml, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    train, _, _ = prepare(path, chatml, tmp_path, val_frac=0, train_on_everything=True)
    ids, targets = train.example(0)
    assert targets[:-1].tolist() == ids[1:].tolist() and targets[-1] == IGNORE_INDEX


def test_raw_text_blocks(chatml, tmp_path):
    (tmp_path / "book.txt").write_text(words(1, 300))
    documents = write_jsonl(tmp_path / "docs.jsonl", [{"text": words(2 + i, 40)} for i in range(5)])
    train, val, report = prepare([tmp_path / "book.txt", documents], chatml, tmp_path, seq_len=64, val_frac=0)
    stream = []
    for text in [words(1, 300)] + [words(2 + i, 40) for i in range(5)]:
        stream += chatml.encode(text) + [chatml.eos_id]
    n_blocks = (len(stream) - 1) // 64
    assert len(train) == n_blocks and report.truncated_tokens == len(stream) - n_blocks * 64
    for block in range(n_blocks):
        ids, targets = train.example(block)
        assert ids.tolist() == stream[block * 64 : block * 64 + 64]
        assert targets.tolist() == stream[block * 64 + 1 : block * 64 + 65]
    assert [f["format"] for f in report.files] == ["text", "text"]


def test_truncation_and_dropping_counted(chatml, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": words(1, 200)}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": words(2, 200)}]},
    ]
    train, _, report = prepare(
        write_jsonl(tmp_path / "long.jsonl", rows), chatml, tmp_path, seq_len=64, val_frac=0
    )
    assert report.truncated_examples == 2 and report.dropped_examples == 1  # the first lost its whole answer
    assert len(train) == 1 and train.lengths.tolist() == [64]
    full = len(record_tokens(Record("x", "chat", rows[1]["messages"]), chatml, "chat", False)[0])
    assert report.truncated_tokens > full - 64


# ---------------------------------------------------------------- properties

chat_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
conversations = st.lists(
    st.tuples(st.sampled_from(["system", "user", "assistant"]), chat_text), min_size=1, max_size=6
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversations)
def test_property_masks_line_up_and_never_leak(chatml, reference, turns):
    messages = [{"role": role, "content": content} for role, content in turns]
    ids, labels = record_tokens(Record("x", "chat", messages), chatml, "chat", False)
    expected = reference.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ids == list(expected["input_ids"]) and len(labels) == len(ids)
    # No label outside what the assistant writes (transformers' mask from the {% generation %} marks) ...
    assert all(
        label == IGNORE_INDEX or in_assistant
        for label, in_assistant in zip(labels, expected["assistant_masks"], strict=True)
    )
    # ... and all of it trained, but for a token that straddles the turn's start (a leading space merged
    # into the template's newline), and every answer's <|im_end|>.
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    assert sum(expected["assistant_masks"]) - sum(label != IGNORE_INDEX for label in labels) <= n_assistant
    assert sum(label == chatml.eos_id for label in labels) == n_assistant


alternating = st.lists(st.tuples(chat_text, chat_text), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.none(), chat_text), alternating)
def test_property_llama2_trains_exactly_the_answers(llama2, system, exchanges):
    messages = [{"role": "system", "content": system}] if system is not None else []
    for question, answer in exchanges:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    ids, labels = record_tokens(Record("x", "chat", messages), llama2, "chat", False)
    assert ids == llama2.apply_chat_template(messages, tokenize=True) and len(labels) == len(ids)
    trained = llama2.decode([label for label in labels if label != IGNORE_INDEX], skip_special_tokens=False)
    assert trained == "".join(f" {answer.strip()} </s>" for _, answer in exchanges)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60), st.text(max_size=30), st.text(max_size=60))
def test_property_alpaca_renders_and_aligns(base, instruction, input, output):
    fields = {"instruction": instruction or "x", "input": input, "output": output}
    ids, labels = record_tokens(Record("x", "alpaca", fields), base, "alpaca", False)
    assert len(ids) == len(labels) and labels[-1] == base.eos_id
    trained = base.decode([label for label in labels if label != IGNORE_INDEX], skip_special_tokens=False)
    assert trained.endswith("</s>")
    # The output (up to trailing spaces) is trained, but for leading whitespace merged into the prompt's "\n".
    answer, output = trained.removesuffix("</s>"), output.rstrip()
    assert output.endswith(answer) and not output[: len(output) - len(answer)].strip()


# ---------------------------------------------------------------- packing


def tiny_model(vocab_size):
    torch.manual_seed(0)
    # conftest's tiny Llama, untied, over this test's vocabulary.
    untied = dict(vocab_size=vocab_size, tie_word_embeddings=False, max_position_embeddings=512)
    config = ModelConfig(**{**TINY_MODEL, **untied})
    return Transformer(config).eval()


def per_example_losses(model, batch) -> dict[int, float]:
    """Summed cross-entropy of each example in the batch (keyed by sample id)."""
    with torch.no_grad():
        logits = model(
            batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"]
        )
    token_losses = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(batch["targets"])
    losses, ids = {}, iter(batch["sample_ids"])
    for row in range(len(token_losses)):
        documents = (
            batch["document_ids"][row]
            if batch["document_ids"] is not None
            else torch.zeros_like(batch["targets"][row])
        )
        for document in documents.unique().tolist():
            if document >= 0:
                losses[next(ids)] = token_losses[row][documents == document].sum().item()
    return losses


def test_packed_loss_equals_one_by_one(chatml, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": words(i, 2 + 7 * i % 20)},
                {"role": "assistant", "content": words(50 + i, 3 + 5 * i % 17)},
            ]
        }
        for i in range(10)
    ]
    train, _, _ = prepare(write_jsonl(tmp_path / "p.jsonl", rows), chatml, tmp_path, seq_len=400, val_frac=0)
    model = tiny_model(chatml.vocab_size)
    packed = Batches(train, batch_size=2, pad_id=chatml.pad_id, pack=True, shuffle=False, drop_last=False)
    assert len(packed.rows) < len(train)  # several examples really share a row
    packed_losses = {}
    for batch in packed:
        assert batch["position_ids"][batch["document_ids"] == 1].min() == 0  # positions restart per example
        assert torch.equal(batch["real_tokens"], batch["document_ids"] >= 0)
        packed_losses.update(per_example_losses(model, batch))
    single = Batches(train, batch_size=1, pad_id=chatml.pad_id, shuffle=False, drop_last=False)
    single_losses = {}
    for batch in single:
        single_losses.update(per_example_losses(model, batch))
    assert sorted(packed_losses) == list(range(len(train)))
    for index, loss in single_losses.items():
        assert packed_losses[index] == pytest.approx(loss, rel=1e-5)
    # and the model's own summed loss of a packed batch is the sum of those
    batch = next(iter(Batches(train, batch_size=2, pad_id=chatml.pad_id, pack=True, shuffle=False)))
    with torch.no_grad():
        loss_sum, n_targets = model(
            batch["input_ids"],
            batch["targets"],
            position_ids=batch["position_ids"],
            document_ids=batch["document_ids"],
        )
    assert loss_sum.item() == pytest.approx(sum(single_losses[i] for i in batch["sample_ids"]), rel=1e-5)
    assert n_targets.item() == sum(
        train.example(i)[1].__ne__(IGNORE_INDEX).sum() for i in batch["sample_ids"]
    )


def test_pack_examples_fits_capacity():
    lengths = np.random.default_rng(0).integers(2, 100, 500)
    packs = pack_examples(lengths, 128)
    assert sorted(i for pack in packs for i in pack) == list(range(500))
    assert all(lengths[pack].sum() <= 128 for pack in packs)
    assert len(packs) <= int(np.ceil(lengths.sum() / 128 * 1.1))


def test_packing_line_counts_rows_and_fill():
    examples = synthetic_examples(100, seq_len=32)
    batches = Batches(examples, 4, pad_id=0, pack=True)
    n_tokens, n_rows = int(examples.lengths.sum()), len(batches.rows)
    assert batches.packing_line() == (
        f"pack: 100 examples in {n_rows} rows of up to 32 tokens, {n_tokens / (32 * n_rows):.1%} full "
        f"({n_tokens:,} of {32 * n_rows:,} token slots)"
    )


# ---------------------------------------------------------------- batches, distribution, resume


def synthetic_examples(n, seq_len=32, seed=0) -> TokenizedExamples:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(3, 50, rng.integers(2, seq_len + 1)).tolist() for _ in range(n)]
    return TokenizedExamples.from_lists(
        ids, [x[1:] + [IGNORE_INDEX] for x in ids], [f"s:{i}" for i in range(n)], seq_len
    )


def test_padding_to_longest_in_batch():
    examples = synthetic_examples(8)
    for batch in Batches(examples, batch_size=4, pad_id=0, seed=1):
        lengths = [len(examples.example(i)[0]) for i in batch["sample_ids"]]
        assert batch["input_ids"].shape == (4, max(lengths)) and batch["document_ids"] is None
        for row, index in enumerate(batch["sample_ids"]):
            ids, targets = examples.example(index)
            assert batch["input_ids"][row, : len(ids)].tolist() == ids.tolist()
            assert (batch["input_ids"][row, len(ids) :] == 0).all() and (
                batch["targets"][row, len(ids) :] == IGNORE_INDEX
            ).all()
            # what a mixture of experts' load-balancing loss counts: the row's tokens, not its padding
            assert batch["real_tokens"][row].tolist() == [t < len(ids) for t in range(max(lengths))]


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_token_counts_count_the_examples_and_not_the_padding(pack):
    """A step's (target tokens, tokens): what train.py divides the loss by, and the tokens it trained on."""
    examples = synthetic_examples(50)
    batches = list(Batches(examples, batch_size=4, pad_id=0, seed=2, pack=pack))
    ids = [i for batch in batches for i in batch["sample_ids"]]
    n_targets = sum(int((examples.example(i)[1] != IGNORE_INDEX).sum()) for i in ids)
    assert token_counts(batches) == (n_targets, int(examples.lengths[ids].sum()))
    assert sum(batch["input_ids"].numel() for batch in batches) > examples.lengths[ids].sum()  # padded


def test_two_ranks_cover_each_epoch_once_and_reshuffle():
    examples = synthetic_examples(40)
    ranks = [Batches(examples, batch_size=4, pad_id=0, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    epochs = []
    for _ in range(2):
        seen = [[i for batch in rank for i in batch["sample_ids"]] for rank in ranks]
        assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(40))
        epochs.append(seen[0])
    assert epochs[0] != epochs[1]  # the order changes with the epoch


def test_resume_yields_exactly_the_same_batches():
    examples = synthetic_examples(50)
    uninterrupted = Batches(examples, batch_size=4, pad_id=0, seed=5, group_by_length=True)
    expected = [b["sample_ids"] for _ in range(3) for b in uninterrupted]
    first = Batches(examples, batch_size=4, pad_id=0, seed=5, group_by_length=True)
    got = []
    for batch in first:
        got.append(batch["sample_ids"])
        if len(got) == 7:
            break
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    resumed = Batches(examples, batch_size=4, pad_id=0, seed=5, group_by_length=True)
    resumed.load_state_dict(state)
    while len(got) < len(expected):
        got += [b["sample_ids"] for b in resumed]
    assert got == expected
    with pytest.raises(UserError, match="batch size"):
        Batches(examples, batch_size=2, pad_id=0, seed=5).load_state_dict(state)


def test_group_by_length_reduces_padding():
    examples = synthetic_examples(400, seq_len=64)
    padded = lambda batches: sum(b["input_ids"].numel() for b in batches)
    assert padded(Batches(examples, 8, 0, group_by_length=True)) < 0.8 * padded(Batches(examples, 8, 0))


def test_eval_batches_keep_the_tail():
    examples = synthetic_examples(11)
    ranks = [
        Batches(examples, batch_size=4, pad_id=0, shuffle=False, drop_last=False, rank=r, world_size=2)
        for r in range(2)
    ]
    assert sorted(i for rank in ranks for b in rank for i in b["sample_ids"]) == list(range(11))
    with pytest.raises(UserError, match="cannot fill one batch"):
        Batches(examples, batch_size=8, pad_id=0, world_size=2)


# ---------------------------------------------------------------- dedup


def test_minhash_equals_datasketch():
    datasketch = pytest.importorskip("datasketch")
    texts = [words(1, 30), "one two", "", words(2, 300)]
    for text, signature in zip(texts, minhash_signatures(texts), strict=True):
        reference = datasketch.MinHash(num_perm=128, seed=1, hashfunc=int)
        reference.update_batch([int(h) for h in shingle_hashes(text, WordHashes())])
        assert (reference.hashvalues == signature).all()


def test_find_duplicates_exact_and_near():
    base_text = words(7, 120)
    near = base_text.replace(base_text.split()[60], "different", 1)
    texts = [base_text, "  " + base_text.upper() + " ", near, words(8, 120), words(9, 5)]
    found = {(d.removed, d.kept, d.method) for d in find_duplicates(texts)}
    assert found == {(1, 0, "exact"), (2, 0, "near")}
    assert {(d.removed, d.method) for d in find_duplicates(texts, near_dup_threshold=None)} == {(1, "exact")}


def test_near_duplicates_are_removed_exactly_at_their_true_similarity():
    """Real records (the built-in set's questions and docstrings) with planted copies, each with 1-4 words
    replaced: every copy at true word-3-shingle Jaccard >= 0.8 with its original is removed, none below.
    MinHash estimates alone (0.035 standard error at 0.8) and LSH banded for 0.8 got this wrong both ways."""
    records = [json.loads(line) for line in default_data_path().read_text().splitlines()]
    texts = ["\n".join(record.values()) for record in records]

    def true_jaccard(a: str, b: str) -> float:  # written out here, independently of nanoft/data_dedup.py
        shingles = lambda text: {
            tuple(w[i : i + 3]) for w in [re.findall(r"\w+", text.lower())] for i in range(len(w) - 2)
        }
        return len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))

    rng = np.random.default_rng(0)
    long_enough = [i for i, text in enumerate(texts) if 20 <= len(text.split()) <= 80]
    originals = rng.choice(long_enough, size=150, replace=False)
    copies, similarities = [], []
    for original in originals:
        words = texts[original].split()
        for position in rng.choice(len(words), size=rng.integers(1, 5), replace=False):
            words[position] = f"planted{rng.integers(10**6)}"
        copies.append(" ".join(words))
        similarities.append(true_jaccard(texts[original], copies[-1]))
    similarities = np.array(similarities)
    assert ((similarities >= 0.75) & (similarities < 0.8)).sum() >= 10  # pairs close on both sides
    assert ((similarities >= 0.8) & (similarities < 0.85)).sum() >= 10

    duplicates = find_duplicates(texts + copies, near_dup_threshold=0.8)
    removed = {d.removed - len(texts): d for d in duplicates}
    assert all(0 <= copy < len(copies) for copy in removed)  # the built-in set has no near duplicates itself
    expected = {copy for copy, similarity in enumerate(similarities) if similarity >= 0.8}
    assert set(removed) == expected
    for copy, duplicate in removed.items():  # kept: the copy's own original, at the exact similarity
        assert duplicate.kept == originals[copy]
        assert duplicate.similarity == pytest.approx(similarities[copy])


def test_dedup_before_split_and_val_files_win(chatml, tmp_path):
    rows = alpaca_rows(30)
    duplicated = rows + [dict(rows[3]), {**rows[4], "output": rows[4]["output"].upper()}]
    train_path = write_jsonl(tmp_path / "train.jsonl", duplicated + [rows[0]])
    val_path = write_jsonl(tmp_path / "val.jsonl", [rows[0]])
    run_dir = tmp_path / "run"
    train, val, report = prepare(train_path, chatml, tmp_path, val_paths=val_path, run_dir=run_dir)
    # rows[3]'s copy, rows[4] with its output upper-cased, and both copies of the val record rows[0]
    assert report.exact_duplicates_removed == 4 and report.val_source == "files"
    assert len(val) == 1 and len(train) == 29 and "val.jsonl" in report.files[1]["path"]
    assert f"{train_path}:1" not in train.sources and f"{train_path}:33" not in train.sources
    pairs = [json.loads(line) for line in (run_dir / "dedup_examples.jsonl").read_text().splitlines()]
    assert pairs and all({"method", "kept", "removed", "similarity"} <= set(pair) for pair in pairs)
    _, _, off = prepare(train_path, chatml, tmp_path, dedup=False)
    assert off.exact_duplicates_removed == 0 and off.train_examples + off.val_examples == 33 and not off.dedup


# ---------------------------------------------------------------- split, spot-check, cache


def test_split_is_seeded_with_floor_and_cap():
    examples = synthetic_examples(200)
    train_a, val_a, why = split_train_val(examples, 0.05, seed=1)
    train_b, val_b, _ = split_train_val(examples, 0.05, seed=1)
    assert val_a.sources == val_b.sources and len(val_a) == 20 and len(train_a) == 180
    assert why == "5% of 200 is 10, raised to 20: a val loss over fewer is noise"
    assert not set(train_a.sources) & set(val_a.sources)
    assert split_train_val(examples, 0.05, seed=2)[1].sources != val_a.sources
    _, val, why = split_train_val(synthetic_examples(79), 0.05, 0)  # the QA report's 79 records
    assert len(val) == 19 and why.endswith(
        "raised towards 20 (a val loss over fewer is noise) but at most a quarter of the data"
    )
    _, val, why = split_train_val(synthetic_examples(30_000, seq_len=4), 0.5, 0)
    assert len(val) == 1000 and why == "50% of 30000 is 15000, capped at 1000: more only slows evaluation"
    assert split_train_val(synthetic_examples(720), 0.05, 0)[2] == "5% of 720 is 36"


def test_the_split_line_says_why_val_is_that_size(chatml, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(79))
    lines = []
    prepare(path, chatml, tmp_path, log=lines.append)
    assert lines[-1].endswith(
        "val 19 (split: 5% of 79 is 4, raised towards 20 (a val loss over fewer is noise) but at most a "
        "quarter of the data)"
    )


def test_spot_check_file_marks_trained_spans(chatml, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(80))
    train, _, _ = prepare(path, chatml, tmp_path, run_dir=tmp_path / "run")
    text = (tmp_path / "run" / "samples.txt").read_text()
    assert text.count("==== sample ") == 50
    spans = re.findall("⟦(.*?)⟧", text.split("\n", 1)[1], flags=re.S)  # after the header line
    assert len(spans) == 50 and all(span.endswith("<|im_end|>") for span in spans)
    assert not any("<|im_start|>" in span for span in spans)


def test_cache_hit_and_invalidation(chatml, llama2, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(40))
    first, _, report = prepare(path, chatml, tmp_path)
    assert report.cache == "miss"
    second, _, report = prepare(path, chatml, tmp_path)
    assert report.cache == "hit" and (second.input_ids == first.input_ids).all()
    assert second.sources == first.sources and report.train_examples == len(first)
    assert prepare(path, chatml, tmp_path, seq_len=128)[2].cache == "miss"  # settings
    assert prepare(path, llama2, tmp_path)[2].cache == "miss"  # tokenizer
    write_jsonl(path, alpaca_rows(40)[:-1])
    assert prepare(path, chatml, tmp_path)[2].cache == "miss"  # content
    assert len(list((tmp_path / "cache").iterdir())) == 4 and not list((tmp_path / "cache").glob("*.tmp*"))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
            r"bad\.jsonl:2: not valid JSON",
        ),
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n',
            r"bad\.jsonl:2: missing field 'output'",
        ),
        ('{"instruction": "a", "output": 3}\n', r"bad\.jsonl:1: field 'output' must be a string, got int"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}\n',
            r"bad\.jsonl:1: message 1 has unknown role 'robot'",
        ),
        (
            '{"messages": [{"role": "user", "content": null}]}\n',
            r"bad\.jsonl:1: message 0 'content' must be a string",
        ),
        (
            '{"conversations": [{"from": "alien", "value": "b"}]}\n',
            r"bad\.jsonl:1: message 0 has unknown from",
        ),
        ('["a", "b"]\n', r"bad\.jsonl:1: a record must be a JSON object"),
        (
            '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]}\n',
            r"bad\.jsonl:1: has no assistant turn: nothing to learn \(roles: system, user\)",
        ),
        (
            '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": " "}]}\n',
            r"bad\.jsonl:1: message 0 \(user\) has an empty 'content'",
        ),
        (
            '{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]}\n',
            r"bad\.jsonl:1: message 1 \(assistant\) has an empty 'value'",
        ),
        ('{"instruction": "a", "input": "", "output": "  "}\n', r"bad\.jsonl:1: 'output' is empty"),
        ('{"prompt": "a", "completion": "b"}\n', r"bad\.jsonl:1: cannot tell the data format.*--data-format"),
        ("\n  \n", r"bad\.jsonl: is empty"),
    ],
)
def test_bad_input_names_file_and_line(chatml, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        prepare(path, chatml, tmp_path)


def test_bad_json_array_line_and_missing_file(chatml, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n')
    with pytest.raises(UserError, match=r"bad\.json:3: missing field 'output'"):
        prepare(path, chatml, tmp_path)
    with pytest.raises(UserError, match="not found"):
        prepare(tmp_path / "nope.jsonl", chatml, tmp_path)
    with pytest.raises(UserError, match="is not a file"):  # a folder of data files, given as one
        prepare(tmp_path, chatml, tmp_path)
    (tmp_path / "notes.txt").write_text("raw text")
    with pytest.raises(UserError, match=r"notes\.txt: a \.txt file is raw text, .* --data-format alpaca"):
        prepare(tmp_path / "notes.txt", chatml, tmp_path, format="alpaca")
    (tmp_path / "train.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00")
    with pytest.raises(UserError, match=r"train\.jsonl\.gz: is compressed; decompress it first"):
        prepare(tmp_path / "train.jsonl.gz", chatml, tmp_path)
    (tmp_path / "train.csv").write_text("instruction,output\na,b\n")
    with pytest.raises(UserError, match=r"train\.csv: \.csv is not supported; convert it to JSON Lines"):
        prepare(tmp_path / "train.csv", chatml, tmp_path)


def test_prompts_longer_than_seq_len_leave_nothing_to_train_and_say_so(chatml, tmp_path):
    rows = [{"instruction": words(seed, 40), "output": "yes"} for seed in range(8)]
    with pytest.raises(UserError, match=r"8 had no answer token within --seq-len 16 \(raise it\)"):
        prepare(write_jsonl(tmp_path / "x.jsonl", rows), chatml, tmp_path, seq_len=16)


def test_record_the_template_refuses(llama2, tmp_path):
    twice = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2
    rows = [{"messages": twice}, {"messages": twice[1:]}]  # the second opens with the assistant
    path = write_jsonl(tmp_path / "x.jsonl", rows * 15)
    with pytest.raises(
        UserError, match=r"x\.jsonl:2: chat template refused the conversation: .*must alternate"
    ):
        prepare(path, llama2, tmp_path, dedup=False)
    train, val, report = prepare(path, llama2, tmp_path, dedup=False, skip_bad_records=True)
    assert report.skipped_bad_records == 15 and len(train) + len(val) == 15


def test_no_data_files_is_the_built_in_dataset(tiny_tokenizer_dir, tmp_path):
    """`python train.py` without --data: the built-in instruction set, read like any --data file."""
    train, val, report = prepare([], Tokenizer.from_pretrained(tiny_tokenizer_dir), tmp_path)
    assert [file["path"] for file in report.files] == [str(default_data_path())]
    n_records = len(default_data_path().read_text().splitlines())
    assert report.files[0]["records"] == n_records and len(train) + len(val) > n_records / 2


def test_skip_bad_records_counts_and_reports(chatml, tmp_path):
    good = alpaca_rows(30)
    lines = [json.dumps(row) for row in good] + [
        "{not json",
        '{"instruction": "a"}',
        '{"instruction": 1, "output": "b"}',
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    logged = []
    train, val, report = prepare(path, chatml, tmp_path, skip_bad_records=True, log=logged.append)
    assert report.skipped_bad_records == 3 and len(train) + len(val) == 30
    assert report.skipped_reasons[0].startswith(f"{path}:31: not valid JSON")
    assert any("skipped 3 bad records" in line for line in logged)


def test_records_with_nothing_to_learn_are_bad_records_stopped_or_skipped_and_counted(chatml, tmp_path):
    no_answer = {"messages": [{"role": "user", "content": "a question nobody answered"}]}
    empty = {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]}
    chats = [
        {
            "messages": [
                {"role": "user", "content": words(i, 6)},
                {"role": "assistant", "content": words(i + 1, 6)},
            ]
        }
        for i in range(0, 60, 2)
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [*chats, no_answer, empty])
    with pytest.raises(UserError, match=r"chat\.jsonl:31: has no assistant turn"):
        prepare(path, chatml, tmp_path)
    logged = []
    train, val, report = prepare(path, chatml, tmp_path, skip_bad_records=True, log=logged.append)
    assert report.skipped_bad_records == 2 and report.dropped_examples == 0 and len(train) + len(val) == 30
    assert report.skipped_reasons == [
        f"{path}:31: has no assistant turn: nothing to learn (roles: user)",
        f"{path}:32: message 0 (user) has an empty 'content'",
    ]


def test_val_data_rendered_unlike_the_training_data_is_refused(chatml, tmp_path):
    alpaca = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(30))
    sharegpt = [
        {
            "conversations": [
                {"from": "human", "value": words(i, 6)},
                {"from": "gpt", "value": words(i + 1, 6)},
            ]
        }
        for i in range(20)
    ]
    val = write_jsonl(tmp_path / "val.jsonl", sharegpt)
    with pytest.raises(UserError, match=(
        r"val\.jsonl: --val-data renders as the model's chat template, which the --data does not \(the "
        r"Stanford Alpaca prompt\); .* never trained on: .* or --alpaca-style chat"
    )):  # fmt: skip
        prepare(alpaca, chatml, tmp_path, val_paths=[val], alpaca_style="alpaca")
    _, val_examples, _ = prepare(alpaca, chatml, tmp_path, val_paths=[val], alpaca_style="chat")
    assert len(val_examples) == 20  # both through the chat template: the same format
    (tmp_path / "book.txt").write_text(words(3, 400))
    with pytest.raises(UserError, match=r"book\.txt: --val-data renders as raw text"):
        prepare(alpaca, chatml, tmp_path, val_paths=[tmp_path / "book.txt"])


def test_raw_text_is_deduplicated_by_paragraph_and_joined_back(chatml, tmp_path):
    first, repeated, last = words(1, 60), words(2, 60), words(3, 60)
    (tmp_path / "a.txt").write_text(f"{first}\n\n{repeated}\n")
    (tmp_path / "b.txt").write_text(f"{repeated}\n\n\n{last}\n")  # the paragraph again, in another file
    logged = []
    train, _, report = prepare(
        [tmp_path / "a.txt", tmp_path / "b.txt"], chatml, tmp_path, seq_len=32, val_frac=0, log=logged.append
    )
    assert report.exact_duplicates_removed == 1 and report.dedup_unit == "a paragraph of a .txt file"
    assert [file["records"] for file in report.files] == [2, 2]
    assert any("unit: a paragraph of a .txt file" in line for line in logged)
    assert any(line.endswith("a.txt (train): 2 paragraphs, format text") for line in logged)
    # Each file one document, its paragraphs a blank line apart; b.txt lost the paragraph a.txt has.
    stream = chatml.encode(f"{first}\n\n{repeated}") + [chatml.eos_id] + chatml.encode(last) + [chatml.eos_id]
    n_blocks = (len(stream) - 1) // 32
    assert len(train) == n_blocks
    assert [int(t) for block in range(n_blocks) for t in train.example(block)[0]] == stream[: n_blocks * 32]
    assert train.sources[0] == f"{tmp_path / 'a.txt'}:1"


def test_forced_format_and_mixed_files(chatml, tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    _, _, report = prepare([alpaca, chat], chatml, tmp_path, val_frac=0)
    assert [f["format"] for f in report.files] == ["alpaca", "chat"] and report.train_examples == 11
    with pytest.raises(UserError, match=r"a\.jsonl:1: missing field 'messages'"):
        prepare(alpaca, chatml, tmp_path, format="chat")
    logged = []
    prepare(alpaca, chatml, tmp_path, log=logged.append)
    assert any("format alpaca" in line for line in logged) and any("chat template" in line for line in logged)
