"""FSDP2 over bitsandbytes 4-bit linears (QLoRA): the packed 4-bit bytes are sharded, the small state not.

    prepare_4bit_linears_for_fsdp(model, mixed_precision)  # before fully_shard (distributed.wrap_model does)
    parameter_bytes(model)  # {dtype: bytes this rank holds}: the proof that 4-bit weights stay 4-bit

The problem: fully_shard rebuilds every parameter as a DTensor from its plain data, so a bitsandbytes
`Params4bit` loses its `quant_state` (block scales, code book, original shape and dtype) and the forward
raises `quant_state is required`; a "fix" that dequantizes instead would silently give back the memory
QLoRA saves.

What we do: each `Linear4bit` weight becomes a plain frozen Parameter of packed bytes, shape (n_packed, 1),
which FSDP2 shards along dim 0 like any other parameter: each of N ranks holds 1/N of the 4-bit bytes. The
QuantState moves to `module.quant_state`, an attribute FSDP does not touch, so every rank keeps all of it
(about 0.13 bits per weight with double quantization). Before each forward FSDP has all-gathered the layer's
bytes into the module's `weight`; a forward pre-hook puts the QuantState back on that gathered tensor and
bitsandbytes dequantizes it exactly as on one GPU (Answer.AI's fsdp_qlora kept the state on the module the
same way under FSDP1).

The storage dtype must survive FSDP's mixed precision: FSDP2 never casts integer parameters, so the default
uint8 storage is always safe; a float storage (bf16, which FSDP1 needed to put the bytes in one flat
buffer) must equal the mixed-precision dtype (if any), or the cast would rewrite the packed bits.
"""

import torch
from torch import nn

from nanoft.errors import UserError
from nanoft.weights import shard_rows


def bitsandbytes_linear_classes():
    """(Linear4bit, Linear8bitLt), or (None, None) without bitsandbytes (then there is nothing to prepare)."""
    try:
        from bitsandbytes.nn import Linear4bit, Linear8bitLt
    except ImportError:
        return None, None
    return Linear4bit, Linear8bitLt


def prepare_4bit_linears_for_fsdp(model: nn.Module, mixed_precision: torch.dtype | None) -> None:
    """Make every bitsandbytes Linear4bit in `model` shardable by fully_shard (a no-op without any)."""
    Linear4bit, Linear8bitLt = bitsandbytes_linear_classes()
    if Linear4bit is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, Linear8bitLt):
            raise UserError(
                f"{name}: --fsdp cannot shard 8-bit (int8) layers; use --quant nf4, or DDP (no --fsdp)"
            )
        if not isinstance(module, Linear4bit):
            continue
        storage = module.weight.quant_storage
        if mixed_precision is not None and storage.is_floating_point and storage != mixed_precision:
            raise UserError(
                f"{name}: FSDP's mixed precision would cast 4-bit weights stored as {storage} to "
                f"{mixed_precision} and corrupt them; quantize with quant_storage=uint8"
            )
        if module.weight.is_meta:  # sharded loading: the bytes and their state come as the weight is read
            module.quant_state = None
            packed = torch.empty(packed_shape(module), dtype=storage, device="meta")
        else:
            module.quant_state = module.weight.quant_state
            if module.quant_state is None:
                raise UserError(f"{name}: 4-bit weight not quantized yet; move the model to its device first")
            packed = module.weight.data
        module.weight = nn.Parameter(packed, requires_grad=False)
        # On AVX512-BF16 CPUs bitsandbytes re-packs weight.data in place on an eval forward; under FSDP that
        # tensor is the shared all-gather buffer (quant.py turns this off too; here it is a correctness need).
        module.support_avx512bf16_for_cpu = False
        module.register_forward_pre_hook(attach_quant_state)


def packed_shape(layer: nn.Module) -> tuple[int, int]:
    """The (n, 1) shape of a Linear4bit's packed weight: two 4-bit values a byte, as its storage dtype."""
    n_bytes = (layer.in_features * layer.out_features + 1) // 2
    return n_bytes // layer.weight.quant_storage.itemsize, 1


def load_4bit_shard(layer: nn.Module, packed: torch.Tensor, quant_state) -> None:
    """Keep this rank's rows of a whole quantized weight's packed bytes in a sharded Linear4bit (meta-built
    by prepare_4bit_linears_for_fsdp), and the whole quantization state, as every rank does."""
    if tuple(packed.shape) != tuple(layer.weight.shape):
        raise AssertionError(f"packed 4-bit bytes {tuple(packed.shape)}, sharded {tuple(layer.weight.shape)}")
    start, end = shard_rows(layer.weight)
    with torch.no_grad():
        layer.weight.to_local().copy_(packed[start:end])
    layer.quant_state = quant_state


def attach_quant_state(module, args):
    # module.weight is now the tensor FSDP gathered for this forward; bitsandbytes reads its quant_state.
    module.weight.quant_state = module.quant_state


def parameter_bytes(model: nn.Module) -> dict[torch.dtype, int]:
    """Bytes of parameters this rank holds, by dtype (a sharded parameter counts only its local shard)."""
    held: dict[torch.dtype, int] = {}
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        held[local.dtype] = held.get(local.dtype, 0) + local.numel() * local.element_size()
    return held


def quant_state_bytes(model: nn.Module) -> int:
    """Bytes of the 4-bit layers' quantization state (scales, code books), which every rank keeps whole."""
    Linear4bit, _ = bitsandbytes_linear_classes()
    total = 0
    for module in model.modules():
        if Linear4bit is not None and isinstance(module, Linear4bit):
            state = getattr(module.weight, "quant_state", None) or module.quant_state
            tensors = [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code]
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total
