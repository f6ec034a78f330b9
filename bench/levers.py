"""The speed levers of a nanoft LoRA step, one at a time: each variant undoes one of them.

    python bench/levers.py                       # SmolLM2-135M, LoRA r=16 q,v, bf16, 4 x 256 tokens, 6 rounds
    python bench/levers.py --rounds 10 --json bench/levers.json
    python bench/levers.py --base nf4 --variants "compiled layers" --threads 1   # QLoRA; some variants only
    python bench/levers.py --model llama-1b --shape 4x256 --variants "thin loss chunks"
    python bench/levers.py --rounds 1 --variants none --copies   # every copy in a default step, and why

One process; the default model, and a model of its own for the variants that change how it is built.
Every round runs one training step (forward, backward, AdamW, zero_grad) of each
variant in turn, so that a noisy machine slows all of them alike; the table gives the median step time and its
ratio to the default (nanoft as it ships), the median CPU time (with --threads 1 the one to trust on a
busy machine), and the first step's time (a compiled model compiles in it). Variants:
- sdpa attention: SDPA's flash kernel (is_causal) instead of nanoft/cpu_attention.py's batched matmuls;
- attention probabilities recomputed: cpu_attention's blocks of queries, which recompute the probabilities
  in backward (what longer sequences get), instead of keeping them;
- attention over the whole square: grouped_attention's matmuls over every (query, key) pair, masked
  ones included, instead of skipping the masked quarter;
- rmsnorm by autograd: the reference's seven small ops instead of _RMSNormFunction;
- swiglu by autograd: F.silu(gate) * up instead of _SwiGLUFunction;
- fp32 logits loss: logits of every position cast to fp32 and F.cross_entropy (what transformers does)
  instead of nanoft.loss's chunked loss;
- thin loss chunks: nanoft.loss's chunks of 2^23 logits however few rows that is (65 at a 128k vocabulary)
  instead of at least MIN_ROWS_PER_CHUNK rows;
- torch dropout: nn.Dropout's bernoulli_ mask for the LoRA inputs instead of
  nanoft.cpu_dropout.CPUFriendlyDropout's;
- frozen base in fp32 + autocast: the base weights kept in fp32 and cast to bf16 by autocast in every matmul
  (a second model, built the same way);
- activation checkpointing: each decoder layer recomputed in backward (`--activation-checkpointing`), a lever
  for memory: its activation bytes, from nanoft.memory's estimate (tests/test_memory.py holds it to within 1%
  of what autograd keeps), are printed under the table;
- compiled layers: each decoder layer through torch.compile (`--compile`; inductor's C++ kernels on CPU), a
  model of its own; its first step compiles (about 4 minutes on 2 cores the first time, seconds once
  inductor's cache holds the graphs);
- q,k,v and gate,up as one matmul each: a model whose layers also hold their frozen q, k, v weights stacked
  into one (and gate, up into one; NF4 ones bit for bit), multiplied once; the adapters of q and v are added
  to their slices of the output one by one, as LoRALinear adds them.
--base nf4 runs the same on QLoRA's NF4 base (bitsandbytes, double quant, bf16 compute; no fp32 variant).
"""

import argparse
import json
import statistics
import sys
import tempfile
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
from nanoft.cpu_allocator import choose_for_run  # noqa: E402
from nanoft.default_model import default_model_dir  # noqa: E402
from nanoft.memory import TrainingShape, estimate_memory  # noqa: E402
from nanoft.weights import from_pretrained  # noqa: E402
from quant import QuantConfig, load_quantized, make_optimizer, make_quantized_linear  # noqa: E402


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


def fp32_logits_loss(hidden, weight, targets, logits_scaling=1.0, softcap=None):
    logits = nanoft.loss.final_logits((hidden @ weight.t()).float(), logits_scaling, softcap)
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
    "thin loss chunks": (nanoft.loss, "MIN_ROWS_PER_CHUNK", 1),
    "torch dropout": (nanoft.cpu_dropout.CPUFriendlyDropout, "forward", torch.nn.Dropout.forward),
}
FP32_BASE = "frozen base in fp32 + autocast"
CHECKPOINTED = "activation checkpointing"
COMPILED = "compiled layers"
FUSED = "q,k,v and gate,up as one matmul each"


def with_lora(projected, layer, x):
    """`projected` (the base's output) plus the LoRA update of `layer` when it has one, as LoRALinear
    adds it."""
    if not isinstance(layer, lora.LoRALinear):
        return projected
    lora_A, lora_B = layer.lora_A.weight.to(x.dtype), layer.lora_B.weight.to(x.dtype)
    return projected + F.linear(F.linear(layer.dropout(x), lora_A) * layer.scale, lora_B)


def fused_project(self, x):
    q, k, v = self.fused_qkv(x).split(self.widths, dim=-1)
    layers = (self.q_proj, self.k_proj, self.v_proj)
    q, k, v = (with_lora(t, layer, x) for t, layer in zip((q, k, v), layers, strict=True))
    return q, k, v.contiguous()


