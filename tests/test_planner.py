"""The planner applies the decision framework: method by memory and model size, layout by devices, a
micro-batch and accumulation that fit and reach an effective batch of 32, and a printed plan that says why."""

import json
import random

import pytest

from nanoft.config import TrainConfig
from nanoft.errors import UserError
from nanoft.memory import GiB
from nanoft.model import ModelConfig
from nanoft.planner import (
    detect_hardware,
    format_lr,
    format_plan,
    host_memory,
    make_plan,
    watch_list,
)
from train import main as train_main

LLAMA_2_7B = ModelConfig(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
)
LLAMA_2_13B = ModelConfig(
    hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, vocab_size=32000
)
CODELLAMA_34B = ModelConfig(
    hidden_size=8192,
    intermediate_size=22016,
    num_hidden_layers=48,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=32000,
)
LLAMA_2_70B = ModelConfig(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=32000,
)
SMOLLM2_135M = ModelConfig(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
)


def plan(config, gib, devices=1, **request):
    """The plan on `devices` GPUs of `gib` each; request: TrainConfig fields (method "auto" unless given)."""
    hardware = detect_hardware(memory_gb=gib, device_count=devices)
    return make_plan(config, hardware, TrainConfig(**{"method": "auto", **request}))


@pytest.mark.parametrize(
    "config, gib, devices, request_, method, layout",
    [
        (LLAMA_2_7B, 8, 1, {}, "qlora", "single"),  # the 8-24 GB band: 4-bit base
        (LLAMA_2_7B, 16, 1, {}, "qlora", "single"),
        (LLAMA_2_7B, 24, 1, {}, "lora", "single"),  # the 24-80 GB band: 16-bit base
        (LLAMA_2_7B, 80, 1, {}, "lora", "single"),
        (LLAMA_2_7B, 80, 1, {"max_quality": True}, "lora", "single"),  # 80 GiB < 16 B x 6.7B
        (LLAMA_2_7B, 80, 2, {"max_quality": True}, "full", "fsdp"),  # fits only sharded
        (LLAMA_2_7B, 80, 8, {}, "lora", "ddp"),  # fits one device: each holds the model
        (LLAMA_2_7B, 16, 2, {}, "lora", "fsdp"),  # a 16-bit base needs both devices' memory: sharded
        (LLAMA_2_13B, 24, 1, {}, "qlora", "single"),
        (CODELLAMA_34B, 24, 1, {}, "qlora", "single"),
        (LLAMA_2_70B, 80, 2, {}, "qlora", "ddp"),  # 2 x 80 GiB is below the 16-bit band for 128 GiB
        (LLAMA_2_70B, 80, 4, {}, "lora", "fsdp"),
        (SMOLLM2_135M, 8, 1, {}, "lora", "single"),  # tiny model: never needs a 4-bit base
        (SMOLLM2_135M, 24, 1, {"max_quality": True}, "full", "single"),
        (SMOLLM2_135M, 24, 1, {"domain_shift": True}, "full", "single"),
    ],
)
def test_framework_chooses_the_method_and_layout(config, gib, devices, request_, method, layout):
    chosen = plan(config, gib, devices, **request_)
    assert (chosen.method, chosen.layout) == (method, layout), chosen.reasons
    assert chosen.fits and chosen.estimate.total <= chosen.hardware.usable_bytes
    assert chosen.effective_batch >= 32


def test_micro_batch_halves_before_checkpointing_and_accumulation_keeps_the_effective_batch():
    roomy = plan(LLAMA_2_7B, 80, batch_size=4, seq_len=1024)
    assert (roomy.micro_batch, roomy.grad_accum, roomy.activation_checkpointing) == (4, 8, False)
    tight = plan(LLAMA_2_7B, 24, batch_size=4, seq_len=1024)
    assert tight.micro_batch < 4 and tight.micro_batch * tight.grad_accum == 32
    assert not tight.activation_checkpointing
    tighter = plan(LLAMA_2_7B, 8, batch_size=4, seq_len=1024)
    assert tighter.method == "qlora" and tighter.activation_checkpointing
    two_devices = plan(SMOLLM2_135M, 24, devices=2, batch_size=4, grad_accum=2)
    assert two_devices.effective_batch == 32 and two_devices.grad_accum == 4
    larger_asked = plan(SMOLLM2_135M, 24, batch_size=4, grad_accum=16)
    assert larger_asked.effective_batch == 64  # the user's larger effective batch is kept


def test_nothing_fits_is_a_clear_error_and_a_fixed_method_is_planned_anyway():
    with pytest.raises(UserError, match="no method fits.*QLoRA needs"):
        plan(LLAMA_2_70B, 8)
    forced = plan(LLAMA_2_7B, 16, method="full")
    assert forced.method == "full" and not forced.fits
    assert "NOT to fit" in format_plan(forced)
    assert plan(LLAMA_2_7B, 80, method="qlora").method == "qlora"


