"""nanoft/merge.py against the reference: PEFT's merge_and_unload, on checkpoints transformers writes.

python -m pytest tests/test_merge.py -q
"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import TINY_WIDTHS
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from lora import LoRAConfig, inject_lora, load_adapter, merge_lora, save_adapter
from nanoft.errors import UserError
from nanoft.merge import main as merge_main
from nanoft.merge import merge_adapter
from nanoft.weights import from_pretrained
from quant import QuantConfig, load_quantized

CASES = {
    "lora": dict(),
    "rslora": dict(use_rslora=True, targets=("k_proj", "down_proj")),
    "dora": dict(use_dora=True, targets=("q_proj", "o_proj", "up_proj")),
    "all-linear": dict(targets="all-linear"),
    "modules_to_save": dict(targets=("v_proj",), modules_to_save=("embed_tokens",)),
}
ADAPTED = {"lora": 4, "rslora": 4, "dora": 6, "all-linear": 14, "modules_to_save": 2}  # weights, 2 layers


def write_checkpoint(
    path, model_type="llama", tie=False, dtype=torch.float32, max_shard_size=None, hidden_size=64
):
    """A tiny random checkpoint as transformers writes it (sharded when max_shard_size is given)."""
    config = AutoConfig.for_model(
        model_type,
        **{
            **TINY_WIDTHS,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "vocab_size": 96,
            "max_position_embeddings": 64,
            "tie_word_embeddings": tie,
        },
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return path


def trained_adapter(base_dir, path, dtype=torch.float32, **options):
    """An adapter with non-zero B (and moved DoRA magnitudes), saved as train.py saves it."""
    model = inject_lora(from_pretrained(base_dir, dtype=dtype), LoRAConfig(r=4, alpha=8, **options))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.2)
    save_adapter(model, path, base_model_name_or_path=str(base_dir))
    return path


def logits(model):
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model.eval()(ids).logits.float()


def peft_merged(base_dir, adapter_dir, dtype):
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("case", CASES)
def test_merged_export_equals_peft_merge_and_unload(tmp_path, case, tie):
    base_dir = write_checkpoint(tmp_path / "base", "qwen2" if tie else "llama", tie)
    adapter_dir = trained_adapter(base_dir, tmp_path / "adapter", **CASES[case])
    merged = merge_adapter(base_dir, adapter_dir, tmp_path / "merged")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    reference = peft_merged(base_dir, adapter_dir, torch.float32)
    assert (logits(ours) - logits(reference)).abs().max() < 1e-4
    assert (logits(ours) - logits(AutoModelForCausalLM.from_pretrained(base_dir))).abs().max() > 1e-2
    assert merged == (ADAPTED[case], case == "modules_to_save", 0, "fp32")  # a tied lm_head is not stored
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


def test_sharded_bf16_checkpoint_streams_into_the_same_shards(tmp_path):
    base_dir = write_checkpoint(tmp_path / "base", dtype=torch.bfloat16, max_shard_size="100KB")
    shards = sorted(p.name for p in base_dir.glob("*.safetensors"))
    assert len(shards) > 1 and (base_dir / "model.safetensors.index.json").is_file()
    adapter_dir = trained_adapter(base_dir, tmp_path / "adapter", dtype=torch.bfloat16, use_dora=True)
    merge_adapter(base_dir, adapter_dir, tmp_path / "merged")
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == shards
    for shard in shards:  # every tensor still bf16, where it was
        with (
            safe_open(tmp_path / "merged" / shard, "pt") as merged,
            safe_open(base_dir / shard, "pt") as base,
        ):
            assert list(merged.keys()) == list(base.keys())
            assert all(merged.get_tensor(k).dtype == torch.bfloat16 for k in merged.keys())
            changed = [k for k in base.keys() if not torch.equal(merged.get_tensor(k), base.get_tensor(k))]
            assert changed == [k for k in base.keys() if k.endswith(("q_proj.weight", "v_proj.weight"))]
    ours = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16))
    reference = logits(peft_merged(base_dir, adapter_dir, torch.bfloat16))
    # PEFT adds the update to the bf16 weight in bf16, we in fp32 and round once: a bf16 step apart at most.
    assert (ours - reference).abs().max() < 2e-2 * reference.abs().max()


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_quantized_base_merge_is_the_base_the_adapter_trained_on(tmp_path, quant_type):
    base_dir = write_checkpoint(tmp_path / "base", dtype=torch.bfloat16)
    adapter_dir = trained_adapter(base_dir, tmp_path / "adapter", targets="all-linear")
    trained = load_adapter(
        load_quantized(base_dir, quant=quant_type, compute_dtype=torch.float32), adapter_dir
    )
    expected = merge_lora(trained)  # in memory: every 4-bit layer dequantized, the update added
    quant_config = QuantConfig(quant_type, compute_dtype=torch.float32)
    merged = merge_adapter(base_dir, adapter_dir, tmp_path / "merged", "quantized", quant_config)
    assert merged.requantized == 14  # 7 linears x 2 layers; lm_head and the embedding stay as stored
    ours = from_pretrained(tmp_path / "merged", dtype=torch.float32)
    for name, tensor in expected.state_dict().items():
        name = name.replace(".base_layer.", ".")
        if name in dict(ours.named_parameters()) and "proj" in name:
            stored = dict(ours.named_parameters())[name]
            torch.testing.assert_close(stored, tensor.float().to(torch.bfloat16).float(), rtol=0, atol=0)
    original = merge_adapter(base_dir, adapter_dir, tmp_path / "original")
    assert original.requantized == 0
    assert not torch.equal(
        from_pretrained(tmp_path / "original").model.layers[0].mlp.up_proj.weight,
        ours.model.layers[0].mlp.up_proj.weight,
    )


def test_adapter_for_another_model_is_refused_before_anything_is_written(tmp_path):
    base_dir = write_checkpoint(tmp_path / "base")
    adapter_dir = trained_adapter(base_dir, tmp_path / "adapter")
    write_checkpoint(tmp_path / "other", hidden_size=32)
    with pytest.raises(UserError, match="was the adapter trained on another base model"):
        merge_adapter(tmp_path / "other", adapter_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_cli_takes_the_base_from_the_adapter_and_says_what_it_merged(tmp_path, capsys):
    base_dir = write_checkpoint(tmp_path / "base")
    adapter_dir = trained_adapter(base_dir, tmp_path / "adapter")
    capsys.readouterr()  # transformers' progress bars
    merge_main(["--adapter", str(adapter_dir), "--out", str(tmp_path / "merged")])
    line = capsys.readouterr().err.strip()
    assert line.startswith(
        f"merged: adapter {adapter_dir} (4 weights updated) into the original fp32 weights"
    )
    assert line.endswith(f"-> {tmp_path / 'merged'} (a Hugging Face model, fp32)")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "x/y"}))
    with pytest.raises(SystemExit) as exit_info:
        merge_main(["--adapter", str(adapter_dir), "--out", str(tmp_path / "merged2")])
    assert exit_info.value.code == 2
    assert "its base model x/y is not a directory here; pass --model DIR" in capsys.readouterr().err


MEMORY_SCRIPT = """
import sys
from nanoft.merge import merge_adapter

def peak_kib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])

open("/proc/self/clear_refs", "w").write("5")  # the peak so far (imports) starts again from the current size
before = peak_kib()
merge_adapter(sys.argv[1], sys.argv[2], sys.argv[3])
print(before, peak_kib())
"""


def test_merge_holds_one_tensor_at_a_time_not_the_model(tmp_path):
    # 12 layers of 256 x 1024 MLPs in fp32: 58 MB of weights, the largest tensor 1 MB.
    sizes = dict(vocab_size=256, hidden_size=256, intermediate_size=1024, num_attention_heads=4)
    config = AutoConfig.for_model("llama", num_hidden_layers=12, num_key_value_heads=4, **sizes)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer_config.json").write_text("{}")
    adapter_dir = trained_adapter(tmp_path / "base", tmp_path / "adapter", targets="all-linear")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            MEMORY_SCRIPT,
            str(tmp_path / "base"),
            str(adapter_dir),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    before_kib, after_kib = map(int, result.stdout.split())
    model_bytes = (tmp_path / "base" / "model.safetensors").stat().st_size
    assert model_bytes > 50e6
    assert (after_kib - before_kib) * 1024 < 0.5 * model_bytes  # reading the shard whole: 1.3x (65 MB)
