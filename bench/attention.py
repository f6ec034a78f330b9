"""Causal attention forward + backward on CPU: nanoft/cpu_attention.py against SDPA, what transformers calls.

    python bench/attention.py                                  # SmolLM2's heads, bf16, 4x256 ... 1x4096
    python bench/attention.py --shapes 1x2048 --blocks 64 128 256 --rounds 9 --json bench/attention.json

One layer's attention: q (B, 9, T, 64), k and v (B, 3, T, 64) as SmolLM2-135M has them, plain causal mask.
Variants: SDPA with is_causal (its CPU flash kernel); nanoft keeping the softmax probabilities for backward;
nanoft recomputing them a block of queries at a time, per block size. Each round runs every variant once in
turn (so a noisy machine slows all alike); the table gives the median milliseconds, the ratio to SDPA, the
bytes autograd keeps for backward besides q, k and v (for the blocks: the (1, 1, T, T) bias, which a model's
layers share), and the largest gradient error against SDPA in float64.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nanoft.cpu_attention as cpu_attention  # noqa: E402
from nanoft.cpu_allocator import choose_for_run  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def sdpa(q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def nanoft(scores_limit: int, block: int):
    """cpu_attention.grouped_attention with its size limit and block size set for this variant."""

    def attention(q, k, v, bias):
        cpu_attention.CPU_ATTENTION_SCORES, cpu_attention.BLOCK_QUERIES = scores_limit, block
        return cpu_attention.grouped_attention(q, k, v, bias, q.shape[-1] ** -0.5)

    return attention


def forward_backward(attention, inputs, bias, grad_y):
    """Gradients of q, k, v, and the bytes of the distinct tensors autograd kept for backward."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = attention(*leaves, bias)
    input_storages = {t.untyped_storage().data_ptr() for t in leaves}
    y.backward(grad_y)
    return [t.grad for t in leaves], sum(n for ptr, n in kept.items() if ptr not in input_storages)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4x256", "1x1024", "1x2048", "2x2048", "1x4096"])
    parser.add_argument("--blocks", nargs="+", type=int, default=[64, 128, 256, 512])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    choose_for_run(sharded=False)  # as train.py does on CPU: no page faults in the timings
    dtype = DTYPES[args.dtype]
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {args.dtype}, heads {HEADS}/{KV_HEADS}")
    print("| B x T | variant | ms | vs SDPA | kept MB | max grad error |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    results = []
    for shape in args.shapes:
        B, T = (int(n) for n in shape.split("x"))
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(B, HEADS, T, HEAD_DIM, generator=generator)
        k, v = (torch.randn(B, KV_HEADS, T, HEAD_DIM, generator=generator) for _ in range(2))
        grad_y = torch.randn(B, HEADS, T, HEAD_DIM, generator=generator)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        bias = torch.zeros(1, 1, T, T, dtype=dtype).masked_fill_(~causal, float("-inf"))
        exact, _ = forward_backward(sdpa, [t.double() for t in (q, k, v)], None, grad_y.double())
        variants = {"SDPA": sdpa, "kept probabilities": nanoft(2**62, cpu_attention.BLOCK_QUERIES)}
        variants |= {f"blocks of {n}": nanoft(0, n) for n in args.blocks}
        inputs = [t.to(dtype) for t in (q, k, v)]
        times = {name: [] for name in variants}
        kept_bytes, errors = {}, {}
        for round_index in range(args.rounds + 1):  # round 0 warms up
            for name, attention in variants.items():
                start = time.perf_counter()
                grads, kept_bytes[name] = forward_backward(attention, inputs, bias, grad_y.to(dtype))
                if round_index:
                    times[name].append(time.perf_counter() - start)
                errors[name] = max(
                    float((g.double() - e).abs().max()) for g, e in zip(grads, exact, strict=True)
                )
        sdpa_ms = statistics.median(times["SDPA"]) * 1000
        for name in variants:
            ms = statistics.median(times[name]) * 1000
            row = dict(
                shape=shape, variant=name, ms=ms, vs_sdpa=ms / sdpa_ms, kept_mb=kept_bytes[name] / 2**20
            )
            results.append(row | {"max_grad_error": errors[name]})
            cells = [shape, name, f"{ms:.1f}", f"{ms / sdpa_ms:.2f}x", f"{row['kept_mb']:.1f}"]
            print("| " + " | ".join([*cells, f"{errors[name]:.4f}"]) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
