"""Resumable training checkpoints, written atomically, the last K kept plus the best.

    checkpoint.save(run_dir, step, trainable, optimizer_state, rng_states, state, config)   # rank 0
    saved = checkpoint.load(checkpoint.latest(run_dir))
    checkpoint.prune(run_dir, keep_last=2, keep_step=best_step)
    progress = checkpoint.Progress(**saved["state"])   # minus "data" and "scaler": what the run has done

A checkpoint is a directory `run_dir/checkpoints/step-0000120/` holding:
    trainable.safetensors   the trained tensors (LoRA adapters, or every weight of a full fine-tune), by name
    optimizer.pt            the optimizer's state (Adam moments), keyed by parameter name
    rng.pt                  each rank's python, numpy, torch and CUDA random states (for exact dropout)
    state.json              the run's Progress (step, best val loss so far, val curve ...), the data position
                            and the gradient scaler's state
    config.json             the resolved config that made it
Everything is written into a hidden temporary directory that is renamed into place only when complete, so a
crash or a full disk mid-write leaves the previous checkpoint as it was; `latest` never sees
a half-written one. The .pt files hold only tensors and plain values: they load with `weights_only=True`.
"""

import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
from torch.distributed.tensor import DTensor

from nanoft.distributed import barrier, is_fsdp, load_full_state_dict, load_optimizer_state_dict
from nanoft.errors import UserError
from nanoft.weights import safetensors_header, shard_rows

CHECKPOINTS = "checkpoints"
PREFIX = "step-"


