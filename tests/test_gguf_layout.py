"""nanoft/gguf_layout.py: the llama.cpp rules the GGUF importer and exporter share, against llama.cpp's."""

import numpy as np
import pytest
import torch
from tokenizers import Regex, pre_tokenizers
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from nanoft.errors import UserError
from nanoft.gguf_layout import (
    gguf_family,
    gguf_tensor_name,
    hf_tensor_name,
    model_type_for,
    permute_rope_rows,
    pre_tokenizer_name,
)


def llama_cpp_permute(weights, n_head: int, n_head_kv: int | None = None):
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes q_proj and k_proj rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


@pytest.mark.parametrize("n_heads", [1, 3, 6])
def test_rope_row_permutation_is_llama_cpp_s_both_ways(n_heads):
    weight = np.arange(192 * 5, dtype=np.float32).reshape(192, 5)
    to_llama_cpp = permute_rope_rows(weight, n_heads, to_llama_cpp=True)
    assert np.array_equal(to_llama_cpp, llama_cpp_permute(weight, n_heads))
    assert np.array_equal(permute_rope_rows(to_llama_cpp, n_heads, to_llama_cpp=False), weight)
    bias = torch.arange(192.0)  # q/k biases travel with their rows; torch tensors work as numpy arrays do
    assert torch.equal(permute_rope_rows(bias, n_heads, True), llama_cpp_permute(bias, n_heads))


def test_tensor_names_map_both_ways():
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.12.attn_output.weight": "model.layers.12.self_attn.o_proj.weight",
        "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
        "blk.3.attn_k.bias": "model.layers.3.self_attn.k_proj.bias",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    for gguf_name, hf_name in pairs.items():
        assert hf_tensor_name(gguf_name) == hf_name and gguf_tensor_name(hf_name) == gguf_name
    with pytest.raises(UserError, match="blk.0.ssm_conv1d.weight"):
        hf_tensor_name("blk.0.ssm_conv1d.weight")
    with pytest.raises(UserError, match="q_norm"):
        gguf_tensor_name("model.layers.0.self_attn.q_norm.weight")


def test_families_map_to_llama_cpp_architectures():
    assert gguf_family("mistral").architecture == "llama" and gguf_family("mistral").interleaved_rope_rows
    assert not gguf_family("qwen2").interleaved_rope_rows  # llama.cpp's qwen2 graph uses NeoX-style RoPE
    assert model_type_for("llama") == "llama" and model_type_for("qwen2") == "qwen2"
    with pytest.raises(UserError, match="has no GGUF export yet"):
        gguf_family("gemma2")
    with pytest.raises(UserError, match="GGUF architecture 'mamba' is not supported"):
        model_type_for("mamba")


def test_pre_tokenizers_are_recognised_by_what_they_do():
    # transformers' Qwen2 and Llama 3 (tiktoken converter) splits, and SmolLM's (its tokenizer.json has
    # trim_offsets on, which changes offsets, never ids, so either matches); a prefix space does not.
    qwen2 = Qwen2Tokenizer(vocab={"a": 0}, merges=[]).backend_tokenizer.pre_tokenizer
    assert pre_tokenizer_name(qwen2) == "qwen2"
    llama3_split = pre_tokenizers.Split(Regex(TikTokenConverter().pattern), behavior="isolated")
    llama3 = [llama3_split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    assert pre_tokenizer_name(pre_tokenizers.Sequence(llama3)) == "llama-bpe"
    digits = pre_tokenizers.Digits(individual_digits=True)
    for trim_offsets in (True, False):
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=trim_offsets)
        assert pre_tokenizer_name(pre_tokenizers.Sequence([digits, byte_level])) == "smollm"
    prefix_space = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert pre_tokenizer_name(pre_tokenizers.Sequence([digits, prefix_space])) is None
    assert pre_tokenizer_name(pre_tokenizers.Whitespace()) is None
    assert pre_tokenizer_name(None) is None
