"""What tests/test_distributed.py runs under torchrun, and in one process as the reference.

    torchrun --nproc_per_node=2 tests/dist_worker.py RUNS_JSON OUT_DIR   # rank 0 writes OUT_DIR/<name>.pt
    python tests/dist_worker.py RUNS_JSON OUT_DIR                        # the same runs, one process

RUNS_JSON is a list of runs (see Run). Each trains a tiny random Llama with nanoft's own pieces (model,
data.py's Batches, lora.py, quant.py, distributed.py) with the loop train.py uses: token-normalised gradient
accumulation with gradient sync on the last micro-batch, clipping, AdamW. Several runs share one launch
because starting torchrun and importing torch costs more than a tiny run.
"""

import json
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.fsdp import FSDPModule

# The repository root, for data.py, quant.py and lora.py (torchrun puts only tests/ on the path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora import LoRAConfig, inject_lora  # noqa: E402
from nanoft.checkpoint import checkpoint_path, restore_checkpoint, save  # noqa: E402
from nanoft.data_batches import Batches  # noqa: E402
from nanoft.data_cache import TokenizedExamples  # noqa: E402
from nanoft.distributed import (  # noqa: E402
    all_reduce_gradients,
    all_reduce_sum,
    barrier,
    clip_grad_norm,
    full_state_dict,
    gather_to_main,
    is_fsdp,
    local_gradients,
    optimizer_state_dict,
    scatter_from_main,
    setup_distributed,
    teardown,
    wrap_model,
)
from nanoft.fsdp_qlora import parameter_bytes, quant_state_bytes  # noqa: E402
from nanoft.interruptions import OOMRecovery  # noqa: E402
from nanoft.loss import IGNORE_INDEX  # noqa: E402
from nanoft.model import ModelConfig, Transformer  # noqa: E402
from nanoft.monitor import memory_bytes, peak_since_reset, reset_peak  # noqa: E402
from nanoft.weights import empty_model, load_weights  # noqa: E402
from quant import QuantConfig, quantize_linears, weight_quantizer  # noqa: E402

VOCAB = 128
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
N_EXAMPLES = 64


@dataclass
class Run:
    name: str
    method: str = "full"  # full | lora | qlora
    fsdp: str = "none"  # none (DDP when several ranks) | full_shard | shard_grad_op
    cpu_offload: bool = False
    mixed_precision: str = ""  # "" or "bf16" (FSDP's MixedPrecisionPolicy)
    batch_size: int = 2  # per rank
    grad_accum: int = 2
    steps: int = 3
    lora_dropout: float = 0.0
    activation_checkpointing: bool = False
    tie_word_embeddings: bool = False  # as SmolLM2 and small Qwen2: lm_head is the embedding matrix
    resume_at: int = 0  # >0: stop after this many steps, save, rebuild everything, load, finish
    crash: str = ""  # "raise": rank 1 raises; "hang": rank 1 never reaches the first collective
    oom_rows: int = 0  # >0: rank 1 runs out of memory (torch.OutOfMemoryError) on forwards of more rows
    checkpoint: str = (
        ""  # a Hugging Face directory, loaded as train.py does (built on meta, filled by wrap_model)
    )


def tiny_config(tie_word_embeddings=False) -> ModelConfig:
    return ModelConfig(
        tie_word_embeddings=tie_word_embeddings,
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
    )


def tiny_examples() -> TokenizedExamples:
    """Examples of 6..20 tokens counting up from a random start by a random stride (learnable in a few steps),
    whose first few tokens (the "prompt") carry no target, as data.py makes them."""
    rng = np.random.default_rng(0)
    input_ids, targets = [], []
    for _ in range(N_EXAMPLES):
        start, stride, length = (int(rng.integers(low, high)) for low, high in ((0, VOCAB), (1, 4), (6, 21)))
        ids = [(start + stride * t) % VOCAB for t in range(length)]
        prompt = int(rng.integers(1, 4))
        input_ids.append(ids)
        # Shifted: position t is scored on token t + 1; the prompt and the last token are not scored.
        targets.append([IGNORE_INDEX] * prompt + ids[prompt + 1 :] + [IGNORE_INDEX])
    return TokenizedExamples.from_lists(
        input_ids, targets, [f"tiny:{i}" for i in range(N_EXAMPLES)], seq_len=32
    )


def build_model(run: Run, seed: int) -> Transformer:
    """The tiny model; `seed` draws what will be trained (the base of a full fine-tune, else the adapters)."""
    torch.manual_seed(seed if run.method == "full" else 0)
    model = Transformer(tiny_config(run.tie_word_embeddings))
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.1)
    if run.method == "qlora":
        quantize_linears(model, QuantConfig(compute_dtype=torch.float32))
    if run.method in ("lora", "qlora"):
        torch.manual_seed(seed)
        model = inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=run.lora_dropout, targets=LORA_TARGETS))
    return model


