"""torch.distributed behind torchrun: set-up, DDP or FSDP2 wrapping, gradient sync, gathering checkpoints.

    dist = setup_distributed(device="auto", timeout_s=600)  # torchrun's env -> process group, else 1 process
    model = empty_model(path, torch.bfloat16)                  # on meta; then quant.py, lora.py reshape it
    model = wrap_model(model, dist, fsdp="full_shard", load=lambda m, device: load_weights(m, path, device))
    for micro_batch in micro_batches:
        with local_gradients(model):
            loss_sum, _ = model(input_ids, targets=targets)
            (loss_sum * dist.world_size / global_target_count).backward()  # DDP and FSDP average over ranks
    if not any_rank(out_of_memory, dist):                      # else every rank retries (interruptions.py)
        all_reduce_gradients(model, dist)
    adapter = full_state_dict(model, dist, trainable_only=True)  # every rank calls; rank 0 gets the tensors
    teardown(dist)

Launch with `torchrun --nproc_per_node=N train.py ...` (one node) or with torchrun's c10d rendezvous (nodes).
Without torchrun nothing here touches torch.distributed: the model is returned as it is and every helper is a
no-op. FSDP over bitsandbytes 4-bit layers (QLoRA) is prepared by nanoft/fsdp_qlora.py; on CPU, FSDP gathers
one unit at a time into one shared buffer (nanoft/fsdp_on_cpu.py).
"""

import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.nn.parallel import DistributedDataParallel

from nanoft import cpu_allocator
from nanoft.config import FSDP_MODES
from nanoft.errors import UserError
from nanoft.fsdp_on_cpu import gather_one_unit_at_a_time
from nanoft.fsdp_qlora import prepare_4bit_linears_for_fsdp


@dataclass
class Dist:
    rank: int  # global rank, 0 .. world_size - 1
    local_rank: int  # rank on this node: picks the GPU
    world_size: int
    device: torch.device
    is_main: bool  # rank 0: the only one that prints, logs and writes files
    backend: str | None  # "nccl" | "gloo" | None when running as a single process


def setup_distributed(device: str = "auto", timeout_s: int = 600) -> Dist:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); without torchrun, one process.

    `timeout_s` bounds every collective: if a rank dies or hangs, the others raise after this long instead
    of waiting forever (and torchrun then stops the whole job with a non-zero exit code).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"--device cuda: torch {torch.__version__} sees no GPU (a CPU build, or no driver); "
            "use --device cpu, or install the CUDA build of torch"
        )
    if "RANK" not in os.environ:
        return Dist(
            rank=0, local_rank=0, world_size=1, device=torch.device(device), is_main=True, backend=None
        )
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.device(device).type == "cuda":
        gpu = gpu_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(gpu)
        pinned, backend = torch.device("cuda", gpu), "nccl"
        # On a collective timeout NCCL's watchdog aborts the communicator and kills this process, so a
        # hung peer turns into an error torchrun sees, not a job that waits forever.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    else:
        pinned, backend = torch.device(device), "gloo"
    torch_dist.init_process_group(
        # gloo beside NCCL for collectives on CPU tensors: with --fsdp-cpu-offload the gradient shards live
        # in CPU memory and clipping all-reduces their norm there.
        "cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo",
        timeout=timedelta(seconds=timeout_s),
        device_id=pinned if backend == "nccl" else None,
    )
    return Dist(rank, local_rank, world_size, pinned, is_main=rank == 0, backend=backend)


def gpu_index(local_rank: int, visible_gpus: int) -> int:
    """The GPU this process trains on: its local rank among the node's GPUs, or the only one it sees when the
    scheduler gives each process its own (SLURM's --gpus-per-task, CUDA_VISIBLE_DEVICES set per process)."""
    if visible_gpus == 1:
        return 0
    if local_rank >= visible_gpus:
        raise UserError(
            f"local rank {local_rank} has no GPU (this process sees {visible_gpus}): "
            "pass --nproc_per_node at most the number of GPUs to torchrun"
        )
    return local_rank