def test_the_printed_plan_shows_why_the_memory_the_batch_the_lr_and_what_to_watch():
    chosen = plan(LLAMA_2_7B, 24, domain_shift=True)
    text = format_plan(chosen, "Llama-2-7B")
    assert "6.74B parameters" in text
    assert "method: LoRA on a 16-bit base, one device" in text
    assert "below 4 x the fp32 model = 100.4 GiB" in text  # why not a full fine-tune
    assert "continue pretraining on raw in-domain text" in text
    for row in (
        "weights (bf16 base)",
        "adapters",
        "gradients",
        "optimizer states",
        "activations without checkpointing",
        "activations with checkpointing",
        "logits / loss",
        "total (peak)",
    ):
        assert row in text
    assert "effective batch 32" in text
    assert "lr 2e-4 with adamw: linear warmup over 3% of the steps, then cosine decay" in text
    for knob in (
        "lr 2e-4",
        "LoRA r 16",
        "warmup",
        "effective batch",
        "micro-batch",
        "seq len",
        "epochs",
        "grad clip",
        "weight decay",
        "activation checkpointing",
    ):
        assert any(name.startswith(knob) for name, _ in watch_list(chosen)), knob


def test_full_fine_tune_lr_and_qlora_watch_item():
    assert plan(SMOLLM2_135M, 24, max_quality=True).lr == 5e-5
    assert plan(LLAMA_2_7B, 16).lr == 2e-4
    assert any(name == "4-bit base" for name, _ in watch_list(plan(LLAMA_2_7B, 16)))
    assert [format_lr(lr) for lr in (2e-4, 5e-5, 1.5e-4, 1e-3)] == ["2e-4", "5e-5", "1.5e-4", "1e-3"]


def test_detects_this_machine(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    hardware = detect_hardware()
    available, total = host_memory()
    if hardware.device_type == "cpu":
        assert hardware.device_count == 1
        assert abs(hardware.memory_bytes - available) < 0.2 * total  # MemAvailable moves while we look
    assert 0 < hardware.usable_bytes < hardware.memory_bytes
    planned = detect_hardware(memory_gb=24, device_count=4)
    assert (planned.device_type, planned.memory_bytes, planned.device_count) == ("cuda", 24 * GiB, 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert detect_hardware(memory_gb=24).device_count == 2


# ------------------------------------------------------------------------ train.py --plan and --method auto


def write_tiny_run(folder, model_dir) -> list[str]:
    """Alpaca records the tiny model (tiny_model_dir) can learn, each word moved up: the train.py flags that
    train it on them."""
    rng = random.Random(0)
    for name, n in (("train", 96), ("val", 16)):
        rows = []
        for _ in range(n):
            words = [rng.randrange(57) for _ in range(rng.randrange(2, 7))]
            answer = " ".join(f"w{w + 1}" for w in words)
            rows.append(json.dumps({"instruction": " ".join(f"w{w}" for w in words), "output": answer}))
        (folder / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    flags = ["--model", str(model_dir), "--data", str(folder / "train.jsonl")]
    return flags + ["--val-data", str(folder / "val.jsonl"), "--seq-len", "64"]


@pytest.fixture(scope="module")
def tiny_run_inputs(tiny_model_dir, tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("tiny_run"), tiny_model_dir())


def test_train_plan_prints_the_plan_and_trains_nothing(tiny_run_inputs, tmp_path, capsys):
    flags = "--plan --plan-memory-gb 8 --plan-devices 2 --method qlora".split()
    train_main([*tiny_run_inputs, *flags, "--out", str(tmp_path / "run")])
    printed = capsys.readouterr().out
    assert "method: LoRA on a 16-bit base, DDP" in printed  # the framework's choice, not the configured one
    assert "--method qlora as configured fits at micro-batch 4" in printed
    assert "planned: 2 x 8 GiB GPU" in printed and "what to watch:" in printed
    assert not (tmp_path / "run").exists()


def test_train_method_auto_trains_with_the_plans_choice(tiny_run_inputs, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "--method",
        "auto",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--max-steps",
        "2",
        "--eval-every",
        "2",
    ]
    train_main([*tiny_run_inputs, *args, "--out", str(out)])
    assert "--method auto: lora, single" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert (config["method"], config["batch_size"], config["grad_accum"]) == ("lora", 4, 8)  # effective 32
    summary = json.loads((out / "summary.json").read_text())
    assert {gate["name"]: gate["status"] for gate in summary["gates"]}["effective batch >= 32"] == "PASS"


def test_one_device_never_gets_fsdp_and_a_tiny_budget_gets_one_verdict(smollm2_dir, capsys):
    """The QA report: --plan-memory-gb 0.2 chose "QLoRA, FSDP + CPU offload" on one device, with a table that
    fit and a line saying LoRA fits too."""
    for gib in (0.3, 0.5, 8, 80):
        for config in (LLAMA_2_7B, LLAMA_2_70B, SMOLLM2_135M):
            try:
                chosen = plan(config, gib)
            except UserError:
                continue
            assert chosen.layout == "single", (config, gib)
    train_main(["--plan", "--plan-memory-gb", "0.2"])  # the built-in SmolLM2
    text = capsys.readouterr().out
    assert "FSDP" not in text
    assert (
        "** estimated NOT to fit" in text and "- no method fits planned: 1 x 0.2 GiB GPU: QLoRA needs" in text
    )
    assert "--method lora as configured does NOT fit" in text
    total = float(next(line for line in text.splitlines() if "total (peak)" in line).split()[2])
    assert total > 0.18 and "of 0.18 usable" in text  # the table agrees with the verdict
