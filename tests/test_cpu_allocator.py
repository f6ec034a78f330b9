"""nanoft/cpu_allocator.py: a training step reuses the memory the last one freed."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from nanoft.cpu_allocator import keep_freed_memory

# Eight training steps of a small model (its embedding and activations are blocks of several MiB, which glibc
# maps and unmaps one by one); prints the median of the pages faulted in during the last six. The median, not
# one step: now and then a step still grows the heap by one 8 MiB block (2048 pages) that later steps reuse.
FAULTS_PER_STEP = """
import resource, statistics, sys, torch
from nanoft.cpu_allocator import keep_freed_memory
from nanoft.model import ModelConfig, Transformer
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
config = ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = Transformer(config)
optimizer = torch.optim.AdamW(model.parameters(), fused=True)
input_ids = torch.randint(0, 8192, (4, 128))
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    loss_sum, n_targets = model(input_ids, input_ids)
    (loss_sum / n_targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(int(statistics.median(faults[2:])))
"""


def faults_per_step(variant: str) -> int:
    command = [sys.executable, "-c", FAULTS_PER_STEP, variant]
    return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(not keep_freed_memory(), reason="malloc is not glibc's")
def test_a_training_step_reuses_freed_memory():
    default, kept = faults_per_step("default"), faults_per_step("keep")
    assert default > 1000  # glibc's defaults: every large block is faulted in again, step after step
    assert kept < default / 10


# What a freed 256 MiB block leaves of the process's address space, with train.py's choice for one process.
ADDRESS_SPACE_KEPT = """
import torch
from nanoft.cpu_allocator import choose_for_run
choose_for_run(sharded=False)
size = lambda: int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1])
torch.ones(2**22).sum()  # the worker threads, their stacks and malloc arenas: before the measurement
before = size()
block = torch.ones(2**28, dtype=torch.uint8)
del block
print((size() - before) // 1024)
"""


@pytest.mark.skipif(not keep_freed_memory() or shutil.which("prlimit") is None, reason="needs glibc, prlimit")
def test_under_an_address_space_cap_freed_memory_is_given_back():
    """One process keeps a freed block's address space for the next step; under an address-space cap (which
    counts it) it gives it back, so a retry after an out-of-memory has room again."""
    kept_mib = lambda cap: int(
        subprocess.run(
            [*cap, sys.executable, "-c", ADDRESS_SPACE_KEPT], capture_output=True, text=True, check=True
        ).stdout
    )
    assert kept_mib([]) >= 224  # 256, or 240 where the kept heap first reuses the warm-up's freed 16 MiB
    assert kept_mib(["prlimit", f"--as={16 * 2**30}"]) < 16


# Executable memory (oneDNN's compiled kernels) after bf16 matmuls of 500 shapes, as rows padded to each
# batch's longest make them; argv[1] "nanoft": with train.py's choice for a CPU run made first.
KERNEL_MEMORY = """
import sys, torch
from nanoft.cpu_allocator import choose_for_run
if sys.argv[1] == "nanoft":
    choose_for_run(sharded=False)
weight = torch.randn(64, 64, dtype=torch.bfloat16)
for rows in range(100, 600):
    torch.randn(rows, 64, dtype=torch.bfloat16) @ weight.t()
executable = 0
for line in open("/proc/self/maps"):
    fields = line.split()
    if len(fields) == 5 and "x" in fields[1]:  # anonymous and executable: code compiled at run time
        start, end = (int(address, 16) for address in fields[0].split("-"))
        executable += end - start
print(executable // 2**20)
"""


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="bf16 matmuls are not oneDNN's")
def test_compiled_matmul_kernels_are_bounded():
    """oneDNN keeps a compiled kernel per matmul shape, 1024 by default; a CPU run keeps 128 (a few
    micro-batches' worth), so new row counts every micro-batch, or a retried step's, do not pile them up."""
    # Not inherited from this process, where a train.py run in an earlier test may have set it.
    env = {key: value for key, value in os.environ.items() if key != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    mib = {
        variant: int(
            subprocess.run(
                [sys.executable, "-c", KERNEL_MEMORY, variant],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            ).stdout
        )
        for variant in ("default", "nanoft")
    }
    assert mib["nanoft"] < mib["default"] / 3, mib
