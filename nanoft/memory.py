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
LoRA's modules_to_save train in place, in the base's compute dtype (as PEFT's copies do in a bf16 model), so
their gradients and AdamW moments are in that dtype too; DoRA's magnitudes are fp32 adapters.
"""

import math
from dataclasses import dataclass

import torch

from nanoft.cpu_attention import keeps_attention_probabilities, uses_matmul_attention
from nanoft.errors import UserError
from nanoft.loss import rows_per_chunk
from nanoft.model import ModelConfig, cuda_sdpa_shares_kv_heads

GiB = 2**30
# NF4 with double quantization: 4 bits per weight, an 8-bit absmax per 64-weight block, and an fp32 scale per
# 256 absmax values. Without double quantization the absmax is fp32: 0.5 + 4/64.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8, "adamw8bit": 2, "paged_adamw8bit": 2}  # m and v: fp32 or 8-bit
# Buffers the kernels keep between steps once they have run: on CPU, oneDNN's matmul scratch (measured
# ~25 MiB after one forward and backward of the 34M model in bench/); on CUDA the cuBLAS workspaces, which
# come from the same caching allocator as tensors.
RUNTIME_WORKSPACE = 32 * 2**20


# The block linears under self_attn and under mlp (modules_to_save may name either whole), fused or not.
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "gate_up_proj", "down_proj")


def linear_shapes(config: ModelConfig, has_experts: bool = False) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of a decoder block; with `has_experts`, of a mixture
    of experts' block: the router `gate` and each expert's linears (one of each per expert)."""
    C, M = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    if has_experts:
        expert_width = config.moe_intermediate_size or M
        gate, up, down = config.expert_projection_names
        attention = {"q_proj": (C, q), "k_proj": (C, kv), "v_proj": (C, kv), "o_proj": (q, C)}
        experts = {gate: (C, expert_width), up: (C, expert_width), down: (expert_width, C)}
        return attention | {"gate": (C, config.num_experts)} | experts
    if config.fused_projections:
        return {
            "qkv_proj": (C, q + 2 * kv),
            "o_proj": (q, C),
            "gate_up_proj": (C, 2 * M),
            "down_proj": (M, C),
        }
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
    block_linear: int  # the weights of q/k/v/o and the MLP (all experts) in every layer: what QLoRA quantizes
    block_other: int  # norms (q/k norms too), attention biases and mixture-of-experts routers
    final_norm: int
    lm_head: int  # 0 when tied to the embedding
    # Of block_linear, what each token passes through: all of it, but only k experts of a mixture of experts.
    block_linear_active: int

    @property
    def total(self) -> int:
        return self.embedding + self.block_linear + self.block_other + self.final_norm + self.lm_head

    @property
    def active(self) -> int:
        """The parameters one token uses (the "A3B" of Qwen3-30B-A3B; counts the embedding, as Mistral's
        12.9B for Mixtral 8x7B does)."""
        return self.total - self.block_linear + self.block_linear_active


def count_parameters(config: ModelConfig) -> ParameterCount:
    """From the shapes alone (equals sum(p.numel()) of nanoft's Transformer, a tied lm_head counted once)."""
    C = config.hidden_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    biases = (q + 2 * kv if config.attention_bias else 0) + (C if config.attention_output_bias else 0)
    norms = C * block_norms(config) + {None: 0, "head": 2 * config.head_dim, "width": q + kv}[config.qk_norm]
    block_linear = block_linear_active = routers = 0
    for layer in range(config.num_hidden_layers):
        shapes = linear_shapes(config, config.has_experts(layer))
        if "gate" in shapes:  # a mixture of experts' layer: its router is kept apart (not quantized)
            router, experts = shapes.pop("gate"), config.expert_projection_names
            routers += router[0] * router[1]
            expert = sum(n_in * n_out for name, (n_in, n_out) in shapes.items() if name in experts)
            attention = sum(n_in * n_out for name, (n_in, n_out) in shapes.items() if name not in experts)
            block_linear += attention + config.num_experts * expert
            block_linear_active += attention + config.num_experts_per_tok * expert
        else:
            linear = sum(n_in * n_out for n_in, n_out in shapes.values())
            block_linear, block_linear_active = block_linear + linear, block_linear_active + linear
    embedding = config.vocab_size * C
    return ParameterCount(
        embedding=embedding,
        block_linear=block_linear,
        block_other=config.num_hidden_layers * (norms + biases) + routers,
        final_norm=config.hidden_size,
        lm_head=0 if config.tie_word_embeddings else embedding,
        block_linear_active=block_linear_active,
    )


def block_norms(config: ModelConfig) -> int:
    """hidden_size-wide RMSNorms in a decoder layer: 2 (Llama: before attention and MLP; OLMo 2: after), 4
    (Gemma 2/3: before and after each)."""
    return 4 if config.norm_placement == "sandwich" else 2


def lora_targets(config: ModelConfig, targets) -> tuple[str, ...]:
    """The linear layers `targets` names; "all-linear" is every linear of the family's block (of a mixture of
    experts: all but the router, as lora.py does)."""
    kinds = {config.has_experts(layer) for layer in range(config.num_hidden_layers)}
    names = tuple(dict.fromkeys(name for kind in sorted(kinds) for name in linear_shapes(config, kind)))
    if targets == "all-linear" or list(targets) == ["all-linear"]:
        return tuple(name for name in names if name != "gate" or not config.num_experts)
    if unknown := [target for target in targets if target not in names]:
        raise unknown_targets_error(unknown, names)
    return tuple(targets)


def unknown_targets_error(unknown: list[str], names) -> UserError:
    """LoRA targets that name no linear layer of the blocks (`names`)."""
    layers = ", ".join(sorted(names))
    hint = " (this family fuses q, k, v into qkv_proj and gate, up into gate_up_proj)"
    fused = hint if "qkv_proj" in names else ""
    return UserError(f"LoRA targets {unknown} are not linear layers of the decoder blocks ({layers}){fused}")


def lora_parameter_count(config: ModelConfig, targets, r: int, use_dora: bool = False) -> int:
    """A and B of every adapted layer (of each expert, on a mixture of experts' experts), and with DoRA its
    magnitude vector (one number per output row)."""
    targets, count = lora_targets(config, targets), 0
    for layer in range(config.num_hidden_layers):
        has_experts = config.has_experts(layer)
        shapes = linear_shapes(config, has_experts)
        for target in (t for t in targets if t in shapes):
            copies = config.num_experts if has_experts and target in config.expert_projection_names else 1
            n_in, n_out = shapes[target]
            count += copies * (r * (n_in + n_out) + use_dora * n_out)
    return count


@dataclass
class SavedModules:
    """What LoRA's modules_to_save (trained whole) hold, and whether the embedding and lm_head train."""

    parameters: int  # a tied embedding / lm_head pair counted once
    block_linear: int  # of those, weights of block linears (a 4-bit base keeps them unquantized)
    embedding: bool  # embed_tokens trains (or lm_head tied to it)
    lm_head: bool  # lm_head trains (or embed_tokens tied to it)


def saved_modules(config: ModelConfig, names) -> SavedModules:
    """Count modules_to_save by PEFT's names (lora.matches' rule: a module's name or its last part)."""
    C, layers, shapes = config.hidden_size, config.num_hidden_layers, linear_shapes(config)
    with_bias = ("q_proj", "k_proj", "v_proj", "qkv_proj") if config.attention_bias else ()
    linear = {
        name: n_in * n_out + (n_out if name in with_bias else 0) for name, (n_in, n_out) in shapes.items()
    }
    linear["self_attn"] = sum(n for name, n in linear.items() if name in ATTENTION_LINEARS)
    linear["mlp"] = sum(n for name, n in linear.items() if name in MLP_LINEARS)
    names = {name.rpartition(".")[2] for name in names}
    tied = config.tie_word_embeddings
    embedding = "embed_tokens" in names or (tied and "lm_head" in names)
    lm_head = "lm_head" in names or (tied and "embed_tokens" in names)
    vocabulary = config.vocab_size * C * (embedding + lm_head if not tied else embedding)
    block_linear = layers * sum(linear[name] for name in names if name in linear)
    norms = C * ("norm" in names) + layers * C * len(names & {"input_layernorm", "post_attention_layernorm"})
    return SavedModules(vocabulary + block_linear + norms, block_linear, embedding, lm_head)


@dataclass
class TrainingShape:
    """What the memory estimate needs to know about a run."""

    method: str  # "full", "lora" or "qlora"
    micro_batch: int
    seq_len: int
    activation_checkpointing: bool = False
    compute_bytes: int = 2  # bf16/fp16; 4 on a CPU without native bf16 (nanoft/precision.py decides)
    lora_r: int = 16
    lora_targets: tuple[str, ...] | str = ("q_proj", "v_proj")  # or "all-linear" (lora_targets resolves it)
    lora_dropout: float = 0.05
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()  # trained whole beside the adapters (LoRA / QLoRA)
    optim: str = "adamw"
    shards: int = 1  # FSDP: weights, gradients and optimizer states divided over this many devices
    cpu_offload: bool = False  # FSDP: the shards live in host memory; the device holds gathered layers
    ddp: bool = False  # DDP keeps a second copy of the gradients in its all-reduce buckets
    device_type: str = "cuda"
    packed: bool = False  # --pack: attention takes a (B, 1, T, T) mask (examples see only themselves)


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
    dora_norm: int = 0  # DoRA's fp32 W + s B A of one adapted layer, while it computes the rows' norms
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
            self.dora_norm,
        )
        return sum(parts) + self.workspace


