"""train.py end to end on a tiny random Llama: accumulation, exact resume, best-by-val, NaN stop, signals,
bad input, and the outputs (summary.json, a PEFT-loadable adapter, merged and full exports).

    python -m pytest tests/test_train.py -q -x

Each run is train.py's own main() (in-process, fast) or a subprocess where exit codes and signals matter.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from families import FAMILIES, QV_TARGETS
from safetensors.torch import load_file, save_file

from nanoft.config import parse_config
from train import main

REPO = Path(__file__).resolve().parents[1]
N_WORDS = 58  # the tiny tokenizer's words w0..w57 (ids 6..63)


@pytest.fixture(scope="module")
def tiny_llama_dir(tiny_model_dir):
    """conftest's tiny Llama (TINY_MODEL, tied) as a Hugging Face directory, shared by this file's runs."""
    return tiny_model_dir()


def poison(model_dir: Path, word: int) -> Path:
    """The word's embedding set to inf in the model's weights: any batch holding it has a NaN loss."""
    weights_file = model_dir / "model.safetensors"
    tensors = load_file(weights_file)
    tensors["model.embed_tokens.weight"][6 + word] = float("inf")
    save_file(tensors, weights_file, {"format": "pt"})
    return model_dir


def write_data(path: Path, n: int, seed: int, shift: int = 1, n_words_range=(2, 7)) -> Path:
    """Alpaca records a tiny model can learn: the answer is each instruction word moved `shift` places up.
    Lengths vary, so micro-batches hold different numbers of target tokens."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = rng.integers(0, N_WORDS - 1, size=rng.integers(*n_words_range))
        rows.append(
            {
                "instruction": " ".join(f"w{w}" for w in words),
                "output": " ".join(f"w{(w + shift) % (N_WORDS - 1)}" for w in words),
            }
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return write_data(folder / "train.jsonl", 96, seed=1), write_data(folder / "val.jsonl", 16, seed=2)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOFT_CACHE", str(tmp_path / "cache"))  # tokenized-data cache per test


def train(model_dir, data_files, out: Path, *flags: str) -> dict:
    """Run train.py's main() with small defaults (later flags override them); return summary.json."""
    train_file, val_file = data_files
    defaults = "--seq-len 64 --batch-size 4 --grad-accum 2 --lr 1e-2 --eval-every 4 --lora-targets all-linear"
    paths = ["--model", str(model_dir), "--data", str(train_file), "--val-data", str(val_file)]
    main([*paths, "--out", str(out), *defaults.split(), *flags])
    return json.loads((out / "summary.json").read_text())


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics(out) if "loss" in row}


def cli_args(model_dir, train_file, val_file, out, flags: str) -> list[str]:
    paths = ["--model", model_dir, "--data", train_file, "--val-data", val_file, "--out", out]
    return [sys.executable, str(REPO / "train.py"), *map(str, paths), "--seq-len", "64", *flags.split()]


def run_cli(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOFT_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


# ---------------------------------------------------------------------------- the loop's arithmetic


def test_accumulating_4_micro_batches_of_1_equals_one_batch_of_4(tiny_llama_dir, data_files, tmp_path):
    """Loss and gradients are normalised by the target tokens of the whole step, so how the step's sequences
    fall into micro-batches changes nothing: the same loss, grad norm and adapter weights, step for step.
    (fp32: in bf16 the different padding of the two layouts alone moves the grad norm by ~1e-3.)"""
    flags = "--max-steps 3 --lora-dropout 0 --save-every 3 --eval-every 3 --dtype fp32".split()
    train(tiny_llama_dir, data_files, tmp_path / "one", *flags, "--batch-size", "4", "--grad-accum", "1")
    train(tiny_llama_dir, data_files, tmp_path / "four", *flags, "--batch-size", "1", "--grad-accum", "4")
    one, four = metrics(tmp_path / "one"), metrics(tmp_path / "four")
    for a, b in zip(one, four, strict=True):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a, b)
    weights_one = load_file(tmp_path / "one/checkpoints/step-0000003/trainable.safetensors")
    weights_four = load_file(tmp_path / "four/checkpoints/step-0000003/trainable.safetensors")
    assert weights_one.keys() == weights_four.keys()
    for name in weights_one:  # Adam divides by sqrt(v): where a gradient is ~0, 1e-6 noise becomes 1e-5
        torch.testing.assert_close(weights_one[name], weights_four[name], rtol=1e-4, atol=1e-5)
    assert any(
        tensor.abs().sum() > 0 for name, tensor in weights_one.items() if "lora_B" in name
    )  # it trained


