"""Out of memory mid-run: halve the micro-batch, double accumulation, and retry the same step.

    recovery = OOMRecovery(micro_batch=config.batch_size, grad_accum=config.grad_accum)
    for step in ...:
        batches = [next(loader) for _ in range(config.grad_accum)]   # the loader keeps its batch size
        while True:
            try:
                pieces = [piece for batch in batches for piece in recovery.split(batch)]
                ... forward and backward every piece, optimizer step ...
                break
            except Exception as error:
                print0(dist, recovery.handle(error, step, optimizer))  # re-raises anything but OOM

The step's data stays the same, only cut into smaller pieces, so the effective batch (micro-batch x
accumulation) and the token count the loss is divided by do not change: the update is the one the step would
have made. At micro-batch 1 there is nothing left to halve and the run stops with what to do instead.
"""

import gc
import math
from dataclasses import dataclass

import torch

from nanoft.errors import UserError

OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory")  # CUDA's, and the CPU allocator's


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in OUT_OF_MEMORY_MESSAGES)


@dataclass
class OOMRecovery:
    micro_batch: int  # rows per forward and backward now
    grad_accum: int  # forward and backward passes per optimizer step now
    splits: int = 1  # each micro-batch the loader makes is cut into this many pieces

    def split(self, batch: dict) -> list[dict]:
        """The loader's batch as pieces of at most `micro_batch` rows (tensors and lists cut along rows)."""
        if self.splits == 1:
            return [batch]
        rows = len(batch["input_ids"])
        return [
            {key: value[start : start + self.micro_batch] for key, value in batch.items()}
            for start in range(0, rows, self.micro_batch)
        ]

    def handle(self, error: BaseException, step: int, optimizer: torch.optim.Optimizer) -> str:
        """After an exception in a step: re-raise it unless it is out-of-memory; else drop the step's partial
        gradients, free the cached memory, halve the micro-batch and return the line to log."""
        if not is_out_of_memory(error):
            raise error
        optimizer.zero_grad(set_to_none=True)
        gc.collect()  # the failed step's activations are referenced by the traceback until collected
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.micro_batch == 1:
            raise UserError(
                f"out of memory at step {step} with micro-batch 1: the model does not fit at this --seq-len; "
                "turn on --activation-checkpointing, shorten --seq-len, use --method qlora, or see what "
                "fits with python train.py --plan"
            ) from None
        before = self.micro_batch
        self.micro_batch = math.ceil(self.micro_batch / 2)
        self.splits *= 2
        self.grad_accum *= 2
        return (
            f"step {step}: out of memory at micro-batch {before}; retrying the step with micro-batch "
            f"{self.micro_batch} x accumulation {self.grad_accum} (effective batch unchanged)"
        )
