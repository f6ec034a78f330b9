"""nanoft/checkpoint.py: atomic writes, keep last K + best, random states, the run directory check.

python -m pytest tests/test_checkpoint.py -q
"""

import random

import numpy as np
import pytest
import torch

from nanoft import checkpoint
from nanoft.checkpoint import (
    check_resume_config,
    checkpoint_path,
    list_checkpoints,
    prepare_run_dir,
    rng_state,
    set_rng_state,
)
from nanoft.config import TrainConfig
from nanoft.distributed import setup_distributed
from nanoft.errors import UserError


def save(run_dir, step, trainable=None):
    trainable = trainable if trainable is not None else {"lora_A.weight": torch.full((2, 3), float(step))}
    optimizer = {"state": {"lora_A.weight": {"step": torch.tensor(step), "exp_avg": torch.ones(2, 3)}}}
    return checkpoint.save(run_dir, step, trainable, optimizer, [rng_state()], {"best_step": 1}, {"lr": 1e-3})


def test_round_trip(tmp_path):
    path = save(tmp_path, 7)
    assert path == checkpoint_path(tmp_path, 7) and checkpoint.latest(tmp_path) == path
    loaded = checkpoint.load(path)
    torch.testing.assert_close(loaded["trainable"]["lora_A.weight"], torch.full((2, 3), 7.0))
    assert loaded["optimizer"]["state"]["lora_A.weight"]["step"] == 7
    assert loaded["state"] == {"best_step": 1, "step": 7} and loaded["config"] == {"lr": 1e-3}


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    save(tmp_path, 10)
    with pytest.raises(Exception):  # noqa: B017 - a non-tensor makes the write fail halfway
        save(tmp_path, 20, trainable={"lora_A.weight": "not a tensor"})
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step-0000010"]
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["step-0000010"]  # no debris
    torch.testing.assert_close(
        checkpoint.load(checkpoint.latest(tmp_path))["trainable"]["lora_A.weight"], torch.full((2, 3), 10.0)
    )
    # Overwriting a checkpoint of the same step with a failing write keeps the old one too.
    with pytest.raises(Exception):  # noqa: B017
        save(tmp_path, 10, trainable={"lora_A.weight": "not a tensor"})
    assert checkpoint.load(checkpoint_path(tmp_path, 10))["state"]["step"] == 10


def test_a_crash_mid_write_is_invisible_and_cleaned_up(tmp_path):
    save(tmp_path, 10)
    debris = tmp_path / "checkpoints" / ".step-0000020.tmp"  # what a killed process leaves behind
    debris.mkdir()
    (debris / "trainable.safetensors").write_bytes(b"half a file")
    incomplete = tmp_path / "checkpoints" / "step-0000030"  # no state.json: never completed
    incomplete.mkdir()
    assert checkpoint.latest(tmp_path) == checkpoint_path(tmp_path, 10)
    save(tmp_path, 20)
    assert not debris.exists() and checkpoint.latest(tmp_path) == checkpoint_path(tmp_path, 20)


def test_replacing_a_checkpoint_of_the_same_step(tmp_path):
    save(tmp_path, 5)
    save(tmp_path, 5, trainable={"lora_A.weight": torch.zeros(2, 3)})
    torch.testing.assert_close(
        checkpoint.load(checkpoint_path(tmp_path, 5))["trainable"]["lora_A.weight"], torch.zeros(2, 3)
    )
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["step-0000005"]


def test_prune_keeps_the_last_k_and_the_best(tmp_path):
    for step in (10, 20, 30, 40, 50):
        save(tmp_path, step)
    checkpoint.prune(tmp_path, keep_last=2, keep_step=20)
    assert [path.name for path in list_checkpoints(tmp_path)] == [
        "step-0000020",
        "step-0000040",
        "step-0000050",
    ]
    checkpoint.prune(tmp_path, keep_last=1, keep_step=None)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step-0000050"]


def test_random_states_continue_exactly():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[:2] == expected[:2]
    torch.testing.assert_close(again[2], expected[2], rtol=0, atol=0)


def test_run_directory_rules(tmp_path):
    dist = setup_distributed("cpu")
    run_dir = prepare_run_dir(tmp_path / "new", resume=False, overwrite=False, dist=dist)
    assert run_dir.is_dir()
    (run_dir / "config.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a run"):
        prepare_run_dir(run_dir, resume=False, overwrite=False, dist=dist)
    with pytest.raises(UserError, match="no checkpoint"):
        prepare_run_dir(run_dir, resume=True, overwrite=False, dist=dist)
    save(run_dir, 3)
    assert prepare_run_dir(run_dir, resume=True, overwrite=False, dist=dist) == run_dir
    assert (run_dir / "config.json").is_file()  # resuming keeps everything
    prepare_run_dir(run_dir, resume=False, overwrite=True, dist=dist)
    assert list(run_dir.iterdir()) == []  # overwriting starts afresh
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("years of work")
    prepare_run_dir(tmp_path / "notes", resume=False, overwrite=True, dist=dist)  # not a run: nothing deleted
    assert (tmp_path / "notes" / "thesis.tex").is_file()
    with pytest.raises(UserError, match="thesis.tex: is a file"):  # --out given a file by mistake
        prepare_run_dir(tmp_path / "notes" / "thesis.tex", resume=False, overwrite=True, dist=dist)
    with pytest.raises(UserError, match=r"thesis.tex/run: cannot create it \(Not a directory\)"):
        prepare_run_dir(tmp_path / "notes" / "thesis.tex" / "run", resume=False, overwrite=False, dist=dist)


def test_resume_refuses_settings_that_change_the_trained_tensors_or_the_data(tmp_path):
    config = TrainConfig(lr=2e-4).to_dict()
    checkpoint.save(tmp_path, 4, {}, {}, [rng_state()], {"best_step": 4}, config)
    check_resume_config(tmp_path, {**config, "max_steps": 99, "lr": 1e-4})  # a longer run, a lower lr: fine
    changes = [("lora_r", 8), ("method", "full"), ("data", ["x.jsonl"]), ("seq_len", 32), ("dtype", "fp32")]
    for name, value in changes:
        with pytest.raises(UserError, match=f"step-0000004 was made with {name} = ") as error:
            check_resume_config(tmp_path, {**config, name: value})
        assert repr(value) in str(error.value)


def test_checkpoints_are_device_independent(tmp_path):
    """The random states hold this rank's own GPU generator only (none from a CPU run), and everything loads
    onto the CPU: a GPU run's checkpoint resumes on fewer GPUs, or on a CPU."""
    state = rng_state()
    assert state["cuda"] is None or (torch.is_tensor(state["cuda"]) and state["cuda"].dim() == 1)
    path = save(tmp_path, 3)
    loaded = checkpoint.load(path)
    tensors = [loaded["optimizer"]["state"]["lora_A.weight"]["exp_avg"], loaded["rng"][0]["torch"]]
    assert {tensor.device.type for tensor in tensors} == {"cpu"}
    set_rng_state(loaded["rng"][0])  # a CPU checkpoint sets no GPU generator, wherever it resumes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_checkpoint_keeps_this_gpus_generator_and_loads_on_the_cpu(tmp_path):
    torch.cuda.init()
    torch.rand(1, device="cuda")
    path = save(tmp_path, 5)
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["rng"][0]["cuda"], torch.cuda.get_rng_state())
    assert loaded["rng"][0]["cuda"].device.type == "cpu"
    expected = torch.rand(4, device="cuda")
    set_rng_state(loaded["rng"][0])
    assert torch.equal(torch.rand(4, device="cuda"), expected)