def teardown(dist: Dist) -> None:
    """Wait for every rank, then leave the process group.

    Not a formality: gloo's worker thread frees finished work (e.g. the last gather's tensors) and needs the
    GIL for it, while a rank that leaves destroys the group (when DDP lets go of it) in the main thread,
    holding the GIL and joining that worker: a deadlock at exit (py-spy: ~ProcessGroupGloo in thread::join,
    the worker in gil_scoped_acquire). A plain barrier made it rarer, not impossible: the worker then freed
    the barrier's work, which holds the gather's. So this rank keeps the barrier's work itself, gives the
    worker time to let go of it (sleep releases the GIL), and frees it here, holding the GIL.
    """
    if dist.backend is not None and torch_dist.is_initialized():
        barrier = torch_dist.barrier(async_op=True)
        barrier.wait()
        time.sleep(0.1)
        del barrier
        torch_dist.destroy_process_group()


def print0(dist: Dist, *args, **kwargs) -> None:
    if dist.is_main:
        print(*args, **kwargs, flush=True)


def seed_for_rank(seed: int, dist: Dist) -> int:
    """The seed for randomness that must differ between ranks (dropout masks).

    The model's initialisation (LoRA's random A) and the data order use the shared `seed` on every rank, so
    all ranks start from the same weights and split the same shuffled epoch.
    """
    return seed + dist.rank


def wrap_model(
    model, dist: Dist, fsdp: str | None = None, cpu_offload: bool = False, mixed_precision=None, load=None
):
    """DDP when several ranks and no FSDP; FSDP2 when `fsdp` is "full_shard" or "shard_grad_op".

    mixed_precision (FSDP only): a torch dtype the gathered parameters are cast to for compute (bf16), with
    gradients reduced in fp32 and the sharded master weights kept in their own dtype.
    load(model, device): fills a model built on the meta device (nanoft.weights.load_weights), called where
    the layout needs it: before DDP (which copies rank 0's weights), after FSDP has split the empty model
    (so each rank reads and holds its shards only). None: the model is loaded already.

    On CPU it also sets how the process's memory is managed, before the weights are read and the first
    matmul runs: freed memory kept for reuse (no fresh page faults each step), or under FSDP and under an
    address-space cap given back at once; the compiled matmul kernels bounded (nanoft/cpu_allocator.py).
    """
    if dist.device.type == "cpu":
        cpu_allocator.choose_for_run(sharded=fsdp not in (None, "none"))
    if fsdp in (None, "none"):
        if load is not None:
            load(model, dist.device)
        if dist.world_size == 1:
            return model
        # find_unused_parameters=False: every trainable parameter gets a gradient in every step, so DDP need
        # not walk the graph after each forward looking for ones that did not. broadcast_buffers=False: the
        # only buffer is the RoPE table, computed alike on every rank; broadcasting it would cost a
        # collective before every forward, and one a rank out of memory could leave the others waiting in.
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        return DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=False, broadcast_buffers=False
        )
    if fsdp not in FSDP_MODES:
        raise UserError(f"--fsdp {fsdp} is not a mode; choose one of {', '.join(FSDP_MODES)}")
    if dist.backend is None:
        raise UserError(
            f"--fsdp {fsdp} shards the model across processes but this run has one: "
            "start it with torchrun --nproc_per_node=N, or drop --fsdp"
        )
    model = shard_model(
        model,
        reshard_after_forward=fsdp == "full_shard",
        cpu_offload=cpu_offload,
        mixed_precision=mixed_precision,
    )
    if dist.device.type == "cpu":
        gather_one_unit_at_a_time(model)
    if load is not None:
        load(model, torch.device("cpu") if cpu_offload else dist.device)  # offloaded shards live on the host
        model.reset_rope(dist.device)  # a buffer, not sharded: where the compute is, offloaded or not
    return model