def layer_activation_bytes_per_token(config: ModelConfig, shape: TrainingShape, has_experts=False) -> float:
    """Bytes one decoder layer (`has_experts`: a mixture of experts' layer) keeps for backward per token: what
    autograd saves in nanoft's model.

    Derived by listing the tensors torch.autograd.graph.saved_tensors_hooks sees on tiny models of each kind
    of block, and checked against that listing for all three methods in tests/test_memory.py. C hidden size,
    M MLP width, c bytes per compute-dtype element, r the residual stream's bytes per element (c; fp32 under
    autocast):
    - each RMSNorm keeps its input as it came and one fp32 number per token: r C + 4 for a norm before a
      branch (it reads the residual stream), c C + 4 for one after it (Gemma 2/3, OLMo 2);
    - attention: see `attention_bytes_per_token`;
    - the gated MLP keeps gate's and up's outputs (it recomputes act(gate) in backward): 2 c M; a mixture of
      experts: `experts_bytes_per_token`;
    - LoRA / QLoRA: a frozen linear keeps nothing (bitsandbytes' 4-bit matmul neither); the adapters' share
      is `lora_activation_bytes_per_token`;
    - full fine-tune, fp32 weights under autocast: autocast casts the fp32 input of attention and of the MLP
      once per linear that reads it (q, k, v: 3 cC, or 1 for Phi-3's fused qkv_proj; gate, up: 2 cC, or 1)
      and down_proj keeps its input (c M). Without autocast (fp32 compute) each input is one shared copy
      (4C, twice) and down_proj's input is 4M.
    """
    C, M, c, r = config.hidden_size, config.intermediate_size, shape.compute_bytes, residual_bytes(shape)
    after = 0 if config.norm_placement == "pre" else 2
    norms = (block_norms(config) - after) * (r * C + 4) + after * (c * C + 4)
    attention = attention_bytes_per_token(config, shape)
    mlp = experts_bytes_per_token(config, shape) if has_experts else 2 * c * M
    down_input = 0 if has_experts else c * M  # (the experts count their own)
    if shape.method == "full":
        if c < 4:
            attention_readers, mlp_readers = (1, 1) if config.fused_projections else (3, 2)
            mlp_readers = 1 if has_experts else mlp_readers  # the router; the experts count their own
            return norms + (attention_readers + mlp_readers) * c * C + attention + mlp + down_input
        return norms + 2 * 4 * C + attention + mlp + (0 if has_experts else 4 * M)
    return (
        norms
        + attention
        + mlp
        + lora_activation_bytes_per_token(config, shape, has_experts)
        + dora_bytes_per_token(config, shape)
    )


