"""nanoft/precision.py: which dtype a run computes in, and what follows from it.

python -m pytest tests/test_precision.py -q
"""

import pytest
import torch

from nanoft.errors import UserError
from nanoft.precision import choose_precision, gpu_compute_dtype, precision_for


@pytest.mark.parametrize(
    "gpu, capability, dtype",
    [
        ("Tesla T4", (7, 5), torch.float16),  # torch.cuda.is_bf16_supported() says True here (emulated)
        ("Tesla V100-SXM2-16GB", (7, 0), torch.float16),
        ("NVIDIA A100-SXM4-80GB", (8, 0), torch.bfloat16),
        ("NVIDIA GeForce RTX 3090", (8, 6), torch.bfloat16),
        ("NVIDIA H100 80GB HBM3", (9, 0), torch.bfloat16),
    ],
)
def test_auto_picks_bf16_only_where_the_gpu_has_it_natively(gpu, capability, dtype):
    compute_dtype, reason = gpu_compute_dtype("auto", gpu, capability)
    assert compute_dtype == dtype and gpu in reason
    for method in ("lora", "qlora", "full"):  # fp16 always comes with the gradient scaler
        assert precision_for(compute_dtype, reason, method).grad_scaler == (dtype == torch.float16)


def test_bf16_asked_for_on_a_gpu_that_only_emulates_it_is_refused():
    with pytest.raises(
        UserError, match=r"Tesla T4, compute capability 7.5\) has no native bf16; use --dtype fp16"
    ):
        gpu_compute_dtype("bf16", "Tesla T4", (7, 5))
    assert gpu_compute_dtype("fp16", "Tesla T4", (7, 5))[0] == torch.float16


def test_full_fine_tunes_keep_fp32_master_weights_and_autocast():
    precision = precision_for(torch.bfloat16, "bf16", "full")
    assert (precision.base_dtype, precision.autocast, precision.grad_scaler) == (torch.float32, True, False)
    lora = precision_for(torch.float16, "fp16", "lora")
    assert (lora.base_dtype, lora.autocast, lora.grad_scaler) == (torch.float16, False, True)


def test_cpu_never_picks_fp16():
    assert choose_precision("auto", torch.device("cpu"), "lora").compute_dtype != torch.float16
    with pytest.raises(UserError, match="--dtype fp16 is for GPUs"):
        choose_precision("fp16", torch.device("cpu"), "lora")