def fused_mlp(self, x):
    gate, up = self.fused_gate_up(x).chunk(2, dim=-1)
    gate, up = with_lora(gate, self.gate_proj, x), with_lora(up, self.up_proj, x)
    return self.down_proj(nanoft.model._GatedActivation.apply(gate, up, self.activation))


FUSED_PATCHES = [(nanoft.model.Attention, "project", fused_project), (nanoft.model.MLP, "forward", fused_mlp)]


def fused_linear(layers, quant: QuantConfig | None) -> torch.nn.Module:
    """One frozen bias-free linear whose rows are the layers' base weights one after the other. 4-bit ones:
    their packed bytes and per-block absmax stacked (NF4 blocks run along the rows, and a row of 576 is 9 of
    them), the absmax kept in fp32 rather than quantized again: the same weights, bit for bit."""
    bases = [getattr(layer, "base_layer", layer) for layer in layers]
    out_features, in_features = sum(base.out_features for base in bases), bases[0].in_features
    if quant is None:
        linear = torch.nn.Linear(in_features, out_features, bias=False, dtype=bases[0].weight.dtype)
        linear.weight.data = torch.cat([base.weight for base in bases])
        return linear.requires_grad_(False)
    import bitsandbytes

    def absmax(state):
        if not state.nested:
            return state.absmax
        return bitsandbytes.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset

    states = [base.weight.quant_state for base in bases]
    state = bitsandbytes.functional.QuantState(
        torch.cat([absmax(state) for state in states]),
        shape=torch.Size((out_features, in_features)),
        code=states[0].code,
        blocksize=states[0].blocksize,
        quant_type=states[0].quant_type,
        dtype=states[0].dtype,
    )
    fused = make_quantized_linear(
        torch.nn.Linear(in_features, out_features, bias=False, device="meta"), quant
    )
    fused.weight = bitsandbytes.nn.Params4bit(
        torch.cat([base.weight.data for base in bases]),
        quant_state=state,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        bnb_quantized=True,
        module=fused,
    )
    return fused.requires_grad_(False)


def fuse_projections(model, quant: QuantConfig | None) -> None:
    """Give every layer the stacked q, k, v and gate, up weights that FUSED_PATCHES multiply by (the separate
    layers stay: their adapters are still added one by one)."""
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        attention.fused_qkv = fused_linear([attention.q_proj, attention.k_proj, attention.v_proj], quant)
        mlp.fused_gate_up = fused_linear([mlp.gate_proj, mlp.up_proj], quant)


def build(model_dir, base_dtype, quant: QuantConfig | None):
    if quant is None:
        model = from_pretrained(model_dir, dtype=base_dtype)
    else:
        model = load_quantized(model_dir, quant=quant.quant, compute_dtype=quant.compute_dtype)
    lora.inject_lora(model, lora.LoRAConfig(16, 32, 0.05, targets=("q_proj", "v_proj")))
    model.train()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", lr=1e-4)
    return model, optimizer