def adapted_shapes(config: ModelConfig, shape: TrainingShape) -> list[tuple[int, int]]:
    """(in, out) of the adapted linears of a dense block (DoRA's terms below; not on experts)."""
    shapes = linear_shapes(config)
    return [shapes[t] for t in lora_targets(config, shape.lora_targets) if t in shapes]


def dora_bytes_per_token(config: ModelConfig, shape: TrainingShape) -> int:
    """DoRA (lora.py) scales the base output and the update by m / ||W + s B A||: both (out wide) are kept for
    the magnitudes' gradient."""
    if not shape.use_dora or shape.method == "full":
        return 0
    return sum(2 * shape.compute_bytes * n_out for _, n_out in adapted_shapes(config, shape))


def dora_dequantized_weight_bytes(config: ModelConfig, shape: TrainingShape) -> int:
    """DoRA with dropout on a 4-bit base multiplies dropout(x) by the dequantized weight, which autograd keeps
    for backward: per adapted layer, the whole weight in the compute dtype (as PEFT does)."""
    if not (shape.use_dora and shape.method == "qlora" and shape.lora_dropout > 0):
        return 0
    return sum(shape.compute_bytes * n_in * n_out for n_in, n_out in adapted_shapes(config, shape))


def experts_bytes_per_token(config: ModelConfig, shape: TrainingShape) -> float:
    """A mixture of experts' layer (nanoft/moe.py), per token: routing keeps the fp32 probabilities (4 E), the
    top-k's sum (4) and for each of its k choices 32 bytes (its expert's index, its weight, its place in the
    grouped order, its token, the weight gathered in that order). Each choice runs one expert, which keeps
    gate's and up's outputs (2 c M for the expert's width M); the weighting keeps the expert's output (c C)
    and index_add its weighted copy (in the residual stream's dtype). A full fine-tune's experts also keep
    down_proj's input (c M) and their linears' inputs (under autocast one cast copy for gate and one for up,
    2 c C; fp32: one shared, 4 C)."""
    C, E, k, c = config.hidden_size, config.num_experts, config.num_experts_per_tok, shape.compute_bytes
    M = config.moe_intermediate_size or config.intermediate_size
    r = residual_bytes(shape) if shape.method == "full" else c  # a frozen base computes in the compute dtype
    per_choice = 2 * c * M + c * C + r * C
    if shape.method == "full":
        per_choice += c * M + (2 * c * C if c < 4 else 4 * C)
    return 4 * E + 4 + k * (32 + per_choice)


