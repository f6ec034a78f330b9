"""Tiny random checkpoints of every supported model family, written by transformers itself.

    path = write_family_checkpoint("gemma2", tmp_path)   # config.json + model.safetensors (+ the tokenizer)

Each config is as small as the tests can afford (hidden 64, 4 layers) and keeps what its family changes in
the Llama block, set so that it shows: sliding windows of 8 tokens (the tests' sequences are longer), NoPE
layers, soft-caps that bend the logits, partial rotary, Granite's multipliers, Gemma's head_dim 256, 8
experts with a dense layer among them. Every weight is redrawn at std 0.2 around its initial value (norm
weights around 1, Gemma's around 0 for its 1 + w), so no term hides behind a 1 or a 0 and w vs 1 + w shows.
"""

import shutil

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
WINDOW = 8  # every sliding window below: shorter than any sequence the tests use
FAMILIES = {
    "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=32, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "smollm3": dict(no_rope_layer_interval=2),
    "gemma": dict(),  # head_dim 256, Gemma's default
    "gemma2": dict(
        head_dim=32, sliding_window=WINDOW, attn_logit_softcapping=2.0, final_logit_softcapping=3.0
    ),
    "gemma3_text": dict(
        head_dim=32,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        final_logit_softcapping=3.0,
    ),
    "phi3": dict(partial_rotary_factor=0.5, sliding_window=WINDOW),
    "olmo2": dict(),
    "granite": dict(
        embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0
    ),
    # Mixtures of experts: 8 experts, top 2; Qwen3-MoE's layer 1 keeps a dense MLP and its experts are
    # narrower than that MLP, and it does not renormalise the top-2 probabilities.
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=WINDOW),
    "qwen3_moe": dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1], head_dim=32,
        use_sliding_window=True, sliding_window=WINDOW,
    ),
}  # fmt: skip
# The query and value projections, as LoRA names them in each family (Phi-3 fuses q, k, v).
QV_TARGETS = {family: ["q_proj", "v_proj"] for family in FAMILIES} | {"phi3": ["qkv_proj"]}


def reference_model(family: str, seed: int = 0):
    """transformers' model of the family's tiny config, in fp32, with redrawn weights."""
    config = AutoConfig.for_model(family, **SIZES, **FAMILIES[family])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            around = parameter.clone() if parameter.dim() == 1 else torch.zeros_like(parameter)  # norms: init
            parameter.copy_(around + torch.randn_like(parameter) * 0.2)
    return model.eval()


def write_family_checkpoint(family: str, path, tokenizer_dir=None):
    """Save the family's reference model as a Hugging Face directory (with the tokenizer's files if given)."""
    reference_model(family).save_pretrained(path)
    if tokenizer_dir is not None:
        for file in tokenizer_dir.iterdir():
            shutil.copy(file, path / file.name)
    return path


def reference_gradients(reference) -> dict[str, torch.Tensor]:
    """The gradients of transformers' model under the checkpoint's (and nanoft's) names. transformers 5
    holds each MoE layer's experts fused in two 3-D parameters (`mlp.experts.gate_up_proj`, (experts, 2 M,
    C), gate rows first; `mlp.experts.down_proj`) and calls Mixtral's `block_sparse_moe` `mlp`; they split
    back here."""
    model_type = reference.config.model_type
    block, (gate, up, down) = "mlp", ("gate_proj", "up_proj", "down_proj")
    if model_type == "mixtral":
        block, (gate, up, down) = "block_sparse_moe", ("w1", "w3", "w2")
    gradients = {}
    for name, parameter in reference.named_parameters():
        layer, _, rest = name.partition(".mlp.")
        if rest == "experts.gate_up_proj":
            for expert, fused in enumerate(parameter.grad):
                gate_grad, up_grad = fused.chunk(2)
                gradients[f"{layer}.{block}.experts.{expert}.{gate}.weight"] = gate_grad
                gradients[f"{layer}.{block}.experts.{expert}.{up}.weight"] = up_grad
        elif rest == "experts.down_proj":
            for expert, down_grad in enumerate(parameter.grad):
                gradients[f"{layer}.{block}.experts.{expert}.{down}.weight"] = down_grad
        elif rest:
            gradients[f"{layer}.{block if rest == 'gate.weight' else 'mlp'}.{rest}"] = parameter.grad
        else:
            gradients[name] = parameter.grad
    return gradients
