"""CPU runs keep the memory they free and reuse it, as PyTorch's caching allocator does on a GPU.

    choose_for_run(sharded)    # once, before the model is built: train.py does it for CPU runs
    keep_freed_memory()        # ... which is this for one process
    give_back_freed_memory()   # ... or this, under FSDP or an address-space cap
    trim_heap()                # after an out-of-memory (nanoft/interruptions.py)
    keep_few_matmul_kernels()  # choose_for_run does this too, for every CPU run

oneDNN, which runs CPU bf16 matmuls, compiles a kernel for each matmul shape it meets and keeps the last
1024 of them by default, about 0.9 MB of resident, executable memory each. A LoRA micro-batch of SmolLM2
compiles 28 (its projections, the adapters, the loss's chunks, forward and backward) and runs them 1,137
times. Rows are padded to their batch's longest, so nearly every micro-batch brings new shapes: after 20
micro-batches of 4 rows of 64-256 tokens the kernels held 482 MB, and each attempt of a retried step, cut
into still other shapes, added more. The last 128 are a few micro-batches' worth; a miss costs ~1 ms.

glibc's malloc gives a freed block above its mmap threshold (128 KiB, adapting up to 32 MiB) straight back to
the kernel, and trims free memory off the top of its heap. A training step frees and allocates the same
activations, gradients and loss chunks every step, so each comes back as fresh pages that the kernel faults in
and zeroes one 4 KiB page at a time: 167,000 page faults and 0.6-0.9 s of system time in every full
fine-tune step of SmolLM2-135M at 4 x 256 tokens. Without the threshold and the trimming the step reuses its
memory: the full fine-tune step 1.17x as fast, LoRA and QLoRA 1.01-1.02x, for 2-4% more peak memory
(`python bench/allocator.py`). Resident memory then stays near its peak instead of falling between steps.
"""

import ctypes
import os
import resource

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
LARGEST_INT = 2**31 - 1  # mallopt takes an int
MATMUL_KERNELS_KEPT = 128


def choose_for_run(sharded: bool) -> None:
    """Keep freed memory for reuse (below), except under FSDP and under an address-space cap (ulimit -v,
    prlimit --as), where it is given back at once. Such a cap counts address space, not memory used, and the
    heap keeps the address space of what it keeps: after a step ran out of memory at micro-batch 32 under a
    3.2 GiB cap, the built-in model's process still held 3.34 GB of it (1.8 GB of heap, 0.8 GB resident after
    trim_heap), and its retries failed down to micro-batch 1, though micro-batch 8 alone fits under that cap.
    Given back, it fell to 1.68 GB after that failure, and with the compiled matmul kernels bounded as well
    (keep_few_matmul_kernels) the retry at micro-batch 16 finished."""
    keep_few_matmul_kernels()
    capped = resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY
    if sharded or capped:
        give_back_freed_memory()
    else:
        keep_freed_memory()


def keep_few_matmul_kernels() -> None:
    """Bound oneDNN's cache of compiled matmul kernels (see the top of this file) unless the user has. oneDNN
    reads the setting when it first compiles one: call this before the first bf16 matmul."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(MATMUL_KERNELS_KEPT))


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse. False where malloc is not glibc's (macOS)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # Blocks up to 1 GiB come from the heap (larger ones are rare and still mapped on their own); the heap's
    # free top is returned only past 2 GiB.
    return bool(mallopt(M_MMAP_THRESHOLD, 2**30) and mallopt(M_TRIM_THRESHOLD, LARGEST_INT))


def give_back_freed_memory() -> bool:
    """The other way: every block of 1 MiB or more is mapped on its own and unmapped when freed, at once. For
    FSDP on CPU, whose gathered layers come and go in many sizes and threads: glibc's adaptive threshold
    puts them on heaps that keep them, and a rank of a 0.9B LoRA run peaked at 3.2 GB instead of 2.2 GB in
    its first step (4.4 GB more with keep_freed_memory). False where malloc is not glibc's."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 2**20))  # set once, the threshold no longer adapts


def trim_heap() -> bool:
    """Give what is free in malloc's heap back to the kernel now (malloc_trim), as torch.cuda.empty_cache does
    on a GPU: after an out-of-memory the failed attempt's blocks, so that the retry, and what comes after it
    (a thread's stack, a file's buffer), find room under the limit again. False where malloc isn't glibc's."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