def timed_step(model, optimizer, input_ids, targets, autocast) -> tuple[float, float]:
    """(wall, CPU) seconds of one training step."""
    started, cpu_started = time.perf_counter(), time.process_time()
    with autocast:
        loss_sum, n_targets = model(input_ids, targets)
    (loss_sum / n_targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started, time.process_time() - cpu_started


def list_copies(step) -> None:
    """Profile one call of `step` (after warm-up) and print every aten::copy_ in it, grouped: the op that
    asked for it (_to_copy: a dtype cast; clone: a layout copy; slice_backward: a slice's gradient written
    into zeros of the whole), the shapes and dtypes (to, from), and for backward the autograd node that ran
    it (forward ones say "forward": their shapes and counts tell which line, e.g. 61 = SmolLM2's norms)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        step()
    rows = {}  # (asked by, shapes, dtypes, cause) -> [calls, self CPU microseconds]
    total = 0.0
    for event in profiler.events():
        total += event.self_cpu_time_total
        if event.name != "aten::copy_":
            continue
        parent, asked_by, cause = event.cpu_parent, "", "forward"
        while parent is not None:
            asked_by = asked_by or (parent.name if parent.name.startswith("aten::") else "")
            if parent.name.startswith("autograd::engine::evaluate_function: "):
                cause = "backward: " + parent.name.rpartition(" ")[2]
            parent = parent.cpu_parent
        shapes = " ".join(str(tuple(shape)) for shape in event.input_shapes if shape)
        key = (asked_by or "-", shapes, " ".join(t for t in event.input_dtypes if t), cause)
        calls_and_time = rows.setdefault(key, [0, 0.0])
        calls_and_time[0] += 1
        calls_and_time[1] += event.self_cpu_time_total
    copies = sum(micros for _, micros in rows.values())
    print(f"\naten::copy_ in one step: {copies / 1000:.0f} ms of {total / 1000:.0f} ms self CPU time")
    print("\n| asked by | shapes | dtypes (to, from) | cause | calls | ms |")
    print("| --- | --- | --- | --- | ---: | ---: |")
    for (asked_by, shapes, dtypes, cause), (calls, micros) in sorted(rows.items(), key=lambda r: -r[1][1]):
        print(f"| {asked_by} | {shapes} | {dtypes} | {cause} | {calls} | {micros / 1000:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="timed steps per variant (after 2 warm-up)")
    parser.add_argument("--shape", default="4x256", help="batch x sequence length")
    parser.add_argument(
        "--base", choices=["bf16", "nf4"], default="bf16", help="frozen base: bf16, or QLoRA's NF4"
    )
    parser.add_argument(
        "--model",
        choices=["smollm2", "llama-1b"],
        default="smollm2",
        help="the built-in SmolLM2-135M, or Llama-3.2-1B's shape with random weights (train_step.py's)",
    )
    parser.add_argument("--variants", nargs="+", help="run these only (beside the default)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--copies", action="store_true", help="then list the copies in a default step")
    args = parser.parse_args()

    batch, seq_len = map(int, args.shape.split("x"))
    if args.threads:  # on a busy machine: its CPU time then leaves out what others take of the core
        torch.set_num_threads(args.threads)
    choose_for_run(sharded=False)  # as train.py does on CPU (bench/allocator.py measures that lever)
    model_dir = default_model_dir()
    if args.model == "llama-1b":
        from train_step import write_family_model  # bench/ is on the path of a script run from it

        model_dir = Path(tempfile.mkdtemp(prefix="nanoft-levers-")) / args.model
        write_family_model(args.model, model_dir)
    quant = QuantConfig("nf4", compute_dtype=torch.bfloat16) if args.base == "nf4" else None
    variants = ["default", *PATCHES, *([FP32_BASE] if quant is None else []), CHECKPOINTED, COMPILED, FUSED]
    if args.variants:
        variants = ["default", *(variant for variant in variants if variant in args.variants)]
    torch.manual_seed(0)
    models = {"default": build(model_dir, torch.bfloat16, quant)}  # variants with a model of their own:
    if FP32_BASE in variants:
        models[FP32_BASE] = build(model_dir, torch.float32, None)
    if COMPILED in variants:
        models[COMPILED] = build(model_dir, torch.bfloat16, quant)
        for layer in models[COMPILED][0].model.layers:
            layer.compile()  # what --compile does (train.py)
    if FUSED in variants:
        models[FUSED] = build(model_dir, torch.bfloat16, quant)
        fuse_projections(models[FUSED][0], quant)
    vocab_size = models["default"][0].config.vocab_size
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    targets = torch.full_like(input_ids, nanoft.loss.IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]

    def run(variant: str) -> tuple[float, float]:
        model, optimizer = models.get(variant, models["default"])
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if variant == FP32_BASE else nullcontext()
        patches = {FUSED: FUSED_PATCHES}.get(variant, [PATCHES[variant]] if variant in PATCHES else [])
        originals = [getattr(owner, name) for owner, name, _ in patches]
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        model.activation_checkpointing = variant == CHECKPOINTED
        try:
            return timed_step(model, optimizer, input_ids, targets, autocast)
        finally:
            model.activation_checkpointing = False
            for (owner, name, _), original in zip(patches, originals, strict=True):
                setattr(owner, name, original)

    times = {variant: [] for variant in variants}
    first = {}  # the first step's wall seconds: a compiled model compiles in it
    for round_index in range(2 + args.rounds):
        for variant in variants:
            seconds = run(variant)
            if round_index == 0:
                first[variant] = seconds[0]
            if round_index >= 2:
                times[variant].append(seconds)
    tokens = batch * seq_len
    default = statistics.median(wall for wall, _ in times["default"])
    base = "QLoRA NF4 base" if quant else "bf16"
    name = "SmolLM2-135M" if args.model == "smollm2" else "Llama-3.2-1B's shape"
    print(f"{name}, LoRA r=16 q,v, {base}, {args.shape}, median of {args.rounds} interleaved steps")
    print(
        "\n| variant | ms / step | tokens/s | step time vs default | CPU ms / step | first step s |"
        "\n| --- | ---: | ---: | ---: | ---: | ---: |"
    )
    results = []
    for variant in variants:
        median = statistics.median(wall for wall, _ in times[variant])
        cpu = statistics.median(cpu for _, cpu in times[variant])
        results.append(
            {
                "variant": variant,
                "seconds": median,
                "cpu_seconds": cpu,
                "first_step_seconds": first[variant],
                "tokens_per_second": tokens / median,
            }
        )
        print(
            f"| {variant} | {median * 1000:.0f} | {tokens / median:.0f} | {median / default:.2f}x | "
            f"{cpu * 1000:.0f} | {first[variant]:.1f} |"
        )
    shape = TrainingShape("lora", batch, seq_len, device_type="cpu")
    estimate = estimate_memory(models["default"][0].config, shape)
    activations = {"plain": estimate.activations_full, "checkpointed": estimate.activations_checkpointed}
    print(
        f"\nactivations kept for backward: {activations['plain'] / 2**20:.0f} MiB, checkpointed "
        f"{activations['checkpointed'] / 2**20:.0f} MiB (nanoft.memory's estimate)"
    )
    if args.copies:
        list_copies(lambda: run("default"))
    if args.json:
        summary = {
            "shape": args.shape,
            "base": args.base,
            "results": results,
            "activation_bytes": activations,
        }
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
