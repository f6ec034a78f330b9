"""How llama.cpp lays out a Hugging Face model in a GGUF file: the rules nanoft's importer and exporter share.

    gguf_name = gguf_tensor_name("model.layers.3.self_attn.q_proj.weight")   # 'blk.3.attn_q.weight'
    hf_name = hf_tensor_name("blk.3.attn_q.weight")                          # and back
    weight = permute_rope_rows(weight, n_heads, to_llama_cpp=True)           # Llama-style Q/K rows

nanoft/gguf_convert.py reads GGUF files with these rules and nanoft/export.py writes them; each rule is
written once here, so the two directions cannot drift apart. What llama.cpp expects was read from its
converter, convert_hf_to_gguf.py (LlamaModel, Qwen2Model, TextModel.set_gguf_parameters, get_vocab_base).

Adding a family is a line in GGUF_FAMILIES (and, for a new tensor, a line in LAYER_TENSOR_NAMES).
"""

import json
import re
from dataclasses import dataclass

from tokenizers import Regex, pre_tokenizers

from nanoft.errors import UserError


@dataclass(frozen=True)
class GGUFFamily:
    architecture: str  # general.architecture: selects llama.cpp's graph and prefixes its hyperparameter keys
    # llama.cpp's "normal" RoPE rotates adjacent pairs, Hugging Face's rotate_half the two halves of a head:
    # its converter reorders Q and K rows to match (LlamaModel.permute). NeoX-style families need no reorder.
    interleaved_rope_rows: bool
    # Llama 3.1 RoPE scaling travels as a rope_freqs tensor of per-dimension factors, which llama.cpp's llama
    # graph reads; other graphs ignore it.
    per_dimension_rope_factors: bool


# Hugging Face model_type -> how llama.cpp runs it. Mistral is the llama graph (convert_hf_to_gguf.py
# registers MistralForCausalLM on LlamaModel). Reading a GGUF back, an architecture maps to the first
# model_type here.
GGUF_FAMILIES = {
    "llama": GGUFFamily("llama", interleaved_rope_rows=True, per_dimension_rope_factors=True),
    "mistral": GGUFFamily("llama", interleaved_rope_rows=True, per_dimension_rope_factors=True),
    "qwen2": GGUFFamily("qwen2", interleaved_rope_rows=False, per_dimension_rope_factors=False),
}

# llama.cpp name -> Hugging Face name, per layer (blk.N.*) and for the rest. Weights and biases alike.
LAYER_TENSOR_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_TENSOR_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
ROPE_FACTORS_TENSOR = "rope_freqs.weight"  # (head_dim / 2,) divisors of the RoPE frequencies (llama graph)

# ModelConfig field -> (key under the architecture's name, e.g. "llama.context_length"; its type in the file).
HYPERPARAMETER_KEYS = {
    "max_position_embeddings": ("context_length", int),
    "hidden_size": ("embedding_length", int),
    "num_hidden_layers": ("block_count", int),
    "intermediate_size": ("feed_forward_length", int),
    "num_attention_heads": ("attention.head_count", int),
    "num_key_value_heads": ("attention.head_count_kv", int),
    "head_dim": ("attention.key_length", int),
    "rope_theta": ("rope.freq_base", float),
    "rms_norm_eps": ("attention.layer_norm_rms_epsilon", float),
    "vocab_size": ("vocab_size", int),
}

# tokenizer.json's pre-tokenizer -> llama.cpp's name for it (tokenizer.ggml.pre), which picks llama.cpp's
# own split rules. llama.cpp's converter recognises a pre-tokenizer by hashing the ids of a test text, one
# hash per published model; nanoft compares the pre-tokenizer itself, so any model that splits alike matches.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split, then bytes
BYTES_ONLY = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
PRE_TOKENIZERS = {
    "gpt-2": [BYTE_LEVEL],
    "smollm": [pre_tokenizers.Digits(individual_digits=True), BYTE_LEVEL],  # SmolLM and SmolLM2
    "llama-bpe": [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), BYTES_ONLY],  # Llama 3
    "qwen2": [pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"), BYTES_ONLY],  # Qwen2, Qwen2.5
}


def gguf_family(model_type: str) -> GGUFFamily:
    if model_type not in GGUF_FAMILIES:
        raise UserError(
            f"model_type '{model_type}' has no GGUF export yet; nanoft exports {', '.join(GGUF_FAMILIES)}"
        )
    return GGUF_FAMILIES[model_type]


def model_type_for(architecture: str) -> str:
    for model_type, family in GGUF_FAMILIES.items():
        if family.architecture == architecture:
            return model_type
    architectures = sorted({family.architecture for family in GGUF_FAMILIES.values()})
    raise UserError(
        f"GGUF architecture '{architecture}' is not supported; nanoft reads {', '.join(architectures)}"
    )


def hf_tensor_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    layer = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if layer and layer[2] in LAYER_TENSOR_NAMES:
        return f"model.layers.{layer[1]}.{LAYER_TENSOR_NAMES[layer[2]]}.{layer[3]}"
    stem = gguf_name.removesuffix(".weight")
    if stem in GLOBAL_TENSOR_NAMES:
        return f"{GLOBAL_TENSOR_NAMES[stem]}.weight"
    raise UserError(f"GGUF tensor '{gguf_name}' has no Hugging Face equivalent; nanoft cannot convert it")


def gguf_tensor_name(hf_name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight' (the inverse of hf_tensor_name)."""
    layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    if layer:
        for gguf_stem, hf_stem in LAYER_TENSOR_NAMES.items():
            if hf_stem == layer[2]:
                return f"blk.{layer[1]}.{gguf_stem}.{layer[3]}"
    for gguf_stem, hf_stem in GLOBAL_TENSOR_NAMES.items():
        if hf_name == f"{hf_stem}.weight":
            return f"{gguf_stem}.weight"
    raise UserError(f"tensor '{hf_name}' has no llama.cpp name; nanoft cannot export it to GGUF")


def permute_rope_rows(weight, n_heads: int, to_llama_cpp: bool):
    """Reorder a Q or K projection's rows (weight or bias; numpy or torch) between the two RoPE layouts.

    Hugging Face keeps each head's rows as (2, half): the halves rotate_half pairs up. llama.cpp rotates
    adjacent pairs, so its converter stores them as (half, 2), row i of the first half next to row i of the
    second. to_llama_cpp=True does that; False undoes it.
    """
    half = weight.shape[0] // n_heads // 2
    heads = (n_heads, 2, half) if to_llama_cpp else (n_heads, half, 2)
    return weight.reshape(*heads, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def pre_tokenizer_steps(pre_tokenizer) -> list[dict]:
    """A pre-tokenizer (tokenizer.json's dict, or a tokenizers object) as its list of steps, each without the
    fields that change offsets but never ids (trim_offsets)."""
    if pre_tokenizer is not None and not isinstance(pre_tokenizer, dict):
        pre_tokenizer = json.loads(pre_tokenizer.__getstate__())  # its tokenizer.json form
    if pre_tokenizer is None:
        return []
    steps = pre_tokenizer["pretokenizers"] if pre_tokenizer["type"] == "Sequence" else [pre_tokenizer]
    return [{key: value for key, value in step.items() if key != "trim_offsets"} for step in steps]


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, or None when it has none of them."""
    steps = pre_tokenizer_steps(pre_tokenizer)
    for name, known in PRE_TOKENIZERS.items():
        if steps == [step for pre in known for step in pre_tokenizer_steps(pre)]:
            return name
    return None