def test_resume_continues_exactly(tiny_llama_dir, data_files, tmp_path):
    """Keep only the step-8 checkpoint of a 16-step run and resume from it: steps 9-16 give the uninterrupted
    run's losses, val losses and weights. Dropout is on, so the random state must come back too, and an epoch
    (6 steps) ends before the checkpoint and another after it, so the data position must too."""
    flags = "--max-steps 16 --save-every 2 --keep-last 20 --lora-dropout 0.1 --batch-size 8 --grad-accum 2"
    full = train(tiny_llama_dir, data_files, tmp_path / "full", *flags.split())
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full", interrupted)
    for checkpoint in (interrupted / "checkpoints").iterdir():
        if checkpoint.name != "step-0000008":
            shutil.rmtree(checkpoint)
    resumed = train(tiny_llama_dir, data_files, interrupted, *flags.split(), "--resume")
    full_losses, resumed_losses = train_losses(tmp_path / "full"), train_losses(interrupted)
    assert sorted(resumed_losses) == list(range(1, 17))
    for step in range(9, 17):
        assert resumed_losses[step] == pytest.approx(full_losses[step], abs=1e-6), step
    assert [step for step, _ in resumed["val_curve"]] == [0, 4, 8, 12, 16]
    assert resumed["val_curve"] == [pytest.approx(point, abs=1e-6) for point in full["val_curve"]]
    final_full = load_file(tmp_path / "full/checkpoints/step-0000016/trainable.safetensors")
    final_resumed = load_file(interrupted / "checkpoints/step-0000016/trainable.safetensors")
    for name in final_full:
        torch.testing.assert_close(final_resumed[name], final_full[name], rtol=0, atol=1e-6)


def test_resume_with_a_different_lora_rank_is_refused_and_the_run_kept(
    tiny_llama_dir, data_files, tmp_path, capsys
):
    train(tiny_llama_dir, data_files, tmp_path / "run", "--max-steps", "2")
    saved = (tmp_path / "run/config.json").read_text()
    with pytest.raises(SystemExit) as stopped:
        main(["--out", str(tmp_path / "run"), "--resume", "--lora-r", "8"])
    assert stopped.value.code == 2
    assert "was made with lora_r = 16, this run has 8" in capsys.readouterr().err
    assert (tmp_path / "run/config.json").read_text() == saved  # so a plain --resume still works


def test_resume_with_another_lr_says_and_records_it_and_a_resume_that_trains_nothing_changes_nothing(
    tiny_llama_dir, data_files, tmp_path, capsys
):
    """The QA report: `--resume --lr 1e-3` on a finished run trained nothing, said nothing, rewrote its config
    with the new lr (so a later resume trained at it unasked) and reported its own process's peak memory."""
    run = tmp_path / "run"
    first = train(tiny_llama_dir, data_files, run, "--max-steps", "4")
    config_json, checkpoints = (run / "config.json").read_text(), sorted((run / "checkpoints").iterdir())
    state = (checkpoints[-1] / "state.json").read_text()
    # In a fresh process: its own peak (loading alone) is not the run's, recorded by the session that trained.
    finished = run_cli(
        [sys.executable, str(REPO / "train.py"), "--out", str(run), "--resume", "--lr", "5e-3"],
        tmp_path / "cache",
    )
    assert finished.returncode == 0, finished.stderr
    assert "  lr 1e-2 -> 5e-3 from step 4" in finished.stdout
    assert "nothing left to train: the run is at step 4 of 4; it stays as it was" in finished.stdout
    assert (run / "config.json").read_text() == config_json
    assert sorted((run / "checkpoints").iterdir()) == checkpoints
    assert (checkpoints[-1] / "state.json").read_text() == state
    summary = json.loads((run / "summary.json").read_text())
    assert summary["peak_memory_bytes"] == first["peak_memory_bytes"] > 0
    assert summary["changed_on_resume"] == [] and summary["val_curve"] == first["val_curve"]

    capsys.readouterr()
    resumed = train(tiny_llama_dir, data_files, run, "--resume", "--lr", "5e-3", "--max-steps", "6")
    printed = capsys.readouterr().out
    assert "  lr 1e-2 -> 5e-3 from step 4\n  max_steps 4 -> 6 from step 4\n" in printed
    said = ["lr 1e-2 -> 5e-3 from step 4", "max_steps 4 -> 6 from step 4"]
    assert [
        line.removeprefix("changed on resume: ") for line in printed.splitlines() if "changed on" in line
    ] == said
    assert resumed["changed_on_resume"] == [
        {"setting": "lr", "from": 1e-2, "to": 5e-3, "step": 4},
        {"setting": "max_steps", "from": 4, "to": 6, "step": 4},
    ]
    assert "| changed on resume | lr 1e-2 -> 5e-3 from step 4 |" in (run / "report.md").read_text()
    assert max(row["lr"] for row in metrics(run) if row["step"] > 4 and "lr" in row) <= 5e-3
    saved = json.loads((run / "config.json").read_text())
    assert saved["lr"] == 5e-3 and saved["changed_on_resume"] == said
    # The saved config still starts a run, and says it does not repeat this one.
    assert parse_config(["--config", str(run / "config.json")]).lr == 5e-3
    assert "does not repeat that run" in capsys.readouterr().err
    assert parse_config(["--out", str(run), "--resume"]).lr == 5e-3  # a later resume keeps the new lr
    assert "does not repeat" not in capsys.readouterr().err