def device_that_holds_rows(max_rows: int):
    """A forward pre-hook: CUDA's out-of-memory error when a forward sees more rows than `max_rows`."""

    def allocate(module, args):
        if args[0].shape[0] > max_rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory: {args[0].shape[0]} rows do not fit")

    return allocate


def build_from_checkpoint(run: Run, seed: int):
    """train.py's way: the model built on the meta device, 4-bit layers and adapters added, and the loader
    wrap_model calls once the layout is known (under FSDP each rank reads only its rows)."""
    model = empty_model(run.checkpoint, torch.float32)
    quantize = None
    if run.method == "qlora":
        config = QuantConfig(compute_dtype=torch.float32)
        quantize_linears(model, config)
        quantize = weight_quantizer(config, "cpu")
    if run.method in ("lora", "qlora"):
        torch.manual_seed(seed)
        model = inject_lora(
            model, LoRAConfig(r=4, alpha=8, dropout=run.lora_dropout, targets=LORA_TARGETS), "cpu"
        )
    return model, lambda model, device: load_weights(model, run.checkpoint, device, quantize=quantize)


def set_up_training(run: Run, dist, seed: int, record_of: dict | None = None):
    model, load = build_from_checkpoint(run, seed) if run.checkpoint else (build_model(run, seed), None)
    model.activation_checkpointing = run.activation_checkpointing
    mixed_precision = torch.bfloat16 if run.mixed_precision == "bf16" else None
    if run.oom_rows and dist.rank == 1:
        model.register_forward_pre_hook(device_that_holds_rows(run.oom_rows))
    reset_peak(dist.device)
    before = memory_bytes(dist.device)
    model = wrap_model(
        model, dist, fsdp=run.fsdp, cpu_offload=run.cpu_offload, mixed_precision=mixed_precision, load=load
    )
    if record_of is not None:  # the most memory loading added, above what the process held before it
        record_of["load_peak_bytes"] = gather_to_main(peak_since_reset(dist.device) - before, dist)
        if is_fsdp(model):
            watch_gathered_units(model, record_of)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1
    )
    batches = Batches(
        tiny_examples(), run.batch_size, pad_id=0, seed=0, rank=dist.rank, world_size=dist.world_size
    )
    return model, optimizer, batches


def watch_gathered_units(model, record_of: dict) -> None:
    """Record in record_of["most_units_gathered"] the most FSDP units this rank held gathered at once,
    counting an all-gather's output buffer as one more unless it is the buffer all units share, looked at in
    each decoder layer's forward and as its backward starts; and in record_of["root_parameters"] the root
    unit's.
    FSDP2 shows this only in its private state (torch 2.13's names)."""
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    # A group of modules (a tied embedding and lm_head) is one unit: counted once.
    groups = list({id(g): g for unit in units for g in unit._get_fsdp_state()._fsdp_param_groups}.values())
    root = model._get_fsdp_state()._fsdp_param_groups[0]
    module_names = {module: name for name, module in model.named_modules()}
    held_by_root = [param._module_info for param in root.fsdp_params]
    record_of["root_parameters"] = sorted(f"{module_names[i.module]}.{i.param_name}" for i in held_by_root)
    record_of["most_units_gathered"] = 0

    def own_buffer(result) -> bool:
        shared = getattr(groups[0]._all_gather_comm, "buffer", None)
        output = result.all_gather_output if result is not None else None
        return output is not None and (shared is None or output.data_ptr() != shared.data_ptr())

    def count(*_):
        held = sum(group.is_unsharded + own_buffer(group._all_gather_result) for group in groups)
        deferred = groups[0].comm_ctx.all_gather_state  # the last forward all-gather's, kept one unit longer
        held += own_buffer(deferred.all_gather_result if deferred is not None else None)
        record_of["most_units_gathered"] = max(record_of["most_units_gathered"], held)

    def count_in_backward(module, args, output):
        if output[0].requires_grad:
            output[0].register_hook(count)

    for layer in model.model.layers:
        layer.register_forward_pre_hook(count)
        layer.register_forward_hook(count_in_backward)


def forward_backward(model, dist, global_targets, pieces) -> torch.Tensor:
    loss_sum_total = torch.zeros(())
    for batch in pieces:
        with local_gradients(model):
            loss_sum, _ = model(
                batch["input_ids"], targets=batch["targets"], position_ids=batch["position_ids"]
            )
            # DDP and FSDP average gradients over ranks: undo that so this rank's share is a plain sum.
            (loss_sum * dist.world_size / global_targets).backward()
        loss_sum_total += loss_sum.detach().float()
    return loss_sum_total


