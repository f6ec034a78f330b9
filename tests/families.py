"""Tiny random checkpoints of every supported model family, written by transformers itself.

    path = write_family_checkpoint("gemma2", tmp_path)   # config.json + model.safetensors (+ the tokenizer)

Each config is as small as the tests can afford (hidden 64, 4 layers) and keeps what its family changes in
the Llama block, set so that it shows: sliding windows of 8 tokens (the tests' sequences are longer), NoPE
layers, soft-caps that bend the logits, partial rotary, Granite's multipliers, Gemma's head_dim 256. Every
weight is redrawn at std 0.2 around its initial value (norm weights around 1, Gemma's around 0 for its
1 + w), so no term hides behind a 1 or a 0 and w vs 1 + w shows.
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
