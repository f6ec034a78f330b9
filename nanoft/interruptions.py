"""What interrupts a training step, and how the run carries on: out of memory, and a signal to stop.

    recovery = OOMRecovery(micro_batch=config.batch_size, grad_accum=config.grad_accum)
    signals = StopSignals()   # SIGINT / SIGTERM from here on: finish the step, save, exit
    while step < total_steps and stop_reason is None:
        batches = [next(loader) for _ in range(config.grad_accum)]   # the loader keeps its batch size

        def attempt(pieces):                                         # may run out of memory anywhere inside
            for piece in pieces:
                ... forward and backward (gradients accumulate locally) ...
            return loss_sum

        loss_sum = recovery.run(attempt, batches, step, dist, sharded=..., log=print0, before_retry=zero_grad)
        ... optimizer step ...
        if signals.received(dist):
            stop_reason = "signal"
    signals.restore()

Out of memory mid-run: halve the micro-batch, double accumulation, and retry the same step. The step's data
stays the same, only cut into smaller pieces, so the effective batch (micro-batch x accumulation) and the
token count the loss is divided by do not change: the update is the one the step would have made. At
micro-batch 1 there is nothing left to halve and the run stops with what to do instead.

Freeing the failed attempt's memory: its activations are held by the traceback's frames, so `run` retries
only after leaving the `except` block (Python then drops the exception and its traceback), and after
collecting and emptying the allocators' caches (the GPU's, and the CPU heap train.py keeps).

Several ranks (DDP): a rank that runs out of memory must not leave the others waiting in a collective. So
no collective runs inside an attempt (distributed.local_gradients), and after it every rank says whether it
failed (one all-reduce of a CPU flag); all retry together, or all go on and the gradients are all-reduced
then (distributed.all_reduce_gradients). FSDP cannot do this: its forward and backward gather and scatter
weights layer by layer, so a rank that fails mid-attempt has left collectives the others are inside. Under
FSDP with several ranks an out-of-memory stops the run with the advice line, at once (torchrun then stops
the other ranks), never a hang or ranks that disagree on the step.

Evaluation (no gradients, and under DDP no collectives in the forward) recovers rank by rank: each rank
halves its own val micro-batch, since the val loss is a sum over ranks whatever the split.

SIGINT (Ctrl-C) and SIGTERM (schedulers, torchrun, `kill`): every rank stops after the same step, the run
saves a checkpoint and exits with 128 + the signal's number; a second Ctrl-C quits at once.
"""

import gc
import math
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanoft.cpu_allocator import trim_heap
from nanoft.distributed import any_rank
from nanoft.errors import UserError
from nanoft.loss import IGNORE_INDEX

# CUDA's, the CPU allocator's, and oneDNN's (CPU bf16 matmuls) when it cannot get memory for a kernel: seen
# under `prlimit --as` when a retried SmolLM2 step at micro-batch 8 ran into the limit in a linear layer.
OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "could not create a primitive")
ADVICE = (
    "turn on --activation-checkpointing, lower --batch-size (raise --grad-accum to keep the effective "
    "batch), shorten --seq-len, use --method qlora, or see what fits with python train.py --plan"
)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in OUT_OF_MEMORY_MESSAGES)


@dataclass
class OOMRecovery:
    micro_batch: int  # rows per forward and backward now
    grad_accum: int  # forward and backward passes per optimizer step now
    splits: int = 1  # each micro-batch the loader makes is cut into this many pieces
    evaluation: bool = False  # val batches: no accumulation to keep, the rest of the evaluation goes on

    def split(self, batch: dict) -> list[dict]:
        """A batch data.Batches made, as pieces of at most `micro_batch` rows: its (B, T) tensors cut along
        rows, None fields (document_ids of unpacked batches) kept None. sample_ids (per example, and a packed
        row holds several) stay with the loader's batch. A piece drops the trailing columns where none of its
        rows has a target: attention is causal, so they change nothing before them."""
        if self.splits == 1:
            return [batch]
        tensors = [key for key, value in batch.items() if isinstance(value, torch.Tensor)]
        pieces = []
        for start in range(0, len(batch["input_ids"]), self.micro_batch):
            rows = slice(start, start + self.micro_batch)
            has_target = (batch["targets"][rows] != IGNORE_INDEX).any(dim=0).nonzero()
            columns = slice(0, int(has_target.max()) + 1 if len(has_target) else 1)
            piece = {key: None for key, value in batch.items() if value is None}
            pieces.append(piece | {key: batch[key][rows, columns] for key in tensors})
        return pieces

    def run(
        self,
        attempt: Callable[[list[dict]], object],
        batches: list[dict],
        step: int,
        dist,
        sharded: bool,
        log: Callable[[str], None],
        before_retry: Callable[[], None] = lambda: None,
        agree: bool = True,
    ):
        """attempt(pieces)'s result, for the batches cut into pieces of at most `micro_batch` rows, retried
        with halved micro-batches while any rank runs out of memory.

        sharded: FSDP over several ranks, where an out-of-memory stops the run (see the module docstring).
        agree: the ranks decide together (training); evaluation passes False, each rank for itself.
        before_retry: drops what the failed attempt left (its partial gradients), on every rank.
        """
        while True:
            failed = False
            try:
                result = attempt([piece for batch in batches for piece in self.split(batch)])
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                if sharded:
                    raise UserError(
                        f"out of memory at step {step} with micro-batch {self.micro_batch} under FSDP, whose "
                        f"ranks cannot retry a step one of them left midway: {ADVICE}"
                    ) from None
                failed = True
            # Out of the except block: the exception, its traceback and the failed graph are released here.
            if not (any_rank(failed, dist) if agree else failed):
                return result
            result = None
            before_retry()
            gc.collect()
            trim_heap()  # CPU runs keep what they free (nanoft/cpu_allocator.py): not this
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log(self.shrink(step, failed))

    def shrink(self, step: int, failed_here: bool = True) -> str:
        """Halve the micro-batch (double the accumulation) and return the line to log; at micro-batch 1 stop
        with what to do instead."""
        where = "" if failed_here else " on another rank"
        if self.micro_batch == 1:
            raise UserError(
                f"out of memory{where} at step {step} with micro-batch 1: the model does not fit at this "
                f"--seq-len; {ADVICE}"
            ) from None
        before = self.micro_batch
        self.micro_batch = math.ceil(self.micro_batch / 2)
        self.splits *= 2
        self.grad_accum *= 2
        if self.evaluation:
            return (
                f"evaluation at step {step}: out of memory at micro-batch {before}; evaluating with "
                f"micro-batch {self.micro_batch} from here on"
            )
        return (
            f"step {step}: out of memory{where} at micro-batch {before}; retrying the step with micro-batch "
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
        """True on every rank once any rank got a signal (they must stop at the same step); a CPU flag, so
        asking never waits for the GPU."""
        if any_rank(self.number is not None, dist):
            self.number = self.number or signal.SIGTERM
            return True
        return False

    @property
    def name(self) -> str:
        return signal.Signals(self.number).name
