"""The GPU check: on one CUDA GPU, the CUDA tests, a matrix of short train.py runs and the train-step bench,
in one table. No network: it builds its own SmolLM2-135M-shaped model, tokenizer and data.

    python bench/gpu_check.py                     # ~6 min on one GPU; writes runs/gpu_check/gpu_check.md
    python bench/gpu_check.py --out DIR --skip-tests --skip-bench

Each train.py run is a few optimizer steps (micro-batch 8 x 512 tokens, 2 accumulated) of a random
SmolLM2-135M-shaped Llama (saved with nanoft's save_pretrained) on learnable synthetic records, with a
49,152-word tokenizer; the row says whether it ran and what it measured (summary.json's tokens/s and peak,
metrics.jsonl's last MFU). "OOM" caps the process at 2.5x the LoRA run's peak (torch's per-process memory
fraction) and trains at 8x the micro-batch: it must run out of memory, halve, and finish.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanoft.model import ModelConfig, Transformer  # noqa: E402
from nanoft.weights import save_pretrained  # noqa: E402

GiB = 2**30
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + "
    "' <|end|> ' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)
STEPS = "--max-steps 6 --eval-every 1000 --save-every 1000 --batch-size 8 --grad-accum 2 --seq-len 512"


def build_model(path: Path) -> None:
    """Random weights (std 0.02, as Hugging Face initialises), a word-level tokenizer, a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = ModelConfig(**SMOLLM2_135M)
    with torch.device("cuda"):
        model = Transformer(config)
    for parameter in model.parameters():
        if parameter.dim() >= 2:
            torch.nn.init.normal_(parameter, std=0.02)
    save_pretrained(model.state_dict(), config, path, dtype=torch.bfloat16)
    words = SPECIAL_TOKENS + [f"w{i}" for i in range(config.vocab_size - len(SPECIAL_TOKENS))]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(path / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(special))


def write_data(path: Path, n: int = 3000) -> None:
    """Alpaca records whose answer is the instruction's words moved one place up (learnable)."""
    rng = random.Random(0)
    with open(path, "w") as file:
        for _ in range(n):
            words = [rng.randrange(2000) for _ in range(rng.randrange(20, 120))]
            record = {
                "instruction": " ".join(f"w{w}" for w in words),
                "output": " ".join(f"w{w + 1}" for w in words),
            }
            file.write(json.dumps(record) + "\n")


def run(name: str, command: list, out: Path, log_dir: Path, timeout_s: int = 300) -> dict:
    """Run one command; its row: name, ok, seconds, and what its run directory's summary says."""
    started = time.perf_counter()
    log = log_dir / f"{name}.log"
    try:
        with open(log, "w") as file:
            finished = subprocess.run(
                [str(arg) for arg in command],
                cwd=REPO,
                stdout=file,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
            )
        ok = finished.returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    row = {"name": name, "ok": ok, "seconds": time.perf_counter() - started, "log": str(log)}
    summary_file = out / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        mfu = [m["mfu"] for m in metrics if "mfu" in m]
        row.update(
            tokens_per_s=summary["train_tokens_per_s"],
            mfu=mfu[-1] if mfu else None,
            peak_gib=summary["peak_memory_bytes"] / GiB,
            steps=summary["steps"],
        )
    print(f"{name}: {'ok' if row['ok'] else 'FAILED'} in {row['seconds']:.0f} s", flush=True)
    return row


