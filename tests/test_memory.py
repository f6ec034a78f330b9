"""The memory estimate against what really happens: parameter counts against the model, activations against
the tensors autograd saves, and the peak against a measured training step (LoRA, QLoRA, full)."""

import pytest
import torch

import lora
import quant
from bench.memory_estimate import REFERENCE_MODELS, measure, write_measured_model
from nanoft.loss import rows_per_chunk
from nanoft.memory import (
    TrainingShape,
    count_parameters,
    estimate_memory,
    lora_parameter_count,
)
from nanoft.model import ModelConfig, Transformer

SMALL = ModelConfig(
    vocab_size=3000,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
)
LLAMA_2_7B = ModelConfig(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
)
# Each kind of block at SMALL's sizes: q/k norms per head (Qwen3) or over the width (OLMo 2, norms after the
# branches), four norms with soft-capped attention and windows (Gemma 2) or local and global RoPE (Gemma 3),
# fused projections with partial RoPE (Phi-3), NoPE layers (SmolLM3), multipliers (Granite), experts.
BLOCK_KINDS = {
    "qwen3": {},
    "olmo2": {},
    "gemma2": {"sliding_window": 64},
    "gemma3_text": {"sliding_window": 64, "sliding_window_pattern": 2},
    "phi3": {"partial_rotary_factor": 0.5},
    "smollm3": {"no_rope_layer_interval": 2},
    "granite": {"residual_multiplier": 0.5, "embedding_multiplier": 4.0},
    # Mixtures of experts (8, top 2); Qwen3-MoE with narrower experts and a dense layer among them.
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen3_moe": {
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 176,
        "mlp_only_layers": [1],
    },
}


def small(family: str) -> ModelConfig:
    if family == "llama":
        return SMALL
    return ModelConfig.from_hf({**SMALL.to_hf(), "model_type": family, "head_dim": 32, **BLOCK_KINDS[family]})


@pytest.mark.parametrize(
    "config",
    [
        SMALL,
        ModelConfig(**{**SMALL.__dict__, "tie_word_embeddings": True}),
        ModelConfig.from_hf({**SMALL.to_hf(), "model_type": "qwen2"}),  # q/k/v biases
        *(small(family) for family in BLOCK_KINDS),
    ],
)
def test_parameter_count_equals_the_model(config):
    with torch.device("meta"):
        model = Transformer(config)
    assert count_parameters(config).total == sum(p.numel() for p in model.parameters())


def test_parameter_count_of_llama_2_7b():
    assert count_parameters(LLAMA_2_7B).total == 6_738_415_616  # as Hugging Face reports it
    assert lora_parameter_count(LLAMA_2_7B, ("q_proj", "v_proj"), 8) == 4_194_304  # as PEFT reports r=8


def test_total_and_active_parameters_of_mixtral_and_qwen3_moe():
    """As their makers give them: Mixtral 8x7B 46.7B with 12.9B active per token, Qwen3-30B-A3B 30.5B with
    3.3B active."""
    mixtral, qwen3_moe = REFERENCE_MODELS["Mixtral-8x7B"], REFERENCE_MODELS["Qwen3-30B-A3B"]
    assert count_parameters(mixtral).total == 46_702_792_704
    assert count_parameters(mixtral).active == 12_879_925_248
    assert count_parameters(qwen3_moe).total == 30_532_122_624
    assert count_parameters(qwen3_moe).active == 3_353_032_704


