"""nanoft/weights.py: Hugging Face directories in and out, sharding, clear errors for broken checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import TINY_WIDTHS
from test_model import random_model, tiny_config

from nanoft.errors import UserError
from nanoft.weights import checkpoint_tensors, from_pretrained, save_pretrained

REPO = Path(__file__).resolve().parents[1]


def test_sharded_checkpoint_round_trips_and_transformers_loads_it(tmp_path):
    config = tiny_config()
    model = random_model(config)
    save_pretrained(model.state_dict(), config, tmp_path, max_shard_bytes=50_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = from_pretrained(tmp_path)
    for (name, ours), (_, theirs) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(ours, theirs), name
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    input_ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert (loaded(input_ids) - reference(input_ids).logits).abs().max().item() <= 1e-4


def test_transformers_checkpoints_load(tmp_path):
    """A directory written by transformers itself (its own config layout) loads with the same logits."""
    hf_config = transformers.LlamaConfig(
        **{**TINY_WIDTHS, "vocab_size": 128, "intermediate_size": 96, "tie_word_embeddings": False}
    )
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(hf_config).eval()
    reference.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, dtype=torch.float32).eval()
    input_ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        assert (ours(input_ids) - reference(input_ids).logits).abs().max().item() <= 1e-4


def test_loading_in_bf16_keeps_bf16(tmp_path):
    config = tiny_config(tie_word_embeddings=True)
    save_pretrained(random_model(config).state_dict(), config, tmp_path)
    model = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_missing_directory_and_files_are_explained(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        from_pretrained(tmp_path / "nowhere")
    config = tiny_config()
    save_pretrained(random_model(config).state_dict(), config, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no model.safetensors"):
        from_pretrained(tmp_path)


def test_truncated_file_is_explained(tmp_path):
    config = tiny_config()
    save_pretrained(random_model(config).state_dict(), config, tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(UserError, match="corrupt or truncated"):
        checkpoint_tensors(tmp_path)  # before any weight is read


def test_shape_mismatch_names_the_tensor(tmp_path):
    config = tiny_config()
    save_pretrained(random_model(config).state_dict(), config, tmp_path)
    wrong = json.loads((tmp_path / "config.json").read_text())
    wrong["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(UserError, match=r"mlp.*has shape .* config.json implies"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"model_type": "gpt_neox"},
            "model_type 'gpt_neox' is not supported; nanoft supports model_type llama",
        ),
        (  # Phi-3's 128k-context variants
            {
                "model_type": "phi3",
                "rope_scaling": {"type": "longrope", "short_factor": [1], "long_factor": [1]},
            },
            "rope scaling 'longrope' is not supported",
        ),
    ],
)
def test_command_line_error_is_one_line_and_exit_2(tmp_path, config, message):
    sizes = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    (tmp_path / "config.json").write_text(json.dumps({**sizes, **config}))
    code = "from nanoft.errors import exit_on_user_error\nfrom nanoft.weights import from_pretrained\n"
    code += f"exit_on_user_error(from_pretrained)({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert message in result.stderr


def test_a_tensor_read_by_rows_is_those_rows_of_the_whole(tmp_path):
    """What a rank reads under FSDP: rows [start, end) of dim 0 straight from the file."""
    config = tiny_config()
    model = random_model(config)
    save_pretrained(model.state_dict(), config, tmp_path, dtype=torch.bfloat16)
    for stored in checkpoint_tensors(tmp_path):
        whole = model.state_dict()[stored.name].to(torch.bfloat16)
        assert torch.equal(stored.read(), whole)
        rows = stored.shape[0]
        for start, end in [(0, rows // 2), (rows // 2, rows), (rows - 1, rows), (rows, rows)]:
            assert torch.equal(stored.read((start, end)), whole[start:end]), (stored.name, start, end)
