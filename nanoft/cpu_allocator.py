"""CPU runs keep the memory they free and reuse it, as PyTorch's caching allocator does on a GPU.

    keep_freed_memory()   # once, before the model is built; train.py does it for CPU runs

glibc's malloc gives a freed block above its mmap threshold (128 KiB, adapting up to 32 MiB) straight back to
the kernel, and trims free memory off the top of its heap. A training step frees and allocates the same
activations, gradients and loss chunks every step, so each comes back as fresh pages that the kernel faults in
and zeroes one 4 KiB page at a time: 167,000 page faults and 0.6-0.9 s of system time in every full
fine-tune step of SmolLM2-135M at 4 x 256 tokens. Without the threshold and the trimming the step reuses its
memory: the full fine-tune step 1.17x as fast, LoRA and QLoRA 1.01-1.02x, for 2-4% more peak memory
(`python bench/allocator.py`). Resident memory then stays near its peak instead of falling between steps.
"""

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
LARGEST_INT = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse. False where malloc is not glibc's (macOS)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # Blocks up to 1 GiB come from the heap (larger ones are rare and still mapped on their own); the heap's
    # free top is returned only past 2 GiB.
    return bool(mallopt(M_MMAP_THRESHOLD, 2**30) and mallopt(M_TRIM_THRESHOLD, LARGEST_INT))
