"""nanoft/distributed.py and nanoft/fsdp_qlora.py: 2 CPU processes (gloo) against one, on a tiny Llama.

    python -m pytest tests/test_distributed.py -q

Each torchrun launch runs tests/dist_worker.py; one launch serves several tests because starting two
processes that import torch costs more than the tiny runs themselves. The reference runs are the same
worker in this process, with the per-rank batch doubled (2 ranks x batch b == 1 process x batch 2b).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import dist_worker
import peft
import pytest
import torch
import transformers
from dist_worker import Run
from safetensors.torch import load_file
from test_train import write_data

from lora import load_adapter, save_adapter
from nanoft.distributed import all_reduce_sum, gpu_index, local_gradients, setup_distributed, wrap_model
from nanoft.errors import UserError
from nanoft.fsdp_qlora import prepare_4bit_linears_for_fsdp
from nanoft.weights import from_pretrained, save_pretrained
from quant import QuantConfig, quantize_linears

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"
RANKS = 2
CHECKPOINT = "{checkpoint}"  # filled in with the checkpoint the `checkpoint` fixture writes
LOADED = ("full", "lora", "qlora")
# Per rank: batch 4 x accumulation 2 x 4 steps x 2 ranks = 64 examples, one epoch of tiny_examples().
EPOCH = dict(batch_size=4, grad_accum=2, steps=4)
DISTRIBUTED_RUNS = [
    Run("ddp_lora", method="lora", **EPOCH),
    Run("ddp_full", method="full", **EPOCH),
    Run("fsdp_lora", method="lora", fsdp="full_shard", **EPOCH),
    Run("zero2_offload_lora", method="lora", fsdp="shard_grad_op", cpu_offload=True, **EPOCH),
    Run("fsdp_full", method="full", fsdp="full_shard", **EPOCH),
    Run("fsdp_full_tied", method="full", fsdp="full_shard", tie_word_embeddings=True, **EPOCH),
    Run("fsdp_lora_tied", method="lora", fsdp="full_shard", tie_word_embeddings=True, **EPOCH),
    Run("fsdp_checkpointing_lora", method="lora", fsdp="full_shard", activation_checkpointing=True, **EPOCH),
    Run("fsdp_qlora", method="qlora", fsdp="full_shard", **EPOCH),
    Run("fsdp_bf16_lora", method="lora", fsdp="full_shard", mixed_precision="bf16", **EPOCH),
    Run("fsdp_dropout", method="lora", fsdp="full_shard", lora_dropout=0.1, **EPOCH),
    Run("fsdp_dropout_resumed", method="lora", fsdp="full_shard", lora_dropout=0.1, resume_at=2, **EPOCH),
    Run("fsdp_full_resumed", method="full", fsdp="full_shard", resume_at=2, **EPOCH),
    # From a checkpoint on disk, as train.py loads one: under FSDP each rank reads and holds only its shards.
    *[Run(f"fsdp_{m}_loaded", method=m, fsdp="full_shard", checkpoint=CHECKPOINT, **EPOCH) for m in LOADED],
    # Rank 1 holds 1 row a forward (the others 4): every step both ranks retry at 2, then at 1.
    Run("ddp_lora_out_of_memory", method="lora", oom_rows=1, **EPOCH),
]
ONE_PROCESS = dict(EPOCH, batch_size=RANKS * EPOCH["batch_size"])
REFERENCE_RUNS = [Run(method, method=method, **ONE_PROCESS) for method in ("lora", "full", "qlora")] + [
    Run("full_tied", method="full", tie_word_embeddings=True, **ONE_PROCESS),
    Run("lora_tied", method="lora", tie_word_embeddings=True, **ONE_PROCESS),
    *[Run(f"{method}_loaded", method=method, checkpoint=CHECKPOINT, **ONE_PROCESS) for method in LOADED],
]


def environment(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def write_runs(path: Path, runs: list[Run]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "runs.json").write_text(json.dumps([asdict(run) for run in runs]))
    return path / "runs.json"


def torchrun(runs: list[Run], out_dir: Path, *launch_args, timeout_s=300, **env):
    """Launch the worker under torchrun (one node, 2 processes unless launch_args say otherwise)."""
    runs_json = write_runs(out_dir, runs)
    launch = list(launch_args) or ["--standalone", f"--nproc-per-node={RANKS}"]
    command = [sys.executable, "-m", "torch.distributed.run", *launch, WORKER, runs_json, out_dir]
    return subprocess.run(
        [str(arg) for arg in command],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=environment(**env),
    )


def load(out_dir: Path, name: str) -> dict:
    return torch.load(out_dir / f"{name}.pt", weights_only=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 25M-weight Llama (103 MB in fp32) written by transformers, for the loaded runs."""
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=dist_worker.VOCAB, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoint")
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def with_checkpoint(runs: list[Run], path: Path) -> list[Run]:
    return [replace(run, checkpoint=str(path)) if run.checkpoint else run for run in runs]


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, checkpoint):
    out_dir = tmp_path_factory.mktemp("distributed")
    finished = torchrun(with_checkpoint(DISTRIBUTED_RUNS, checkpoint), out_dir)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return {run.name: load(out_dir, run.name) for run in DISTRIBUTED_RUNS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, checkpoint):
    out_dir = tmp_path_factory.mktemp("reference")
    single = setup_distributed(device="cpu")
    for run in with_checkpoint(REFERENCE_RUNS, checkpoint):
        dist_worker.run_once(run, single, out_dir)
    return {run.name: load(out_dir, run.name) for run in REFERENCE_RUNS}


