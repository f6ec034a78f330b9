"""Fixtures shared by the test files: the built-in model and a tiny tokenizer for tiny models."""

import json

import pytest
from families import write_family_checkpoint
from tokenizers import Tokenizer, models, pre_tokenizers

from nanoft.default_model import default_model_dir

TINY_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + "
    "' <|end|> ' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a Hugging Face directory (prepared once per machine, then cached)."""
    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A 64-token word-level tokenizer (specials, then w0..w57) with a chat template, for tiny models."""
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    words = TINY_SPECIAL_TOKENS + [f"w{i}" for i in range(64 - len(TINY_SPECIAL_TOKENS))]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(TINY_SPECIAL_TOKENS)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "chat_template": TINY_CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory, tiny_tokenizer_dir):
    """family_dir("gemma2"): a tiny random checkpoint of that family written by transformers, with the tiny
    tokenizer (tests/families.py); each made once per session."""
    made = {}

    def get(family: str):
        if family not in made:
            path = tmp_path_factory.mktemp(family)
            made[family] = write_family_checkpoint(family, path, tiny_tokenizer_dir)
        return made[family]

    return get
