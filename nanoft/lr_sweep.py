"""LR range test (`python train.py --lr-sweep ...`): which learning rate makes this model learn this data?

    result = run_lr_sweep(model, train_batches, 2e-4, mean_loss, make_optimizer)  # what train.py calls
    print(sweep_table(result))                       # one row per lr, then the recommendation and its rule
    result = lr_range_test(train_steps, default_lr=2e-4, n_steps=10)   # any train_steps(lr, n) -> losses

Every lr of a 10x-spaced grid (default/100 .. default*10) trains from the same starting weights on the same
batches for the same number of steps; the one whose loss fell most, without diverging, wins. Among the lrs
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
SPIKE_FACTOR = 2.0  # a loss above twice the first one at any step is divergence
SWEEP_DATA_FRACTION = 0.01
MIN_SWEEP_BATCHES = 4
MIN_SWEEP_STEPS = 10  # fewer steps cannot tell a slow lr from a fast one


@dataclass
class SweepRow:
    lr: float
    losses: list[float]
    diverged: bool

    @property
    def drop(self) -> float:
        """First loss minus the mean of the last few: how far this lr got in the fixed number of steps."""
        if self.diverged:
            return -math.inf
        tail = self.losses[-max(1, len(self.losses) // 4) :]  # averaging the tail damps batch-to-batch noise
        return self.losses[0] - sum(tail) / len(tail)


@dataclass
class SweepResult:
    rows: list[SweepRow]
    recommended_lr: float | None  # None: no lr lowered the loss
    reason: str


def lr_grid(default_lr: float) -> list[float]:
    """default/100, default/10, default, default*10: e.g. 2e-6, 2e-5, 2e-4, 2e-3 around LoRA's 2e-4."""
    return [float(f"{default_lr * factor:.3g}") for factor in (0.01, 0.1, 1.0, 10.0)]


def sweep_batch_count(train_batches: int) -> int:
    """About 1% of the training batches, never fewer than MIN_SWEEP_BATCHES."""
    return max(MIN_SWEEP_BATCHES, math.ceil(SWEEP_DATA_FRACTION * train_batches))


def is_diverged(losses: list[float]) -> bool:
    if not losses or not all(math.isfinite(loss) for loss in losses):
        return True
    return losses[-1] > losses[0] or max(losses) > SPIKE_FACTOR * losses[0]


def lr_range_test(
    train_steps: Callable[[float, int], list[float]],
    default_lr: float,
    n_steps: int,
    grid: list[float] | None = None,
) -> SweepResult:
    """train_steps(lr, n) trains n steps at a constant lr from the same starting state; returns the losses."""
    rows = []
    for lr in grid or lr_grid(default_lr):
        losses = train_steps(lr, n_steps)
        rows.append(SweepRow(lr, losses, is_diverged(losses)))
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
    return SweepResult(rows, chosen.lr, reason)


def sweep_table(result: SweepResult) -> str:
    lines = [f"{'lr':>10}  {'first loss':>10}  {'last loss':>10}  {'drop':>8}  verdict"]
    for row in result.rows:
        first = f"{row.losses[0]:.4f}" if row.losses else "-"
        last = f"{row.losses[-1]:.4f}" if row.losses else "-"
        drop = "-" if row.diverged else f"{row.drop:.4f}"
        verdict = "diverged" if row.diverged else ("recommended" if row.lr == result.recommended_lr else "")
        lines.append(f"{row.lr:>10.2g}  {first:>10}  {last:>10}  {drop:>8}  {verdict}")
    if result.recommended_lr is None:
        lines.append(f"no recommendation: {result.reason}")
    else:
        lines.append(f"recommended lr {result.recommended_lr:g}: {result.reason}")
    return "\n".join(lines)


def restartable_train_steps(
    model: torch.nn.Module,
    batches: list,
    loss_of_batch: Callable[[torch.nn.Module, object], torch.Tensor],
    make_optimizer: Callable[[list, float], torch.optim.Optimizer] | None = None,
    max_grad_norm: float | None = 1.0,
) -> Callable[[float, int], list[float]]:
    """A train_steps(lr, n) for lr_range_test: every call restores the trainable weights it started from,
    builds a fresh optimizer (AdamW by default) at the constant lr and cycles through the same batches,
    clipping gradients like the real run. It keeps one copy of the trainable weights (adapters: small)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    make_optimizer = make_optimizer or (lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0))

    def train_steps(lr: float, n_steps: int) -> list[float]:
        with torch.no_grad():
            for param, value in zip(trainable, start, strict=True):
                param.copy_(value)
        optimizer = make_optimizer(trainable, lr)
        model.train()
        losses = []
        for step in range(n_steps):
            loss = loss_of_batch(model, batches[step % len(batches)])
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                break  # a NaN only spreads; the row is marked diverged
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for param, value in zip(trainable, start, strict=True):
                param.copy_(value)  # leave the model as it was found, for the real run
        return losses

    return train_steps


def run_lr_sweep(model, train_batches, default_lr, loss_of_batch, make_optimizer) -> SweepResult:
    """The range test on the first ~1% of `train_batches` (an iterable with len()), each step one micro-batch:
    it compares lrs, for which the full effective batch is not needed."""
    n_batches = sweep_batch_count(len(train_batches))
    batches = list(itertools.islice(iter(train_batches), n_batches))
    train_steps = restartable_train_steps(model, batches, loss_of_batch, make_optimizer)
    return lr_range_test(train_steps, default_lr, n_steps=max(MIN_SWEEP_STEPS, len(batches)))
