"""QLoRA's frozen base: the decoder's linear layers in 4-bit NF4 (or FP4, or int8) through bitsandbytes.

    model = load_quantized("path/to/hf_dir", quant="nf4")  # quantized tensor by tensor while loading
    model = inject_lora(model, LoRAConfig(...))              # lora.py: adapters on top of the 4-bit layers
    stored, bf16 = quantized_weight_bytes(model)             # what the weights really occupy
    optimizer = make_optimizer(trainable_params, "paged_adamw8bit", lr=2e-4)

Every `nn.Linear` of the decoder layers becomes a bitsandbytes `Linear4bit` (or `Linear8bitLt` for int8),
experts included; embeddings, norms, mixture-of-experts routers and lm_head stay in the compute dtype (the
chunked loss multiplies by lm_head's weight matrix directly). The model is built on the meta device and each
linear weight is quantized the moment it is read, so loading peaks at the quantized model plus one
full-precision tensor and its quantization temporaries (nanoft.weights reads each tensor into its own memory,
never memory-maps a shard). Adapters are saved alone (lora.save_adapter). `--merge` (nanoft/merge.py) merges
the adapter into the original 16-bit checkpoint by default, or (`--merge-base quantized`) into the weights as
this 4-bit base holds them; bench/qlora_merge_gap.py measures both against the 4-bit base + adapter. Never
quantize a merged model to 4-bit again (+1.06 val loss: the update is finer than NF4's steps).
`make_optimizer` adds QLoRA's third ingredient, bitsandbytes' 8-bit and paged AdamW.
Measured: bench/quant_memory.py, bench/matmul_4bit.py, bench/qlora_merge_gap.py.
"""

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lora import matches
from nanoft.config import OPTIMIZERS, QUANT_TYPES
from nanoft.errors import UserError
from nanoft.fsdp_qlora import bitsandbytes_linear_classes, load_4bit_shard
from nanoft.model import Transformer
from nanoft.moe import SparseMoE
from nanoft.precision import DTYPES
from nanoft.weights import empty_model, load_weights


def without_optional_kernel_notice(record: logging.LogRecord) -> bool:
    """bitsandbytes (0.50, on CPUs with AVX512-BF16) logs on import that it could not load an optional CPU
    kernel from the `kernels` package ("Failed to load CPU gemm_4bit_forward from kernels-community ..."); it
    falls back to its own kernel, which the tests and benchmarks measure. Nothing for the user to act on."""
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


# On the logger that prints it, before anything imports bitsandbytes; its other warnings still reach the user.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(without_optional_kernel_notice)


def bitsandbytes_error(error: Exception, flag: str) -> UserError:
    """The one-line message for a bitsandbytes that is missing or cannot run here."""
    if isinstance(error, ImportError):
        return UserError(
            f"{flag} needs bitsandbytes, which could not be imported ({error}); "
            f"install it with `pip install bitsandbytes>=0.45` or drop {flag}"
        )
    return UserError(f"bitsandbytes cannot run on this platform ({error}); drop {flag} or run on CPU or CUDA")


def import_bitsandbytes(flag: str):
    """`import bitsandbytes`, turning a missing or broken install into a UserError that names `flag`."""
    try:
        import bitsandbytes
    except (ImportError, RuntimeError, OSError) as error:  # OSError/RuntimeError: its native library failed
        raise bitsandbytes_error(error, flag) from None
    return bitsandbytes


@dataclass
class QuantConfig:
    """How the base model's linear layers are stored. Strings "bf16", "fp16", "fp32" work for dtypes."""

    quant: str = "nf4"  # nf4 (QLoRA's default), fp4, or int8 (LLM.int8() row-wise 8-bit)
    double_quant: bool = True  # 4-bit only: quantize the per-block absmax too (0.5 -> 0.127 bits per weight)
    compute_dtype: torch.dtype | str = torch.bfloat16  # activations, embeddings, norms, lm_head
    quant_storage: torch.dtype | str = torch.uint8  # 4-bit only: dtype the packed bytes are viewed as (FSDP)
    skip: tuple[str, ...] | str = ("lm_head",)  # linears kept in compute dtype (lora.matches' rule; or "a,b")

    def __post_init__(self):
        if self.quant not in QUANT_TYPES:
            raise UserError(f"--quant {self.quant}: unknown; choose one of {', '.join(QUANT_TYPES)}")
        self.compute_dtype = DTYPES.get(self.compute_dtype, self.compute_dtype)
        self.quant_storage = DTYPES.get(self.quant_storage, self.quant_storage)
        if self.compute_dtype not in DTYPES.values():
            raise UserError(f"compute dtype {self.compute_dtype}: choose bf16, fp16 or fp32")
        if not isinstance(self.quant_storage, torch.dtype):
            raise UserError(f"quant storage {self.quant_storage}: must be a torch dtype such as torch.uint8")
        if isinstance(self.skip, str):
            self.skip = tuple(name.strip() for name in self.skip.split(",") if name.strip())
        self.skip = tuple(self.skip)
        if not matches("lm_head", self.skip):
            raise UserError("skip must keep 'lm_head': the chunked loss multiplies by its unquantized weight")


