"""Export a model, with a LoRA adapter merged in if given, as a GGUF file for llama.cpp, Ollama, LM Studio.

    python -m nanoft.export --model DIR --gguf model.gguf                         # q8_0 (default)
    python -m nanoft.export --model DIR --adapter runs/x/adapter --gguf model-f16.gguf --outtype f16
    export_gguf(model_dir, "model.gguf", outtype="q8_0", adapter_dir=None)      # from Python

The file holds what llama.cpp's own converter (convert_hf_to_gguf.py) writes for the family: its tensor
names, Q/K rows in its RoPE order, the architecture's hyperparameters, the tokenizer (vocabulary, merges,
token types, special ids, pre-tokenizer) and the chat template. The rules shared with the importer live in
nanoft/gguf_layout.py. Matrices take --outtype (q8_0: blocks of 32 int8 weights with one fp16 scale, 8.5
bits a weight, bit-exact with ggml's quantizer); norms and biases stay f32, as llama.cpp's converter keeps
them.

Without --adapter the checkpoint streams through one tensor at a time; with one, the base is loaded in fp32
and the adapter merged into it (4 bytes a weight). The file is written under a temporary name and renamed
when complete.
"""

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
    TokenType,
    quant_shape_to_byte_shape,
)
from gguf.quants import quantize

from lora import base_state_dict, load_adapter, merge_lora
from nanoft.config import GGUF_OUTTYPES, OneLineErrorParser
from nanoft.errors import UserError, exit_on_user_error
from nanoft.generate import model_for
from nanoft.gguf_layout import (
    HYPERPARAMETER_KEYS,
    ROPE_FACTORS_TENSOR,
    GGUFFamily,
    gguf_family,
    gguf_tensor_name,
    permute_rope_rows,
    pre_tokenizer_name,
)
from nanoft.model import ModelConfig, rope_inverse_frequencies
from nanoft.tokenizer import Tokenizer
from nanoft.weights import (
    checkpoint_tensors,
    from_pretrained,
    is_redundant,
    load_config,
    write_atomically,
)


@dataclass
class ExportWeights:
    """A model's weights under Hugging Face names: their shapes first (the GGUF header lists every tensor
    before the data), then the tensors themselves, in the same order."""

    shapes: dict[str, tuple[int, ...]]
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]


def weights_to_export(model_dir: Path, adapter_dir: Path | None) -> ExportWeights:
    """The checkpoint as stored, or with the adapter merged in (fp32, so the merge itself rounds nothing)."""
    if adapter_dir is None:
        stored = checkpoint_tensors(model_dir)  # one tensor read at a time, in the order of the files' bytes
        shapes = {tensor.name: tensor.shape for tensor in stored}
        return ExportWeights(shapes, lambda: ((tensor.name, tensor.read()) for tensor in stored))
    model = load_adapter(from_pretrained(model_dir, dtype=torch.float32), adapter_dir)
    merged = base_state_dict(merge_lora(model))
    return ExportWeights({name: tuple(t.shape) for name, t in merged.items()}, lambda: iter(merged.items()))


@dataclass
class Vocabulary:
    """The tokenizer as llama.cpp's "gpt2" (byte-level BPE) model holds it."""

    pre: str  # tokenizer.ggml.pre: llama.cpp's name for the split before BPE
    tokens: list[str]  # one per embedding row
    token_types: list[TokenType]
    merges: list[str]  # "a b", in priority order


@dataclass
class Exportable:
    """What a GGUF export needs besides the weights, read and checked before anything is written."""

    config: ModelConfig
    family: GGUFFamily
    tokenizer: Tokenizer
    vocabulary: Vocabulary


def read_exportable(model_dir: Path) -> Exportable:
    """Raise a UserError for anything llama.cpp cannot run as it is (train.py --gguf asks before training)."""
    config = load_config(model_dir)
    family = gguf_family(config.model_type)
    if (config.rope_scaling or {}).get("rope_type") == "llama3" and not family.per_dimension_rope_factors:
        raise UserError(
            f"rope_scaling llama3 on a {config.model_type} model: llama.cpp's {family.architecture} graph "
            "has no per-dimension RoPE factors, so the GGUF would compute something else; cannot export"
        )
    tokenizer = Tokenizer.from_pretrained(model_dir)
    return Exportable(config, family, tokenizer, gguf_vocabulary(model_dir, tokenizer, config.vocab_size))


