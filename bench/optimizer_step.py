"""One optimizer step over SmolLM2-135M's weights (a full fine-tune's): torch AdamW's three implementations
and bitsandbytes' AdamW8bit.

    python bench/optimizer_step.py              # fp32 weights and gradients of SmolLM2-135M's shapes, 5 steps

The weights are random tensors of the model's shapes (135M fp32 numbers; the values do not change the time),
with random gradients. Median seconds of --repeats steps after one warm-up step each; the variants run in
turn, so a noisy machine slows them alike. quant.make_optimizer("adamw") is the fused one.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanoft.default_model import default_model_dir  # noqa: E402
from nanoft.model import Transformer  # noqa: E402
from nanoft.weights import load_config  # noqa: E402

VARIANTS = {
    "AdamW fused (nanoft)": lambda params: torch.optim.AdamW(params, lr=1e-4, fused=True),
    "AdamW foreach": lambda params: torch.optim.AdamW(params, lr=1e-4, foreach=True),
    "AdamW for-loop": lambda params: torch.optim.AdamW(params, lr=1e-4, foreach=False),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    variants = dict(VARIANTS)
    try:
        import bitsandbytes as bnb

        variants["bitsandbytes AdamW8bit"] = lambda params: bnb.optim.AdamW8bit(params, lr=1e-4)
    except ImportError:
        print("bitsandbytes not installed: AdamW8bit left out")

    with torch.device("meta"):
        shapes = [p.shape for p in Transformer(load_config(default_model_dir())).parameters()]
    generator = torch.Generator().manual_seed(0)
    setups = {}
    for name, make in variants.items():
        params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator) * 1e-3
        setups[name] = make(params)
    times = {name: [] for name in setups}
    for round_index in range(1 + args.repeats):
        for name, optimizer in setups.items():
            started = time.perf_counter()
            optimizer.step()
            if round_index:
                times[name].append(time.perf_counter() - started)
    count = sum(shape.numel() for shape in shapes)
    print(f"{count / 1e6:.0f}M fp32 weights, median of {args.repeats} steps")
    print("\n| optimizer | seconds / step |\n| --- | ---: |")
    for name, seconds in times.items():
        print(f"| {name} | {statistics.median(seconds):.3f} |")


if __name__ == "__main__":
    main()