def make_quantized_linear(linear: nn.Linear, config: QuantConfig) -> nn.Module:
    """An empty bitsandbytes layer shaped like `linear`; its weight is set by `quantize_weight`."""
    bnb = import_bitsandbytes(f"--quant {config.quant}")
    with torch.device("meta"):
        if config.quant == "int8":
            # LLM.int8() quantizes its inputs from fp16 by design; bitsandbytes logs that on every call.
            logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
            # threshold 0 (the default): no fp16 outlier columns, so the whole weight really is 8-bit.
            return bnb.nn.Linear8bitLt(
                linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False
            )
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=config.compute_dtype,
            compress_statistics=config.double_quant,
            quant_type=config.quant,
            quant_storage=config.quant_storage,
        )
    # On CPUs with AVX512-BF16, an eval forward under no_grad repacks the weight in place into an inference
    # layout whose matmul has no autograd: after the first validation pass, LoRA in earlier layers would get
    # no gradient at all (seen with bitsandbytes 0.50). Keep the one layout that trains.
    layer.support_avx512bf16_for_cpu = False
    return layer


def quantize_weight(layer: nn.Module, weight: torch.Tensor, config: QuantConfig, device) -> None:
    """Quantize a full-precision (out, in) weight into `layer` on `device` (bitsandbytes does it in `.to`)."""
    bnb = import_bitsandbytes(f"--quant {config.quant}")
    try:
        if config.quant == "int8":
            # Int8Params quantizes only when moved off the CPU (or kept there): a weight already on the GPU
            # would stay 16-bit. So it goes over as read, and only its 8-bit form is kept there.
            weight = weight.to(device="cpu", dtype=config.compute_dtype)
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
        else:  # Params4bit quantizes wherever it is moved: on the GPU, with the GPU's kernels
            layer.weight = bnb.nn.Params4bit(
                weight.to(device=device, dtype=config.compute_dtype),
                requires_grad=False,
                compress_statistics=config.double_quant,
                quant_type=config.quant,
                quant_storage=config.quant_storage,
                module=layer,
            ).to(device)
    except (RuntimeError, NotImplementedError) as error:
        raise bitsandbytes_error(error, f"--quant {config.quant}") from None


def quantize_linears(model: nn.Module, config: QuantConfig) -> list[str]:
    """Replace the model's `nn.Linear` modules (all but `config.skip`) by bitsandbytes ones, in place.

    A loaded linear is quantized now, where its weight is; one on the meta device stays empty for
    load_weights to fill as the weight is read (`weight_quantizer`). Returns the replaced modules' names.
    """
    # A mixture of experts' router stays in the compute dtype: it is small, and 4-bit rounding of its scores
    # would send tokens to other experts.
    routers = {id(m.gate) for m in model.modules() if isinstance(m, SparseMoE)}
    names = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not matches(name, config.skip) and id(module) not in routers
    ]
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        linear = model.get_submodule(name)
        layer = make_quantized_linear(linear, config)
        if linear.bias is not None:  # kept in the compute dtype, like the layer's output
            bias = linear.bias.detach().to(config.compute_dtype)
            layer.bias = nn.Parameter(bias, requires_grad=False)
        if linear.weight.device.type != "meta":
            quantize_weight(layer, linear.weight.detach(), config, linear.weight.device)
        setattr(model.get_submodule(parent_name), child_name, layer)
    return names