def train_steps(model, optimizer, batches, dist, run: Run, steps: int, record_of: dict) -> None:
    """Train `steps` steps; record each step's loss (equal on all ranks) and the samples this rank read."""
    micro_batches = iter(batches)
    recovery = OOMRecovery(run.batch_size, run.grad_accum)
    for step in range(steps):
        step_batches = [next(micro_batches) for _ in range(run.grad_accum)]
        # Normalise by the target tokens of the whole step on all ranks, counted before any backward.
        local_targets = sum((batch["targets"] != IGNORE_INDEX).sum() for batch in step_batches)
        global_targets = all_reduce_sum(local_targets, dist)
        loss_sum_total = recovery.run(
            partial(forward_backward, model, dist, global_targets),
            step_batches,
            step,
            dist,
            sharded=is_fsdp(model) and dist.world_size > 1,
            log=lambda line: print(f"rank {dist.rank}: {line}", flush=True),
            before_retry=lambda: optimizer.zero_grad(set_to_none=True),
        )
        record_of["samples"] += [batch["sample_ids"] for batch in step_batches]
        all_reduce_gradients(model, dist)
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record_of["losses"].append((all_reduce_sum(loss_sum_total, dist) / global_targets).item())


def run_once(run: Run, dist, out_dir: Path) -> None:
    started = time.perf_counter()
    if run.crash:
        crash_on_purpose(run, dist)
    result = {"losses": [], "samples": []}
    model, optimizer, batches = set_up_training(run, dist, seed=0, record_of=result)
    if run.checkpoint and run.method == "full":  # every weight, as loaded
        result["loaded"] = full_state_dict(model, dist, trainable_only=True)
    result["broadcast_buffers"] = getattr(model, "broadcast_buffers", None)  # DDP's setting
    result["parameter_bytes"] = gather_to_main(parameter_bytes(model), dist)
    result["quant_state_bytes"] = gather_to_main(quant_state_bytes(model), dist)
    if run.resume_at:
        train_steps(model, optimizer, batches, dist, run, run.resume_at, result)
        # As train.py saves and restores (nanoft/checkpoint.py's format, its loaders).
        trainable = full_state_dict(model, dist, trainable_only=True)
        optimizer_state = optimizer_state_dict(model, optimizer, dist)
        rng_states = gather_to_main(torch.get_rng_state(), dist)  # dropout masks differ per rank
        if dist.is_main:
            state = {"data": batches.state_dict()}
            run_dir = out_dir / run.name
            save(run_dir, run.resume_at, trainable, optimizer_state, rng_states, state, {})
        barrier(dist)
        del model, optimizer, batches, trainable, optimizer_state
        # A fresh process would start here: other weights (seed 1), nothing in memory but what it reads.
        model, optimizer, batches = set_up_training(run, dist, seed=1)
        path = checkpoint_path(out_dir / run.name, run.resume_at)
        checkpoint = restore_checkpoint(path, model, optimizer, dist)  # under FSDP each rank reads its rows
        data_position = [checkpoint["state"]["data"]] * dist.world_size if dist.is_main else None
        batches.load_state_dict(scatter_from_main(data_position, dist))
        torch.set_rng_state(scatter_from_main(checkpoint.get("rng"), dist))
    train_steps(model, optimizer, batches, dist, run, run.steps - run.resume_at, result)
    result["trainable"] = full_state_dict(model, dist, trainable_only=True)
    result["samples"] = gather_to_main(result["samples"], dist)
    for key in ("most_units_gathered", "root_parameters"):
        result[key] = gather_to_main(result.get(key), dist)
    if dist.is_main:
        torch.save(result, out_dir / f"{run.name}.pt")
        print(f"{run.name}: {time.perf_counter() - started:.1f} s", flush=True)


def crash_on_purpose(run: Run, dist) -> None:
    if dist.rank == 1 and run.crash == "raise":
        raise RuntimeError("rank 1 crashed on purpose")
    if dist.rank == 1 and run.crash == "hang":
        time.sleep(3600)  # never joins the all-reduce below; rank 0 must time out
    all_reduce_sum(torch.ones(()), dist)


@record  # torchrun's failure summary then shows the failing rank's traceback
def main(runs_json: str, out_dir: str) -> None:
    runs = [Run(**spec) for spec in json.loads(Path(runs_json).read_text())]
    timeout_s = int(os.environ.get("NANOFT_TEST_DIST_TIMEOUT", "60"))
    dist = setup_distributed(device="cpu", timeout_s=timeout_s)
    for run in runs:
        run_once(run, dist, Path(out_dir))
    teardown(dist)


if __name__ == "__main__":
    main(*sys.argv[1:])