def residual_bytes(shape: TrainingShape) -> int:
    """The residual stream is fp32 under autocast (the fp32 embedding's output plus bf16 layer outputs)."""
    return 4 if shape.method == "full" else shape.compute_bytes


def attention_sizes(config: ModelConfig, shape: TrainingShape) -> tuple[int, int, int, int]:
    """(batch, heads, queries, keys) of a training step's attention."""
    return shape.micro_batch, config.num_attention_heads, shape.seq_len, shape.seq_len


def matmul_attention(config: ModelConfig, shape: TrainingShape) -> bool:
    """Whether the model computes attention with nanoft/cpu_attention.py's matmuls rather than SDPA: where
    they are faster, and always for soft-capped scores (Gemma 2), which SDPA cannot do."""
    if config.attn_logit_softcapping is not None:
        return True
    return uses_matmul_attention(shape.device_type, shape.compute_bytes, *attention_sizes(config, shape))


def keeps_probabilities(config: ModelConfig, shape: TrainingShape) -> bool:
    """nanoft/cpu_attention.py keeps the softmax probabilities of short sequences for backward."""
    sizes = attention_sizes(config, shape)
    return matmul_attention(config, shape) and keeps_attention_probabilities(*sizes)


def attention_bytes_per_token(config: ModelConfig, shape: TrainingShape) -> float:
    """SDPA (on GPUs, and for long fp32 sequences on CPU) keeps q, k, v after RoPE, its output and an fp32
    logsumexp per head: c (2 H D + 2 KV D) + 4 H. nanoft's CPU attention keeps q (scaled, for short
    sequences), k and v, and for short sequences the softmax probabilities too, c H 3S/4 per token for S keys
    (it skips the masked quarter), and as much again for soft-capped scores (their tanh); long ones recompute
    them, keeping the bias (`attention_bias_bytes`). q/k norms (Qwen3, Gemma 3, OLMo 2) keep q and k as
    projected, and an fp32 number per row they normalise.
    o_proj reads the output through a reshape: a view of CUDA flash attention's (B, T, H, D) output, a copy
    on CPU, kept when o_proj's weight or a dropout-free adapter on it trains."""
    H, KV, D, c = config.num_attention_heads, config.num_key_value_heads, config.head_dim, shape.compute_bytes
    adapted_o = shape.method != "full" and "o_proj" in lora_targets(config, shape.lora_targets)
    o_input_kept = shape.method == "full" or (adapted_o and shape.lora_dropout == 0)
    o_input = c * H * D if o_input_kept and shape.device_type == "cpu" else 0
    qk_norm = 0
    if config.qk_norm is not None:
        qk_norm = c * (H + KV) * D + 4 * ((H + KV) if config.qk_norm == "head" else 2)
    if not matmul_attention(config, shape):
        if repeats_kv_heads(config, shape):  # SDPA keeps the repeated k and v
            KV = H
        return c * (2 * H * D + 2 * KV * D) + 4 * H + o_input + qk_norm
    probabilities = 0
    if keeps_probabilities(config, shape):
        copies = 1 if config.attn_logit_softcapping is None else 2
        probabilities = copies * c * H * shape.seq_len * 3 / 4
    return c * (H * D + 2 * KV * D) + probabilities + o_input + qk_norm