def train_matrix(model_dir: Path, data: Path, work: Path, log_dir: Path) -> list[dict]:
    base = ["train.py", "--model", model_dir, "--data", data, "--val-frac", "0.01", *STEPS.split()]
    python, torchrun = [sys.executable], [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cases = {
        "LoRA bf16": "--method lora --dtype bf16",
        "QLoRA NF4 + paged AdamW 8-bit": "--method qlora --optim paged_adamw8bit",
        "int8 base + LoRA": "--method qlora --quant int8",
        "full fine-tune fp16 + scaler": "--method full --dtype fp16",
        "LoRA --pack at 2048": "--method lora --pack --seq-len 2048 --batch-size 2",
        "LoRA --compile": "--method lora --compile",
        "LoRA --merge": "--method lora --merge",
    }
    rows = []
    for name, flags in cases.items():
        out = work / name.split()[0].lower() / name.replace(" ", "_")
        rows.append(run(name, [*python, *base, *flags.split(), "--out", out], out, log_dir))
    # --resume: 4 steps saving every 2, then resumed to 6
    out = work / "resume"
    first = run(
        "resume: first 4 steps",
        [*python, *base, "--max-steps", "4", "--save-every", "2", "--out", out],
        out,
        log_dir,
    )
    resumed = run("resume: to step 6", [*python, *base, "--resume", "--out", out], out, log_dir)
    resumed["ok"] = first["ok"] and resumed["ok"] and resumed.get("steps") == 6
    rows.append(resumed)
    out = work / "fsdp_one_rank"
    fsdp = [*torchrun, "--nproc-per-node=1", *base, "--method", "lora", "--fsdp", "full_shard", "--out", out]
    rows.append(run("FSDP full_shard on one rank", fsdp, out, log_dir))
    # Out of memory, forced: a memory cap at 2.5x what the LoRA run peaked at, 8x its micro-batch.
    lora_peak = rows[0].get("peak_gib")
    if lora_peak:
        fraction = min(0.9, 2.5 * lora_peak * GiB / torch.cuda.get_device_properties(0).total_memory)
        capped = (
            "import runpy, sys, torch\n"
            f"torch.cuda.set_per_process_memory_fraction({fraction})\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path('train.py', run_name='__main__')\n"
        )
        out = work / "oom"
        command = [*python, "-c", capped, *base, "--method", "lora", "--batch-size", "64", "--out", out]
        row = run(f"OOM forced (cap {2.5 * lora_peak:.1f} GiB, micro-batch 64)", command, out, log_dir)
        row["ok"] = row["ok"] and "out of memory at micro-batch 64" in Path(row["log"]).read_text()
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_check.py needs a CUDA GPU; torch sees none")
    started = time.perf_counter()
    gpu = torch.cuda.get_device_properties(0)
    header = (
        f"{gpu.name}, compute capability {gpu.major}.{gpu.minor}, {gpu.total_memory / GiB:.0f} GiB; "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    )
    print(header, flush=True)
    work, log_dir = args.out / "work", args.out / "logs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    model_dir, data = work / "smollm2-135m-shaped", work / "train.jsonl"
    build_model(model_dir)
    write_data(data)
    env = {**os.environ, "NANOFT_CACHE": str(work / "cache")}
    os.environ.update(env)

    rows = []
    if not args.skip_tests:  # every test that needs CUDA is named for it
        tests = [sys.executable, "-m", "pytest", "-q", "-rs", "-k", "cuda or gpu", "tests"]
        rows.append(
            run("CUDA tests (pytest -k 'cuda or gpu')", tests, work / "no_run", log_dir, timeout_s=240)
        )
        rows[-1]["note"] = Path(rows[-1]["log"]).read_text().strip().splitlines()[-1]
    rows += train_matrix(model_dir, data, work, log_dir)
    if not args.skip_bench:
        bench_json = args.out / "train_step_cuda.json"
        bench = [
            sys.executable,
            "bench/train_step.py",
            "--device",
            "cuda",
            "--model",
            model_dir,
            "--dtypes",
            "bf16",
        ]
        # Issue 19's cases and shapes: its goal (>= 30% MFU, >= 3x transformers + PEFT) is read off this row.
        bench += ["--cases", "lora-qv", "qlora-nf4", "--shapes", "4x256", "1x2048", "--steps", "6"]
        bench += ["--json", bench_json]
        rows.append(run("bench/train_step.py --device cuda", bench, work / "no_run", log_dir, timeout_s=300))
        results = [
            line
            for line in Path(rows[-1]["log"]).read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| case", "| ---"))
        ]
        rows[-1]["note"] = "vs transformers + PEFT: " + "; ".join(results)

    lines = [
        f"# GPU check: {header}",
        "",
        f"`python bench/gpu_check.py` in {(time.perf_counter() - started) / 60:.1f} min",
        "",
    ]
    lines += [
        "| what ran | result | tokens/s | MFU | peak GiB | note |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        tokens = f"{row['tokens_per_s']:.0f}" if row.get("tokens_per_s") else ""
        mfu = f"{row['mfu']:.0%}" if row.get("mfu") is not None else ""
        peak = f"{row['peak_gib']:.2f}" if row.get("peak_gib") else ""
        result = "pass" if row["ok"] else f"FAIL ({row['log']})"
        lines.append(f"| {row['name']} | {result} | {tokens} | {mfu} | {peak} | {row.get('note', '')} |")
    table = "\n".join(lines) + "\n"
    (args.out / "gpu_check.md").write_text(table)
    (args.out / "gpu_check.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
