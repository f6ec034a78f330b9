"""Per-rank peak memory of train.py under FSDP against one process: sharded loading (nanoft/weights.py).

    python bench/fsdp_memory.py                  # SmolLM2-1.7B-shaped; writes bench/fsdp_memory_1.7b.json
    python bench/fsdp_memory.py --size 0.9b      # the issue's 0.9B case (weights 1.8 GB)
    python bench/fsdp_memory.py --size 0.9b --ranks 4 --methods lora
    python bench/fsdp_memory.py --size 3b --methods lora   # Llama-3.2-3B's shape: 6.5 GiB for one process
    python bench/fsdp_memory.py --size 8b --methods lora   # Llama-3.1-8B's shape: 15 GiB for one process

The checkpoint is a Llama written by transformers (AutoConfig.for_model + from_config + save_pretrained, bf16,
random weights) with the built-in model's tokenizer, written once under --work. Each case is one optimizer
step of train.py on the built-in data (LoRA r=16 q,v or QLoRA NF4: 2 micro-batches of 1 x 128 tokens), once
as one process and once under `torchrun --nproc_per_node=N --fsdp full_shard`; the peak is each rank's
peak resident memory from start to end, loading included (summary.json's peak_memory_bytes_per_rank).
Runs one at a time: the 1.7B LoRA case needs 4.0 GiB for one process and 2.7 GiB per rank.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanoft.default_model import default_model_dir  # noqa: E402
from nanoft.weights import copy_tokenizer_files  # noqa: E402

GiB = 2**30
SIZES = {  # Llama shapes with SmolLM2's 49,152-token vocabulary (its tokenizer comes with the built-in model)
    "0.9b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=4, tie_word_embeddings=False),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, tie_word_embeddings=True),  # SmolLM2-1.7B's shape
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, tie_word_embeddings=True),  # Llama-3.2-3B's shape
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),  # Llama-3.1-8B's shape
}  # fmt: skip
STEP_FLAGS = (
    "--max-steps 1 --batch-size 1 --grad-accum 2 --seq-len 128 --val-frac 0.01 --lora-dropout 0 --overwrite"
).split()


def write_checkpoint(path: Path, size: str) -> None:
    """In a child process, so this one's memory stays small while it measures the others."""
    code = f"""
import torch, transformers
config = transformers.AutoConfig.for_model("llama", vocab_size=49152, max_position_embeddings=2048,
    bos_token_id=1, eos_token_id=2, **{SIZES[size]!r})
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained({str(path)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    copy_tokenizer_files(default_model_dir(), path)


def train(model_dir: Path, out: Path, method: str, ranks: int) -> list[int]:
    """Each rank's peak resident memory (bytes) over one train.py run."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command = [
        *(launch if ranks > 1 else [sys.executable]),
        str(REPO / "train.py"),
        "--model",
        str(model_dir),
    ]
    command += ["--method", method, "--out", str(out), *STEP_FLAGS]
    command += ["--fsdp", "full_shard"] if ranks > 1 else []
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"  {method} x {ranks}: {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads((out / "summary.json").read_text())["peak_memory_bytes_per_rank"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1.7b")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["lora", "qlora"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/nanoft-fsdp-memory"))
    parser.add_argument("--json", type=Path, help="default: bench/fsdp_memory_SIZE.json")
    args = parser.parse_args()
    args.json = args.json or REPO / "bench" / f"fsdp_memory_{args.size}.json"
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    print(cpu.strip(), "|", os.getloadavg())
    model_dir = args.work / f"llama-{args.size}"
    if not (model_dir / "config.json").is_file():
        write_checkpoint(model_dir, args.size)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    rows = []
    for method in args.methods:
        one = train(model_dir, args.work / f"{method}-1", method, ranks=1)[0]
        sharded = train(model_dir, args.work / f"{method}-{args.ranks}", method, ranks=args.ranks)
        rows.append({"method": method, "one_process": one, "per_rank": sharded})
    print(f"\n{args.size} Llama, bf16 checkpoint {weights / GiB:.2f} GiB; peak resident memory per process")
    print(f"| method | one process | FSDP x {args.ranks}, per rank | ratio |\n| --- | ---: | ---: | ---: |")
    for row in rows:
        per_rank = ", ".join(f"{peak / GiB:.2f}" for peak in row["per_rank"])
        ratio = max(row["per_rank"]) / row["one_process"]
        print(f"| {row['method']} | {row['one_process'] / GiB:.2f} GiB | {per_rank} GiB | {ratio:.2f}x |")
    record = {"cpu": cpu.strip(), "load": os.getloadavg(), "size": args.size, "checkpoint_bytes": weights}
    args.json.write_text(json.dumps({**record, "ranks": args.ranks, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
