"""nanoft/loss_plot.py and `python -m nanoft.report`: loss.png of a finished run and of one still going.

python -m pytest -q tests/test_loss_plot.py
"""

import shutil
import subprocess
import sys

import matplotlib.image
import pytest
from test_train import REPO, metrics, train, write_data

from nanoft.loss_plot import read_metrics, smooth


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """(run directory, summary) of a 24-step run of the tiny model."""
    folder = tmp_path_factory.mktemp("loss_plot")
    model_dir = tiny_model_dir()
    data = write_data(folder / "train.jsonl", 96, seed=1), write_data(folder / "val.jsonl", 16, seed=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOFT_CACHE", str(folder / "cache"))
        summary = train(model_dir, data, folder / "run", "--max-steps", "24", "--eval-every", "8")
    return folder / "run", summary


def test_a_run_draws_loss_png_and_nanoft_report_redraws_it_while_running(run, tmp_path):
    run_dir, summary = shutil.copytree(run[0], tmp_path / "run"), run[1]
    png = run_dir / "loss.png"
    assert png.stat().st_size > 10_000  # axes, two curves, a legend: not an empty canvas
    assert matplotlib.image.imread(png).shape == (450, 800, 4)  # 8 x 4.5 inches at 100 dpi, RGBA
    assert "![train and val loss](loss.png)" in (run_dir / "report.md").read_text()
    train_points, val_points = read_metrics(run_dir / "metrics.jsonl")
    assert [step for step, _ in train_points] == list(range(1, 25))
    assert val_points == [tuple(point) for point in summary["val_curve"]]

    # A run still going: the trainer is half-way through writing a line when the report reads the file.
    with open(run_dir / "metrics.jsonl", "a") as file:
        file.write('{"step": 25, "loss": 3.')
    png.unlink()
    finished = subprocess.run(
        [sys.executable, "-m", "nanoft.report", str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stderr
    assert png.stat().st_size > 10_000
    best_step, best_loss = min(summary["val_curve"], key=lambda point: point[1])
    assert f"{png}: 24 steps" in finished.stdout
    assert f"best {best_loss:.4f} at step {best_step}" in finished.stdout


def test_nanoft_report_without_metrics_is_one_line(tmp_path):
    finished = subprocess.run(
        [sys.executable, "-m", "nanoft.report", str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert finished.returncode == 2 and finished.stderr.count("\n") == 1
    assert "no metrics.jsonl" in finished.stderr


def test_smoothing_follows_the_losses_without_lag_at_the_start(run):
    losses = [row["loss"] for row in metrics(run[0]) if "loss" in row]
    smoothed = smooth(losses)
    assert smoothed[0] == losses[0]  # debiased: the first point is not pulled towards 0
    assert min(losses) <= min(smoothed) and max(smoothed) <= max(losses)
    noise = lambda values: sum(abs(b - a) for a, b in zip(values, values[1:], strict=False))
    assert noise(smoothed) < 0.7 * noise(losses)
