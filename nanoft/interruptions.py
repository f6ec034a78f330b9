"""What interrupts a training step, and how the run carries on: out of memory, and a signal to stop.

    recovery = OOMRecovery(micro_batch=config.batch_size, grad_accum=config.grad_accum)
    signals = StopSignals()   # SIGINT / SIGTERM from here on: finish the step, save, exit
    while step < total_steps and stop_reason is None:
        batches = [next(loader) for _ in range(config.grad_accum)]   # the loader keeps its batch size
        while True:
            try:
                pieces = [piece for batch in batches for piece in recovery.split(batch)]
                ... forward and backward every piece, optimizer step ...
                break
            except Exception as error:
                print0(dist, recovery.handle(error, step, optimizer))  # re-raises anything but OOM
        if signals.received(dist):
            stop_reason = "signal"
    signals.restore()

Out of memory mid-run: halve the micro-batch, double accumulation, and retry the same step. The step's data
stays the same, only cut into smaller pieces, so the effective batch (micro-batch x accumulation) and the
token count the loss is divided by do not change: the update is the one the step would have made. At
micro-batch 1 there is nothing left to halve and the run stops with what to do instead.

SIGINT (Ctrl-C) and SIGTERM (schedulers, torchrun, `kill`): every rank stops after the same step, the run
saves a checkpoint and exits with 128 + the signal's number; a second Ctrl-C quits at once.
"""

import gc
import math
import signal
import sys
from dataclasses import dataclass

import torch

from nanoft.distributed import all_reduce_sum
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


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (schedulers, torchrun, `kill`) ask the loop to stop after the current step,
    save a checkpoint and exit; a second Ctrl-C quits at once."""

    def __init__(self):
        self.number = None
        self.previous = {
            number: signal.signal(number, self.handle) for number in (signal.SIGINT, signal.SIGTERM)
        }

    def restore(self) -> None:
        """Give the signals back to whoever handled them before (Python's KeyboardInterrupt, pytest ...)."""
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def handle(self, number, frame):
        if self.number is not None:
            raise KeyboardInterrupt
        self.number = number
        print(
            f"\n{self.name}: finishing this step, then saving a checkpoint (Ctrl-C again quits now)",
            file=sys.stderr,
        )

    def received(self, dist) -> bool:
        """True on every rank once any rank got a signal (they must stop at the same step)."""
        flag = torch.tensor([float(self.number is not None)], device=dist.device)
        if all_reduce_sum(flag, dist).item() > 0:
            self.number = self.number or signal.SIGTERM
            return True
        return False

    @property
    def name(self) -> str:
        return signal.Signals(self.number).name