def export_gguf(model_dir, out_path, outtype: str = "q8_0", adapter_dir=None) -> Path:
    """Write `out_path` (atomically) and return it."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    exportable = read_exportable(model_dir)
    window, context = exportable.config.sliding_window, exportable.config.max_position_embeddings
    if window is not None and window < context:
        print(
            f"nanoft: note: sliding_window {window}: llama.cpp's {exportable.family.architecture} graph "
            f"attends to the whole context, so outputs agree up to {window} tokens (llama.cpp -c {window})",
            file=sys.stderr,
        )
    weights = weights_to_export(model_dir, Path(adapter_dir) if adapter_dir else None)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out_path, lambda tmp: write_gguf(tmp, model_dir.name, exportable, weights, outtype))
    return out_path


def write_gguf(path, name: str, exportable: Exportable, weights: ExportWeights, outtype: str) -> None:
    config, family = exportable.config, exportable.family
    matrix_type = GGMLQuantizationType[outtype.upper()]
    writer = GGUFWriter(path, family.architecture)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(
        LlamaFileType.ALL_F32 if outtype == "f32" else LlamaFileType[f"MOSTLY_{matrix_type.name}"]
    )
    writer.add_quantization_version(GGML_QUANT_VERSION)  # the block layouts gguf.quants writes
    write_hyperparameters(writer, config, family)
    write_tokenizer(writer, exportable.tokenizer, exportable.vocabulary)

    # The header lists every tensor (name, shape, type) before any data: plan them all, then stream.
    plan = {}  # Hugging Face name -> (llama.cpp name, tensor type)
    for name, shape in weights.shapes.items():
        if is_redundant(name, config):
            continue  # llama.cpp ties lm_head to the embedding when the file has no output.weight
        gguf_name = gguf_tensor_name(name)
        plan[name] = (gguf_name, tensor_type(gguf_name, shape, matrix_type))
        add_tensor_info(writer, gguf_name, shape, plan[name][1])
    rope_factors = rope_factors_tensor(config)
    if rope_factors is not None:
        add_tensor_info(writer, ROPE_FACTORS_TENSOR, rope_factors.shape, GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, tensor in weights.tensors():
        if name in plan:
            array = llama_cpp_rows(name, tensor.float().numpy(), config, family)
            writer.write_tensor_data(quantize(array, plan[name][1]))
    if rope_factors is not None:
        writer.write_tensor_data(rope_factors)
    writer.close()


def tensor_type(gguf_name: str, shape, matrix_type: GGMLQuantizationType) -> GGMLQuantizationType:
    """llama.cpp's converter's rule: norms, biases and other vectors stay f32; matrices take --outtype, or f16
    when a row does not split into whole quantization blocks."""
    if len(shape) == 1 or not gguf_name.endswith(".weight") or gguf_name.endswith("_norm.weight"):
        return GGMLQuantizationType.F32
    block_size, _ = GGML_QUANT_SIZES[matrix_type]
    return matrix_type if shape[-1] % block_size == 0 else GGMLQuantizationType.F16


def add_tensor_info(writer, name: str, shape, kind: GGMLQuantizationType) -> None:
    nbytes = int(np.prod(quant_shape_to_byte_shape(shape, kind)))
    writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=kind)


def llama_cpp_rows(name: str, array: np.ndarray, config: ModelConfig, family: GGUFFamily) -> np.ndarray:
    """Q and K rows (weights and biases) in llama.cpp's RoPE order, for the families that need it."""
    if family.interleaved_rope_rows and ".q_proj." in name:
        return permute_rope_rows(array, config.num_attention_heads, to_llama_cpp=True)
    if family.interleaved_rope_rows and ".k_proj." in name:
        return permute_rope_rows(array, config.num_key_value_heads, to_llama_cpp=True)
    return array


def rope_factors_tensor(config: ModelConfig) -> np.ndarray | None:
    """Llama 3.1 RoPE scaling as llama.cpp takes it: what each frequency is divided by."""
    if (config.rope_scaling or {}).get("rope_type") != "llama3":
        return None
    unscaled = rope_inverse_frequencies(config.rotary_dim, config.rope_theta, None)
    scaled = rope_inverse_frequencies(config.rotary_dim, config.rope_theta, config.rope_scaling)
    return (unscaled / scaled).numpy().astype(np.float32)


