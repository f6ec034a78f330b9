"""Peak training memory per device, from the model's shapes: what nanoft/planner.py decides with.

    estimate = estimate_memory(config, TrainingShape("lora", micro_batch=4, seq_len=1024))
    estimate.total, estimate.activations, estimate.optimizer, ...      # bytes
    python bench/memory_estimate.py     # this estimate next to measured peaks, and for 7B / 13B / 34B

"Peak memory" is the high-water mark of live tensor memory during a training step under gradient
accumulation: the gradients of the previous micro-batches are held while the next one runs forward, and the
forward's end holds every saved activation plus one chunk of the loss. On CUDA that is what
torch.cuda.max_memory_allocated reports; on CPU it is the process's peak RSS above its RSS after importing
torch, with glibc returning freed blocks at once (bench/memory_estimate.py, tests/test_memory.py).

Precision follows nanoft/precision.py: LoRA and QLoRA keep the frozen base in the compute dtype (NF4 for
QLoRA's block linears) and fp32 adapters; a full fine-tune keeps fp32 master weights and runs under autocast.
"""

import math
from dataclasses import dataclass

import torch

from nanoft.cpu_attention import keeps_attention_probabilities, uses_matmul_attention
from nanoft.loss import rows_per_chunk
from nanoft.model import ModelConfig, cuda_sdpa_shares_kv_heads

GiB = 2**30
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# NF4 with double quantization: 4 bits per weight, an 8-bit absmax per 64-weight block, and an fp32 scale per
# 256 absmax values. Without double quantization the absmax is fp32: 0.5 + 4/64.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8, "adamw8bit": 2, "paged_adamw8bit": 2}  # m and v: fp32 or 8-bit
# Buffers the kernels keep between steps once they have run: on CPU, oneDNN's matmul scratch (measured
# ~25 MiB after one forward and backward of the 34M model in bench/); on CUDA the cuBLAS workspaces, which
# come from the same caching allocator as tensors.
RUNTIME_WORKSPACE = 32 * 2**20


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of a decoder block."""
    C, M = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {
        "q_proj": (C, q),
        "k_proj": (C, kv),
        "v_proj": (C, kv),
        "o_proj": (q, C),
        "gate_proj": (C, M),
        "up_proj": (C, M),
        "down_proj": (M, C),
    }


@dataclass
class ParameterCount:
    embedding: int
    block_linear: int  # the weights of q/k/v/o and the MLP in every layer: what QLoRA quantizes
    block_other: int  # norms and q/k/v biases
    final_norm: int
    lm_head: int  # 0 when tied to the embedding

    @property
    def total(self) -> int:
        return self.embedding + self.block_linear + self.block_other + self.final_norm + self.lm_head


def count_parameters(config: ModelConfig) -> ParameterCount:
    """From the shapes alone (equals sum(p.numel()) of nanoft's Transformer, a tied lm_head counted once)."""
    shapes = linear_shapes(config)
    biases = sum(shapes[name][1] for name in ("q_proj", "k_proj", "v_proj")) if config.attention_bias else 0
    per_layer_linear = sum(n_in * n_out for n_in, n_out in shapes.values())
    embedding = config.vocab_size * config.hidden_size
    return ParameterCount(
        embedding=embedding,
        block_linear=config.num_hidden_layers * per_layer_linear,
        block_other=config.num_hidden_layers * (2 * config.hidden_size + biases),
        final_norm=config.hidden_size,
        lm_head=0 if config.tie_word_embeddings else embedding,
    )


def lora_targets(targets) -> tuple[str, ...]:
    if targets == "all-linear" or list(targets) == ["all-linear"]:
        return LINEAR_NAMES
    return tuple(targets)


def lora_parameter_count(config: ModelConfig, targets, r: int) -> int:
    shapes = linear_shapes(config)
    return config.num_hidden_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in lora_targets(targets))


@dataclass
class TrainingShape:
    """What the memory estimate needs to know about a run."""

    method: str  # "full", "lora" or "qlora"
    micro_batch: int
    seq_len: int
    activation_checkpointing: bool = False
    compute_bytes: int = 2  # bf16/fp16; 4 on a CPU without native bf16 (nanoft/precision.py decides)
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_dropout: float = 0.05
    optim: str = "adamw"
    shards: int = 1  # FSDP: weights, gradients and optimizer states divided over this many devices
    cpu_offload: bool = False  # FSDP: the shards live in host memory; the device holds gathered layers
    ddp: bool = False  # DDP keeps a second copy of the gradients in its all-reduce buckets
    device_type: str = "cuda"
    packed: bool = False  # --pack: attention takes a (B, 1, T, T) mask (examples see only themselves)

    def __post_init__(self):
        self.lora_targets = lora_targets(self.lora_targets)


