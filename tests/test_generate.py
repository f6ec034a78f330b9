"""nanoft/generate.py: KV-cache decoding equals full recomputation, left-padded batches, sampling, the CLI."""

import copy
import json
import subprocess
import sys

import peft
import pytest
import torch
import transformers
from conftest import TINY_MODEL
from families import FAMILIES, WINDOW

from nanoft.generate import generate, generate_batch, main, next_token
from nanoft.model import ModelConfig, Transformer
from nanoft.tokenizer import Tokenizer
from nanoft.weights import copy_tokenizer_files, from_pretrained, save_pretrained

PROMPTS = [[1, 10, 11, 12, 13], [1, 20], [1, 30, 31, 32, 33, 34, 35, 36, 37]]


@pytest.fixture(scope="module")
def tiny_model():
    # conftest's tiny Llama at half the width, untied.
    narrow = dict(
        hidden_size=32, intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=False
    )
    config = ModelConfig(**{**TINY_MODEL, **narrow})
    torch.manual_seed(0)
    model = Transformer(config)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_tokenizer_dir):
    return Tokenizer.from_pretrained(tiny_tokenizer_dir)


def greedy_by_recomputation(model, tokenizer, prompt, max_new_tokens):
    """The reference: run the whole sequence again for every new token, no cache."""
    sequence, all_logits = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([sequence]))[0, -1]
            all_logits.append(logits)
            token = int(logits.argmax())
            if token in tokenizer.eos_ids:
                break
            sequence.append(token)
    return sequence[len(prompt) :], torch.stack(all_logits)


def test_kv_cache_decoding_equals_full_recomputation(tiny_model, tiny_tokenizer):
    expected = [greedy_by_recomputation(tiny_model, tiny_tokenizer, prompt, 24) for prompt in PROMPTS]
    assert max(len(tokens) for tokens, _ in expected) > 5  # the comparison covers many cached steps
    seen_logits = []  # what generate() computed at each step, caught on the way out of lm_head
    hook = tiny_model.lm_head.register_forward_hook(
        lambda module, inputs, output: seen_logits.append(output[0, -1])
    )
    try:
        for prompt, (expected_tokens, expected_logits) in zip(PROMPTS, expected, strict=True):
            seen_logits.clear()
            assert generate(tiny_model, tiny_tokenizer, prompt, max_new_tokens=24) == expected_tokens
            assert len(seen_logits) == len(expected_logits)
            assert (torch.stack(seen_logits) - expected_logits).abs().max().item() <= 1e-4
    finally:
        hook.remove()


def test_left_padded_batch_equals_one_prompt_at_a_time(tiny_model, tiny_tokenizer):
    one_by_one = [generate(tiny_model, tiny_tokenizer, prompt, max_new_tokens=16) for prompt in PROMPTS]
    tiny_model.train()  # as in a training loop's spot check: generation runs in eval, then restores the mode
    assert generate_batch(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=16) == one_by_one
    assert tiny_model.training
    tiny_model.eval()