def repeats_kv_heads(config: ModelConfig, shape: TrainingShape) -> bool:
    """Whether the model gives SDPA on CUDA a copy of k and v per query head (nanoft/model.py: a mask or
    fp32 rule out the one fused kernel that shares them)."""
    if shape.device_type != "cuda" or config.num_key_value_heads == config.num_attention_heads:
        return False
    dtype = torch.float32 if shape.compute_bytes == 4 else torch.bfloat16
    return not cuda_sdpa_shares_kv_heads(dtype, config.head_dim, mask=True if shape.packed else None)


def attention_bias_bytes(config: ModelConfig, shape: TrainingShape) -> int:
    """CPU attention over long sequences keeps its (1, 1, T, T) causal bias, shared by the layers (packed
    batches have one per row: B x this), and one more for sliding layers when the window is shorter. On a
    GPU a packed batch's (B, 1, T, T) boolean mask is turned into a bias in the compute dtype by every layer's
    SDPA call, and each keeps its own for backward."""
    T, B, c = shape.seq_len, shape.micro_batch, shape.compute_bytes
    if not matmul_attention(config, shape):
        return config.num_hidden_layers * B * T * T * c if shape.packed else 0
    if keeps_probabilities(config, shape):
        return 0
    windowed = config.sliding_window is not None and "sliding_attention" in config.layer_types
    masks = 2 if windowed and config.sliding_window < T else 1
    return masks * c * T * T * (B if shape.packed else 1)


def lora_activation_bytes_per_token(config: ModelConfig, shape: TrainingShape, has_experts=False) -> int:
    """What the adapters keep per token: their input, where the base does not keep it (or its dropped-out
    copy and mask), and the rank-r product. An adapted expert's share is that of the k tokens it sees."""
    shapes, c, r = linear_shapes(config, has_experts), shape.compute_bytes, shape.lora_r
    targets = [t for t in lora_targets(config, shape.lora_targets) if t in shapes]
    experts = config.expert_projection_names if has_experts else ()
    adapted_experts = [t for t in targets if t in experts]
    targets = [t for t in targets if t not in experts]
    expert_bytes = 0
    if adapted_experts and shape.lora_dropout > 0:
        expert_bytes = sum((dropout_mask_bytes(shape) + c) * shapes[t][0] + c * r for t in adapted_experts)
    elif adapted_experts:  # gate and up read the expert's grouped input, down the gated product
        gate, up, down = experts
        grouped_input = c * shapes[gate][0] if {gate, up} & set(adapted_experts) else 0
        product = c * shapes[down][0] if down in adapted_experts else 0
        expert_bytes = grouped_input + product + len(adapted_experts) * c * r
    if shape.lora_dropout > 0:
        dense = sum((dropout_mask_bytes(shape) + c) * shapes[t][0] + c * r for t in targets)
        return dense + config.num_experts_per_tok * expert_bytes
    input_groups = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "o_proj": "sdpa"}
    input_groups |= {"qkv_proj": "attention", "gate_up_proj": "mlp", "gate": "mlp"}
    input_groups |= {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "product"}
    # o_proj's input is attention's output, counted by attention_bytes_per_token
    group_width = {"attention": config.hidden_size, "sdpa": 0, "mlp": config.hidden_size}
    group_width["product"] = config.intermediate_size
    kept_inputs = {input_groups[t] for t in targets}
    dense = sum(c * group_width[group] for group in kept_inputs) + len(targets) * c * r
    return dense + config.num_experts_per_tok * expert_bytes