@dataclass
class MemoryEstimate:
    """Bytes per device at the peak of a training step; `activations` is at the shape's checkpointing."""

    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int  # the same micro-batch with activation checkpointing
    activations_full: int  # ... and without
    logits_loss: int
    workspace: int = RUNTIME_WORKSPACE
    host_offload: int = 0  # bytes in host memory under FSDP CPU offload (not in the total)

    @property
    def total(self) -> int:
        parts = (
            self.weights,
            self.adapters,
            self.gradients,
            self.optimizer,
            self.activations,
            self.logits_loss,
        )
        return sum(parts) + self.workspace


def layer_activation_bytes_per_token(config: ModelConfig, shape: TrainingShape) -> float:
    """Bytes one decoder layer keeps for backward per token: what autograd saves in nanoft's model.

    Derived by listing the tensors torch.autograd.graph.saved_tensors_hooks sees on a tiny model, and checked
    against that listing for all three methods in tests/test_memory.py. C hidden size, M MLP width, c bytes
    per compute-dtype element, r the residual stream's bytes per element (c; fp32 under autocast):
    - each of the two RMSNorms keeps its input as it came and one fp32 number per token: r C + 4 each;
    - attention: see `attention_bytes_per_token`;
    - SwiGLU keeps gate's and up's outputs (it recomputes silu(gate) in backward): 2 c M;
    - LoRA / QLoRA: a frozen linear keeps nothing (bitsandbytes' 4-bit matmul neither); the adapters' share
      is `lora_activation_bytes_per_token`;
    - full fine-tune, fp32 weights under autocast: autocast casts a norm's fp32 output once per linear that
      reads it (q, k, v: 3 cC; gate, up: 2 cC) and down_proj keeps its input (c M). Without autocast (fp32
      compute) each norm's output is one shared copy (4C, twice) and down_proj's input is 4M.
    """
    C, M, c = config.hidden_size, config.intermediate_size, shape.compute_bytes
    norms = 2 * (residual_bytes(shape) * C + 4)
    attention = attention_bytes_per_token(config, shape)
    mlp = 2 * c * M
    if shape.method == "full":
        if c < 4:
            return norms + 5 * c * C + attention + mlp + c * M
        return norms + 2 * 4 * C + attention + mlp + 4 * M
    return norms + attention + mlp + lora_activation_bytes_per_token(config, shape)


def residual_bytes(shape: TrainingShape) -> int:
    """The residual stream is fp32 under autocast (the fp32 embedding's output plus bf16 layer outputs)."""
    return 4 if shape.method == "full" else shape.compute_bytes


def attention_sizes(config: ModelConfig, shape: TrainingShape) -> tuple[int, int, int, int]:
    """(batch, heads, queries, keys) of a training step's attention."""
    return shape.micro_batch, config.num_attention_heads, shape.seq_len, shape.seq_len


def matmul_attention(config: ModelConfig, shape: TrainingShape) -> bool:
    """Whether the model computes attention with nanoft/cpu_attention.py's matmuls rather than SDPA."""
    return uses_matmul_attention(shape.device_type, shape.compute_bytes, *attention_sizes(config, shape))


def keeps_probabilities(config: ModelConfig, shape: TrainingShape) -> bool:
    """nanoft/cpu_attention.py keeps the softmax probabilities of short sequences for backward."""
    sizes = attention_sizes(config, shape)
    return matmul_attention(config, shape) and keeps_attention_probabilities(*sizes)


