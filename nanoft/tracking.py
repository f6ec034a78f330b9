"""Where a run's numbers go besides metrics.jsonl: TensorBoard and MLflow, behind the same four calls.

    trackers = open_trackers(["tensorboard", "mlflow"], run_dir, run_settings(config), start_step)  # rank 0
    for tracker in trackers:
        tracker.log_metrics({"train/loss": 1.9, "train/lr": 2e-4}, step)
        tracker.log_text("val/samples", markdown, step)
        tracker.finish(run_settings(config), {"best_val_loss": 1.7}, [run_dir / "report.md"])  # at the end
        tracker.close(stop_reason)   # None (finished), "early_stop", "nan" or "signal" (resumable)

TensorBoard writes run_dir/tensorboard (`tensorboard --logdir runs/`); the hyperparameters go in at the end,
next to the best val loss, for its HPARAMS tab.

MLflow follows the conventions of Hugging Face's Trainer: MLFLOW_TRACKING_URI names the tracking server or
store (unset: mlflow's own default, a store in the working directory: ./mlflow.db with artifacts under
./mlruns in mlflow 3, ./mlruns in mlflow 2), MLFLOW_EXPERIMENT_NAME the experiment (unset: "Default"), and the
MLflow run is named after the run directory. Its params are the resolved config; its metrics are the same as
TensorBoard's; report.md, config.json, summary.json and loss.png are its artifacts. The MLflow run's id is
kept in run_dir/mlflow_run.json, so `--resume` continues the same MLflow run, where the steps it logged
before its checkpoint are not logged twice. mlflow is optional: `pip install mlflow` when asked for.
"""

import importlib.util
import json
import os
import time
from pathlib import Path

from nanoft.errors import UserError
from nanoft.weights import write_atomically

MLFLOW_RUN_FILE = "mlflow_run.json"
# train.py's stop reasons (None: finished) as MLflow run states; a run stopped by a signal can be resumed.
MLFLOW_STATUS = {None: "FINISHED", "early_stop": "FINISHED", "nan": "FAILED", "signal": "KILLED"}


def check_trackers(names: list[str]) -> None:
    """Fail at once, in one line, for a tracker that cannot run here."""
    if "none" in names and len(names) > 1:
        raise UserError(f"--report-to {' '.join(names)}: 'none' turns tracking off; give it alone")
    if "mlflow" in names and importlib.util.find_spec("mlflow") is None:
        raise UserError("--report-to mlflow: mlflow is not installed; pip install mlflow (or drop mlflow)")


def open_trackers(names: list[str], run_dir, config: dict, start_step: int) -> list:
    """The trackers named by --report-to, opened for this run (rank 0 only: the others log nothing)."""
    trackers = []
    if "tensorboard" in names:
        trackers.append(TensorBoardTracker(Path(run_dir), start_step))
    if "mlflow" in names:
        trackers.append(MLflowTracker(Path(run_dir), config))
    return trackers


class TensorBoardTracker:
    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where it is used

        # purge_step hides events a crashed run logged after the checkpoint we resume from.
        self.writer = SummaryWriter(
            run_dir / "tensorboard", purge_step=start_step + 1 if start_step else None
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def log_text(self, name: str, text: str, step: int) -> None:
        self.writer.add_text(name, text, step)
        self.writer.flush()

    def finish(self, config: dict, results: dict, artifacts: list[Path]) -> None:
        plain = {
            key: value if isinstance(value, int | float | str | bool) else str(value)
            for key, value in config.items()
        }
        from torch.utils.tensorboard.summary import hparams  # tensorboard: imported where it is used

        metrics = {f"hparams/{key}": value for key, value in results.items()}
        # Into the run's own event file, as add_hparams writes them into a new one: that would start another
        # writer thread, which a process out of address space (after an OOM retry) cannot.
        writer = self.writer._get_file_writer()
        for summary in hparams(plain, metrics):
            writer.add_summary(summary)
        for name, value in metrics.items():
            self.writer.add_scalar(name, value)

    def close(self, stop_reason: str | None) -> None:
        self.writer.close()


class MLflowTracker:
    def __init__(self, run_dir: Path, config: dict):
        from mlflow import MlflowClient  # optional: check_trackers said so if it is missing

        self.client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or None)
        self.logged_until = {}  # metric name -> the last step this MLflow run holds for it
        run_file = run_dir / MLFLOW_RUN_FILE
        if run_file.is_file():  # a resumed run: continue its MLflow run
            self.run_id = json.loads(run_file.read_text())["run_id"]
            self.resume(run_file)
            return
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        )
        run = self.client.create_run(experiment_id, run_name=run_dir.resolve().name)
        self.run_id = run.info.run_id
        saved = {
            "run_id": self.run_id,
            "tracking_uri": self.client.tracking_uri,
            "experiment": experiment_name,
        }
        write_atomically(run_file, lambda tmp: Path(tmp).write_text(json.dumps(saved, indent=2) + "\n"))
        self.log_params(config)

    def resume(self, run_file: Path) -> None:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(self.run_id)
        except MlflowException:
            saved = json.loads(run_file.read_text())["tracking_uri"]
            raise UserError(
                f"{run_file}: MLflow run {self.run_id} is not in {self.client.tracking_uri}; it was "
                f"logged to {saved}: set MLFLOW_TRACKING_URI={saved} to continue it"
            ) from None
        for name in run.data.metrics:
            self.logged_until[name] = max(m.step for m in self.client.get_metric_history(self.run_id, name))
        self.client.update_run(self.run_id, status="RUNNING")

    def log_params(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [
            Param(key, value if isinstance(value, str) else json.dumps(value))
            for key, value in config.items()
        ]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per request
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        new = [
            Metric(name, float(value), timestamp, step)
            for name, value in metrics.items()
            if step > self.logged_until.get(name, -1)
        ]
        if new:
            self.client.log_batch(self.run_id, metrics=new)

    def log_text(self, name: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{name}/step-{step:07d}.md")

    def finish(self, config: dict, results: dict, artifacts: list[Path]) -> None:
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, stop_reason: str | None) -> None:
        self.client.set_terminated(self.run_id, MLFLOW_STATUS[stop_reason])
