"""Fixtures shared by the test files: the built-in model, a tiny tokenizer and tiny models that train fast."""

import json
from pathlib import Path

import pytest
import torch
from families import write_family_checkpoint
from tokenizers import Tokenizer, models, pre_tokenizers

from nanoft.default_model import default_model_dir
from nanoft.model import ModelConfig, Transformer
from nanoft.weights import copy_tokenizer_files, save_pretrained

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
# The widths of the tests' tiny models, of any family: 2 layers of width 64, 4 query and 2 key/value heads.
TINY_WIDTHS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
# A Llama of those widths over the tiny tokenizer's 64 tokens (and its ids): trains in well under a second a
# step. A checkpoint with another tokenizer takes TINY_WIDTHS alone, its token ids being that tokenizer's.
TINY_MODEL = dict(
    model_type="llama",
    vocab_size=64,
    **TINY_WIDTHS,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
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


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer_dir, tmp_path_factory):
    """tiny_model_dir(**overrides) -> a new Hugging Face directory holding a random tiny model and the tiny
    tokenizer: TINY_MODEL with `overrides` (any ModelConfig field: model_type="qwen2", vocab_size=128 ...).

    The weights are nanoft's Transformer's after torch.manual_seed(seed), then N(0, std) in every matrix
    (Hugging Face's initialisation at the default 0.02: small, stable logits), or in every tensor, norms and
    biases too, with every_tensor=True (then no term hides behind a 1 or a 0); std=None keeps the
    Transformer's own initialisation. Load it with nanoft.weights.from_pretrained or transformers."""

    def make(seed: int = 0, std: float | None = 0.02, every_tensor: bool = False, **overrides) -> Path:
        # Read as config.json is: model_type="qwen2" brings that family's settings (its q, k, v biases).
        config = ModelConfig.from_hf({**TINY_MODEL, **overrides})
        torch.manual_seed(seed)
        model = Transformer(config)
        if std is not None:
            for parameter in model.parameters():
                if every_tensor or parameter.dim() >= 2:
                    torch.nn.init.normal_(parameter, std=std)
        path = tmp_path_factory.mktemp("tiny_model")
        save_pretrained(model.state_dict(), config, path)
        copy_tokenizer_files(tiny_tokenizer_dir, path)
        return path

    return make