def prepare_run_dir(out, resume: bool, overwrite: bool, dist) -> Path:
    """The run directory, checked before any expensive work: a new run never mixes with an old one's files."""
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir}: is a file; --out names the run directory, choose another")
    if resume and latest(run_dir) is None:
        raise UserError(
            f"--resume: {run_dir} holds no checkpoint to resume from (one is saved every --save-every "
            "steps); start afresh with --overwrite"
        )
    # A run writes config.json once its input is checked; files without it are a start that failed early.
    holds_run = (run_dir / "config.json").is_file()
    if holds_run and not resume and not overwrite:
        raise UserError(
            f"--out {run_dir} already holds a run; pass --resume to continue it, --overwrite to "
            "replace it, or choose another --out"
        )
    barrier(dist)  # every rank has checked before rank 0 changes anything
    if dist.is_main:
        if holds_run and overwrite:  # only a run's directory: a typo in --out must not delete other files
            shutil.rmtree(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a read-only or missing mount, a file in the way of a parent
            raise UserError(f"--out {run_dir}: cannot create it ({error.strerror}); choose another") from None
    return run_dir


# What a resumed run must share with its checkpoint: the names and shapes of the trained tensors, the data
# stream the saved position points into, and the precision the weights and optimizer state were made in
# (dtype as resolved: a bf16 GPU run resumed on a CPU that would pick fp32 must say --dtype bf16). The rest
# (--max-steps, --eval-every, --lr, the devices ...) may change.
RESUME_MUST_MATCH = (
    "model method quant lora_r lora_alpha lora_targets data val_data data_format alpaca_style seq_len "
    "val_frac pack group_by_length dedup near_dup_threshold train_on_everything seed batch_size dtype"
).split()


def check_resume_config(run_dir, config: dict) -> None:
    """Before anything is written: a resumed run's settings (dtype resolved) against its last checkpoint's."""
    checkpoint = latest(run_dir)
    saved = json.loads((checkpoint / "config.json").read_text())
    for name in RESUME_MUST_MATCH:
        if saved.get(name, config[name]) != config[name]:
            raise UserError(
                f"--resume: {checkpoint} was made with {name} = {saved[name]!r}, this run has "
                f"{config[name]!r}; resume with the run's setting, or start a new run with another --out"
            )


# What a resumed run may change that changes what it learns from there on: said when it resumes, recorded in
# the progress (summary.json, report.md) and in config.json.
RESUME_MAY_CHANGE = (
    "lr epochs max_steps warmup_frac weight_decay grad_clip grad_accum optim lora_dropout".split()
)


def resume_changes(run_dir, config: dict, step: int) -> list[dict]:
    """{"setting", "from", "to", "step"} for each RESUME_MAY_CHANGE setting this run has changed against its
    latest checkpoint; `step`: the step it resumes at, the first the new setting trains."""
    saved = json.loads((latest(run_dir) / "config.json").read_text())
    return [
        {"setting": name, "from": saved[name], "to": config[name], "step": step}
        for name in RESUME_MAY_CHANGE
        if name in saved and saved[name] != config[name]
    ]


@dataclass
class Progress:
    """How far the run has come: what every checkpoint's state.json carries besides the data position and the
    gradient scaler, what the monitor reports at each eval and what the final report summarises."""

    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0  # tokens those steps trained on, all ranks together, padding not counted
    train_seconds: float = 0.0  # time spent in optimizer steps (evaluations and saves not counted): tokens/s
    wall_seconds: float = 0.0  # wall-clock time of the run up to its latest checkpoint, earlier sessions too
    val_curve: list = field(default_factory=list)  # (step, val loss) of every eval; step 0: the untuned model
    best_val_loss: float = math.inf
    best_step: int | None = None  # the eval whose weights are kept as the best (run_dir/adapter or /model)
    evals_since_best: int = 0  # evals after step 0 without a better val loss: early stopping counts them
    samples: list = field(default_factory=list)  # (prompt, generated, reference) texts at the latest eval
    changed_on_resume: list = field(default_factory=list)  # resume_changes() of every resume that trained on
    peak_memory_bytes: int = 0  # the most any session of the run used (nanoft.monitor.peak_memory_bytes)

    def record_eval(self, step: int, val_loss: float) -> bool:
        """Add an eval to the val curve; True when it is the best so far (its weights should be kept)."""
        self.val_curve.append((step, val_loss))
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.best_step, self.evals_since_best = val_loss, step, 0
            return True
        self.evals_since_best += step > 0
        return False

    def evaluated_at(self, step: int) -> bool:
        """Whether the latest eval was at this step (a resumed run does not evaluate its first step twice)."""
        return bool(self.val_curve) and self.val_curve[-1][0] == step

    def to_dict(self) -> dict:
        return asdict(self)


def checkpoint_path(run_dir, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{PREFIX}{step:07d}"


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix(PREFIX))


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories start with '.' and are not listed)."""
    folder = Path(run_dir) / CHECKPOINTS
    found = folder.glob(f"{PREFIX}*") if folder.is_dir() else []
    return sorted((path for path in found if (path / "state.json").is_file()), key=checkpoint_step)


def latest(run_dir) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def write_directory_atomically(path, write) -> None:
    """Call write(tmp_dir) to fill a temporary directory, then move it to `path`, replacing what was there.

    If `write` raises, the temporary directory is removed and `path` is untouched. Replacing an existing
    directory takes two renames (old out of the way, new in); between them the old one is still on disk.
    """
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
    shutil.rmtree(old, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for file in tmp.iterdir():  # on disk before the rename makes the directory visible
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save(
    run_dir, step: int, trainable: dict, optimizer_state: dict, rng_states: list, state: dict, config: dict
) -> Path:
    """Write one checkpoint (rank 0 calls this, with tensors gathered from every rank)."""
    path = checkpoint_path(run_dir, step)

    def write(tmp: Path):
        tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in trainable.items()}
        save_file(tensors, tmp / "trainable.safetensors", metadata={"format": "pt"})
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(rng_states, tmp / "rng.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "state.json").write_text(
            json.dumps({**state, "step": step}, indent=2)
        )  # last: marks it complete

    write_directory_atomically(path, write)
    return path


def load(path, tensors: bool = True) -> dict:
    """{"trainable", "optimizer", "rng", "state", "config"} of a checkpoint directory; without `tensors`,
    no "trainable" and "optimizer" (under FSDP each rank reads its own rows of them: load_sharded)."""
    path = Path(path)
    try:
        checkpoint = {
            # On the CPU whatever device saved them: a GPU run resumes on fewer GPUs, or on a CPU.
            "rng": torch.load(path / "rng.pt", map_location="cpu", weights_only=True),
            "state": json.loads((path / "state.json").read_text()),
            "config": json.loads((path / "config.json").read_text()),
        }
        if tensors:
            checkpoint["trainable"] = load_file(path / "trainable.safetensors")
            checkpoint["optimizer"] = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as error:
        raise UserError(
            f"{path}: checkpoint unreadable ({error}); delete it to resume from the one before"
        ) from None
    return checkpoint


def restore_checkpoint(path, model, optimizer, dist) -> dict:
    """Put a checkpoint's trained tensors and optimizer state into a (wrapped) model and its optimizer; every
    rank calls this. Under FSDP each rank reads its own rows; otherwise rank 0 reads them and sends them.
    Returns the rest ("rng", "state", "config") on rank 0, {} on the others."""
    if is_fsdp(model):
        load_sharded(path, model, optimizer)
        return load(path, tensors=False) if dist.is_main else {}
    checkpoint = load(path) if dist.is_main else {}
    load_full_state_dict(model, checkpoint.pop("trainable", {}), dist)
    load_optimizer_state_dict(model, optimizer, checkpoint.pop("optimizer", {}), dist)
    return checkpoint


def load_sharded(path, model, optimizer) -> None:
    """Under FSDP: each rank reads only its rows of a checkpoint's trained tensors and optimizer state into
    its shards (optimizer.pt memory-mapped, so the other rows are never read), so resuming a full fine-tune
    never puts its whole weights and Adam moments on one rank."""
    path = Path(path)
    parameters = dict(model.named_parameters())
    try:
        with torch.no_grad():
            for stored in safetensors_header(path / "trainable.safetensors"):
                parameter = parameters[stored.name]
                parameter.to_local().copy_(stored.read(shard_rows(parameter)))
        full = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise UserError(
            f"{path}: checkpoint unreadable ({error}); delete it to resume from the one before"
        ) from None
    sharded = {"param_groups": full["param_groups"], "state": {}}
    for name, state in full["state"].items():
        parameter = parameters[name]
        sharded["state"][name] = {
            key: shard_like(parameter, value) if value.shape == parameter.shape else value
            for key, value in state.items()
        }
    set_optimizer_state_dict(
        model, optimizer, sharded, options=StateDictOptions(full_state_dict=False, cpu_offload=False)
    )


def shard_like(parameter: DTensor, full: torch.Tensor) -> DTensor:
    """This rank's rows of `full` as a DTensor sharded like `parameter` (copied: `full` may map a file)."""
    start, end = shard_rows(parameter)
    local = full[start:end].to(parameter.to_local().device, copy=True)
    return DTensor.from_local(
        local,
        parameter.device_mesh,
        parameter.placements,
        run_check=False,
        shape=parameter.shape,
        stride=parameter.stride(),
    )


def prune(run_dir, keep_last: int, keep_step: int | None = None) -> None:
    """Delete all but the newest `keep_last` checkpoints and the one at `keep_step` (the best)."""
    checkpoints = list_checkpoints(run_dir)
    for path in checkpoints[:-keep_last]:
        if checkpoint_step(path) != keep_step:
            shutil.rmtree(path)


def rng_state() -> dict:
    """Every random generator this process draws from, as tensors and plain values: the CUDA one of this
    rank's GPU only (each rank saves its own), so the state fits any number of GPUs on resume."""
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if isinstance(state["cuda"], torch.Tensor) and torch.cuda.is_available():  # a CPU run saved none
        torch.cuda.set_rng_state(state["cuda"])  # this rank's GPU (torch.cuda.set_device chose it)