def attention_bytes_per_token(config: ModelConfig, shape: TrainingShape) -> float:
    """SDPA (on GPUs, and for long fp32 sequences on CPU) keeps q, k, v after RoPE, its output and an fp32
    logsumexp per head: c (2 H D + 2 KV D) + 4 H. nanoft's CPU attention keeps q (scaled, for short
    sequences), k and v, and for short sequences the softmax probabilities too, c H 3S/4 per token for S keys
    (it skips the masked quarter); long ones recompute them, keeping the bias (`attention_bias_bytes`).
    o_proj reads the output through a reshape: a view of CUDA flash attention's (B, T, H, D) output, a copy
    on CPU, kept when o_proj's weight or a dropout-free adapter on it trains."""
    H, KV, D, c = config.num_attention_heads, config.num_key_value_heads, config.head_dim, shape.compute_bytes
    o_input_kept = shape.method == "full" or ("o_proj" in shape.lora_targets and shape.lora_dropout == 0)
    o_input = c * H * D if o_input_kept and shape.device_type == "cpu" else 0
    if not matmul_attention(config, shape):
        if repeats_kv_heads(config, shape):  # SDPA keeps the repeated k and v
            KV = H
        return c * (2 * H * D + 2 * KV * D) + 4 * H + o_input
    probabilities = c * H * shape.seq_len * 3 / 4 if keeps_probabilities(config, shape) else 0
    return c * (H * D + 2 * KV * D) + probabilities + o_input


def repeats_kv_heads(config: ModelConfig, shape: TrainingShape) -> bool:
    """Whether the model gives SDPA on CUDA a copy of k and v per query head (nanoft/model.py: a mask or
    fp32 rule out the one fused kernel that shares them)."""
    if shape.device_type != "cuda" or config.num_key_value_heads == config.num_attention_heads:
        return False
    dtype = torch.float32 if shape.compute_bytes == 4 else torch.bfloat16
    return not cuda_sdpa_shares_kv_heads(dtype, config.head_dim, mask=True if shape.packed else None)


def attention_bias_bytes(config: ModelConfig, shape: TrainingShape) -> int:
    """CPU attention over long sequences keeps its (1, 1, T, T) causal bias, shared by the layers (packed
    batches have one per row: B x this). On a GPU a packed batch's (B, 1, T, T) boolean mask is turned into a
    bias in the compute dtype by every layer's SDPA call, and each keeps its own for backward."""
    T, B, c = shape.seq_len, shape.micro_batch, shape.compute_bytes
    if not matmul_attention(config, shape):
        return config.num_hidden_layers * B * T * T * c if shape.packed else 0
    if keeps_probabilities(config, shape):
        return 0
    return c * T * T * (B if shape.packed else 1)


def lora_activation_bytes_per_token(config: ModelConfig, shape: TrainingShape) -> int:
    shapes, c, r = linear_shapes(config), shape.compute_bytes, shape.lora_r
    if shape.lora_dropout > 0:
        return sum((dropout_mask_bytes(shape) + c) * shapes[t][0] + c * r for t in shape.lora_targets)
    input_groups = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "o_proj": "sdpa"}
    input_groups |= {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "product"}
    # o_proj's input is attention's output, counted by attention_bytes_per_token
    group_width = {"attention": config.hidden_size, "sdpa": 0, "mlp": config.hidden_size}
    group_width["product"] = config.intermediate_size
    kept_inputs = {input_groups[t] for t in shape.lora_targets}
    return sum(c * group_width[group] for group in kept_inputs) + len(shape.lora_targets) * c * r


def dropout_mask_bytes(shape: TrainingShape) -> int:
    """CUDA's fused dropout keeps a bool mask; the CPU kernel keeps a mask in the input's dtype."""
    if shape.lora_dropout == 0:
        return 0
    return shape.compute_bytes if shape.device_type == "cpu" else 1


def activation_bytes(config: ModelConfig, shape: TrainingShape, checkpointing: bool) -> int:
    """Everything autograd keeps for backward at the end of a micro-batch's forward."""
    tokens, layers, C = shape.micro_batch * shape.seq_len, config.num_hidden_layers, config.hidden_size
    residual = residual_bytes(shape)
    per_layer = layer_activation_bytes_per_token(config, shape)
    final_norm = residual * C + 4
    rope = 2 * shape.compute_bytes * config.head_dim  # cos and sin, shared by the layers
    loss = residual * C + 1  # the loss keeps dL/dhidden (computed in its forward) and the target mask
    embedding_indices = 8 if shape.method == "full" else 0
    if checkpointing:  # only each layer's input is kept; backward recomputes one layer at a time
        layer_bytes = layers * residual * C + per_layer
    else:
        layer_bytes = layers * per_layer - first_layer_saving(config, shape)
    per_token = layer_bytes + final_norm + rope + loss + embedding_indices
    return math.ceil(per_token * tokens) + attention_bias_bytes(config, shape)


