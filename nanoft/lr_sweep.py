"""LR range test (`python train.py --lr-sweep ...`): which learning rate makes this model learn this data?

    result = run_lr_sweep(model, train_batches, 2e-4, mean_loss, make_optimizer, make_scaler, mean_over_ranks)
    print(sweep_table(result))                       # one row per lr, then the recommendation and its rule
    result = lr_range_test(train_steps, 2e-4, n_steps=12, window=4)   # any train_steps(lr, n) -> losses

Every lr of a 10x-spaced grid (default/100 .. default*10) trains from the same starting weights on the same
batches for the same number of steps; the one whose loss fell most (first pass over the batches against the
last), without diverging, wins. Among the lrs
that did not diverge, take the largest whose loss drop is within SAME_DROP of the best drop: a larger lr that
learns as fast in the short test covers more ground in the long run, while one that spikes or ends above its
start is out however far it fell on the way.
"""

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

SAME_DROP = 0.9  # a drop at least 90% of the best counts as "as fast": the short test is that noisy
SPIKE_FACTOR = 2.0  # a loss above twice the first one (same start for every lr) is divergence
SWEEP_DATA_FRACTION = 0.01
MIN_SWEEP_BATCHES = 4
PASSES = 3  # each lr goes over the sweep batches this many times


@dataclass
class SweepRow:
    lr: float
    losses: list[float]
    window: int  # steps per pass over the sweep batches: the first and last pass see the same batches

    @property
    def first_pass(self) -> list[float]:
        return self.losses[: self.window]

    @property
    def last_pass(self) -> list[float]:
        return self.losses[-self.window :]

    @property
    def diverged(self) -> bool:
        """A non-finite loss, a last pass above the first, or a loss above twice the very first one."""
        if len(self.losses) < 2 * self.window or not all(math.isfinite(loss) for loss in self.losses):
            return True
        return (
            mean(self.last_pass) > mean(self.first_pass) or max(self.losses) > SPIKE_FACTOR * self.losses[0]
        )

    @property
    def drop(self) -> float:
        """Mean loss of the first pass minus that of the last, over the same batches: batch-to-batch noise
        cancels out, what is left is how far this lr got in the fixed number of steps."""
        return -math.inf if self.diverged else mean(self.first_pass) - mean(self.last_pass)


@dataclass
class SweepResult:
    rows: list[SweepRow]
    recommended_lr: float | None  # None: no lr lowered the loss
    reason: str


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def lr_grid(default_lr: float) -> list[float]:
    """default/100, default/10, default, default*10: e.g. 2e-6, 2e-5, 2e-4, 2e-3 around LoRA's 2e-4."""
    return [float(f"{default_lr * factor:.3g}") for factor in (0.01, 0.1, 1.0, 10.0)]


def sweep_batch_count(train_batches: int) -> int:
    """About 1% of the training batches, never fewer than MIN_SWEEP_BATCHES."""
    return max(MIN_SWEEP_BATCHES, math.ceil(SWEEP_DATA_FRACTION * train_batches))


def lr_range_test(
    train_steps: Callable[[float, int], list[float]],
    default_lr: float,
    n_steps: int,
    window: int,
    grid: list[float] | None = None,
) -> SweepResult:
    """train_steps(lr, n) trains n steps at a constant lr from the same starting state and returns the
    losses; the drop is the first `window` losses' mean minus the last `window`'s."""
    rows = [SweepRow(lr, train_steps(lr, n_steps), window) for lr in grid or lr_grid(default_lr)]
    falling = [row for row in rows if row.drop > 0]
    if not falling:
        return SweepResult(rows, None, "no lr lowered the loss: check the data (are all targets masked?)")
    best = max(falling, key=lambda row: row.drop)
    chosen = max((row for row in falling if row.drop >= SAME_DROP * best.drop), key=lambda row: row.lr)
    if chosen is best:
        reason = f"the largest loss drop ({best.drop:.3f}) of the lrs that did not diverge"
    else:
        reason = (
            f"the largest lr whose loss drop ({chosen.drop:.3f}) is within {1 - SAME_DROP:.0%} of the best "
            f"({best.drop:.3f} at lr {best.lr:g}) without diverging"
        )
    if chosen.lr == max(row.lr for row in rows):
        reason += "; it is the largest lr tried, so a higher one may be faster still: watch for spikes"
    return SweepResult(rows, chosen.lr, reason)


