"""LR range test (`python train.py --lr-sweep ...`): which learning rate makes this model learn this data?

    result = run_lr_sweep(model, train_batches, 2e-4, mean_loss, make_optimizer, make_scaler, mean_over_ranks)
    print(sweep_table(result))                       # one row per lr, then the recommendation and its rule
    result = lr_range_test(train_steps, 2e-4, n_steps=12, window=4)   # any train_steps(lr, n) -> SweepRun

Every lr of a 10x-spaced grid (default/100 .. default*10) trains from the same starting weights on the same
few batches (~1% of the data) for the same number of steps, and is then scored on as many batches it never
trained on: the drop of that held-out loss says how much it learned that carries over, as the val loss of the
real run will. (Scored on the batches it trained on, a short test favours the lrs that memorise them fastest:
the largest.) Among the lrs that did not diverge, take the largest whose drop is within SAME_DROP of the best
drop: a larger lr that learns as fast in the short test covers more ground in the long run, while one that
spikes, or ends above its start or makes the held-out loss worse (by more than RISE_TOLERANCE, what
a tiny lr's batch noise moves), is out however far it fell on the way.
A choice at either end of the grid says nothing about the lrs past it: the grid widens by 10x on that side
(MAX_WIDENINGS times at most) until the choice lies inside it; otherwise nothing is recommended.
"""

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

SAME_DROP = 0.9  # a drop at least 90% of the best counts as "as fast": the short test is that noisy
SPIKE_FACTOR = 2.0  # a loss above twice the first one (same start for every lr) is divergence
RISE_TOLERANCE = 0.01  # a loss less than 1% above where it started is a tiny lr's noise, not divergence
SWEEP_DATA_FRACTION = 0.01
MIN_SWEEP_BATCHES = 4
PASSES = 3  # each lr goes over the sweep batches this many times
MAX_WIDENINGS = 2  # lrs tried past the end of the grid the choice sits at
MAX_LR = 1.0  # never tried: config refuses --lr 1 and above


class SweepRun(NamedTuple):
    """What train_steps(lr, n) returns: the training losses, and the mean loss over the held-out batches
    before and after those steps."""

    losses: list[float]
    held_out_before: float
    held_out_after: float


@dataclass
class SweepRow:
    lr: float
    run: SweepRun
    window: int  # steps per pass over the sweep batches: the first and last pass see the same batches

    @property
    def losses(self) -> list[float]:
        return self.run.losses

    @property
    def first_pass(self) -> list[float]:
        return self.losses[: self.window]

    @property
    def last_pass(self) -> list[float]:
        return self.losses[-self.window :]

    @property
    def diverged(self) -> bool:
        """A non-finite loss, a loss above twice the very first one, or a last pass or a held-out loss that
        ended more than RISE_TOLERANCE above where it started."""
        losses = [*self.losses, self.run.held_out_after]
        if len(self.losses) < 2 * self.window or not all(math.isfinite(loss) for loss in losses):
            return True
        return (
            mean(self.last_pass) > (1 + RISE_TOLERANCE) * mean(self.first_pass)
            or max(self.losses) > SPIKE_FACTOR * self.losses[0]
            or self.run.held_out_after > (1 + RISE_TOLERANCE) * self.run.held_out_before
        )

    @property
    def drop(self) -> float:
        """How far the held-out loss fell: what this lr learned in the fixed number of steps that carries
        over to data it did not see."""
        return -math.inf if self.diverged else self.run.held_out_before - self.run.held_out_after


@dataclass
class SweepResult:
    rows: list[SweepRow]
    recommended_lr: float | None  # None: no lr lowered the loss, or the best sat at the end of the range
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
    train_steps: Callable[[float, int], SweepRun],
    default_lr: float,
    n_steps: int,
    window: int,
    grid: list[float] | None = None,
) -> SweepResult:
    """train_steps(lr, n) trains n steps at a constant lr from the same starting state; the losses of the
    first and last `window` steps (the same batches) tell divergence, the held-out loss the drop."""
    rows = {lr: SweepRow(lr, train_steps(lr, n_steps), window) for lr in grid or lr_grid(default_lr)}
    for _ in range(MAX_WIDENINGS):
        chosen, _ = choose(list(rows.values()))
        edge = past_edge(chosen.lr, sorted(rows)) if chosen else None
        if edge is None or edge >= MAX_LR:
            break
        rows[edge] = SweepRow(edge, train_steps(edge, n_steps), window)
    rows = [rows[lr] for lr in sorted(rows)]
    chosen, reason = choose(rows)
    if chosen is not None and chosen.lr in (rows[0].lr, rows[-1].lr):
        side = "largest" if chosen.lr == rows[-1].lr else "smallest"
        reason = (
            f"the {side} lr tried ({chosen.lr:g}) learned fastest, so the best may lie past the range: "
            "check the data, or find the lr by hand (halve or double it while the val loss improves)"
        )
        chosen = None
    return SweepResult(rows, chosen.lr if chosen else None, reason)


