"""The planner's memory estimate against measurement, and its table for 7B / 13B / 34B and MoE models.

    python bench/memory_estimate.py             # the README table, then estimated vs measured on this machine
    python bench/memory_estimate.py --table     # the table only

Measured: a ~34M-parameter Llama (vocab 32000, random weights written to disk), and a Gemma 2 of the same
sizes (four norms a layer, head_dim 256, soft-capped attention, sliding window 128), train two optimizer steps
of 2 micro-batches x 2 sequences x 256 tokens with LoRA, QLoRA and a full fine-tune, and LoRA's variants
(DoRA, modules_to_save: VARIANTS), each in a fresh process (`--child`), set up the way train.py sets up a run
(nanoft/precision.py's dtypes, lora.py, quant.py, AdamW).
"Peak memory" is the same quantity on both sides: the process's peak RSS while it trains (VmHWM, reset after
loading with /proc/self/clear_refs so loading's own peak is not counted) minus its RSS after importing torch,
bitsandbytes and nanoft; on CUDA it is torch.cuda.max_memory_allocated. The estimate is
nanoft.planner.estimate_memory for the same shape, which models the gradients of earlier micro-batches being
held during the next forward (so the second step of accumulation is the peak).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from nanoft.loss import IGNORE_INDEX  # noqa: E402
from nanoft.memory import GiB, TrainingShape, count_parameters, estimate_memory  # noqa: E402
from nanoft.model import ModelConfig, Transformer  # noqa: E402
from nanoft.weights import load_config, save_pretrained  # noqa: E402

MEASURED_MODEL = ModelConfig(
    vocab_size=32000,
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_key_value_heads=2,
)
# The same sizes as Gemma 2 (model_type gemma2): its own head_dim, norms, soft-capping and windows.
MEASURED_GEMMA2 = ModelConfig.from_hf(
    {
        **MEASURED_MODEL.to_hf(),
        "model_type": "gemma2",
        "head_dim": 256,
        "sliding_window": 128,
        "tie_word_embeddings": True,
    }
)
MEASURED_MODELS = {"llama": MEASURED_MODEL, "gemma2": MEASURED_GEMMA2}
MICRO_BATCH, SEQ_LEN, GRAD_ACCUM, STEPS = 2, 256, 2, 2

REFERENCE_MODELS = {
    "Llama-2-7B": ModelConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
    ),
    "Llama-2-13B": ModelConfig(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        vocab_size=32000,
    ),
    "CodeLlama-34B": ModelConfig(
        hidden_size=8192,
        intermediate_size=22016,
        num_hidden_layers=48,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    # Mixtures of experts: every expert's weights are held, k of them work on each token.
    "Mixtral-8x7B": ModelConfig.from_hf(
        dict(
            model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
            num_experts_per_tok=2,
        )
    ),
    "Qwen3-30B-A3B": ModelConfig.from_hf(
        dict(
            model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
            moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
            head_dim=128, num_experts=128, num_experts_per_tok=8,
        )
    ),
}  # fmt: skip
# What users quote (GB as tools print GiB): LoRA and full for a 7B, QLoRA for 7B / 13B / 34B; QLoRA for
# Mixtral 8x7B (kaitchup.substack.com, "even with QLoRA, we still need 32 GB"), 16-bit LoRA for
# Qwen3-30B-A3B (Unsloth's MoE kernels announcement: 63 GB).
FOLKLORE_GB = {
    ("Llama-2-7B", "lora"): 16.9,
    ("Llama-2-7B", "full"): 29.5,
    ("Llama-2-7B", "qlora"): 8.0,
    ("Llama-2-13B", "qlora"): 14.0,
    ("CodeLlama-34B", "qlora"): 22.0,
    ("Mixtral-8x7B", "qlora"): 32.0,
    ("Qwen3-30B-A3B", "lora"): 63.0,
}
TABLE_SHAPES = {  # micro-batch x seq len and checkpointing for the table's columns
    "1 x 512, ckpt": (1, 512, True),
    "1 x 512": (1, 512, False),
    "4 x 1024, ckpt": (4, 1024, True),
    "4 x 1024": (4, 1024, False),
}
TABLE_ROWS = (("lora", "adamw"), ("qlora", "adamw"), ("full", "adamw"), ("full", "adamw8bit"))
VARIANTS = {  # LoRAConfig and TrainingShape fields of the measured LoRA variants
    "plain": {},
    "dora": {"use_dora": True},
    "modules_to_save": {"modules_to_save": ("embed_tokens", "lm_head")},
}


def rss_bytes(field: str = "VmRSS") -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def child(model_dir: str, method: str, checkpointing: bool, variant: str) -> dict:
    """One measured run, in its own process: set up like train.py, train STEPS steps, report peak bytes."""
    import bitsandbytes  # noqa: F401  imported before the baseline: its import is not training memory

    import lora
    import quant
    from nanoft.precision import choose_precision
    from nanoft.weights import from_pretrained

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = choose_precision("auto", device, method)
    torch.manual_seed(0)
    baseline = rss_bytes()
    if method == "qlora":
        model = quant.load_quantized(model_dir, compute_dtype=precision.compute_dtype, device=device)
    else:
        model = from_pretrained(model_dir, dtype=precision.base_dtype, device=device)
    if method != "full":
        model = lora.inject_lora(model, lora.LoRAConfig(**VARIANTS[variant]))
    model.activation_checkpointing = checkpointing
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = quant.make_optimizer(trainable, "adamw", lr=1e-4)
    vocab_size = model.config.vocab_size
    batches = [torch.randint(0, vocab_size, (MICRO_BATCH, SEQ_LEN + 1), device=device)]
    batches = batches * GRAD_ACCUM
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the peak starts at what is allocated now: the loaded model
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: loading's peak is not the step's
    model.train()
    for _ in range(STEPS):
        n_targets = sum((batch[:, 1:] != IGNORE_INDEX).sum() for batch in batches)
        for batch in batches:
            with torch.autocast(device.type, precision.compute_dtype, enabled=precision.autocast):
                loss_sum, _ = model(batch[:, :-1], batch[:, 1:])
            (loss_sum / n_targets).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = rss_bytes("VmHWM") - baseline
    return {"peak_bytes": peak, "compute_bytes": precision.compute_dtype.itemsize, "device": device.type}


def write_measured_model(path: Path, family: str = "llama") -> None:
    torch.manual_seed(0)
    config = MEASURED_MODELS[family]
    model = Transformer(config)
    save_pretrained(model.state_dict(), config, path)


def measure(
    model_dir: Path, method: str, checkpointing: bool = False, default_malloc: bool = False, variant="plain"
) -> dict:
    """Run `child` in a fresh process; return its report plus the planner's estimate for the same run."""
    command = [sys.executable, __file__, "--child", str(model_dir), method, "--variant", variant]
    command += ["--ckpt"] if checkpointing else []
    # glibc hands freed blocks of 64 KiB and more straight back to the system, so RSS follows live tensors
    # (what the estimate counts, and what torch.cuda.max_memory_allocated counts on a GPU) rather than what
    # malloc keeps cached; `--default-malloc` in the table shows the cached figure too.
    env = os.environ | ({} if default_malloc else {"MALLOC_MMAP_THRESHOLD_": "65536"})
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"measuring {method} failed:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    shape = TrainingShape(
        method,
        MICRO_BATCH,
        SEQ_LEN,
        activation_checkpointing=checkpointing,
        compute_bytes=report["compute_bytes"],
        device_type=report["device"],
        **VARIANTS[variant],
    )
    report["estimate_bytes"] = estimate_memory(load_config(model_dir), shape).total
    report["ratio"] = report["estimate_bytes"] / report["peak_bytes"]
    return report