def assert_same_training(result: dict, expected: dict, atol=1e-5):
    torch.testing.assert_close(
        torch.tensor(result["losses"]), torch.tensor(expected["losses"]), rtol=1e-6, atol=0
    )
    assert result["trainable"].keys() == expected["trainable"].keys()
    for name, tensor in expected["trainable"].items():
        torch.testing.assert_close(result["trainable"][name], tensor, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize(
    "name, reference_name",
    [
        ("ddp_lora", "lora"),
        ("ddp_full", "full"),
        ("fsdp_lora", "lora"),
        ("zero2_offload_lora", "lora"),
        ("fsdp_full", "full"),
        ("fsdp_full_tied", "full_tied"),
        ("fsdp_lora_tied", "lora_tied"),
        ("fsdp_checkpointing_lora", "lora"),
        ("fsdp_qlora", "qlora"),
        *[(f"fsdp_{method}_loaded", f"{method}_loaded") for method in LOADED],
    ],
)
def test_two_ranks_train_like_one_process_with_twice_the_batch(distributed, reference, name, reference_name):
    # From a checkpoint (transformers' initialisation: some gradients tiny), Adam turns the last bits by which
    # the ranks' gradient sums differ into up to a few % of an update (9e-5 of 4e-3; LoRA A: 1 element of
    # 2048); the losses still agree to 1e-6.
    assert_same_training(
        distributed[name], reference[reference_name], atol=2e-4 if "_loaded" in name else 1e-5
    )
    # ... and both trained: every trainable tensor moved away from where it started.
    reference_run = next(run for run in REFERENCE_RUNS if run.name == reference_name)
    if not reference_run.checkpoint:
        initial = dist_worker.build_model(reference_run, seed=0).state_dict()
        for tensor_name, tensor in distributed[name]["trainable"].items():
            assert (tensor - initial[tensor_name]).abs().max() > 1e-3, tensor_name


@pytest.mark.parametrize("method", LOADED)
def test_under_fsdp_each_rank_loads_only_its_shards(distributed, reference, method):
    """Loading from disk under FSDP: each rank's memory grows by its half of the weights (plus one tensor's
    rows in flight), never by the whole model as one process's does."""
    one_process = reference[f"{method}_loaded"]["load_peak_bytes"][0]
    per_rank = distributed[f"fsdp_{method}_loaded"]["load_peak_bytes"]
    print(f"{method}: loading added {one_process / 2**20:.0f} MiB to one process, {per_rank} bytes per rank")
    if method == "full":  # the weights each rank read, gathered: exactly what one process loaded
        for name, tensor in reference["full_loaded"]["loaded"].items():
            assert torch.equal(distributed["fsdp_full_loaded"]["loaded"][name], tensor), name
    held = distributed[f"fsdp_{method}_loaded"]["parameter_bytes"]
    whole = reference[f"{method}_loaded"]["parameter_bytes"][0]
    for rank_bytes in held:  # every dtype's parameters halved (4-bit bytes included)
        assert {dtype: 2 * n for dtype, n in rank_bytes.items()} == pytest.approx(whole, rel=0.01)
    if method != "qlora":  # the 4-bit base is 13 MB: the process's own noise is of that size
        # Against the whole model's bytes, not one_process (a process that ran other trainings before reuses
        # the heap they freed, so what loading adds to its peak can be next to nothing).
        assert max(per_rank) <= 0.6 * sum(whole.values())


@pytest.mark.parametrize(
    "name", ["fsdp_lora", "fsdp_full", "fsdp_full_tied", "fsdp_lora_tied", "fsdp_qlora", "fsdp_lora_loaded"]
)
def test_fsdp_on_cpu_holds_one_layer_gathered_at_a_time(distributed, name):
    """The root and the layer that computes: no all-gather buffer but the one every unit shares, no next layer
    gathered ahead in backward (nanoft/fsdp_on_cpu.py). The embedding and lm_head are gathered at their end
    of the forward only, outside the root (the final norm), but for a tied embedding that trains."""
    assert distributed[name]["most_units_gathered"] == [2] * RANKS
    tied = ["model.embed_tokens.weight"] if name == "fsdp_full_tied" else []
    assert distributed[name]["root_parameters"] == [tied + ["model.norm.weight"]] * RANKS


def test_ddp_ranks_retry_together_when_one_runs_out_of_memory(distributed, reference):
    """Only rank 1 runs out of memory; both halve their micro-batches and retry the same step together (no
    collective inside an attempt), and the training is the one that fit."""
    assert_same_training(distributed["ddp_lora_out_of_memory"], reference["lora"])


def test_fsdp_rank_out_of_memory_stops_every_rank_with_the_advice(tmp_path):
    """Under FSDP a rank that fails mid-step has left collectives the others are in: the run stops, with the
    advice line, long before the process group's 600 s timeout (the subprocess timeout bounds it)."""
    run = Run("fsdp_out_of_memory", method="lora", fsdp="full_shard", oom_rows=1, **EPOCH)
    finished = torchrun([run], tmp_path, timeout_s=120, NANOFT_TEST_DIST_TIMEOUT="600")
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0
    assert "out of memory at step 0 with micro-batch 4 under FSDP" in output, output[-3000:]
    assert "--activation-checkpointing" in output


def test_ddp_broadcasts_no_buffers(distributed):
    """The RoPE table is computed alike on every rank: no collective before each forward for it."""
    assert distributed["ddp_lora"]["broadcast_buffers"] is False


def test_every_rank_reads_different_samples_and_together_the_epoch_once(distributed):
    for name in ("ddp_lora", "fsdp_lora"):
        per_rank = [[i for batch in batches for i in batch] for batches in distributed[name]["samples"]]
        assert len(per_rank) == RANKS
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(dist_worker.N_EXAMPLES))


