"""Dropout whose mask is cheaper on CPU: LoRA drops its adapters' inputs out on every forward.

    dropout = CPUFriendlyDropout(0.05)   # an nn.Dropout; lora.py's LoRALinear uses it for its input

One of the CPU-only speed pieces, with cpu_allocator.py (reuse freed memory) and cpu_attention.py
(attention as plain matmuls); on other devices it is nn.Dropout.
"""

import torch
from torch import nn


class CPUFriendlyDropout(nn.Dropout):
    """nn.Dropout whose mask costs less on CPU (2% of a LoRA step: bench/levers.py): bernoulli_ draws a 64-bit
    number per element in a serial loop on CPUs without MKL's generator (AMD); here one draw gives four
    16-bit uniforms. p is rounded to a multiple of 1/65536 (0.05 -> 0.050003). Same generator, so
    torch.manual_seed still makes runs repeatable."""

    def forward(self, x):
        if not self.training or x.device.type != "cpu":
            return super().forward(x)
        bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
        uniform = bits.view(torch.int16)[: x.numel()].view(x.shape)  # in [-32768, 32767]
        keep = uniform >= round(self.p * 65536) - 32768
        survivor = torch.tensor(1 / (1 - self.p), dtype=x.dtype)
        return x * torch.where(keep, survivor, torch.tensor(0.0, dtype=x.dtype))
