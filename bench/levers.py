"""The speed levers of a nanoft LoRA step, one at a time: each variant undoes one of them.

    python bench/levers.py                       # SmolLM2-135M, LoRA r=16 q,v, bf16, 4 x 256 tokens, 6 rounds
    python bench/levers.py --rounds 10 --json bench/levers.json

One process, one model. Every round runs one training step (forward, backward, AdamW, zero_grad) of each
variant in turn, so that a noisy machine slows all of them alike; the table gives the median step time and its
ratio to the default (nanoft as it ships). Variants:
- sdpa attention: SDPA's flash kernel (is_causal) instead of nanoft/cpu_attention.py's batched matmuls;
- attention probabilities recomputed: cpu_attention's blocks of queries, which recompute the probabilities
  in backward (what longer sequences get), instead of keeping them;
- attention over the whole square: grouped_attention's matmuls over every (query, key) pair, masked
  ones included, instead of skipping the masked quarter;
- rmsnorm by autograd: the reference's seven small ops instead of _RMSNormFunction;
- swiglu by autograd: F.silu(gate) * up instead of _SwiGLUFunction;
- fp32 logits loss: logits of every position cast to fp32 and F.cross_entropy (what transformers does)
  instead of nanoft.loss's chunked loss;
- loss chunks 4x larger: nanoft.loss.LOGITS_PER_CHUNK x 4;
- torch dropout: nn.Dropout's bernoulli_ mask for the LoRA inputs instead of
  nanoft.cpu_dropout.CPUFriendlyDropout's;
- frozen base in fp32 + autocast: the base weights kept in fp32 and cast to bf16 by autocast in every matmul
  (a second model, built the same way);
- activation checkpointing: each decoder layer recomputed in backward (`--activation-checkpointing`), a lever
  for memory: its activation bytes, from nanoft.memory's estimate (tests/test_memory.py holds it to within 1%
  of what autograd keeps), are printed under the table.
"""

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lora  # noqa: E402
import nanoft.cpu_attention  # noqa: E402
import nanoft.cpu_dropout  # noqa: E402
import nanoft.loss  # noqa: E402
import nanoft.model  # noqa: E402
from nanoft.cpu_allocator import keep_freed_memory  # noqa: E402
from nanoft.default_model import default_model_dir  # noqa: E402
from nanoft.memory import TrainingShape, estimate_memory  # noqa: E402
from nanoft.weights import from_pretrained  # noqa: E402
from quant import make_optimizer  # noqa: E402


def sdpa_causal(q, k, v, bias, scale, softcap):  # the lever's steps are plain causal: no cache, no packing
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def rmsnorm_by_autograd(self, x):
    normed = x.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * normed.to(x.dtype)


def swiglu_by_autograd(self, x):
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def fp32_logits_loss(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    loss_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    return loss_sum, (targets != nanoft.loss.IGNORE_INDEX).sum()


PATCHES = {  # variant -> (object, attribute, replacement)
    "sdpa attention": (nanoft.model, "grouped_attention", sdpa_causal),
    "attention probabilities recomputed": (nanoft.cpu_attention, "CPU_ATTENTION_SCORES", 0),
    "attention over the whole square": (
        nanoft.model,
        "grouped_attention",
        nanoft.cpu_attention._grouped_attention,
    ),
    "rmsnorm by autograd": (nanoft.model.RMSNorm, "forward", rmsnorm_by_autograd),
    "swiglu by autograd": (nanoft.model.MLP, "forward", swiglu_by_autograd),
    "fp32 logits loss": (nanoft.model, "chunked_cross_entropy", fp32_logits_loss),
    "loss chunks 4x larger": (nanoft.loss, "LOGITS_PER_CHUNK", nanoft.loss.LOGITS_PER_CHUNK * 4),
    "torch dropout": (nanoft.cpu_dropout.CPUFriendlyDropout, "forward", torch.nn.Dropout.forward),
}
FP32_BASE = "frozen base in fp32 + autocast"
CHECKPOINTED = "activation checkpointing"


def build(model_dir, base_dtype):
    model = from_pretrained(model_dir, dtype=base_dtype)
    lora.inject_lora(model, lora.LoRAConfig(16, 32, 0.05, targets=("q_proj", "v_proj")))
    model.train()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", lr=1e-4)
    return model, optimizer


def timed_step(model, optimizer, input_ids, targets, autocast) -> float:
    started = time.perf_counter()
    with autocast:
        loss_sum, n_targets = model(input_ids, targets)
    (loss_sum / n_targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="timed steps per variant (after 2 warm-up)")
    parser.add_argument("--shape", default="4x256", help="batch x sequence length")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    batch, seq_len = map(int, args.shape.split("x"))
    keep_freed_memory()  # as train.py does on CPU (bench/allocator.py measures that lever)
    model_dir = default_model_dir()
    torch.manual_seed(0)
    bf16 = build(model_dir, torch.bfloat16)
    fp32 = build(model_dir, torch.float32)
    input_ids = torch.randint(0, 49152, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    targets = torch.full_like(input_ids, nanoft.loss.IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]

    def run(variant: str) -> float:
        if variant == FP32_BASE:
            return timed_step(*fp32, input_ids, targets, torch.autocast("cpu", dtype=torch.bfloat16))
        if variant == "default":
            return timed_step(*bf16, input_ids, targets, nullcontext())
        if variant == CHECKPOINTED:
            bf16[0].activation_checkpointing = True
            try:
                return timed_step(*bf16, input_ids, targets, nullcontext())
            finally:
                bf16[0].activation_checkpointing = False
        owner, name, replacement = PATCHES[variant]
        original = getattr(owner, name)
        setattr(owner, name, replacement)
        try:
            return timed_step(*bf16, input_ids, targets, nullcontext())
        finally:
            setattr(owner, name, original)

    variants = ["default", *PATCHES, FP32_BASE, CHECKPOINTED]
    times = {variant: [] for variant in variants}
    for round_index in range(2 + args.rounds):
        for variant in variants:
            seconds = run(variant)
            if round_index >= 2:
                times[variant].append(seconds)
    tokens = batch * seq_len
    default = statistics.median(times["default"])
    print(f"SmolLM2-135M, LoRA r=16 q,v, bf16, {args.shape}, median of {args.rounds} interleaved steps")
    print("\n| variant | ms / step | tokens/s | step time vs default |\n| --- | ---: | ---: | ---: |")
    results = []
    for variant in variants:
        median = statistics.median(times[variant])
        results.append({"variant": variant, "seconds": median, "tokens_per_second": tokens / median})
        print(f"| {variant} | {median * 1000:.0f} | {tokens / median:.0f} | {median / default:.2f}x |")
    shape = TrainingShape("lora", batch, seq_len, device_type="cpu")
    estimate = estimate_memory(bf16[0].config, shape)
    activations = {"plain": estimate.activations_full, "checkpointed": estimate.activations_checkpointed}
    print(
        f"\nactivations kept for backward: {activations['plain'] / 2**20:.0f} MiB, checkpointed "
        f"{activations['checkpointed'] / 2**20:.0f} MiB (nanoft.memory's estimate)"
    )
    if args.json:
        summary = {"shape": args.shape, "results": results, "activation_bytes": activations}
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
