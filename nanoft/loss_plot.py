"""The run in one picture: run_dir/loss.png, from the run's metrics.jsonl (nanoft/monitor.py writes it).

    write_loss_plot(run_dir)            # the end of a run (nanoft/report.py embeds it in report.md)
    python -m nanoft.report RUN_DIR     # the same picture of a run that is still going

Train loss per optimizer step, faint as logged and smoothed on top; val loss at every eval; the untuned
baseline (the step-0 eval) as a dashed line and the best eval as a star. A train loss that falls while val
turns up is overfitting; a val line that stays near the baseline means the run is not learning.
"""

import json
from pathlib import Path

SMOOTHING_SHARE = 0.1  # the smoothing averages over about this share of the run's steps


def read_metrics(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """([(step, train loss)], [(step, val loss)]) of a metrics.jsonl, which a running run may be writing:
    a half-written last line is left out."""
    train, val = [], []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                break
            raise
        if "loss" in row:
            train.append((row["step"], row["loss"]))
        if "val_loss" in row:
            val.append((row["step"], row["val_loss"]))
    return train, val


def smooth(values: list[float]) -> list[float]:
    """An exponential moving average over about SMOOTHING_SHARE of the points, debiased so the first points
    are not pulled towards 0 (TensorBoard's smoothing, with a weight that follows the run's length)."""
    weight = 1 - 1 / max(1.0, SMOOTHING_SHARE * len(values))
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**count))
    return smoothed


def write_loss_plot(run_dir) -> Path:
    """Draw run_dir/metrics.jsonl into run_dir/loss.png (replaced whole: a reader never sees half a file)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    from nanoft.weights import write_atomically

    run_dir = Path(run_dir)
    train, val = read_metrics(run_dir / "metrics.jsonl")
    figure = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    axes = figure.subplots()
    if train:
        steps, losses = zip(*train, strict=True)
        axes.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1)
        axes.plot(steps, smooth(list(losses)), color="tab:blue", label="train loss (smoothed)")
    if val:
        steps, losses = zip(*val, strict=True)
        axes.plot(steps, losses, color="tab:orange", marker="o", markersize=4, label="val loss")
        if val[0][0] == 0:
            axes.axhline(
                val[0][1], color="gray", linestyle="--", linewidth=1, label=f"baseline {val[0][1]:.4f}"
            )
        best_step, best_loss = min(val, key=lambda point: point[1])
        axes.plot(
            [best_step],
            [best_loss],
            "*",
            color="tab:red",
            markersize=14,
            label=f"best {best_loss:.4f} at step {best_step}",
        )
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss per target token")
    axes.set_title(run_dir.resolve().name)
    axes.grid(alpha=0.3)
    if train or val:
        axes.legend()
    path = run_dir / "loss.png"
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png"))
    return path
