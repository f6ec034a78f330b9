"""Merge a LoRA adapter into its base checkpoint on disk, tensor by tensor: a plain Hugging Face model.

    python -m nanoft.merge --adapter runs/x/adapter --out runs/x/merged     # base from adapter_config.json
    python -m nanoft.merge --adapter runs/x/adapter --model DIR --out merged --base quantized --quant nf4
    merged = merge_adapter(model_dir, adapter_dir, out_dir)                  # what train.py --merge calls

Each adapted weight becomes W + scale B A (DoRA: m (W + scale B A) / ||W + scale B A||, row by row), the
weight that computes what the adapter layer did (lora.merged_weight; PEFT's merge_and_unload gives the same).
modules_to_save tensors replace the base's. Everything else is copied byte for byte, in its stored dtype.

The merge streams: it reads one base tensor from the safetensors shards, adds the update on the CPU, and
writes it at the same place of an output shard whose header is the input's (same names, shapes, dtypes, so
the same offsets). Memory: the adapter plus one tensor, never the whole model, never a GPU; it needs no
trained model in memory, so train.py runs it after the training processes have let go of each other.

Which W. `base="original"` (the default): the checkpoint's own 16-bit (or fp32) weights. `base="quantized"`
(QLoRA runs): each decoder linear weight rounded through the run's 4-bit (or int8) quantization first, the
base the adapter was trained on, as on the CPU (quant.py). The adapter on the original weights scored the
better val loss (bench/qlora_merge_gap.py, README "QLoRA: which base to merge into").
"""

import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

import lora
import quant
from nanoft import checkpoint, precision, weights
from nanoft.config import MERGE_BASES, QUANT_TYPES, OneLineErrorParser
from nanoft.errors import UserError, exit_on_user_error
from nanoft.model import Transformer

ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")


class Merged(NamedTuple):
    adapted: int  # weights that got W + scale B A
    replaced: int  # weights the adapter's modules_to_save replaced
    requantized: int  # weights rounded through the 4-bit quantization first (base="quantized")
    dtypes: str  # the stored dtypes of the weights, e.g. "bf16"


class AdapterUpdate(NamedTuple):
    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    magnitude: torch.Tensor | None  # DoRA's m (out,)


def merge_adapter(
    model_dir, adapter_dir, out_dir, base="original", quant_config: quant.QuantConfig | None = None
) -> Merged:
    """Write `out_dir`: the checkpoint in `model_dir` with the adapter in `adapter_dir` merged in (see the
    module docstring). `quant_config`: the run's QuantConfig, needed for base="quantized"."""
    if base not in MERGE_BASES:
        raise UserError(f"merge base '{base}' is unknown; use one of {', '.join(MERGE_BASES)}")
    if base == "quantized" and quant_config is None:
        raise UserError(
            "merging into the quantized base needs the run's quantization (--quant nf4, fp4, int8)"
        )
    model_dir, adapter_dir = Path(model_dir), Path(adapter_dir)
    cfg, _ = lora.read_adapter_config(adapter_dir)
    scale = lora.lora_scale(cfg.r, cfg.alpha, cfg.use_rslora)
    updates, replacements = split_adapter(lora.read_adapter_tensors(adapter_dir))
    files = weights.checkpoint_files(model_dir)
    stored = weights.checkpoint_tensors(model_dir)  # headers only, checked before anything is written
    shapes = {tensor.name: list(tensor.shape) for tensor in stored}
    check_adapter_fits(adapter_dir, updates, replacements, shapes, model_dir)
    requantize = quantized_linear_names(model_dir, quant_config) if base == "quantized" else set()
    counts = {"adapted": 0, "replaced": 0, "requantized": 0}
    dtypes = sorted({dtype_name(tensor.dtype) for tensor in stored})

    def merged_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name in replacements:
            counts["replaced"] += 1
            return replacements[name].to(tensor.dtype)
        weight = tensor
        if name in requantize:
            counts["requantized"] += 1
            weight = as_quantized(tensor, quant_config)
        if name in updates:
            counts["adapted"] += 1
            update = updates[name]
            weight = lora.merged_weight(weight, update.lora_A, update.lora_B, scale, update.magnitude)
        return weight.to(tensor.dtype)

    def write(tmp: Path) -> None:
        for file in files:
            in_file = [tensor for tensor in stored if tensor.file == file]  # in the order of their bytes
            write_shard(file, tmp / file.name, in_file, merged_tensor)
        for name in ("config.json", "model.safetensors.index.json"):
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        weights.copy_tokenizer_files(model_dir, tmp)

    checkpoint.write_directory_atomically(out_dir, write)
    return Merged(**counts, dtypes="/".join(dtypes))


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16", as the flags name dtypes; others as torch does ("float64")."""
    return next(
        (name for name, known in precision.DTYPES.items() if known == dtype), str(dtype).split(".")[-1]
    )


