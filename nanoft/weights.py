"""Hugging Face checkpoint directories: read config.json and safetensors shards, write what HF loads.

    model = from_pretrained("path/to/hf_dir", dtype=torch.bfloat16)
    save_pretrained(model.state_dict(), model.config, "path/to/out")

    model = empty_model("path/to/hf_dir", torch.bfloat16)  # on meta: quantize, add LoRA, shard it, then
    load_weights(model, "path/to/hf_dir", device)          # fill it (train.py: distributed.wrap_model does)

The model is built on the meta device (no memory) and each tensor is put in place as it is read, so loading
costs one copy of the weights, never two; under FSDP one copy of this rank's shards (load_weights).
"""

import json
import math
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from nanoft.errors import UserError
from nanoft.model import ModelConfig, Transformer

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def load_config(path) -> ModelConfig:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"{config_file}: not found; --model must be a Hugging Face model directory with config.json"
        )
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{config_file}: not valid JSON ({error})") from None
    return ModelConfig.from_hf(hf)


def checkpoint_files(path) -> list[Path]:
    """The safetensors files of a checkpoint directory, from its index when it is sharded."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise UserError(f"{index}: not a valid safetensors index ({error})") from None
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if (path / "pytorch_model.bin").is_file():
        raise UserError(
            f"{path}: has only pytorch_model.bin; nanoft reads safetensors "
            "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json found")


class StoredTensor(NamedTuple):
    """One tensor of a safetensors file: where its bytes lie, to read it whole or only some of its rows."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int  # of its first byte in the file

    def read(self, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or rows [start, end) of its first dimension (a rank's FSDP shard), read into memory of
        its own.

        Plain reads rather than safetensors' memory map: every page of a mapped shard that has been read stays
        in the process's resident memory until the file is closed (and as long as any tensor viewing it
        lives), so a loader that converts tensor by tensor (4-bit, bf16 from fp32) would still peak at the
        whole shard.
        """
        start, end = rows or (0, self.shape[0] if self.shape else 1)
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        data = torch.empty((end - start) * row_bytes, dtype=torch.uint8)
        with open(self.file, "rb") as file:
            file.seek(self.offset + start * row_bytes)
            if file.readinto(data.numpy()) != len(data):
                raise UserError(f"{self.file}: the data of '{self.name}' is cut short; re-download it")
        shape = (end - start, *self.shape[1:]) if self.shape else ()
        return data.view(self.dtype).reshape(shape)


def checkpoint_tensors(path) -> list[StoredTensor]:
    """Every tensor of a checkpoint directory, file by file in the order of their bytes; reads headers only,
    so a truncated or corrupt file stops the load before any weight is read."""
    stored = []
    for file in checkpoint_files(path):
        if not file.is_file():
            raise UserError(f"{file}: listed in the index but missing; re-download the checkpoint")
        try:
            stored += safetensors_header(file)
        except Exception as error:  # a bad header, an unknown dtype, a file shorter than its header says
            raise UserError(
                f"{file}: corrupt or truncated safetensors file ({error}); re-download it"
            ) from None
    return stored


def safetensors_header(file: Path) -> list[StoredTensor]:
    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
    header.pop("__metadata__", None)
    data_start, file_size = 8 + header_size, file.stat().st_size
    stored = []
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"'{name}' holds {end - begin} bytes, its shape and dtype need another size")
        if data_start + end > file_size:
            raise ValueError(f"the data of '{name}' is cut short")
        stored.append(StoredTensor(name, dtype, shape, file, data_start + begin))
    return stored


def empty_model(path, dtype=torch.float32) -> Transformer:
    """The architecture `path`/config.json describes, on the meta device (no memory), parameters in `dtype`:
    what quant.py, lora.py and FSDP reshape before load_weights fills it."""
    config = load_config(path)
    with torch.device("meta"):
        return Transformer(config).to(dtype)


def load_weights(model: Transformer, path, device, quantize=None) -> None:
    """Fill the meta parameters of a model made by empty_model with the checkpoint at `path`, tensor by
    tensor, each converted to its parameter's dtype on `device`.

    quantize(module, attribute, stored) -> bool: quant.py's hook; True when it read `stored` and kept it as
    `module`'s quantized weight. Checkpoint names are Hugging Face's; lora.py's wrappers add `.base_layer`
    to the layers they wrap, and their adapters (not on meta) are left as they are.
    Sharded (FSDP2, after distributed.wrap_model): memory is allocated for this rank's shards only, and each
    tensor is read as this rank's rows alone (a quantized one whole, one at a time: its quantization spans
    the whole tensor), so no rank ever holds the whole model, in host or device memory.
    """
    to_fill = {name.replace(".base_layer.", "."): name for name, p in model.named_parameters() if p.is_meta}
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    if sharded:
        allocate_shards(model, device)
    tied = model.config.tie_word_embeddings
    loaded = set()
    for stored in checkpoint_tensors(path):
        if tied and stored.name == "lm_head.weight":
            continue  # some tied checkpoints store the copy anyway
        if stored.name.endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints saved the RoPE buffer; it is recomputed
        if stored.name not in to_fill:
            raise UserError(f"{stored.file}: unexpected tensor '{stored.name}' for this architecture")
        module_name, _, attribute = to_fill[stored.name].rpartition(".")
        module = model.get_submodule(module_name)
        parameter = getattr(module, attribute)
        # A quantized or sharded weight's own shape is not the checkpoint's; a linear layer knows its own.
        is_weight = isinstance(module, nn.Linear) and attribute == "weight"
        expected = (module.out_features, module.in_features) if is_weight else tuple(parameter.shape)
        if stored.shape != expected:
            raise UserError(
                f"{stored.file}: '{stored.name}' has shape {stored.shape}, config.json implies {expected}"
            )
        loaded.add(stored.name)
        if quantize is not None and quantize(module, attribute, stored):
            continue
        if sharded:
            with torch.no_grad():
                parameter.to_local().copy_(stored.read(shard_rows(parameter)))
            continue
        tensor = stored.read().to(device=device, dtype=parameter.dtype)
        setattr(module, attribute, nn.Parameter(tensor, requires_grad=parameter.requires_grad))
    if missing := to_fill.keys() - loaded:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. '{sorted(missing)[0]}'")
    if tied and not sharded:  # filled in place when sharded, so still one tensor
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope(device)


def allocate_shards(model: nn.Module, device) -> None:
    """Memory on `device` for this rank's shards of an FSDP-sharded model built on the meta device; parameters
    already real before sharding (LoRA's adapters, drawn from the shared seed) keep their values."""
    kept = {name: p.to_local().clone() for name, p in model.named_parameters() if not p.is_meta}
    model.to_empty(device=device)  # FSDP re-points its shards at the new memory (FSDPModule._apply)
    with torch.no_grad():
        for name, value in kept.items():
            model.get_parameter(name).to_local().copy_(value)


def shard_rows(parameter: DTensor) -> tuple[int, int]:
    """Rows [start, end) of dim 0 this rank holds of an FSDP2 parameter (torch.chunk's split)."""
    (placement,) = parameter.placements
    assert isinstance(placement, Shard) and placement.dim == 0, placement  # FSDP2 on a 1-D mesh
    rows, ranks = parameter.shape[0], parameter.device_mesh.size()
    per_rank = -(-rows // ranks)
    start = min(parameter.device_mesh.get_local_rank() * per_rank, rows)
    end = min(start + per_rank, rows)
    assert end - start == parameter.to_local().shape[0], (start, end, parameter.to_local().shape)
    return start, end


def from_pretrained(path, dtype=torch.float32, device="cpu") -> Transformer:
    """A Hugging Face checkpoint directory as a Transformer in `dtype` on `device`."""
    model = empty_model(path, dtype)
    load_weights(model, path, device)
    return model


def save_pretrained(state_dict, config: ModelConfig, path, dtype=None, max_shard_bytes=5 * 2**30) -> None:
    """Write config.json and safetensors shards (with an index above `max_shard_bytes`) into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in state_dict.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        tensors[name] = tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous()
    shards, current, current_bytes = [], {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = tensor
        current_bytes += size
    shards.append(current)
    hf_config = config.to_hf()
    if dtype is not None:
        hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    write_atomically(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(hf_config, indent=2)))
    if len(shards) == 1:
        write_atomically(path / "model.safetensors", lambda tmp: save_file(shards[0], tmp, {"format": "pt"}))
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_atomically(path / name, lambda tmp, shard=shard: save_file(shard, tmp, {"format": "pt"}))
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_atomically(
        path / "model.safetensors.index.json", lambda tmp: Path(tmp).write_text(json.dumps(index))
    )


def copy_tokenizer_files(source_dir, destination_dir) -> None:
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, Path(destination_dir) / name)


def write_atomically(path: Path, write) -> None:
    """Write through a temporary name and rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)