def test_each_row_stops_at_its_own_stop_token(tiny_model, tiny_tokenizer):
    full = generate_batch(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=16)
    stopping = copy.copy(tiny_tokenizer)
    stopping.eos_ids = {44}  # a token these prompts produce at different steps (first, never, third...)
    expected = [row[: row.index(44)] if 44 in row else row for row in full]
    assert generate_batch(tiny_model, stopping, PROMPTS, max_new_tokens=16) == expected
    assert len({len(row) for row in expected}) > 1


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus(tiny_model, tiny_tokenizer):
    def sample(seed, top_p):
        generator = torch.Generator().manual_seed(seed)
        return generate(
            tiny_model, tiny_tokenizer, PROMPTS[0], 16, temperature=1.0, top_p=top_p, generator=generator
        )

    assert sample(1, 0.9) == sample(1, 0.9)
    assert sample(1, 1e-6) == generate(
        tiny_model, tiny_tokenizer, PROMPTS[0], 16
    )  # nucleus of one token = greedy
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = {int(next_token(logits, 1.0, 0.7, generator)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is never drawn


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nanoft.generate", *args], capture_output=True, text=True)


def test_cli_prints_only_the_answer(smollm2_dir):
    result = run_cli(
        "--prompt", "What is the capital of France?", "--chat", "--greedy", "--max-new-tokens", "16"
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "nanoft:" not in result.stdout and "nanoft:" in result.stderr


def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "missing"), "--prompt", "hi"])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and stderr.startswith("error: --model") and stderr.count("\n") == 1
    for argv, message in [
        (["--prompt", "hi", "--top-p", "0.5"], "error: --top-p needs --temperature > 0"),
        (["--prompt", "hi", "--temperature", "-1"], "error: need --temperature >= 0"),
        (["--prompt", "hi", "--bogus"], "error: unrecognized arguments: --bogus"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2 and stderr.startswith(message) and stderr.count("\n") == 1, stderr
        assert stderr.endswith("(see python -m nanoft.generate --help)\n")


def test_cli_adapter_answers_like_peft(tiny_model, tiny_tokenizer, tiny_tokenizer_dir, tmp_path, capsys):
    """--adapter loads a PEFT-written adapter; the greedy text equals transformers + peft generating."""
    model_dir, adapter_dir = tmp_path / "model", tmp_path / "adapter"
    save_pretrained(tiny_model.state_dict(), tiny_model.config, model_dir)
    copy_tokenizer_files(tiny_tokenizer_dir, model_dir)
    torch.manual_seed(1)
    # init_lora_weights=False: random B too, so the adapter changes the output from the first step.
    targets = ["q_proj", "v_proj"]
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    reference = peft.get_peft_model(reference, lora_config)
    reference.save_pretrained(adapter_dir)
    prompt = "w1 w2 w3"
    input_ids = torch.tensor([tiny_tokenizer.encode(prompt, add_special_tokens=True)])
    stop_ids = sorted(tiny_tokenizer.eos_ids)
    reference.eval()
    expected_ids = reference.generate(
        input_ids, max_new_tokens=12, do_sample=False, eos_token_id=stop_ids, pad_token_id=0
    )[0, input_ids.shape[1] :]
    expected = tiny_tokenizer.decode(expected_ids.tolist())

    def cli_answer(*adapter_args):
        main(["--model", str(model_dir), *adapter_args, "--prompt", prompt, "--max-new-tokens=12"])
        return capsys.readouterr().out.rstrip("\n")

    assert cli_answer("--adapter", str(adapter_dir)) == expected
    assert cli_answer() != expected  # the adapter changed the answer, so the comparison above means something

    # Past the model's 128 positions RoPE meets angles it never trained on: the CLI says so, still answering.
    main(["--model", str(model_dir), "--prompt", prompt, "--max-new-tokens=126"])
    assert "exceeds the model's context of 128 positions" in capsys.readouterr().err


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_generates_as_transformers_does(family_dir, tiny_tokenizer, family):
    """Greedy decoding of a left-padded batch past every sliding window: nanoft's KV cache against
    transformers' generate on the same checkpoint (tests/families.py)."""
    prompts = [[1, 10, 11, 12, 13, 14, 15, 16, 17, 18], [1, 20, 21]]
    max_new_tokens = 2 * WINDOW
    ours = from_pretrained(family_dir(family)).eval()
    tokens = generate_batch(ours, tiny_tokenizer, prompts, max_new_tokens=max_new_tokens)
    reference = transformers.AutoModelForCausalLM.from_pretrained(family_dir(family), dtype=torch.float32)
    for prompt, mine in zip(prompts, tokens, strict=True):
        padded = torch.tensor([[0] * (len(prompts[0]) - len(prompt)) + prompt])
        attention_mask = (torch.arange(padded.shape[1]) >= len(prompts[0]) - len(prompt)).long()[None]
        expected = reference.generate(
            padded,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(tiny_tokenizer.eos_ids),
            pad_token_id=tiny_tokenizer.pad_id,
        )[0, padded.shape[1] :].tolist()
        stop = next((i for i, token in enumerate(expected) if token in tiny_tokenizer.eos_ids), len(expected))
        assert mine == expected[:stop]


def test_cli_adapter_without_model_uses_the_base_it_names(tiny_model, tiny_tokenizer_dir, tmp_path, capsys):
    """--adapter alone: the base in adapter_config.json (said on stderr), else one line naming it, --model."""
    model_dir, adapter_dir = tmp_path / "model", tmp_path / "adapter"
    save_pretrained(tiny_model.state_dict(), tiny_model.config, model_dir)
    copy_tokenizer_files(tiny_tokenizer_dir, model_dir)
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir)  # PEFT records this path
    peft.get_peft_model(reference, lora_config).save_pretrained(adapter_dir)
    args = ["--prompt", "w1 w2", "--max-new-tokens=4"]
    main(["--model", str(model_dir), "--adapter", str(adapter_dir), *args])
    with_model = capsys.readouterr().out
    main(["--adapter", str(adapter_dir), *args])
    out, err = capsys.readouterr()
    assert out == with_model
    assert f"nanoft: {model_dir} (the base model named in {adapter_dir}/adapter_config.json" in err

    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    for base, message in [
        ("someone/not-here", "its base model someone/not-here is not a directory here; pass --model DIR"),
        (None, "names no base model (base_model_name_or_path); pass --model DIR"),
    ]:
        config_file.write_text(json.dumps({**config, "base_model_name_or_path": base}))
        with pytest.raises(SystemExit) as exit_info:
            main(["--adapter", str(adapter_dir), *args])
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2 and stderr.count("\n") == 1 and message in stderr, stderr