def dropout_mask_bytes(shape: TrainingShape) -> int:
    """CUDA's fused dropout keeps a bool mask; the CPU kernel keeps a mask in the input's dtype."""
    if shape.lora_dropout == 0:
        return 0
    return shape.compute_bytes if shape.device_type == "cpu" else 1


def activation_bytes(config: ModelConfig, shape: TrainingShape, checkpointing: bool) -> int:
    """Everything autograd keeps for backward at the end of a micro-batch's forward."""
    tokens, layers, C = shape.micro_batch * shape.seq_len, config.num_hidden_layers, config.hidden_size
    residual = residual_bytes(shape)
    per_layer = [
        layer_activation_bytes_per_token(config, shape, config.has_experts(i)) for i in range(layers)
    ]
    final_norm = residual * C + 4
    # cos and sin, shared by the layers: one pair per RoPE base (Gemma 3's local and global layers)
    ropes = 2 if config.rope_local_base_freq is not None and "sliding_attention" in config.layer_types else 1
    rope = ropes * 2 * shape.compute_bytes * config.rotary_dim
    loss = residual * C + 1  # the loss keeps dL/dhidden (computed in its forward) and the target mask
    embedding_indices = 8 if trains_embedding(config, shape) else 0
    dequantized = dora_dequantized_weight_bytes(config, shape)  # per layer, whatever the tokens
    if checkpointing:  # only each layer's input is kept; backward recomputes one layer at a time
        layer_bytes = layers * residual * C + max(per_layer)
    else:
        layer_bytes = sum(per_layer) - first_layer_saving(config, shape)
        dequantized *= layers - (not trains_embedding(config, shape))  # the first layer's input needs no grad
    per_token = layer_bytes + final_norm + rope + loss + embedding_indices
    return math.ceil(per_token * tokens) + attention_bias_bytes(config, shape) + dequantized


def trains_embedding(config: ModelConfig, shape: TrainingShape) -> bool:
    return shape.method == "full" or saved_modules(config, shape.modules_to_save).embedding


def trains_lm_head(config: ModelConfig, shape: TrainingShape) -> bool:
    return shape.method == "full" or saved_modules(config, shape.modules_to_save).lm_head


def first_layer_saving(config: ModelConfig, shape: TrainingShape) -> int:
    """With a frozen embedding the first layer's input needs no gradient, so what serves only that gradient
    is not kept there: the input norm's input, the dropout masks of adapters on q/k/v, what a q/k norm keeps
    for a q or k without an adapter and, in the CPU attention that keeps probabilities, the scaled q when k
    has no adapter (it serves k's gradient). For targets that adapt q or k."""
    if trains_embedding(config, shape):  # the first layer's input needs its gradient after all
        return 0
    C, c, H, KV, D = (
        config.hidden_size, shape.compute_bytes, config.num_attention_heads, config.num_key_value_heads,
        config.head_dim,
    )  # fmt: skip
    targets = lora_targets(config, shape.lora_targets)
    attention_targets = [t for t in targets if t in ("q_proj", "k_proj", "v_proj", "qkv_proj")]
    saving = dropout_mask_bytes(shape) * C * len(attention_targets)
    if config.norm_placement != "post":
        saving += c * C + 4
    adapted = {name: f"{name}_proj" in targets or "qkv_proj" in targets for name in ("q", "k")}
    if config.qk_norm is not None:
        rows = {"q": H, "k": KV} if config.qk_norm == "head" else {"q": 1, "k": 1}
        heads = {"q": H, "k": KV}
        saving += sum(c * heads[n] * D + 4 * rows[n] for n in ("q", "k") if not adapted[n])
    if keeps_probabilities(config, shape) and not adapted["k"]:
        saving += c * H * D
    return saving