def measured_table(model_dir: Path) -> str:
    config = load_config(model_dir)
    params = count_parameters(config).total / 1e6
    lines = [
        f"{params:.0f}M-parameter {config.model_type} (vocab 32000), {STEPS} steps of {GRAD_ACCUM} "
        "micro-batches x "
        f"{MICRO_BATCH} x {SEQ_LEN} tokens; MiB",
        "",
        "| method | estimated | measured | estimate / measured | measured, glibc's default caching |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    runs = [(method, False, "plain") for method in ("lora", "qlora", "full")]
    runs += [("lora", True, "plain"), ("full", True, "plain")]
    runs += [("lora", False, "dora"), ("qlora", False, "dora"), ("lora", False, "modules_to_save")]
    for method, checkpointing, variant in runs:
        report = measure(model_dir, method, checkpointing, variant=variant)
        cached = measure(model_dir, method, checkpointing, default_malloc=True, variant=variant)
        name = method + (" + checkpointing" if checkpointing else "")
        name += {"plain": "", "dora": " + DoRA", "modules_to_save": " + embed_tokens, lm_head"}[variant]
        lines.append(
            f"| {name} | {report['estimate_bytes'] / 2**20:.0f} | {report['peak_bytes'] / 2**20:.0f} | "
            f"{report['ratio']:.2f} | {cached['peak_bytes'] / 2**20:.0f} |"
        )
    return "\n".join(lines)


def reference_table() -> str:
    """The planner's estimates for real 7B / 13B / 34B and mixture-of-experts configs (bf16 compute, LoRA
    r=16 on q,v, CUDA), with each model's total and active parameters."""
    header = "| model | method | " + " | ".join(TABLE_SHAPES) + " | folklore |"
    lines = [header, "| --- | --- | " + " | ".join("---:" for _ in TABLE_SHAPES) + " | ---: |"]
    for name, config in REFERENCE_MODELS.items():
        params = count_parameters(config)
        label_name = name
        if params.active < params.total:
            label_name = f"{name} ({params.total / 1e9:.1f}B, {params.active / 1e9:.1f}B active)"
        for method, optim in TABLE_ROWS:
            cells = []
            for micro_batch, seq_len, checkpointing in TABLE_SHAPES.values():
                shape = TrainingShape(method, micro_batch, seq_len, checkpointing, optim=optim)
                cells.append(f"{estimate_memory(config, shape).total / GiB:.1f}")
            folklore = FOLKLORE_GB.get((name, method)) if optim == "adamw" else None
            label = method + ("" if optim == "adamw" else f" ({optim})")
            cells.append(f"~{folklore}" if folklore else "")
            lines.append(f"| {label_name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print only the 7B/13B/34B table")
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, default="plain", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.ckpt, args.variant)))
        return
    print("Estimated peak GiB per GPU: bf16, LoRA r=16 on q_proj,v_proj; micro-batch x seq len, ckpt =")
    print("activation checkpointing; folklore: the figures users quote (GB as tools print GiB)\n")
    print(reference_table())
    if args.table:
        return
    for family in MEASURED_MODELS:
        with tempfile.TemporaryDirectory() as tmp:
            write_measured_model(Path(tmp), family)
            print("\nEstimated vs measured on this machine:\n")
            print(measured_table(Path(tmp)))


if __name__ == "__main__":
    main()