def test_qlora_counts_its_parameters_once(tiny_llama_dir, data_files, tmp_path, capsys):
    """The QA report: the PEFT line said 135M weights and the run's own lines 82M (4-bit bytes counted)."""
    pytest.importorskip("bitsandbytes")
    train(tiny_llama_dir, data_files, tmp_path / "run", "--max-steps", "1", "--method", "qlora")
    printed = capsys.readouterr().out
    total = re.search(r"all params: ([\d,]+)", printed).group(1)
    assert re.search(rf"LoRA r=16 .*: [\d,]+ of {total} weights train", printed), printed


def test_a_step_longer_than_an_epoch_trains(tiny_llama_dir, data_files, tmp_path, capsys):
    """96 examples in micro-batches of 16 are 6 per epoch; a step of 8 spans two epochs (it crashed with a
    ZeroDivisionError while printing the notes)."""
    flags = "--batch-size 16 --grad-accum 8 --max-steps 1".split()
    summary = train(tiny_llama_dir, data_files, tmp_path / "run", *flags)
    assert summary["steps"] == 1
    assert "1 steps = 1.3 epochs of 0.75 steps" in capsys.readouterr().out


def test_best_by_val_is_kept_and_early_stopping(tiny_llama_dir, tmp_path, capsys):
    """Validation answers follow another rule than training's, so after a first improvement (the format) the
    more the model learns the worse val gets: the best adapter is an early one, kept on disk (its checkpoint
    survives pruning to the last 1), the rise is flagged as overfitting, and patience stops the run."""
    train_file = write_data(tmp_path / "train.jsonl", 96, seed=1, shift=1)
    val_file = write_data(tmp_path / "val.jsonl", 16, seed=2, shift=5)
    flags = "--max-steps 60 --eval-every 2 --save-every 2 --keep-last 1 --patience 3".split()
    summary = train(tiny_llama_dir, (train_file, val_file), tmp_path / "run", *flags)
    curve = summary["val_curve"]
    assert summary["stop_reason"] == "early stop (patience)"
    assert summary["steps"] < 60
    assert "while train loss fell" in capsys.readouterr().out  # the overfitting warning
    best_step, best_loss = min(curve, key=lambda point: point[1])
    assert (summary["best_step"], summary["best_val_loss"]) == (best_step, best_loss)
    assert 0 < best_step < summary["steps"]
    assert summary["final_val_loss"] > best_loss
    kept = sorted(path.name for path in (tmp_path / "run/checkpoints").iterdir())
    assert kept == [f"step-{best_step:07d}", f"step-{summary['steps']:07d}"]  # last 1 + best
    adapter = load_file(tmp_path / "run/adapter/adapter_model.safetensors")
    at_best = load_file(tmp_path / f"run/checkpoints/step-{best_step:07d}/trainable.safetensors")
    assert {name.removeprefix("base_model.model.") for name in adapter} == set(at_best)
    for name, tensor in adapter.items():
        torch.testing.assert_close(tensor, at_best[name.removeprefix("base_model.model.")], rtol=0, atol=0)

    # Resumed, the early-stopped run stops again at once: no step is trained past the stop.
    resumed = train(tiny_llama_dir, (train_file, val_file), tmp_path / "run", *flags, "--resume")
    assert (resumed["steps"], resumed["val_curve"]) == (summary["steps"], curve)