def split_adapter(tensors: dict) -> tuple[dict[str, AdapterUpdate], dict[str, torch.Tensor]]:
    """({base weight name: its LoRA update}, {base tensor name: modules_to_save replacement})."""
    adapted = {name.removesuffix(end) for name in tensors for end in ADAPTER_SUFFIXES if name.endswith(end)}
    updates = {}
    for module in adapted:
        lora_A, lora_B = tensors.get(module + ".lora_A.weight"), tensors.get(module + ".lora_B.weight")
        if lora_A is None or lora_B is None:
            raise UserError(f"adapter for '{module}' lacks its lora_A or lora_B tensor")
        updates[module + ".weight"] = AdapterUpdate(
            lora_A, lora_B, tensors.get(module + ".lora_magnitude_vector")
        )
    replacements = {name: tensor for name, tensor in tensors.items() if not name.endswith(ADAPTER_SUFFIXES)}
    return updates, replacements


def check_adapter_fits(adapter_dir, updates, replacements, shapes: dict, model_dir) -> None:
    """Before writing anything: every adapted or replaced tensor is in the checkpoint, with its shape."""
    weights_file = Path(adapter_dir) / "adapter_model.safetensors"
    for name, update in updates.items():
        shape = [update.lora_B.shape[0], update.lora_A.shape[1]]
        if name not in shapes:
            raise UserError(
                f"{weights_file}: adapts '{name}', which {model_dir} does not have; wrong --model?"
            )
        if shapes[name] != shape:
            raise UserError(
                f"{weights_file}: the update of '{name}' is {tuple(shape)}, {model_dir} has "
                f"{tuple(shapes[name])}; was the adapter trained on another base model?"
            )
    for name, tensor in replacements.items():
        tied_head = name == "lm_head.weight" and "model.embed_tokens.weight" in replacements
        if name not in shapes and tied_head:
            continue  # a tied model stores only the embedding, which the adapter replaces too
        if name not in shapes or shapes[name] != list(tensor.shape):
            raise UserError(
                f"{weights_file}: '{lora.PEFT_PREFIX}{name}' {tuple(tensor.shape)} matches no tensor of "
                f"{model_dir}"
            )


def write_shard(source: Path, destination: Path, stored: list, merged_tensor) -> None:
    """`source` with each of its tensors (`stored`: weights.StoredTensor, in the order of their bytes)
    replaced by merged_tensor(name, tensor), which keeps its dtype and shape: the header (and so every
    offset) is copied as is, then the tensors' bytes."""
    with open(source, "rb") as f:
        header_size = f.read(8)
        header = f.read(int.from_bytes(header_size, "little"))
    with open(destination, "wb") as out:
        out.write(header_size + header)
        for entry in stored:  # one tensor in memory at a time
            tensor = entry.read()
            merged = merged_tensor(entry.name, tensor)
            assert merged.dtype == tensor.dtype and merged.shape == tensor.shape, entry.name
            out.write(merged.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def quantized_linear_names(model_dir, quant_config: quant.QuantConfig) -> set[str]:
    """The weights load_quantized quantizes (every linear but QuantConfig.skip's), by the same rule."""
    with torch.device("meta"):
        model = Transformer(weights.load_config(model_dir))
    return {name + ".weight" for name in quant.quantize_linears(model, quant_config)}


def as_quantized(weight: torch.Tensor, quant_config: quant.QuantConfig) -> torch.Tensor:
    """`weight` as the quantized base holds it: quantized as load_quantized does, then dequantized."""
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer = quant.make_quantized_linear(linear, quant_config)
    quant.quantize_weight(layer, weight, quant_config, "cpu")
    return lora.dense_weight(layer).float()


def parse_args(argv=None):
    parser = OneLineErrorParser(
        prog="python -m nanoft.merge",
        description="Merge a LoRA adapter into its base model's checkpoint, tensor by tensor on the CPU.",
    )
    parser.add_argument(
        "--adapter", required=True, help="PEFT-format adapter directory (e.g. runs/x/adapter)"
    )
    parser.add_argument(
        "--model", default="", help="base model directory (default: base_model_name_or_path of the adapter)"
    )
    parser.add_argument("--out", required=True, help="directory to write the merged model to")
    parser.add_argument(
        "--base",
        default="original",
        choices=MERGE_BASES,
        help="original: the checkpoint's weights (default); quantized: rounded through --quant first",
    )
    parser.add_argument(
        "--quant", default="nf4", choices=QUANT_TYPES, help="with --base quantized (default nf4)"
    )
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    model_dir = Path(args.model) if args.model else lora.adapter_base_model(args.adapter)
    quant_config = quant.QuantConfig(args.quant) if args.base == "quantized" else None
    merged = merge_adapter(model_dir, args.adapter, args.out, args.base, quant_config)
    print(merge_line(merged, args.adapter, model_dir, args.out, args.base, args.quant), file=sys.stderr)


def merge_line(merged: Merged, adapter_dir, model_dir, out_dir, base: str, quant_type: str = "") -> str:
    """What was merged into what, and where it is."""
    if base == "original":
        into = f"the original {merged.dtypes} weights of {model_dir}"
    else:
        into = f"the weights of {model_dir} rounded through {quant_type} as the run's base held them"
    replaced = f" and {merged.replaced} replaced (modules_to_save)" if merged.replaced else ""
    return (
        f"merged: adapter {adapter_dir} ({merged.adapted} weights updated{replaced}) into {into} -> "
        f"{out_dir} (a Hugging Face model, {merged.dtypes})"
    )


if __name__ == "__main__":
    main()
