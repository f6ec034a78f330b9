"""The learning-rate schedule: linear warmup, then cosine decay to a floor (as in nanoGPT).

    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, max_lr=2e-4, warmup_steps=3, total_steps=100)

A plain function of the step, so the schedule has no state to save: resuming at step k gives the same lr.
"""

import math

MIN_LR_RATIO = 0.1  # the floor the cosine decays to, as a fraction of the peak lr


def lr_at(
    step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = MIN_LR_RATIO
) -> float:
    """The lr for optimizer step `step` (0-based) of `total_steps`."""
    # Warmup: Adam's second-moment estimates start at zero, so the first updates are noisy; ramp up gently.
    # (step + 1) so that the very first step already moves the weights.
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    min_lr = max_lr * min_lr_ratio
    if step >= total_steps:
        return min_lr
    # Cosine from max_lr down to min_lr over the remaining steps; the floor keeps late steps useful.
    decay_ratio = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    coefficient = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coefficient * (max_lr - min_lr)
