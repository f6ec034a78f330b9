"""Which floating-point formats a run uses, and why.

    precision = choose_precision("auto", torch.device("cuda"), method="lora")
    print(precision.reason)   # "bf16: this GPU computes in bf16 natively (NVIDIA A100)"

- Compute dtype: bf16 where the hardware multiplies bf16 natively (CUDA compute capability 8.0 and newer:
  Ampere, Hopper ...; CPUs with AVX512-BF16 or AMX), fp16 with a gradient scaler on older GPUs (T4, V100:
  fp16's small range underflows small gradients to zero unless the loss is scaled up first), fp32 when
  asked or when nothing faster exists. Not torch.cuda.is_bf16_supported(): it says True on a T4 or V100,
  which only emulate bf16, far slower than their fp16 tensor cores.
- LoRA / QLoRA: the frozen base is stored in the compute dtype (half the memory of fp32, and no cast on every
  forward), so no autocast is needed; the adapters are fp32 (they are small, and Adam's updates of ~1e-4 would
  round away in bf16) and lora.py casts their output to the base's dtype.
- Full fine-tune: fp32 master weights with autocast to the compute dtype. Keeping the weights in bf16
  instead would halve their memory, but bf16 has 8 bits of mantissa: an update smaller than 1/256 of a weight
  (lr 5e-5 makes them ~1e-4 relative) is rounded away entirely and the model stops learning.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from nanoft.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass
class Precision:
    compute_dtype: torch.dtype  # matrix multiplies and activations
    base_dtype: torch.dtype  # the model's weights as loaded (full fine-tune: fp32 master weights)
    autocast: bool  # run forward under torch.autocast(compute_dtype)
    grad_scaler: bool  # fp16 only: scale the loss so small gradients survive
    reason: str

    @property
    def name(self) -> str:
        return next(name for name, dtype in DTYPES.items() if dtype == self.compute_dtype)


def cpu_native_bf16() -> str | None:
    """The CPU flag that gives it bf16 matrix units, or None (then bf16 is emulated and slower than fp32)."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
    return next((flag for flag in NATIVE_BF16_CPU_FLAGS if flag in flags), None)


def gpu_compute_dtype(requested: str, gpu: str, capability: tuple[int, int]) -> tuple[torch.dtype, str]:
    """For a GPU named `gpu` of CUDA compute capability (major, minor)."""
    native_bf16 = capability >= (8, 0)
    described = f"{gpu}, compute capability {capability[0]}.{capability[1]}"
    if requested == "bf16" and not native_bf16:
        raise UserError(f"--dtype bf16: this GPU ({described}) has no native bf16; use --dtype fp16 or auto")
    if requested in ("bf16", "fp16", "fp32"):
        return DTYPES[requested], f"{requested}: asked for with --dtype ({gpu})"
    if native_bf16:
        return torch.bfloat16, f"bf16: this GPU computes in bf16 natively ({gpu})"
    return (
        torch.float16,
        f"fp16 with a gradient scaler: this GPU ({described}) has no native bf16",
    )


def choose_compute_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        return gpu_compute_dtype(requested, gpu, torch.cuda.get_device_capability(device))
    if requested == "fp16":
        raise UserError("--dtype fp16 is for GPUs without bf16; on CPU use --dtype bf16 or fp32")
    native = cpu_native_bf16()
    if requested == "bf16":
        return torch.bfloat16, "bf16: asked for with --dtype" + (
            "" if native else " (emulated on this CPU: slow)"
        )
    if requested == "fp32":
        return torch.float32, "fp32: asked for with --dtype"
    if native:
        return torch.bfloat16, f"bf16: this CPU multiplies bf16 natively ({native}), ~4x its fp32 speed"
    return (
        torch.float32,
        "fp32: this CPU has no native bf16 (no avx512_bf16 or amx_bf16), so bf16 would be slower",
    )


def choose_precision(requested: str, device: torch.device, method: str) -> Precision:
    return precision_for(*choose_compute_dtype(requested, device), method)


def precision_for(compute_dtype: torch.dtype, reason: str, method: str) -> Precision:
    """What a run in `compute_dtype` keeps its weights in, and whether it autocasts and scales the loss."""
    reduced = compute_dtype != torch.float32
    if method == "full":
        if reduced:
            reason += "; fp32 master weights under autocast (bf16 weights would round small updates away)"
        return Precision(compute_dtype, torch.float32, reduced, compute_dtype == torch.float16, reason)
    if reduced:
        reason += "; frozen base stored in it, LoRA adapters in fp32"
    return Precision(compute_dtype, compute_dtype, False, compute_dtype == torch.float16, reason)