def sweep_table(result: SweepResult) -> str:
    lines = [f"{'lr':>10}  {'first pass':>10}  {'last pass':>10}  {'drop':>8}  verdict"]
    for row in result.rows:
        finite = len(row.losses) >= 2 * row.window
        first = f"{mean(row.first_pass):.4f}" if row.losses else "-"
        last = f"{mean(row.last_pass):.4f}" if finite else "-"
        drop = "-" if row.diverged else f"{row.drop:.4f}"
        verdict = "diverged" if row.diverged else ("recommended" if row.lr == result.recommended_lr else "")
        lines.append(f"{row.lr:>10.2g}  {first:>10}  {last:>10}  {drop:>8}  {verdict}")
    if result.recommended_lr is None:
        lines.append(f"no recommendation: {result.reason}")
    else:
        lines.append(
            f"recommended lr {result.recommended_lr:g} (--lr {result.recommended_lr:g}): {result.reason}"
        )
    return "\n".join(lines)


def restartable_train_steps(
    model: torch.nn.Module,
    batches: list,
    loss_of_batch: Callable[[torch.nn.Module, object], torch.Tensor],
    make_optimizer: Callable[[list, float], torch.optim.Optimizer] | None = None,
    max_grad_norm: float | None = 1.0,
    make_scaler: Callable[[], torch.amp.GradScaler] | None = None,
    mean_over_ranks: Callable[[torch.Tensor], float] | None = None,
) -> Callable[[float, int], list[float]]:
    """A train_steps(lr, n) for lr_range_test: every call restores the trainable weights it started from,
    builds a fresh optimizer (AdamW by default) at the constant lr and cycles through the same batches,
    clipping gradients like the real run. It keeps one copy of the trainable weights (adapters: small).

    make_scaler: a fresh gradient scaler per lr, as the run uses (fp16: small gradients would underflow to
    zero and every lr look flat). mean_over_ranks: the loss every rank records; under DDP/FSDP the mean over
    ranks, so all see the same divergence and stop together (one rank stopping alone would leave the others
    in the next step's collectives)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    make_optimizer = make_optimizer or (lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    make_scaler = make_scaler or (lambda: torch.amp.GradScaler("cpu", enabled=False))
    mean_over_ranks = mean_over_ranks or (lambda loss: loss.item())

    def train_steps(lr: float, n_steps: int) -> list[float]:
        with torch.no_grad():
            for param, value in zip(trainable, start, strict=True):
                param.copy_(value)
        optimizer, scaler = make_optimizer(trainable, lr), make_scaler()
        model.train()
        losses = []
        for step in range(n_steps):
            loss = loss_of_batch(model, batches[step % len(batches)])
            losses.append(mean_over_ranks(loss))
            if not math.isfinite(losses[-1]):
                break  # a NaN only spreads; the row is marked diverged
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clipping sees the true gradients
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for param, value in zip(trainable, start, strict=True):
                param.copy_(value)  # leave the model as it was found, for the real run
        return losses

    return train_steps


def run_lr_sweep(
    model, train_batches, default_lr, loss_of_batch, make_optimizer, make_scaler=None, mean_over_ranks=None
) -> SweepResult:
    """The range test on the first ~1% of `train_batches` (an iterable with len()), PASSES passes over them,
    each step one micro-batch: comparing lrs does not need the full effective batch. make_scaler and
    mean_over_ranks: see restartable_train_steps."""
    batches = list(itertools.islice(iter(train_batches), sweep_batch_count(len(train_batches))))
    train_steps = restartable_train_steps(
        model,
        batches,
        loss_of_batch,
        make_optimizer,
        make_scaler=make_scaler,
        mean_over_ranks=mean_over_ranks,
    )
    return lr_range_test(train_steps, default_lr, n_steps=PASSES * len(batches), window=len(batches))