def first_layer_saving(config: ModelConfig, shape: TrainingShape) -> int:
    """With a frozen embedding the first layer's input needs no gradient, so what serves only that gradient
    is not kept there: the input norm's input, the dropout masks of adapters on q/k/v and, in the CPU
    attention that keeps probabilities, the scaled q when k has no adapter (it serves k's gradient). For
    targets that adapt q or k."""
    if shape.method == "full":
        return 0
    C, c = config.hidden_size, shape.compute_bytes
    attention_targets = [t for t in shape.lora_targets if t in ("q_proj", "k_proj", "v_proj")]
    saving = c * C + 4 + dropout_mask_bytes(shape) * C * len(attention_targets)
    if keeps_probabilities(config, shape) and "k_proj" not in shape.lora_targets:
        saving += c * config.num_attention_heads * config.head_dim
    return saving


def estimate_memory(config: ModelConfig, shape: TrainingShape) -> MemoryEstimate:
    """Peak bytes per device of a training step of `shape` (the module docstring says which peak)."""
    params = count_parameters(config)
    c, tokens, layers = shape.compute_bytes, shape.micro_batch * shape.seq_len, config.num_hidden_layers
    matmul_params = params.block_linear + (params.lm_head or params.embedding)
    if shape.method == "full":
        # fp32 master weights, plus the compute-dtype copies autocast caches for every matmul weight until
        # backward has used them.
        weights = 4 * params.total + (c * matmul_params if c < 4 else 0)
        trainable, adapters = params.total, 0
    else:
        linear_bytes = NF4_BYTES_PER_PARAM if shape.method == "qlora" else c
        weights = math.ceil(linear_bytes * params.block_linear) + c * (params.total - params.block_linear)
        trainable = lora_parameter_count(config, shape.lora_targets, shape.lora_r)
        # fp32 adapters, and the compute-dtype copies lora.py casts them to for each forward.
        adapters = (4 + (c if c < 4 else 0)) * trainable
    gradients = 4 * trainable * (2 if shape.ddp else 1)
    optimizer = OPTIMIZER_BYTES_PER_PARAM[shape.optim] * trainable

    activations_full = activation_bytes(config, shape, checkpointing=False)
    activations_checkpointed = activation_bytes(config, shape, checkpointing=True)
    activations = activations_checkpointed if shape.activation_checkpointing else activations_full

    # One chunk of logits at a time (nanoft/loss.py), kept in the compute dtype: the logits and their softmax,
    # 2 c bytes per logit at the peak (measured; fp16 keeps fp32 logits, ~10 bytes, not modelled). A trained
    # lm_head adds its fp32 gradient, built in the forward, and the compute-dtype + fp32 copies of each
    # chunk's contribution to it.
    chunk_logits = min(tokens, rows_per_chunk(config.vocab_size, shape.method == "full")) * config.vocab_size
    logits_loss = 2 * c * chunk_logits
    if shape.method == "full":
        lm_head = params.lm_head or params.embedding
        logits_loss += 4 * lm_head + (c + 4 if c < 4 else 4) * lm_head

    host_offload = 0
    if shape.shards > 1 or shape.cpu_offload:
        # FSDP keeps 1/shards of the weights, gradients and optimizer states on each device. It all-gathers a
        # decoder layer just before using it, prefetching the next (two layers in full), and keeps the root's
        # embedding and lm_head gathered; its mixed precision casts what it gathers, so no autocast copies.
        stored = 4 * params.total if shape.method == "full" else weights
        gathered_linear = NF4_BYTES_PER_PARAM if shape.method == "qlora" else c
        gathered = math.ceil(2 * gathered_linear * params.block_linear / layers)
        gathered += c * (params.embedding + params.lm_head)
        sharded = [math.ceil(x / shape.shards) for x in (stored, adapters, gradients, optimizer)]
        if shape.cpu_offload:
            host_offload = sum(sharded)
            weights, adapters, gradients, optimizer = gathered, 0, 0, 0
        else:
            weights, adapters, gradients, optimizer = sharded[0] + gathered, *sharded[1:]
    return MemoryEstimate(
        weights=weights,
        adapters=adapters,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        activations_checkpointed=activations_checkpointed,
        activations_full=activations_full,
        logits_loss=logits_loss,
        host_offload=host_offload,
    )
