"""nanoft/tracking.py: train.py against a real MLflow tracking server, read back with MlflowClient.

    python -m pytest -q tests/test_tracking.py

The server is `mlflow server` on 127.0.0.1 at a free port, in a subprocess (it takes ~16 s to answer
/health), with a SQLite store and proxied artifacts in a temporary directory, stopped after the module.
The MLflow tests are skipped when mlflow is not installed (requirements-dev.txt installs it).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_train import metrics, write_data

from train import main

EXPERIMENT = "nanoft-tracking-test"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """The tracking URI of a running `mlflow server`."""
    pytest.importorskip("mlflow")
    folder, port = tmp_path_factory.mktemp("mlflow"), free_port()
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)),
        *("--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"),
        *("--artifacts-destination", str(folder / "artifacts")),
    ]
    log = open(folder / "server.log", "w")  # noqa: SIM115 (open while the server runs)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # ~16 s on a quiet machine; much longer beside other test runs
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    else:
        os.killpg(server.pid, signal.SIGKILL)
        pytest.fail(
            "mlflow server did not answer /health in 180 s: " + (folder / "server.log").read_text()[-3000:]
        )
    yield uri
    os.killpg(server.pid, signal.SIGTERM)  # the server and the worker it started
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    log.close()


@pytest.fixture(scope="module")
def tiny_run_inputs(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return (
        tiny_model_dir(),
        write_data(folder / "train.jsonl", 64, seed=1),
        write_data(folder / "val.jsonl", 16, seed=2),
    )


def train(inputs, out: Path, *flags: str) -> None:
    model_dir, train_file, val_file = inputs
    paths = [
        "--model",
        str(model_dir),
        "--data",
        str(train_file),
        "--val-data",
        str(val_file),
        "--out",
        str(out),
    ]
    defaults = (
        "--seq-len 64 --batch-size 4 --grad-accum 2 --lr 1e-2 --eval-every 2 --save-every 2 --keep-last 20"
    )
    main([*paths, *defaults.split(), *flags])


def test_a_run_and_its_resume_log_to_one_mlflow_run(
    mlflow_server, tiny_run_inputs, tmp_path, monkeypatch, capsys
):
    import mlflow

    monkeypatch.setenv("NANOFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    out = tmp_path / "tracked-run"
    train(tiny_run_inputs, out, "--max-steps", "6", "--report-to", "mlflow", "tensorboard")

    output = capsys.readouterr().out.splitlines()
    where = next(line for line in output if line.startswith("best weights:"))  # what the run prints last
    assert "; tensorboard --logdir" in where and where.endswith("; MLflow run tracked-run")
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    [run] = client.search_runs(
        [experiment.experiment_id], filter_string="attributes.run_name = 'tracked-run'"
    )
    assert run.info.status == "FINISHED"
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
    config = json.loads((out / "config.json").read_text())  # params: the resolved config, every field
    assert run.data.params["lr"] == "0.01" and run.data.params["lora_targets"] == '["q_proj", "v_proj"]'
    assert set(run.data.params) == set(config) and run.data.params["report_to"] == '["mlflow", "tensorboard"]'

    def history(name: str) -> dict[int, float]:
        points = client.get_metric_history(run.info.run_id, name)
        assert len({point.step for point in points}) == len(points), f"{name}: a step logged twice"
        return {point.step: point.value for point in points}

    rows = metrics(out)  # metrics.jsonl: what the MLflow run must hold too
    for name in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_bytes"):
        assert history(f"train/{name}") == pytest.approx({r["step"]: r[name] for r in rows if name in r}), (
            name
        )
    val_curve = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(val_curve) == [0, 2, 4, 6] and history("val/loss") == pytest.approx(val_curve)
    best = [min(loss for step, loss in val_curve.items() if step <= at) for at in sorted(val_curve)]
    assert list(history("val/best_loss").values()) == pytest.approx(best)
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "config.json", "summary.json", "loss.png", "val"} <= artifacts
    report = client.download_artifacts(run.info.run_id, "report.md", str(tmp_path))
    assert Path(report).read_text() == (out / "report.md").read_text()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard beside it

    # A crash after step 6 that left only the step-4 checkpoint: --resume redoes steps 5 and 6, which MLflow
    # holds already (with the same values: resume is exact) and are not logged twice.
    logged_before = history("train/loss")
    for checkpoint in (out / "checkpoints").iterdir():
        if checkpoint.name != "step-0000004":
            shutil.rmtree(checkpoint)
    train(tiny_run_inputs, out, "--resume")
    assert history("train/loss") == logged_before
    assert history("train/loss") == pytest.approx({r["step"]: r["loss"] for r in metrics(out) if "loss" in r})
    # Resumed for two more steps: they go into the same MLflow run, which ends finished.
    train(tiny_run_inputs, out, "--resume", "--max-steps", "8")
    [resumed] = client.search_runs(
        [experiment.experiment_id], filter_string="attributes.run_name = 'tracked-run'"
    )
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert sorted(history("train/loss")) == list(range(1, 9)) and sorted(history("val/loss")) == [
        0,
        2,
        4,
        6,
        8,
    ]


def test_mlflow_asked_for_but_not_installed_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # how Python sees a package that is not installed
    with pytest.raises(SystemExit) as stopped:
        main(["--report-to", "mlflow", "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and error.count("\n") == 1
    assert "--report-to mlflow: mlflow is not installed; pip install mlflow" in error
    assert not (tmp_path / "run").exists()


def test_report_to_none_writes_metrics_jsonl_only(tiny_run_inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOFT_CACHE", str(tmp_path / "cache"))
    train(tiny_run_inputs, tmp_path / "run", "--max-steps", "2", "--report-to", "none")
    assert not (tmp_path / "run/tensorboard").exists() and not (tmp_path / "run/mlflow_run.json").exists()
    assert [row["step"] for row in metrics(tmp_path / "run") if "loss" in row] == [1, 2]
    assert (tmp_path / "run/loss.png").stat().st_size > 0
    where = capsys.readouterr().out.splitlines()[-1]
    assert where.startswith("best weights:") and "tensorboard" not in where