def test_fsdp_mixed_precision_bf16_stays_close_to_fp32(distributed, reference):
    losses, expected = distributed["fsdp_bf16_lora"]["losses"], reference["lora"]["losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=0, atol=2e-2)


def test_resume_under_fsdp_is_exact(distributed):
    """Stopped after 2 steps, saved (gathered weights, optimizer, data position, each rank's RNG), rebuilt
    from other random adapters and restored: the same losses and weights as the uninterrupted run, exactly."""
    assert_same_training(distributed["fsdp_dropout_resumed"], distributed["fsdp_dropout"], atol=0)
    # A full fine-tune, each rank reading only its rows of the weights and Adam moments, resumes exactly too.
    assert_same_training(distributed["fsdp_full_resumed"], distributed["fsdp_full"], atol=0)


def test_fsdp_qlora_keeps_the_base_4bit_and_sharded(distributed, reference):
    model = dist_worker.build_model(Run("count", method="qlora"), seed=0)
    quantized_weights = sum(
        m.in_features * m.out_features for m in model.modules() if type(m).__name__ == "Linear4bit"
    )
    one_process = reference["qlora"]["parameter_bytes"][0]
    per_rank = distributed["fsdp_qlora"]["parameter_bytes"]
    assert one_process[torch.uint8] == quantized_weights // 2  # 4 bits per weight, packed two to a byte
    for rank_bytes in per_rank:
        # Each rank holds half of the packed bytes: a quarter of what its half takes in bf16, an eighth of
        # the whole bf16 base on one device...
        assert rank_bytes[torch.uint8] == quantized_weights // 2 // RANKS
        assert rank_bytes[torch.uint8] * 8 == 2 * quantized_weights
        # ...and no dequantized copy: the float parameters (adapters, norms, embeddings) are halved too.
        assert rank_bytes[torch.float32] == one_process[torch.float32] // RANKS
        assert set(rank_bytes) == {torch.uint8, torch.float32}
    # The quantization state (block scales, code books) is kept whole on every rank, as in one process. At
    # this toy size its fixed 1 KB code book per layer dominates; on a real model it is ~0.13 bits per weight.
    assert distributed["fsdp_qlora"]["quant_state_bytes"] == reference["qlora"]["quant_state_bytes"] * RANKS


def test_adapter_gathered_from_fsdp_loads_with_peft(distributed, tmp_path):
    base = dist_worker.build_model(Run("base", method="full"), seed=0)  # what the adapters were trained on
    save_pretrained(base.state_dict(), base.config, tmp_path / "base")
    # As train.py does under FSDP: rank 0 writes the gathered tensors, its model gives only the LoRA config.
    gathered = distributed["fsdp_lora"]["trainable"]
    save_adapter(
        dist_worker.build_model(Run("config", method="lora"), seed=1), tmp_path / "adapter", tensors=gathered
    )
    ours = load_adapter(from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    for name, tensor in gathered.items():
        assert torch.equal(ours.get_parameter(name), tensor), name
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    input_ids = torch.randint(0, dist_worker.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids), reference(input_ids).logits, rtol=1e-4, atol=1e-4)


def test_a_crashing_rank_stops_the_job(tmp_path):
    finished = torchrun([Run("crash", crash="raise")], tmp_path, timeout_s=120)
    assert finished.returncode != 0
    assert "rank 1 crashed on purpose" in finished.stdout + finished.stderr


def test_a_hanging_rank_makes_the_others_time_out(tmp_path):
    # Rank 1 sleeps instead of joining a collective: rank 0 gives up after the process-group timeout, and
    # torchrun then stops rank 1 too. The subprocess timeout is the bound "no silent hang" is held to.
    finished = torchrun([Run("hang", crash="hang")], tmp_path, timeout_s=120, NANOFT_TEST_DIST_TIMEOUT="5")
    assert finished.returncode != 0
    assert "timed out" in (finished.stdout + finished.stderr).lower()


def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


def test_two_nodes_on_localhost_train_like_one_process(tmp_path, reference):
    endpoint = f"127.0.0.1:{free_port()}"
    run = Run("two_nodes", method="lora", **EPOCH)
    runs_json = write_runs(tmp_path, [run])
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={node}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}",
                "--rdzv-id=nanoft-test",
                str(WORKER),
                str(runs_json),
                str(tmp_path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environment(),
        )
        for node in range(2)
    ]
    outputs = [node.communicate(timeout=180)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(output[-3000:] for output in outputs)
    assert_same_training(load(tmp_path, "two_nodes"), reference["lora"])


def test_single_process_takes_no_distributed_path(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    single = setup_distributed(device="cpu")
    assert (single.rank, single.world_size, single.backend, single.is_main) == (0, 1, None, True)
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, single) is model
    assert all_reduce_sum(torch.tensor(3.0), single).item() == 3.0
    with local_gradients(model):
        model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(UserError, match="torchrun"):
        wrap_model(model, single, fsdp="full_shard")


def test_each_process_finds_its_gpu():
    assert [gpu_index(local_rank, visible_gpus=4) for local_rank in range(4)] == [0, 1, 2, 3]
    # SLURM-style: every process sees only its own GPU, whatever its local rank
    assert [gpu_index(local_rank, visible_gpus=1) for local_rank in range(4)] == [0, 0, 0, 0]
    with pytest.raises(UserError, match="local rank 2 has no GPU .*--nproc_per_node"):
        gpu_index(2, visible_gpus=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_cuda_asked_for_without_a_gpu_is_a_user_error():
    with pytest.raises(UserError, match="--device cuda: torch .* sees no GPU"):
        setup_distributed(device="cuda")


def test_fsdp_refuses_4bit_bytes_that_mixed_precision_would_cast():
    model = dist_worker.build_model(Run("bf16_storage", method="full"), seed=0)
    quantize_linears(model, QuantConfig(compute_dtype=torch.float32, quant_storage=torch.bfloat16))
    with pytest.raises(UserError, match="quant_storage"):
        prepare_4bit_linears_for_fsdp(model, mixed_precision=torch.float16)


# ---------------------------------------------------------------- train.py under torchrun


@pytest.fixture(scope="module")
def tiny_llama_dir(tiny_model_dir):
    """conftest's tiny tied Llama, with its learnable data: 48 train records, 21 val records (so one rank's
    share of the last val batch is empty, and under FSDP it must still join the forward)."""
    path = tiny_model_dir()
    write_data(path / "train.jsonl", 48, seed=1)
    write_data(path / "val.jsonl", 21, seed=2)
    return path


TRAIN_FLAGS = (
    "--max-steps 3 --grad-accum 2 --eval-every 2 --save-every 2 --seq-len 32 --dtype fp32 --lr 1e-2 "
    "--lora-targets all-linear --lora-dropout 0"  # no dropout: ranks draw other masks than one process
).split()


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}"]


def run_train(model_dir: Path, out_dir: Path, *flags, torchrun: bool):
    """train.py on the tiny model (under torchrun with 2 processes, or as one process)."""
    data = ["--data", model_dir / "train.jsonl", "--val-data", model_dir / "val.jsonl"]
    command = [*(TORCHRUN if torchrun else [sys.executable]), "train.py", "--model", model_dir, *data]
    finished = subprocess.run(
        [str(arg) for arg in [*command, "--out", out_dir, *TRAIN_FLAGS, *flags]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=environment(NANOFT_CACHE=str(out_dir.parent / "cache")),
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return finished.stdout


def test_a_bad_flag_under_torchrun_is_reported_once(tiny_llama_dir, tmp_path):
    """Every rank meets the missing file; the user reads its one line once, from rank 0, with no traceback of
    ours (torchrun's own failure summary follows it)."""
    missing = tmp_path / "missing.jsonl"
    command = [
        *TORCHRUN,
        "train.py",
        "--model",
        tiny_llama_dir,
        "--seq-len",
        "32",
        "--data",
        missing,
        "--out",
        tmp_path / "run",
    ]
    finished = subprocess.run(
        [str(arg) for arg in command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=environment(),
    )
    assert finished.returncode != 0
    errors = [line for line in finished.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and str(missing) in errors[0], finished.stderr[-3000:]
    assert 'train.py", line' not in finished.stderr  # no Python traceback from train.py


def test_method_auto_under_torchrun_plans_for_both_ranks_and_says_so_once(tiny_llama_dir, tmp_path):
    output = run_train(
        tiny_llama_dir, tmp_path / "run", "--method", "auto", "--max-steps", "1", torchrun=True
    )
    assert output.count("--method auto:") == 1, output
    assert "--method auto: lora, ddp;" in output  # the model fits whole on each rank: DDP over the 2 ranks


def test_shard_grad_op_saves_a_checkpoint_right_after_an_eval(tiny_llama_dir, tmp_path):
    """shard_grad_op leaves the weights an eval's forward gathered unsharded (no backward frees them); the
    step-2 checkpoint, saved just after the step-2 eval, must find the optimizer's sharded parameters."""
    run_train(tiny_llama_dir, tmp_path / "run", "--fsdp", "shard_grad_op", "--max-steps", "2", torchrun=True)
    assert (tmp_path / "run/checkpoints/step-0000002/optimizer.pt").is_file()


def test_train_py_with_fsdp_matches_one_process_resumes_exactly_and_exports_for_peft(
    tiny_llama_dir, tmp_path
):
    fsdp_dir, one_dir = tmp_path / "fsdp", tmp_path / "one"
    # --merge: rank 0 merges from disk after the process group is gone: no rank waits on it in a collective.
    output = run_train(
        tiny_llama_dir, fsdp_dir, "--fsdp", "full_shard", "--batch-size", "2", "--merge", torchrun=True
    )
    assert output.count("merged: adapter") == 1, output
    run_train(tiny_llama_dir, one_dir, "--batch-size", "4", torchrun=False)
    assert_same_run(fsdp_dir, one_dir, val_rtol=1e-6)

    # Resume under FSDP from the step-2 checkpoint: the step-3 checkpoint comes out bit for bit the same.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(fsdp_dir, resumed_dir)
    step_3 = resumed_dir / "checkpoints" / "step-0000003"
    shutil.rmtree(step_3)
    run_train(tiny_llama_dir, resumed_dir, "--resume", torchrun=True)
    uninterrupted = load_file(fsdp_dir / "checkpoints" / "step-0000003" / "trainable.safetensors")
    resumed = load_file(step_3 / "trainable.safetensors")
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name

    # The adapter rank 0 wrote from the gathered shards is one PEFT loads onto transformers' model.
    assert_peft_loads_with_our_logits(tiny_llama_dir, fsdp_dir / "adapter", fsdp_dir / "merged")


def assert_same_run(fsdp_dir: Path, one_dir: Path, val_rtol: float) -> None:
    """The FSDP run's val curve and best adapter are the one-process run's."""
    fsdp_summary, one_summary = (json.loads((d / "summary.json").read_text()) for d in (fsdp_dir, one_dir))
    torch.testing.assert_close(
        torch.tensor(fsdp_summary["val_curve"]), torch.tensor(one_summary["val_curve"]), rtol=val_rtol, atol=0
    )
    fsdp_adapter, one_adapter = (
        load_file(d / "adapter" / "adapter_model.safetensors") for d in (fsdp_dir, one_dir)
    )
    assert fsdp_adapter.keys() == one_adapter.keys()
    for name, tensor in one_adapter.items():
        torch.testing.assert_close(fsdp_adapter[name], tensor, rtol=0, atol=1e-5, msg=name)


def assert_peft_loads_with_our_logits(model_dir: Path, adapter_dir: Path, merged_dir: Path | None = None):
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(reference, adapter_dir).eval()
    ours = load_adapter(from_pretrained(model_dir), adapter_dir).eval()
    input_ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids), reference(input_ids).logits, rtol=1e-4, atol=1e-4)
        if merged_dir is not None:  # nanoft/merge.py's model is PEFT's merge_and_unload
            merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
            expected = reference.merge_and_unload()(input_ids).logits
            torch.testing.assert_close(merged(input_ids).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "variant",
    ["--use-dora --use-rslora --modules-to-save embed_tokens --merge", "--method qlora --use-dora"],
    ids=["lora-dora-rslora-embed_tokens", "qlora-dora"],
)
def test_lora_variants_under_fsdp_match_one_process_and_load_in_peft(tiny_llama_dir, tmp_path, variant):
    """`--fsdp` alone shards fully. DoRA (its norms need each layer's whole weight, which FSDP gathers; a
    4-bit one dequantized from the gathered bytes), rsLoRA and a trained embedding (tied to lm_head: the
    adapter file names both) shard and train as one process does; the merged model is PEFT's."""
    fsdp_dir, one_dir = tmp_path / "fsdp", tmp_path / "one"
    run_train(tiny_llama_dir, fsdp_dir, "--fsdp", "--batch-size", "2", *variant.split(), torchrun=True)
    run_train(tiny_llama_dir, one_dir, "--batch-size", "4", *variant.split(), torchrun=False)
    assert json.loads((fsdp_dir / "config.json").read_text())["fsdp"] == "full_shard"
    assert_same_run(fsdp_dir, one_dir, val_rtol=1e-5)
    assert any(
        "lora_magnitude_vector" in name for name in load_file(fsdp_dir / "adapter/adapter_model.safetensors")
    )
    if "qlora" not in variant:  # a 4-bit base's adapter is checked against PEFT in tests/test_lora.py
        assert_peft_loads_with_our_logits(tiny_llama_dir, fsdp_dir / "adapter", fsdp_dir / "merged")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_mixture_of_experts_trains_the_same_under_fsdp(family_dir, tiny_llama_dir, tmp_path, method):
    """Mixtral's experts are sharded with their layer: two FSDP ranks train as one process does (the same
    losses; the experts each rank's tokens skip still join every collective). Without the load-balancing
    loss, which like transformers' is taken over each rank's own tokens. A small lr: Adam's first step
    moves each weight by about lr x the sign of its gradient, so gradients that differ in rounding alone move
    a router by +-lr, which near a tie sends a token to another expert (at 1e-2: 0.7% apart at step 2)."""
    model_dir = shutil.copytree(family_dir("mixtral"), tmp_path / "mixtral")
    for data in ("train.jsonl", "val.jsonl"):
        shutil.copy(tiny_llama_dir / data, model_dir)
    flags = [
        "--max-steps",
        "2",
        "--method",
        method,
        "--lr",
        "1e-4",
        "--batch-size",
        "4",
        "--fsdp",
        "full_shard",
    ]
    run_train(model_dir, tmp_path / "fsdp", *flags, torchrun=True)
    run_train(model_dir, tmp_path / "one", *flags[:-2], "--batch-size", "8", torchrun=False)  # 2 ranks x 4
    losses = [train_losses_of(tmp_path / run) for run in ("fsdp", "one")]
    assert len(losses[0]) == 2
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=0)


def train_losses_of(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]
