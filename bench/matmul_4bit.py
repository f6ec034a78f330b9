"""What a 4-bit weight costs per matmul: bitsandbytes Linear4bit (NF4) next to a bf16 nn.Linear.

    python bench/matmul_4bit.py                 # CPU (or --device cuda), SmolLM2-135M and Llama-2-7B shapes

For each decoder projection shape, with 4 x 256 = 1024 tokens of bf16 input, median milliseconds of:
- forward: y = x W^T;
- forward + backward to the input (what LoRA needs from a frozen base: no weight gradient);
- the dequantization alone (4-bit -> bf16 weight), which bitsandbytes does inside every 4-bit forward and
  again inside the backward;
- on CPU, bitsandbytes' inference kernel (eval + no_grad, weight repacked for AVX512-BF16), which quant.py
  turns off because after it a layer no longer passes gradients to its input.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant import QuantConfig, make_quantized_linear, quantize_weight  # noqa: E402

SHAPES = {  # (in_features, out_features) of q/o, k/v, gate/up, down
    "SmolLM2-135M": [(576, 576), (576, 192), (576, 1536), (1536, 576)],
    "Llama-2-7B": [(4096, 4096), (4096, 11008), (11008, 4096)],
}
TOKENS = 4 * 256


def median_ms(fn, device, repeats) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure_shape(in_features, out_features, device, repeats) -> dict:
    import bitsandbytes as bnb

    weight = torch.randn(out_features, in_features) * 0.02
    dense = nn.Linear(in_features, out_features, bias=False, device=device, dtype=torch.bfloat16)
    dense.weight.data.copy_(weight)
    dense.requires_grad_(False)
    config = QuantConfig()
    quantized = make_quantized_linear(nn.Linear(in_features, out_features, bias=False, device="meta"), config)
    quantize_weight(quantized, weight, config, device)
    x = torch.randn(TOKENS, in_features, device=device, dtype=torch.bfloat16)
    x_grad = x.clone().requires_grad_(True)

    def forward_backward(layer):
        return lambda: layer(x_grad).sum().backward()

    state = quantized.weight.quant_state
    row = {
        "shape": f"{in_features}x{out_features}",
        "bf16 fwd": median_ms(lambda: dense(x), device, repeats),
        "nf4 fwd": median_ms(lambda: quantized(x), device, repeats),
        "bf16 fwd+bwd": median_ms(forward_backward(dense), device, repeats),
        "nf4 fwd+bwd": median_ms(forward_backward(quantized), device, repeats),
        "dequantize": median_ms(
            lambda: bnb.functional.dequantize_4bit(quantized.weight.data, state), device, repeats
        ),
    }
    if device.type == "cpu" and bnb.functional.has_avx512bf16():
        inference = make_quantized_linear(
            nn.Linear(in_features, out_features, bias=False, device="meta"), config
        )
        quantize_weight(inference, weight, config, device)
        inference.support_avx512bf16_for_cpu = True
        inference.eval()
        with torch.no_grad():
            row["nf4 inference fwd"] = median_ms(lambda: inference(x), device, repeats)
    flops = 2 * TOKENS * in_features * out_features
    row["bf16 GFLOP/s"] = flops / row["bf16 fwd"] / 1e6
    row["nf4 GFLOP/s"] = flops / row["nf4 fwd"] / 1e6
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    threads, load = torch.get_num_threads(), os.getloadavg()[0]
    print(f"device {device}, {threads} threads, load average {load:.1f}, {TOKENS} tokens per matmul")
    for model, shapes in SHAPES.items():
        rows = [measure_shape(i, o, device, args.repeats) for i, o in shapes]
        columns = list(rows[0])
        print(f"\n{model} (ms, median of {args.repeats}; nf4/bf16 = slowdown of the forward)")
        print("  ".join(f"{c:>17}" for c in columns + ["nf4/bf16 fwd"]))
        for row in rows:
            cells = [row[c] if isinstance(row[c], str) else f"{row[c]:.2f}" for c in columns]
            print("  ".join(f"{c:>17}" for c in cells + [f"{row['nf4 fwd'] / row['bf16 fwd']:.2f}"]))


if __name__ == "__main__":
    main()
