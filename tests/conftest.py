"""Fixtures shared by the test files: the built-in model and a tiny tokenizer for tiny models."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from nanoft.default_model import default_model_dir

# Texts that tell tokenizers apart: runs of spaces and newlines, digits, non-ASCII, code, special tokens.
TOKENIZER_TEXTS = [
    "Hello world",
    "  leading spaces, and trailing  ",
    "The year 2024 had 365 days; π≈3.14159 and x² + y³",
    "naïve café — “quotes” 🙂🎉 一个 中文",
    "tabs\tand\nnewlines\r\n\n",
    "def f(x):\n    return x**2  # 12345678901234567890",
    "don't I'll we've a1b2c3 1,000,000.50",
    "<|im_start|>user\nHi<|im_end|>\n<|endoftext|><repo_name>a/b<file_sep> <think>",
]
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