def shard_model(model, reshard_after_forward: bool, cpu_offload: bool, mixed_precision):
    """fully_shard the embedding and lm_head (one unit if tied), each decoder layer, then the root (the final
    norm, and a tied embedding that trains), in place. A model on the meta device stays there, sharded:
    nanoft.weights.load_weights then allocates and fills the shards."""
    prepare_4bit_linears_for_fsdp(model, mixed_precision)
    # FSDP2, unlike DDP, does not copy rank 0's weights to the others: broadcast the trainable ones made
    # before sharding (LoRA's adapters; weights still on meta come from the checkpoint on every rank), so a
    # rank that drew a different random LoRA initialisation cannot silently train a different model.
    for param in model.parameters():
        if param.requires_grad and not param.is_meta:
            torch_dist.broadcast(param.data, src=0)
    options = dict(
        reshard_after_forward=reshard_after_forward,
        mp_policy=MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
        if mixed_precision is not None
        else MixedPrecisionPolicy(),
        # Pinned memory makes the host-to-GPU copies asynchronous; there is nothing to pin without CUDA.
        offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        if cpu_offload
        else OffloadPolicy(),
    )
    # The vocabulary's weights, gathered at their end of the forward only: the embedding at the start, lm_head
    # at the loss (its cross_entropy method, registered so FSDP gathers around it as around a forward).
    embed, head = model.model.embed_tokens, model.lm_head
    if not model.config.tie_word_embeddings:
        fully_shard(embed, **options)
        fully_shard(head, **options)
        register_fsdp_forward_method(head, "cross_entropy")
    elif not embed.weight.requires_grad and reshard_after_forward and torch.__version__ >= (2, 13):
        # Tied and frozen (LoRA): one weight in two modules, one unit (FSDP2's group for a tied weight, which
        # since torch 2.13 may run only some of its modules' forwards), freed again after the lookup, whose
        # backward needs nothing from it. Tied and trained, it stays in the root, gathered for the whole
        # step, so that the lookup's gradient joins lm_head's in the one reduce-scatter.
        fully_shard([embed, head], **options)
        register_fsdp_forward_method(head, "cross_entropy")
        embed.register_forward_hook(lambda module, args, output: module.reshard())
        reshard_once_loss_backward_ran(head)
    for layer in model.model.layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def reshard_once_loss_backward_ran(head) -> None:
    """FSDP registers a unit's resharding after backward on the inputs of its first forward in a step: for a
    tied unit that is the lookup of token ids, which has no backward, so the weight gathered again for the
    loss's backward would stay gathered through every layer's. The loss's gradients come from its forward
    (nanoft/loss.py): free the weight as soon as the hidden states' gradient is through."""
    cross_entropy = head.cross_entropy

    def cross_entropy_then_reshard(x, *args):
        if x.requires_grad:
            x.register_hook(lambda grad: head.reshard())
        return cross_entropy(x, *args)

    head.cross_entropy = cross_entropy_then_reshard


def is_fsdp(model) -> bool:
    """True for a model wrap_model sharded: its forward is then a collective every rank must join."""
    return isinstance(model, FSDPModule)


@contextmanager
def local_gradients(model):
    """Run each micro-batch's forward and backward inside this; all_reduce_gradients after the last one.

    DDP: gradients add up on each rank (no_sync) and are all-reduced once per step, after every rank has
    said it did not run out of memory (nanoft/interruptions.py): inside the micro-batches no rank ever waits
    for another, so one that fails can retry with the rest instead of leaving them in a collective. The price
    is that the all-reduce no longer overlaps the last backward: small for LoRA's adapters; a full
    fine-tune's gradients are what FSDP is for.
    FSDP: gradients are reduce-scattered in every backward anyway. Deferring that would keep a full,
    unsharded gradient of every parameter on each rank until the last micro-batch, which is the memory
    FSDP is used to save; the sum of the sharded gradients is the same.
    """
    with model.no_sync() if isinstance(model, DistributedDataParallel) else nullcontext():
        yield


GRADIENT_BUCKET_BYTES = 64 * 2**20  # per all-reduce: the extra memory it needs, and few enough calls


def all_reduce_gradients(model, dist: Dist) -> None:
    """DDP: average the accumulated gradients over ranks, as DDP's own backward would have (a no-op for one
    process and for FSDP, whose gradients are reduced already). A gradient a rank lacks counts as zeros."""
    if not isinstance(model, DistributedDataParallel):
        return
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    bucket, bucket_bytes = [], 0
    for grad in (p.grad for p in trainable):
        if bucket and (bucket_bytes + grad.nbytes > GRADIENT_BUCKET_BYTES or grad.dtype != bucket[0].dtype):
            average_over_ranks(bucket, dist)
            bucket, bucket_bytes = [], 0
        bucket.append(grad)
        bucket_bytes += grad.nbytes
    if bucket:
        average_over_ranks(bucket, dist)


def average_over_ranks(tensors: list[torch.Tensor], dist: Dist) -> None:
    """In place, through one flat all-reduce."""
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
    flat /= dist.world_size
    for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        tensor.copy_(part.view_as(tensor))