def test_nan_loss_stops_cleanly_with_the_batch_named(tiny_model_dir, tmp_path, capsys):
    """A record holding a token whose embedding is inf makes its batch's loss NaN: the run stops without
    applying that step, keeps its earlier checkpoint and best adapter, names the record, and exits 1 with a
    one-line error (sys.exit with a message: Python prints it to stderr and exits with status 1)."""
    # Untied: an inf row in a tied lm_head would make every logit, not one batch, NaN.
    model_dir = poison(tiny_model_dir(tie_word_embeddings=False), word=57)
    train_file = write_data(tmp_path / "train.jsonl", 96, seed=1, n_words_range=(2, 6))
    rows = train_file.read_text().splitlines()
    rows[40] = json.dumps({"instruction": "w3 w57 w4", "output": "w4 w5"})
    train_file.write_text("\n".join(rows) + "\n")
    val_file = write_data(tmp_path / "val.jsonl", 16, seed=2, n_words_range=(2, 6))
    flags = "--save-every 1 --eval-every 2 --epochs 1 --lr 1e-3".split()
    with pytest.raises(SystemExit) as stopped:
        train(model_dir, (train_file, val_file), tmp_path / "run", *flags)
    assert isinstance(stopped.value.code, str) and stopped.value.code.startswith(
        "error: loss is NaN or inf at"
    )
    assert "\n" not in stopped.value.code
    printed = capsys.readouterr().out
    assert f"{train_file}:41" in printed  # the offending record, by file and line
    assert "halve the lr" in printed
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["stop_reason"] == "NaN loss"
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()
    checkpoints = sorted((tmp_path / "run/checkpoints").iterdir())
    assert checkpoints and int(checkpoints[-1].name.removeprefix("step-")) == summary["steps"]
    for tensor in load_file(checkpoints[-1] / "trainable.safetensors").values():
        assert torch.isfinite(tensor).all()