def choose(rows: list[SweepRow]) -> tuple[SweepRow | None, str]:
    """The rule of the module docstring: (the chosen row, why), or (None, why not)."""
    falling = [row for row in rows if row.drop > 0]
    if not falling:
        return None, "no lr lowered the held-out loss: check the data (are all targets masked?)"
    best = max(falling, key=lambda row: row.drop)
    chosen = max((row for row in falling if row.drop >= SAME_DROP * best.drop), key=lambda row: row.lr)
    if chosen is best:
        return chosen, f"the largest held-out loss drop ({best.drop:.3f}) of the lrs that did not diverge"
    return chosen, (
        f"the largest lr whose held-out loss drop ({chosen.drop:.3f}) is within {1 - SAME_DROP:.0%} of the "
        f"best ({best.drop:.3f} at lr {best.lr:g}) without diverging"
    )


def past_edge(lr: float, tried: list[float]) -> float | None:
    """The next lr past the end of the tried range that `lr` sits at; None when it sits inside."""
    if lr == tried[-1]:
        return float(f"{lr * 10:.3g}")
    if lr == tried[0]:
        return float(f"{lr / 10:.3g}")
    return None


def sweep_table(result: SweepResult) -> str:
    header = f"{'lr':>10}  {'train loss':>19}  {'held-out loss':>19}  {'drop':>8}  verdict"
    lines = [header, f"{'':>10}  {'first -> last pass':>19}  {'before -> after':>19}"]
    for row in result.rows:
        finite = len(row.losses) >= 2 * row.window
        first = f"{mean(row.first_pass):.4f}" if row.losses else "-"
        last = f"{mean(row.last_pass):.4f}" if finite else "-"
        held_out = f"{row.run.held_out_before:.4f} -> {row.run.held_out_after:.4f}"
        drop = "-" if row.diverged else f"{row.drop:.4f}"
        verdict = "diverged" if row.diverged else "no drop" if row.drop <= 0 else ""
        verdict = "recommended" if row.lr == result.recommended_lr else verdict
        lines.append(f"{row.lr:>10.2g}  {first + ' -> ' + last:>19}  {held_out:>19}  {drop:>8}  {verdict}")
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
    held_out: list,
    loss_of_batch: Callable[[torch.nn.Module, object], torch.Tensor],
    make_optimizer: Callable[[list, float], torch.optim.Optimizer] | None = None,
    max_grad_norm: float | None = 1.0,
    make_scaler: Callable[[], torch.amp.GradScaler] | None = None,
    mean_over_ranks: Callable[[torch.Tensor], float] | None = None,
) -> Callable[[float, int], SweepRun]:
    """A train_steps(lr, n) for lr_range_test: every call restores the trainable weights it started from,
    builds a fresh optimizer (AdamW by default) at the constant lr, cycles through `batches` clipping
    gradients like the real run, and scores the `held_out` batches before and after. It keeps one copy of
    the trainable weights (adapters: small).

    make_scaler: a fresh gradient scaler per lr, as the run uses (fp16: small gradients would underflow to
    zero and every lr look flat). mean_over_ranks: the loss every rank records; under DDP/FSDP the mean over
    ranks, so all see the same divergence and stop together (one rank stopping alone would leave the others
    in the next step's collectives)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    make_optimizer = make_optimizer or (lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    make_scaler = make_scaler or (lambda: torch.amp.GradScaler("cpu", enabled=False))
    mean_over_ranks = mean_over_ranks or (lambda loss: loss.item())

    def held_out_loss() -> float:
        model.eval()  # no dropout: the same number for the same weights
        with torch.no_grad():
            losses = [mean_over_ranks(loss_of_batch(model, batch)) for batch in held_out]  # ranks agree
        model.train()
        return mean(losses)

    def train_steps(lr: float, n_steps: int) -> SweepRun:
        with torch.no_grad():
            for param, value in zip(trainable, start, strict=True):
                param.copy_(value)
        before = held_out_loss()
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
        after = held_out_loss() if math.isfinite(losses[-1]) else math.nan
        with torch.no_grad():
            for param, value in zip(trainable, start, strict=True):
                param.copy_(value)  # leave the model as it was found, for the real run
        return SweepRun(losses, before, after)

    return train_steps


def run_lr_sweep(
    model, train_batches, default_lr, loss_of_batch, make_optimizer, make_scaler=None, mean_over_ranks=None
) -> SweepResult:
    """The range test on the first ~1% of `train_batches` (an iterable with len()), PASSES passes over them,
    each step one micro-batch (comparing lrs does not need the full effective batch), scored on as many
    batches after them. make_scaler and mean_over_ranks: see restartable_train_steps."""
    n_batches = sweep_batch_count(len(train_batches))
    # Epoch after epoch: a split of fewer than 2 x n_batches batches scores on reshuffled training examples.
    epochs = itertools.chain.from_iterable(itertools.repeat(train_batches))
    batches = list(itertools.islice(epochs, 2 * n_batches))
    train_steps = restartable_train_steps(
        model,
        batches[:n_batches],
        batches[n_batches:],
        loss_of_batch,
        make_optimizer,
        make_scaler=make_scaler,
        mean_over_ranks=mean_over_ranks,
    )
    return lr_range_test(train_steps, default_lr, n_steps=PASSES * n_batches, window=n_batches)