def all_reduce_sum(tensor: torch.Tensor, dist: Dist) -> torch.Tensor:
    """The sum over ranks, a copy on the tensor's own device (the tensor itself when single process). A CPU
    tensor goes through gloo even beside NCCL: counts and flags that way never wait for the GPU."""
    if dist.backend is None:
        return tensor
    total = tensor.detach().clone()
    torch_dist.all_reduce(total, op=torch_dist.ReduceOp.SUM)
    return total


def any_rank(flag: bool, dist: Dist) -> bool:
    """True on every rank when `flag` is True on any (one all-reduce of a CPU tensor)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)]), dist).item())


def barrier(dist: Dist) -> None:
    """Return once every rank got here. A CPU all-reduce through gloo blocks until all joined; one on a GPU
    tensor (NCCL) would only queue the kernel and return at once."""
    all_reduce_sum(torch.zeros(1), dist)


def unwrap(model):
    """The Transformer inside DDP (FSDP2 shards the Transformer in place, so it is its own model)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def clip_grad_norm(model, max_norm: float) -> torch.Tensor:
    """Clip the trainable parameters' gradients to a global norm (0: no clipping, --grad-clip 0); returns
    that norm before clipping.

    Under FSDP the gradients are shards: the norm is computed across ranks and comes back as a DTensor,
    gathered here so every rank logs and checks the same plain number.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_state_dict(model, dist: Dist, trainable_only: bool) -> dict:
    """Every rank must call this (FSDP gathers shards); rank 0 gets {name: CPU tensor}, the others {}.

    Names are the model's own (Hugging Face's, plus lora.py's), without DDP's `module.` prefix.
    """
    model = unwrap(model)
    if trainable_only:
        # Straight from the parameters: torch's state-dict helpers walk the whole module state, and a
        # bitsandbytes int8 layer's (its SCB statistics) has entries they cannot resolve to attributes.
        state = {}
        for name, parameter in model.named_parameters():  # the same order on every rank: the gathers match
            if parameter.requires_grad:
                if hasattr(parameter, "full_tensor"):  # an FSDP shard (on the CPU when offloaded): gather it
                    parameter = parameter.to(dist.device).full_tensor()
                state[name] = parameter
    else:
        options = StateDictOptions(full_state_dict=True, cpu_offload=dist.backend is not None)
        state = get_model_state_dict(model, options=options)
    return {name: tensor.detach().cpu().clone() for name, tensor in state.items()} if dist.is_main else {}


def load_full_state_dict(model, state_dict: dict, dist: Dist) -> None:
    """Load a full_state_dict (all weights, or only the trainable ones) into a wrapped model.

    Only rank 0's `state_dict` is read; under torchrun it is broadcast and each rank keeps its shard, so the
    other ranks may pass {} (a checkpoint need not be on every node's disk).
    """
    options = StateDictOptions(
        full_state_dict=True, strict=False, broadcast_from_rank0=dist.backend is not None
    )
    set_model_state_dict(unwrap(model), state_dict, options=options)


def optimizer_state_dict(model, optimizer, dist: Dist) -> dict:
    """The optimizer's whole state keyed by parameter name, on rank 0 ({} elsewhere); every rank calls it.

    Keys are names rather than positions, so a checkpoint resumes under DDP, FSDP or one process alike.
    """
    # shard_grad_op keeps the weights a forward gathered until its backward, and evaluation has none; the
    # optimizer holds the sharded parameters, which torch matches by identity, so register them again.
    for module in unwrap(model).modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.backend is not None)
    state = get_optimizer_state_dict(unwrap(model), optimizer, options=options)
    return state if dist.is_main else {}


def load_optimizer_state_dict(model, optimizer, state_dict: dict, dist: Dist) -> None:
    """Restore optimizer_state_dict's result; as for load_full_state_dict only rank 0's copy is read."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.backend is not None)
    set_optimizer_state_dict(unwrap(model), optimizer, state_dict, options=options)


def gather_to_main(value, dist: Dist) -> list | None:
    """[value of rank 0, value of rank 1, ...] on rank 0, None elsewhere: e.g. each rank's RNG state."""
    if dist.backend is None:
        return [value]
    gathered = [None] * dist.world_size if dist.is_main else None
    torch_dist.gather_object(value, gathered, dst=0)
    return gathered


def scatter_from_main(values: list | None, dist: Dist):
    """Rank r gets values[r] from rank 0's list (other ranks pass None): gather_to_main's inverse."""
    if dist.backend is None:
        return values[0]
    received = [None]
    torch_dist.scatter_object_list(received, values if dist.is_main else None, src=0)
    return received[0]
