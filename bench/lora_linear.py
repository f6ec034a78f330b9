"""LoRA linear layer forward + backward: nanoft's LoRALinear against PEFT's lora.Linear on one base layer.

    python bench/lora_linear.py                        # CPU (and CUDA when present), bf16 and fp32, ~1-2 min
    python bench/lora_linear.py --repeats 30 --json runs/lora_linear.json

Shapes: SmolLM2-135M's q_proj (576 x 576) and a 7B model's (4096 x 4096), x of 4 x 256 tokens. r=16,
alpha=32, dropout 0.05, training mode, frozen base, fp32 adapters (PEFT's get_peft_model upcasts them the same
way), x requiring grad as it does inside a network. Each repeat runs ours and PEFT's back to back, in
alternating order, so load from other processes hits both alike; the table shows medians and
speed = PEFT time / our time (above 1: ours is faster).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import peft
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: lora.py is at the root
from lora import LoRALinear  # noqa: E402

SHAPES = {"SmolLM2 576x576": 576, "7B 4096x4096": 4096}
TOKENS = (4, 256)
RANK, ALPHA, DROPOUT = 16, 32, 0.05


class OneLayer(nn.Module):
    """The smallest model PEFT's get_peft_model accepts: one linear layer named `proj`."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


def build_pair(width: int, dtype, device):
    """Ours and PEFT's LoRA layer around one shared frozen base, with identical (non-zero) adapters."""
    base = nn.Linear(width, width, bias=False, dtype=dtype, device=device).requires_grad_(False)
    ours = LoRALinear(base, RANK, ALPHA, DROPOUT)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=["proj"])
    theirs = get_peft_model(OneLayer(base), config).base_model.model.proj
    with torch.no_grad():
        ours.lora_B.weight.normal_(std=0.02)
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    assert (
        theirs.lora_A["default"].weight.dtype == torch.float32
    )  # the comparison is fp32 adapters on both sides
    return ours, theirs


def check_same_output(ours, theirs, x):
    with torch.no_grad():
        expected = theirs.eval()(x).float()
        difference = (ours.eval()(x).float() - expected).abs().max() / expected.abs().max()
    ours.train(), theirs.train()
    assert difference < (1e-2 if x.dtype == torch.bfloat16 else 1e-5), f"outputs differ by {difference:.2e}"


def time_step(layer, x, grad_output, device) -> float:
    """Seconds for one forward + backward (gradients of x and of the adapters)."""
    x.grad = None
    layer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    layer(x).backward(grad_output)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(width: int, dtype, device, repeats: int) -> dict:
    torch.manual_seed(0)
    ours, theirs = build_pair(width, dtype, device)
    x = torch.randn(*TOKENS, width, dtype=dtype, device=device, requires_grad=True)
    grad_output = torch.randn_like(x)
    check_same_output(ours, theirs, x.detach())
    for layer in (ours, theirs, ours, theirs):  # warm-up: allocator, oneDNN/cuBLAS kernel selection
        time_step(layer, x, grad_output, device)
    seconds = {"ours": [], "peft": []}
    for i in range(repeats):
        order = (("ours", ours), ("peft", theirs)) if i % 2 == 0 else (("peft", theirs), ("ours", ours))
        for name, layer in order:
            seconds[name].append(time_step(layer, x, grad_output, device))
    ours_ms, peft_ms = (1e3 * statistics.median(seconds[name]) for name in ("ours", "peft"))
    return {"ours_ms": ours_ms, "peft_ms": peft_ms, "speed_ours_over_peft": peft_ms / ours_ms}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=12, help="timed forward+backward steps per layer (median)"
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(
        f"torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} CPU threads, "
        f"{platform.processor() or platform.machine()}, x = {TOKENS[0]}x{TOKENS[1]} tokens, r={RANK}"
    )
    print(f"{'device':6} {'dtype':8} {'shape':18} {'ours ms':>9} {'PEFT ms':>9} {'speed ours/PEFT':>16}")
    results = []
    for device in devices:
        for dtype in (torch.bfloat16, torch.float32):
            for shape, width in SHAPES.items():
                row = {"device": device.type, "dtype": str(dtype).removeprefix("torch."), "shape": shape}
                row |= measure(width, dtype, device, args.repeats)
                results.append(row)
                times = f"{row['ours_ms']:9.2f} {row['peft_ms']:9.2f} {row['speed_ours_over_peft']:16.2f}"
                print(f"{row['device']:6} {row['dtype']:8} {shape:18} {times}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        environment = {
            "torch": torch.__version__,
            "peft": peft.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "repeats": args.repeats,
        }
        Path(args.json).write_text(json.dumps({"environment": environment, "results": results}, indent=2))


if __name__ == "__main__":
    main()