def test_sigint_saves_a_checkpoint_and_resume_finishes(tiny_llama_dir, data_files, tmp_path):
    flags = "--batch-size 2 --grad-accum 1 --eval-every 100000 --save-every 100000"
    args = cli_args(tiny_llama_dir, *data_files, tmp_path / "run", flags)
    env = {**os.environ, "NANOFT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*args, "--max-steps", "100000"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics_file = tmp_path / "run/metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if metrics_file.is_file() and len(metrics_file.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr
    assert "--resume" in stdout
    checkpoint = sorted((tmp_path / "run/checkpoints").iterdir())[-1]
    stopped_at = json.loads((checkpoint / "state.json").read_text())["step"]
    assert stopped_at >= 2
    # What the run printed is all it takes: the rest of the config comes from the run directory.
    main(["--out", str(tmp_path / "run"), "--resume", "--max-steps", str(stopped_at + 2)])
    assert json.loads((tmp_path / "run/summary.json").read_text())["steps"] == stopped_at + 2


ADDRESS_SPACE_PEAK = """import atexit, runpy, sys
peak = lambda: next(line for line in open("/proc/self/status") if line.startswith("VmPeak"))
atexit.register(lambda: print(peak(), file=sys.stderr))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux's prlimit")
def test_out_of_memory_under_an_address_space_cap_halves_the_micro_batch_and_finishes(
    tiny_model_dir, tmp_path
):
    """A real out-of-memory: train.py at micro-batch 32 in a process whose address space is capped (prlimit
    --as) 600 MB above what a micro-batch-4 run peaked at. 32 rows of 256 tokens need about 1.5 GB of
    activations, 4 rows 190 MB: the step fails, is retried at 16 and 8 (or less), and the run finishes."""
    bigger = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8)
    model_dir = tiny_model_dir(std=None, **bigger, num_key_value_heads=4, max_position_embeddings=512)
    train_file = write_data(tmp_path / "train.jsonl", 40, seed=1, n_words_range=(100, 121))
    val_file = write_data(tmp_path / "val.jsonl", 4, seed=2, n_words_range=(100, 121))
    flags = "--seq-len 256 --dtype fp32 --max-steps 1 --grad-accum 1 --eval-every 1000 --lora-dropout 0"

    def run(batch_size: int, cap: list[str]) -> subprocess.CompletedProcess:
        args = cli_args(model_dir, train_file, val_file, tmp_path / f"run{batch_size}", flags)
        args = [*cap, sys.executable, "-c", ADDRESS_SPACE_PEAK, *args[1:], "--batch-size", str(batch_size)]
        return run_cli([str(arg) for arg in args], tmp_path / "cache")

    fits = run(4, cap=[])
    assert fits.returncode == 0, fits.stderr[-3000:]
    peak_kib = int(fits.stderr.split("VmPeak:")[1].split()[0])
    capped = run(32, cap=["prlimit", f"--as={peak_kib * 1024 + 600 * 2**20}"])
    assert capped.returncode == 0, capped.stdout[-3000:] + capped.stderr[-3000:]
    assert "step 0: out of memory at micro-batch 32; retrying the step with micro-batch 16" in capped.stdout
    assert json.loads((tmp_path / "run32/summary.json").read_text())["steps"] == 1


# ---------------------------------------------------------------------------- outputs


def test_end_to_end_outputs_load_in_transformers_and_peft(tiny_llama_dir, data_files, tmp_path, capsys):
    summary = train(tiny_llama_dir, data_files, tmp_path / "run", "--max-steps", "12", "--merge")
    printed = capsys.readouterr().out.splitlines()
    done, merged_line = next(line for line in printed if line.startswith("done (")), printed[-1]
    # Training time and wall time, each labelled: tokens/s divides by the first only.
    assert re.fullmatch(
        r"done \(finished\): 12 steps, [\d,]+ tokens in [\d.]+ min of training \(\d+ tokens/s\); "
        r"wall time [\d.]+ min, peak memory [\d.]+ GiB",
        done,
    ), done
    assert 0 < summary["train_s"] < summary["wall_s"]
    assert summary["train_tokens_per_s"] == pytest.approx(summary["tokens_seen"] / summary["train_s"])
    assert merged_line == (
        f"merged: adapter {tmp_path / 'run/adapter'} (14 weights updated) into the original fp32 weights of "
        f"{tiny_llama_dir} -> {tmp_path / 'run/merged'} (a Hugging Face model, fp32)"
    )
    for key in (
        "baseline_val_loss",
        "best_val_loss",
        "best_step",
        "final_val_loss",
        "steps",
        "tokens_seen",
        "train_tokens_per_s",
        "peak_memory_bytes",
        "wall_s",
        "data",
        "config",
        "gates",
    ):
        assert key in summary, key
    assert summary["best_val_loss"] < summary["baseline_val_loss"]
    assert summary["data"]["train_examples"] == 96 and "exact_duplicates_removed" in summary["data"]
    assert summary["config"]["lr"] == 1e-2 and summary["config"]["dtype"] in ("bf16", "fp32")
    assert json.loads((tmp_path / "run/config.json").read_text())["lr"] == 1e-2
    assert "## Quality gates" in (tmp_path / "run/report.md").read_text()
    assert list((tmp_path / "run/tensorboard").glob("events.out.tfevents.*"))

    assert_peft_and_merged_give_our_logits(tiny_llama_dir, tmp_path / "run")


def assert_peft_and_merged_give_our_logits(model_dir: Path, run: Path) -> torch.Tensor:
    """The best adapter, loaded by PEFT onto the transformers model, gives our model's logits, and the merged
    export (nanoft/merge.py) gives PEFT's merge_and_unload's. Returns our logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora import load_adapter
    from nanoft.weights import from_pretrained

    ids = torch.tensor([[1, 3, 10, 11, 12, 5, 4]])
    with torch.no_grad():
        ours = load_adapter(from_pretrained(model_dir), run / "adapter").eval()(ids)
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(reference, run / "adapter").eval()
        torch.testing.assert_close(peft_model(ids).logits, ours, rtol=1e-4, atol=1e-4)
        # The merged export is a plain model with the logits of PEFT's merge_and_unload (fp32 as stored).
        merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
        torch.testing.assert_close(merged(ids).logits, peft_model.merge_and_unload()(ids).logits)
    return ours


@pytest.mark.parametrize("flags", ["--use-rslora", "--use-dora", "--modules-to-save embed_tokens"])
def test_lora_variants_from_the_command_line_resume_exactly_and_load_in_peft(
    tiny_llama_dir, data_files, tmp_path, flags
):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    steps = "--max-steps 4 --save-every 2 --keep-last 10 --merge".split()
    train(tiny_llama_dir, data_files, run, *steps, *flags.split())
    peft_config = json.loads((run / "adapter/adapter_config.json").read_text())  # says what the flags said
    assert peft_config["use_rslora"] == ("--use-rslora" in flags)
    assert peft_config["use_dora"] == ("--use-dora" in flags)
    assert peft_config["modules_to_save"] == (["embed_tokens"] if "embed_tokens" in flags else None)
    ours = assert_peft_and_merged_give_our_logits(tiny_llama_dir, run)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        assert (base(torch.tensor([[1, 3, 10, 11, 12, 5, 4]])).logits - ours).abs().max() > 1e-3  # it trained

    # The step-2 checkpoint holds every trained tensor (magnitudes, the saved module) and their optimizer
    # state: resumed from it, the run reaches step 4 bit for bit as before.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints/step-0000004")
    train(tiny_llama_dir, data_files, resumed, *steps, *flags.split(), "--resume")
    before = load_file(run / "checkpoints/step-0000004/trainable.safetensors")
    after = load_file(resumed / "checkpoints/step-0000004/trainable.safetensors")
    assert before.keys() == after.keys()
    assert any("magnitude" in name for name in before) == ("--use-dora" in flags)
    assert ("model.embed_tokens.weight" in before) == ("embed_tokens" in flags)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    with pytest.raises(SystemExit):  # a resume that would change the variant is refused
        main(["--out", str(resumed), "--resume", "--no-use-dora" if "dora" in flags else "--use-dora"])


def test_qlora_merge_goes_into_the_original_weights_or_the_quantized_base(
    tiny_llama_dir, data_files, tmp_path, capsys
):
    """The QA report: QLoRA --merge wrote the adapter merged into the dequantized NF4 base (every other layer
    off the original by up to 0.59) and never said where. Now the original weights by default, as PEFT
    merges an adapter into the checkpoint; the quantized base when asked; and the line says which."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pytest.importorskip("bitsandbytes")
    flags = ("--max-steps", "2", "--method", "qlora", "--merge", "--lora-targets", "q_proj,v_proj")
    train(tiny_llama_dir, data_files, tmp_path / "original", *flags)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith(
        f"merged: adapter {tmp_path / 'original/adapter'} (4 weights updated) into the original fp32"
    )
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(reference, tmp_path / "original/adapter").merge_and_unload()
    ids = torch.tensor([[1, 3, 10, 11, 12, 5, 4]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "original/merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits)

    train(tiny_llama_dir, data_files, tmp_path / "quantized", *flags, "--merge-base", "quantized")
    line = capsys.readouterr().out.splitlines()[-1]
    assert "(4 weights updated) into the weights of" in line and "rounded through nf4" in line
    k_proj = "model.layers.0.self_attn.k_proj.weight"  # no adapter: as stored, or rounded through NF4
    base = load_file(tiny_llama_dir / "model.safetensors")[k_proj]
    assert torch.equal(load_file(tmp_path / "original/merged/model.safetensors")[k_proj], base)
    assert (load_file(tmp_path / "quantized/merged/model.safetensors")[k_proj] - base).abs().max() > 1e-4
    with pytest.raises(SystemExit):
        main(["--merge-base", "quantized", "--out", str(tmp_path / "x")])  # a LoRA run has no 4-bit base
    assert "--merge-base quantized merges into the 4-bit base" in capsys.readouterr().err


def test_full_fine_tune_keeps_best_weights_in_hugging_face_format(tiny_llama_dir, data_files, tmp_path):
    from transformers import AutoModelForCausalLM

    flags = "--method full --lr 1e-3 --max-steps 8".split()
    summary = train(tiny_llama_dir, data_files, tmp_path / "run", *flags)
    assert summary["best_val_loss"] < summary["baseline_val_loss"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run/model")
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    changed = [
        name for name, p in model.named_parameters() if not torch.equal(p, original.get_parameter(name))
    ]
    assert len(changed) == len(list(model.parameters()))  # every weight trained, norms included


FULL_FINE_TUNED = ("gemma2", "phi3")  # four norms, soft-caps and tying; fused projections and partial RoPE


@pytest.mark.parametrize(
    "family, method",
    [(family, "lora") for family in FAMILIES] + [(family, "full") for family in FULL_FINE_TUNED],
)
def test_every_family_trains_two_steps_and_saves(family_dir, data_files, tmp_path, family, method):
    """Each family's tiny checkpoint (tests/families.py, written by transformers) through train.py: LoRA on
    its query and value projections writes an adapter of them, a full fine-tune a model transformers loads
    with every weight moved. (Every family's full-fine-tune gradients equal transformers' in
    tests/test_model.py; two families with the most differences run it through train.py here.)"""
    from transformers import AutoModelForCausalLM

    flags = ["--max-steps", "2", "--method", method, "--lr", "1e-3"]
    flags += ["--lora-targets", ",".join(QV_TARGETS[family])] if method == "lora" else []
    summary = train(family_dir(family), data_files, tmp_path / "run", *flags)
    assert summary["steps"] == 2 and np.isfinite(summary["final_val_loss"])
    if method == "lora":
        adapter_config = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
        assert sorted(adapter_config["target_modules"]) == sorted(QV_TARGETS[family])
        tensors = load_file(tmp_path / "run/adapter/adapter_model.safetensors")
        assert len(tensors) == 2 * 4 * len(QV_TARGETS[family])  # A and B, 4 layers, each target
        return
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run/model")
    original = AutoModelForCausalLM.from_pretrained(family_dir(family))
    assert all(not torch.equal(p, original.get_parameter(name)) for name, p in model.named_parameters())


@pytest.mark.parametrize("method", ["qlora", "full"])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_mixtures_of_experts_train_with_the_router_loss(
    family_dir, data_files, tmp_path, family, method, capsys
):
    """QLoRA (experts in NF4) and a full fine-tune of each mixture of experts, with config.json asking for
    the load-balancing loss: it is logged every step, and the full fine-tune moves every weight, routers
    included. (LoRA on q, v runs for them with every family above.)"""
    from transformers import AutoModelForCausalLM

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(family_dir(family), checkpoint)
    config = json.loads((checkpoint / "config.json").read_text()) | {"output_router_logits": True}
    (checkpoint / "config.json").write_text(json.dumps(config))
    flags = ["--max-steps", "2", "--method", method, "--lr", "1e-3", "--lora-targets", "q_proj,v_proj"]
    summary = train(checkpoint, data_files, tmp_path / "run", *flags)
    assert summary["steps"] == 2 and np.isfinite(summary["final_val_loss"])
    aux_losses = [row["router_aux_loss"] for row in metrics(tmp_path / "run") if "loss" in row]
    assert len(aux_losses) == 2 and all(aux > 1 for aux in aux_losses)  # 1: perfectly balanced
    assert "(router aux " in capsys.readouterr().out
    if method == "full":
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "run/model")
        original = AutoModelForCausalLM.from_pretrained(checkpoint)
        moved = [not torch.equal(p, original.get_parameter(name)) for name, p in model.named_parameters()]
        assert all(moved)


@pytest.mark.parametrize("flag", ["--activation-checkpointing", "--pack", "--group-by-length"])
def test_options_train_the_same_model(tiny_llama_dir, data_files, tmp_path, flag, capsys):
    """Activation checkpointing recomputes the same numbers; packing and length grouping change the batches
    but the run still trains. (--compile is exercised by bench/train_step.py: compiling takes minutes.)"""
    flags = "--max-steps 4 --lora-dropout 0".split()
    plain = train(tiny_llama_dir, data_files, tmp_path / "plain", *flags)
    capsys.readouterr()
    other = train(tiny_llama_dir, data_files, tmp_path / "other", *flags, flag)
    assert other["best_val_loss"] < other["baseline_val_loss"]
    packing = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: pack:")]
    if flag == "--pack":  # rows and how full they are
        assert len(packing) == 1 and re.fullmatch(
            r"data: pack: 96 examples in \d+ rows of up to 64 tokens, [\d.]+% full \([\d,]+ of [\d,]+ token "
            r"slots\)",
            packing[0],
        ), packing
    else:
        assert not packing
    if flag == "--activation-checkpointing":
        assert train_losses(tmp_path / "other") == pytest.approx(train_losses(tmp_path / "plain"), abs=1e-6)
        assert other["val_curve"] == [pytest.approx(point, abs=1e-6) for point in plain["val_curve"]]


@pytest.mark.parametrize(
    "flags",
    [
        "--method qlora",
        "--method qlora --quant int8",
        "--optim adamw8bit",
    ],
)
def test_bitsandbytes_paths_train(tiny_llama_dir, data_files, tmp_path, flags):
    """QLoRA (4-bit NF4 or int8 base through quant.py) and the 8-bit optimizer train and export an adapter."""
    summary = train(tiny_llama_dir, data_files, tmp_path / "run", "--max-steps", "4", *flags.split())
    assert summary["best_val_loss"] < summary["baseline_val_loss"]
    assert summary["config"]["quant"] == ("int8" if "int8" in flags else "nf4" if "qlora" in flags else "")
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cuda_precisions(tiny_llama_dir, data_files, tmp_path, dtype):
    """On a GPU: bf16, or fp16 with the gradient scaler (whose state a checkpoint keeps), train and resume."""
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    flags = ["--device", "cuda", "--dtype", dtype, "--max-steps", "4", "--save-every", "2"]
    summary = train(tiny_llama_dir, data_files, tmp_path / "run", *flags)
    assert summary["best_val_loss"] < summary["baseline_val_loss"] and summary["config"]["dtype"] == dtype
    assert summary["peak_memory_bytes"] > 0
    state = json.loads((tmp_path / "run/checkpoints/step-0000004/state.json").read_text())
    assert bool(state["scaler"]) == (dtype == "fp16")


# ---------------------------------------------------------------------------- bad input

BAD_INPUTS = {  # flags -> what the one-line error says
    "--lora-rank 8": "unrecognized arguments: --lora-rank",
    "--method full --quant nf4": "--method full",
    "--lr fast": "invalid float value",
    "--out {existing}": "already holds",
    "--out {existing} --resume": "no checkpoint",
    "--seq-len 4096": "longer than the model's context",
    "--batch-size 500": "lower --batch-size",
    "--data no/such.jsonl": "not found",
    "--lora-targets q_prj": "LoRA targets ['q_prj'] are not linear layers",
}


@pytest.mark.parametrize("flags", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(flags, tiny_llama_dir, data_files, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    args = cli_args(tiny_llama_dir, *data_files, tmp_path / "run", flags.format(existing=existing))
    with pytest.raises(SystemExit) as stopped:
        main(args[2:])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and BAD_INPUTS[flags] in lines[0], lines
    assert not (tmp_path / "run/config.json").exists()  # so the corrected command needs no --overwrite


def test_a_bad_lora_target_is_reported_before_the_data_is_read(tiny_llama_dir, data_files, tmp_path, capsys):
    """The QA report: it came after the data was read, deduplicated and tokenized (minutes, on big sets)."""
    args = cli_args(tiny_llama_dir, *data_files, tmp_path / "run", "--lora-targets q_proj,gate")
    with pytest.raises(SystemExit):
        main(args[2:])
    out, err = capsys.readouterr()
    assert "LoRA targets ['gate'] are not linear layers of the decoder blocks (down_proj, gate_proj" in err
    assert "data:" not in out and not (tmp_path / "cache" / "data").exists()  # nothing read, nothing cached


def test_too_little_data_to_split_says_so(tiny_llama_dir, tmp_path, capsys):
    """Three records and no --val-data: the split holds none out, and the error must not blame --val-frac."""
    train_file = write_data(tmp_path / "train.jsonl", 3, seed=1)
    with pytest.raises(SystemExit) as stopped:
        main(
            [
                "--model",
                str(tiny_llama_dir),
                "--data",
                str(train_file),
                "--out",
                str(tmp_path / "run"),
                "--seq-len",
                "64",
            ]
        )
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: no validation data: 3 examples are too few to split (4 at least); add data or pass --val-data"
    )


def test_tokenizer_larger_than_the_embedding_is_a_user_error(tiny_model_dir, data_files, tmp_path, capsys):
    """The 64-token tokenizer on a model with 32 embedding rows: one line before training, not an IndexError
    from inside the first step."""
    model_dir = tiny_model_dir(vocab_size=32, std=None)
    args = cli_args(model_dir, *data_files, tmp_path / "run", "")
    with pytest.raises(SystemExit) as stopped:
        main(args[2:])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: the tokenized data holds token id 6") and "vocab_size 32" in error, error
    assert not (tmp_path / "run/config.json").exists()


def test_bad_input_from_the_command_line(tiny_llama_dir, data_files, tmp_path):
    """The same through a real process: status 2, one line on stderr, no traceback, nothing on stdout."""
    args = cli_args(tiny_llama_dir, *data_files, tmp_path / "run", "--method full --quant nf4")
    result = run_cli(args, tmp_path / "cache")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --method full trains every weight") and result.stdout == ""


# ---------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_trains_a_few_steps(smollm2_dir, tmp_path):
    """The built-in model and dataset through the real code path: val loss falls within 4 steps."""
    val = tmp_path / "val.jsonl"
    records = (REPO / "nanoft/default_data.jsonl").read_text().splitlines()
    val.write_text("\n".join(records[:8]) + "\n")
    flags = "--max-steps 4 --batch-size 2 --grad-accum 2 --seq-len 128 --eval-every 4 --lr 1e-3".split()
    main(["--val-data", str(val), "--out", str(tmp_path / "run"), *flags])
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["best_val_loss"] < summary["baseline_val_loss"]
    assert (tmp_path / "run/adapter/adapter_config.json").is_file()