def saved_activation_bytes(model, autocast, micro_batch, seq_len, device="cpu", packed=False):
    """Bytes of the distinct tensors autograd saves for backward in one forward (parameters excluded);
    packed: two examples per row, each attending only to itself."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    torch.manual_seed(0)
    ids = torch.randint(0, SMALL.vocab_size, (micro_batch, seq_len), device=device)
    documents = (torch.arange(seq_len, device=device) >= seq_len // 3).long().expand(micro_batch, seq_len)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            model(ids, ids, document_ids=documents if packed else None)
    return sum(saved.values())


CASES = [  # 96 tokens: nanoft's own CPU attention; 1024: SDPA (the scores would be too big to keep)
    ("full", ("q_proj",), 0.05, 96),
    ("full", ("q_proj",), 0.05, 1024),
    ("lora", ("q_proj", "v_proj"), 0.05, 96),
    ("lora", ("q_proj", "v_proj"), 0.05, 1024),
    ("lora", "all-linear", 0.05, 96),
    ("lora", "all-linear", 0.0, 96),
    ("lora", "all-linear", 0.0, 1024),
    ("qlora", ("q_proj", "v_proj"), 0.05, 96),
]
FAMILY_CASES = [CASES[i] for i in (0, 1, 2, 6)]
# Mixtures of experts: adapters on every expert too, with and without dropout, and 4-bit experts.
EXPERT_CASES = [CASES[i] for i in (4, 5, 7)]
VARIANT_CASES = [  # LoRA's variants (lora.py): DoRA's magnitudes, modules_to_save trained whole
    ("lora", ("q_proj", "v_proj"), 0.05, 96, {"use_dora": True}),
    ("lora", "all-linear", 0.0, 96, {"use_dora": True}),
    ("qlora", ("q_proj", "v_proj"), 0.05, 96, {"use_dora": True}),
    ("qlora", ("q_proj", "v_proj"), 0.0, 96, {"use_dora": True}),
    ("lora", ("q_proj", "v_proj"), 0.05, 96, {"modules_to_save": ("embed_tokens", "lm_head")}),
    ("lora", ("q_proj", "v_proj"), 0.05, 96, {"modules_to_save": ("lm_head", "norm")}),
]


@pytest.mark.parametrize(
    "family, method, targets, dropout, seq_len, variant",
    [("llama", *case, {}) for case in CASES]
    + [("llama", *case) for case in VARIANT_CASES]
    + [(family, *case, {}) for family in BLOCK_KINDS for case in FAMILY_CASES]
    + [(family, *case, {}) for family in ("mixtral", "qwen3_moe") for case in EXPERT_CASES],
)
def test_activation_estimate_matches_what_autograd_saves(family, method, targets, dropout, seq_len, variant):
    config = small(family)
    if config.fused_projections and targets != "all-linear":  # Phi-3's q and v are rows of qkv_proj
        targets = ("qkv_proj",)
    torch.manual_seed(0)
    if method == "full":
        model = Transformer(config)  # fp32 master weights under bf16 autocast, as nanoft/precision.py does it
    else:
        model = Transformer(config).to(torch.bfloat16)
        if method == "qlora":
            quant.quantize_linears(model, quant.QuantConfig())
        model = lora.inject_lora(model, lora.LoRAConfig(targets=targets, dropout=dropout, **variant))
    measured = saved_activation_bytes(model, autocast=method == "full", micro_batch=2, seq_len=seq_len)
    shape = TrainingShape(
        method, 2, seq_len, lora_targets=targets, lora_dropout=dropout, device_type="cpu", **variant
    )
    estimate = estimate_memory(config, shape)
    parameters = count_parameters(config)
    expected = estimate.activations_full
    if method == "full" or "lm_head" in variant.get("modules_to_save", ()):
        expected += 4 * parameters.lm_head  # the loss's fp32 lm_head gradient (in logits_loss)
    if method == "full":  # autograd also keeps the bf16 weight copies
        expected += 2 * parameters.block_linear
    else:  # ... and the bf16 copies of the adapters
        expected += 2 * lora_parameter_count(config, shape.lora_targets, shape.lora_r)
    assert abs(expected / measured - 1) < 0.01, (expected, measured)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("packed", [False, True])
def test_cuda_activation_estimate_with_and_without_packing(packed):
    """On a GPU SDPA saves q, k, v, its output and logsumexp; a packed batch's mask makes it repeat the
    grouped k/v heads and keep a per-layer bias: what the estimate counts."""
    torch.manual_seed(0)
    model = lora.inject_lora(Transformer(SMALL).to("cuda", torch.bfloat16), lora.LoRAConfig(dropout=0.0))
    measured = saved_activation_bytes(model, False, micro_batch=2, seq_len=1024, device="cuda", packed=packed)
    shape = TrainingShape("lora", 2, 1024, lora_dropout=0.0, device_type="cuda", packed=packed)
    expected = estimate_memory(SMALL, shape).activations_full
    expected += 2 * lora_parameter_count(SMALL, shape.lora_targets, shape.lora_r)
    assert abs(expected / measured - 1) < 0.05, (expected, measured)


def test_a_packed_batch_on_a_gpu_costs_its_masks_and_whole_kv_heads():
    plain = estimate_memory(SMALL, TrainingShape("lora", 2, 1024, device_type="cuda"))
    packed = estimate_memory(SMALL, TrainingShape("lora", 2, 1024, device_type="cuda", packed=True))
    H, KV, D, layers = 8, 2, 32, SMALL.num_hidden_layers
    tokens = 2 * 1024
    masks = layers * 2 * 1024 * 1024 * 2  # a bf16 (B, 1, T, T) bias per layer
    whole_kv_heads = layers * tokens * 2 * 2 * (H - KV) * D
    assert packed.activations_full - plain.activations_full == masks + whole_kv_heads


def test_loss_holds_one_chunk_of_logits_never_all():
    big_vocab = ModelConfig(**{**SMALL.__dict__, "vocab_size": 128_000})
    rows = rows_per_chunk(128_000, want_grad_weight=False)
    small = estimate_memory(big_vocab, TrainingShape("lora", 1, rows // 2))
    large = estimate_memory(big_vocab, TrainingShape("lora", 16, 4096))
    assert small.logits_loss == 2 * 2 * (rows // 2) * 128_000  # bf16 logits and their softmax
    assert large.logits_loss == 2 * 2 * rows * 128_000  # capped at one chunk


def test_checkpointing_and_sharding_shrink_what_they_should():
    shape = dict(micro_batch=4, seq_len=1024)
    plain = estimate_memory(LLAMA_2_7B, TrainingShape("full", **shape))
    checkpointed = estimate_memory(LLAMA_2_7B, TrainingShape("full", activation_checkpointing=True, **shape))
    sharded = estimate_memory(LLAMA_2_7B, TrainingShape("full", shards=8, **shape))
    offloaded = estimate_memory(LLAMA_2_7B, TrainingShape("full", shards=8, cpu_offload=True, **shape))
    assert checkpointed.activations < plain.activations / 5 and checkpointed.weights == plain.weights
    assert sharded.optimizer == pytest.approx(plain.optimizer / 8, rel=1e-6)
    assert sharded.activations == plain.activations
    assert offloaded.optimizer == 0 and offloaded.host_offload > 0 and offloaded.total < sharded.total


@pytest.fixture(scope="module")
def measured_model_dir(tmp_path_factory):
    made = {}

    def get(family: str):
        if family not in made:
            made[family] = tmp_path_factory.mktemp(f"measured_{family}")
            write_measured_model(made[family], family)
        return made[family]

    return get


@pytest.mark.parametrize(
    "family, method, variant",
    [("llama", "lora", "plain"), ("llama", "qlora", "plain"), ("llama", "full", "plain")]
    + [("gemma2", "lora", "plain"), ("llama", "lora", "dora"), ("llama", "qlora", "dora")]
    + [("llama", "lora", "modules_to_save")],
)
def test_estimate_within_25_percent_of_a_measured_training_step(measured_model_dir, family, method, variant):
    """Two optimizer steps of 2 micro-batches x 2 x 256 tokens of a 34M Llama (and a Gemma 2 of its sizes:
    head_dim 256, four norms a layer, soft-capped attention), and LoRA's variants, each run in a fresh
    process: its peak RSS above its RSS after imports (glibc returning freed blocks at once, so RSS follows
    live tensors) against the estimate for the same run."""
    report = measure(measured_model_dir(family), method, variant=variant)
    print(method, variant, report)
    assert 0.75 <= report["ratio"] <= 1.25, report
