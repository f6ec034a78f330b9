"""Hugging Face checkpoint directories: read config.json and safetensors shards, write what HF loads.

    model = from_pretrained("path/to/hf_dir", dtype=torch.bfloat16)
    save_pretrained(model.state_dict(), model.config, "path/to/out")

The model is built on the meta device (no memory) and each tensor is assigned as it is read, one shard at a
time, so loading a model costs about one copy of its weights, never two.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

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


def iter_checkpoint_tensors(path):
    """Yield (name, tensor) for every tensor, one shard open at a time."""
    for file in checkpoint_files(path):
        if not file.is_file():
            raise UserError(f"{file}: listed in the index but missing; re-download the checkpoint")
        try:
            yield from read_safetensors(file)
        except UserError:
            raise
        except Exception as error:  # a bad header, an unknown dtype, a file shorter than its header says
            raise corrupt_file_error(file, error) from None


def corrupt_file_error(file, error) -> UserError:
    return UserError(f"{file}: corrupt or truncated safetensors file ({error}); re-download it")


def checkpoint_shapes(path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, in the order iter_checkpoint_tensors yields them, read from the headers alone."""
    shapes = {}
    for file in checkpoint_files(path):
        try:
            with open(file, "rb") as f:
                shapes.update((name, tuple(entry["shape"])) for name, entry in read_header(f)[1])
        except (OSError, ValueError, KeyError) as error:
            raise corrupt_file_error(file, error) from None
    return shapes


def read_header(f) -> tuple[int, list[tuple[str, dict]]]:
    """(header size, [(name, {"dtype", "shape", "data_offsets"})] in the order the data lies in the file)."""
    header_size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_size))
    header.pop("__metadata__", None)
    return header_size, sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])


def read_safetensors(file):
    """Yield (name, tensor) from one safetensors file, each tensor read into memory of its own.

    Plain reads rather than safetensors' memory map: every page of a mapped shard that has been read stays in
    the process's resident memory until the file is closed (and as long as any tensor viewing it lives), so a
    loader that converts tensor by tensor (4-bit, bf16 from fp32) would still peak at the whole shard.
    """
    with open(file, "rb") as f:
        header_size, entries = read_header(f)
        for name, entry in entries:
            begin, end = entry["data_offsets"]
            data = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(8 + header_size + begin)
            if f.readinto(data.numpy()) != end - begin:
                raise ValueError(f"the data of '{name}' is cut short")
            yield name, data.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def assign_tensor(model: torch.nn.Module, name: str, tensor: torch.Tensor, source) -> None:
    """Put a loaded tensor in place of the (meta) parameter `name`, checking its shape."""
    module_name, _, attribute = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise UserError(f"{source}: unexpected tensor '{name}' for this architecture") from None
    current = getattr(module, attribute, None)
    if not isinstance(current, torch.Tensor):
        raise UserError(f"{source}: unexpected tensor '{name}' for this architecture")
    if current.shape != tensor.shape:
        raise UserError(
            f"{source}: '{name}' has shape {tuple(tensor.shape)}, config.json implies {tuple(current.shape)}"
        )
    setattr(module, attribute, torch.nn.Parameter(tensor, requires_grad=current.requires_grad))


def is_redundant(name: str, config: ModelConfig) -> bool:
    """A tensor some checkpoints store that the model does not load: a tied lm_head (the embedding itself) or
    the RoPE buffer of old checkpoints (recomputed)."""
    return (config.tie_word_embeddings and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq")


def from_pretrained(path, dtype=torch.float32, device="cpu") -> Transformer:
    config = load_config(path)
    with torch.device("meta"):
        model = Transformer(config)
    expected = {name for name, _ in model.named_parameters()}  # the tied lm_head is listed once, as embed
    loaded = set()
    for name, tensor in iter_checkpoint_tensors(path):
        if is_redundant(name, config):
            continue
        assign_tensor(model, name, tensor.to(device=device, dtype=dtype), path)
        loaded.add(name)
    missing = expected - loaded
    if missing:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. '{sorted(missing)[0]}'")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope(device)
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