def write_hyperparameters(writer: GGUFWriter, config: ModelConfig, family: GGUFFamily) -> None:
    prefix = family.architecture
    for field, (key, kind) in HYPERPARAMETER_KEYS.items():
        value = getattr(config, field)
        if kind is float:
            writer.add_float32(f"{prefix}.{key}", float(value))
        else:
            writer.add_uint32(f"{prefix}.{key}", int(value))
    # These families rotate and attend over the whole head: llama.cpp reads the same size three ways.
    writer.add_uint32(f"{prefix}.attention.value_length", config.head_dim)
    writer.add_uint32(f"{prefix}.rope.dimension_count", config.head_dim)
    if (config.rope_scaling or {}).get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling["factor"])


def gguf_vocabulary(model_dir: Path, tokenizer: Tokenizer, vocab_size: int) -> Vocabulary:
    """tokenizer.json as llama.cpp's converter lays it out (get_vocab_base): a token per embedding row."""
    tokenizer_file = model_dir / "tokenizer.json"
    tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    bpe = tokenizer_json["model"]
    pre = pre_tokenizer_name(tokenizer_json.get("pre_tokenizer"))
    if bpe["type"] != "BPE" or pre is None:
        kind = "SentencePiece-style BPE (byte fallback)" if bpe.get("byte_fallback") else bpe["type"]
        raise UserError(
            f"{tokenizer_file}: a {kind} tokenizer; GGUF export supports byte-level BPE split like gpt-2, "
            "smollm, llama-bpe (Llama 3) or qwen2"
        )
    normalizer = (tokenizer_json.get("normalizer") or {}).get("type", "NFC")
    if normalizer != "NFC":
        raise UserError(f"{tokenizer_file}: normalizer {normalizer} has no GGUF form; cannot export")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)  # token -> id
    if max(vocab.values()) >= vocab_size:
        raise UserError(
            f"{tokenizer_file}: token id {max(vocab.values())} is past the model's vocab_size {vocab_size}; "
            "resize the embeddings before exporting"
        )
    # Embedding rows no token uses (vocab_size padded to a multiple of 64 or 128) get placeholder tokens.
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    token_types = [TokenType.UNUSED] * vocab_size
    for token, token_id in vocab.items():
        tokens[token_id], token_types[token_id] = token, TokenType.NORMAL
    for token_id, added in tokenizer.backend.get_added_tokens_decoder().items():
        token_types[token_id] = TokenType.CONTROL if added.special else TokenType.USER_DEFINED
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in bpe["merges"]]
    return Vocabulary(pre, tokens, token_types, merges)


def write_tokenizer(writer: GGUFWriter, tokenizer: Tokenizer, vocabulary: Vocabulary) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.token_types)
    writer.add_token_merges(vocabulary.merges)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.declared_eos_id)
    if tokenizer.eos_id != tokenizer.declared_eos_id:  # the chat template ends a turn with another token
        writer.add_eot_token_id(tokenizer.eos_id)
    unk = tokenizer.special_tokens.get("unk_token")
    if unk is not None and tokenizer.backend.token_to_id(unk) is not None:
        writer.add_unk_token_id(tokenizer.backend.token_to_id(unk))
    if tokenizer.declared_pad_id is not None:
        writer.add_pad_token_id(tokenizer.declared_pad_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(tokenizer.add_eos)
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(
        prog="python -m nanoft.export",
        description="Write a model (with a LoRA adapter merged in) as a GGUF file for llama.cpp and Ollama.",
    )
    parser.add_argument(
        "--model",
        default="",
        help="Hugging Face model directory (default: the base the adapter names, else the built-in model)",
    )
    parser.add_argument("--adapter", default="", help="LoRA adapter directory (PEFT format) to merge in")
    parser.add_argument("--gguf", required=True, help="the .gguf file to write")
    parser.add_argument(
        "--outtype",
        default="q8_0",
        choices=GGUF_OUTTYPES,
        help="tensor type of the matrices: q8_0 (8.5 bits a weight), f16, bf16 or f32",
    )
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.adapter and not Path(args.adapter).is_dir():
        raise UserError(f"--adapter {args.adapter}: no such directory")
    model_dir, model_source = model_for(args)  # --model, else the base the adapter names, else built-in
    if model_source:
        print(f"nanoft: {model_dir}{model_source}", file=sys.stderr)
    out = export_gguf(model_dir, args.gguf, args.outtype, adapter_dir=args.adapter or None)
    merged = f" with {args.adapter} merged in" if args.adapter else ""
    print(f"wrote {out} ({args.outtype}, {out.stat().st_size / 1e6:.0f} MB): {model_dir}{merged}")


if __name__ == "__main__":
    main()