def estimate_memory(config: ModelConfig, shape: TrainingShape) -> MemoryEstimate:
    """Peak bytes per device of a training step of `shape` (the module docstring says which peak)."""
    params = count_parameters(config)
    c, tokens, layers = shape.compute_bytes, shape.micro_batch * shape.seq_len, config.num_hidden_layers
    matmul_params = params.block_linear + (params.lm_head or params.embedding)
    saved = saved_modules(
        config, shape.modules_to_save
    )  # LoRA's: trained whole, in place, in the compute dtype
    if shape.method == "full":
        # fp32 master weights, plus the compute-dtype copies autocast caches for every matmul weight until
        # backward has used them.
        weights = 4 * params.total + (c * matmul_params if c < 4 else 0)
        trainable, adapters = params.total, 0
    else:
        linear_bytes = NF4_BYTES_PER_PARAM if shape.method == "qlora" else c
        quantized = params.block_linear - saved.block_linear  # train.py keeps modules_to_save unquantized
        weights = math.ceil(linear_bytes * quantized) + c * (params.total - quantized)
        trainable = lora_parameter_count(config, shape.lora_targets, shape.lora_r, shape.use_dora)
        # fp32 adapters, and the compute-dtype copies lora.py casts them to for each forward.
        adapters = (4 + (c if c < 4 else 0)) * trainable
    gradients = 4 * trainable * (2 if shape.ddp else 1)
    optimizer = OPTIMIZER_BYTES_PER_PARAM[shape.optim] * trainable
    if shape.method != "full":  # modules_to_save: gradients and AdamW moments in the weights' dtype
        gradients += c * saved.parameters * (2 if shape.ddp else 1)
        moments = 2 * c if shape.optim == "adamw" else OPTIMIZER_BYTES_PER_PARAM[shape.optim]
        optimizer += moments * saved.parameters

    activations_full = activation_bytes(config, shape, checkpointing=False)
    activations_checkpointed = activation_bytes(config, shape, checkpointing=True)
    activations = activations_checkpointed if shape.activation_checkpointing else activations_full

    # One chunk of logits at a time (nanoft/loss.py), kept in the compute dtype: the logits and their softmax,
    # 2 c bytes per logit at the peak (measured; fp16 keeps fp32 logits, ~10 bytes, not modelled). A trained
    # lm_head adds its fp32 gradient, built in the forward, and the compute-dtype + fp32 copies of each
    # chunk's contribution to it.
    lm_head_trains = trains_lm_head(config, shape)
    chunk_logits = min(tokens, rows_per_chunk(config.vocab_size, lm_head_trains)) * config.vocab_size
    logits_loss = 2 * c * chunk_logits
    if lm_head_trains:
        lm_head = params.lm_head or params.embedding
        logits_loss += 4 * lm_head + (c + 4 if c < 4 else 4) * lm_head

    # DoRA's row norms (lora.py's weight_norm): one (out, in) fp32 matrix, of one adapted layer at a time.
    adapted = [n_in * n_out for n_in, n_out in adapted_shapes(config, shape)]
    dora_norm = 4 * max(adapted, default=0) if shape.use_dora and shape.method != "full" else 0

    host_offload = 0
    if shape.shards > 1 or shape.cpu_offload:
        # FSDP keeps 1/shards of the weights, gradients and optimizer states on each device. It all-gathers a
        # decoder layer just before using it, prefetching the next (two layers in full), and lm_head at the
        # loss, with one layer; a tied embedding that trains stays gathered all along in the root unit
        # (distributed.shard_model). Its mixed precision casts what it gathers, so no autocast copies.
        stored = 4 * params.total if shape.method == "full" else weights
        gathered_linear = NF4_BYTES_PER_PARAM if shape.method == "qlora" else c
        layer = math.ceil(gathered_linear * params.block_linear / layers)
        head = c * (params.lm_head or params.embedding)
        if not params.lm_head and trains_lm_head(config, shape):
            gathered = 2 * layer + head
        else:
            gathered = layer + max(layer, head)
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
        dora_norm=dora_norm,
        host_offload=host_offload,
    )