def weight_quantizer(config: QuantConfig, device):
    """load_weights' hook (nanoft/weights.py): the weight of a layer quantize_linears made is quantized on
    `device` the moment it is read; under FSDP this rank keeps its rows of the packed bytes."""
    Linear4bit, Linear8bitLt = bitsandbytes_linear_classes()

    def quantize(module: nn.Module, attribute: str, stored) -> bool:
        if attribute != "weight" or not isinstance(module, Linear4bit | Linear8bitLt):
            return False
        weight = stored.read()
        if isinstance(module.weight, DTensor):  # sharded: quantize the whole tensor, keep this rank's rows
            whole = make_quantized_linear(module, config)
            quantize_weight(whole, weight, config, device)
            load_4bit_shard(module, whole.weight.data, whole.weight.quant_state)
        else:
            quantize_weight(module, weight, config, device)
        return True

    return quantize


def load_quantized(
    path,
    quant="nf4",
    compute_dtype=torch.bfloat16,
    quant_storage=torch.uint8,
    double_quant=True,
    device="cpu",
    skip=("lm_head",),
) -> Transformer:
    """A Hugging Face checkpoint directory with its decoder linears quantized as read, one tensor at a time.

    The options are QuantConfig's; `device` ("cpu", "cuda") is where weights are quantized and kept.
    """
    config = QuantConfig(quant, double_quant, compute_dtype, quant_storage, skip)
    model = empty_model(path, config.compute_dtype)
    quantize_linears(model, config)
    load_weights(model, path, device, quantize=weight_quantizer(config, device))
    return model.requires_grad_(False)  # QLoRA trains adapters only; the base is frozen, quantized or not


class WeightBytes(NamedTuple):
    stored: int  # bytes the weights occupy now: packed 4/8-bit data, quantization state, other tensors
    bf16: int  # bytes the same weights take in bf16

    @property
    def ratio(self) -> float:
        return self.stored / self.bf16


def quantized_weight_bytes(model: nn.Module) -> WeightBytes:
    """Count every parameter and quantization-state tensor once (tied or shared tensors once)."""
    stored, bf16_elements, seen = 0, 0, set()

    def count(tensor):
        nonlocal stored
        if tensor is not None and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            stored += tensor.numel() * tensor.element_size()

    for parameter in model.parameters():  # each tied parameter once
        quant_state = getattr(parameter, "quant_state", None)
        if quant_state is not None:  # 4-bit: packed data + per-block absmax (+ its own 8-bit state if nested)
            bf16_elements += quant_state.shape.numel()
            for tensor in (quant_state.absmax, quant_state.code, quant_state.offset):
                count(tensor)
            if quant_state.nested:
                count(quant_state.state2.absmax)
                count(quant_state.state2.code)
        elif getattr(parameter, "SCB", None) is not None:  # int8: one byte per weight + a scale per row
            bf16_elements += parameter.numel()
            count(parameter.SCB)
        else:
            bf16_elements += parameter.numel()
        count(parameter)
    return WeightBytes(stored, 2 * bf16_elements)


def make_optimizer(params_or_groups, name="adamw", lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8):
    """`--optim`: torch AdamW, or bitsandbytes' AdamW8bit / PagedAdamW8bit, over parameters or param groups.

    AdamW keeps two fp32 moments per trainable weight (8 bytes); the 8-bit versions keep them block-quantized
    (2 bytes; tensors under 4096 elements keep 32-bit state, where 8 bits would save nothing). The paged one
    puts its state in CUDA unified memory, so a memory spike pages it to the host instead of running out of
    GPU memory; on CPU it behaves as AdamW8bit.
    """
    params_or_groups = list(params_or_groups)
    if name == "adamw":
        params = [p for g in params_or_groups for p in (g["params"] if isinstance(g, dict) else [g])]
        # The fused kernel updates every tensor in one pass, on CUDA and (torch >= 2.4) on CPU, where it took
        # 0.08 s for SmolLM2's 135M weights, against 0.27 s (for-loop) and 0.62 s (foreach):
        # bench/optimizer_step.py.
        fused = True if params and all(p.device.type in ("cuda", "cpu") for p in params) else None
        return torch.optim.AdamW(
            params_or_groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused
        )
    if name not in OPTIMIZERS:
        raise UserError(f"--optim {name}: unknown; choose one of {', '.join(OPTIMIZERS)}")
    bnb = import_bitsandbytes(f"--optim {name}")
    optimizer_class = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return optimizer_class(params_or_groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
