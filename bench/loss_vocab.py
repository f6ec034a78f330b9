"""Cross-entropy over a large vocabulary: nanoft's chunked loss against F.cross_entropy on fp32 logits.

    python bench/loss_vocab.py                                 # 4x256 and 1x2048 tokens, bf16 and fp32
    python bench/loss_vocab.py --shapes 4x256 --dtypes bf16 --repeats 10 --threads 1
    python bench/loss_vocab.py --weight-grad                   # also d loss / d matrix (full fine-tune)
    python bench/loss_vocab.py --lm-head 128256x2048 --shapes 4x256 --dtypes bf16 --min-rows 1 128 256 512
        # Llama-3.2-1B's lm_head, nanoft with chunks of at least each many rows (1: 2^23 logits a chunk)

Both sides start from the final hidden states (tokens x C) and the lm_head matrix (V x C; SmolLM2's tied
49,152 x 576 unless --lm-head says otherwise) in --dtype, and run forward + backward to the hidden states;
with --weight-grad also to the matrix (a full fine-tune or a tied, trained embedding; LoRA never needs it).
The reference is what
transformers does: logits = hidden @ W^T in --dtype, cast to fp32, F.cross_entropy. Every position has a
target. Each measurement runs in its own subprocess: time = the median CPU time of --repeats runs after a
warm-up run (CPU time, so that other processes on a shared machine are not counted; exact with --threads 1);
memory = that process's peak RSS during the timed runs minus its RSS just before them (the inputs excluded).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import nanoft.loss  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def reference_loss(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()  # (N, V): the full fp32 logits
    return F.cross_entropy(logits, targets, reduction="sum")


def nanoft_loss(hidden, weight, targets):
    return nanoft.loss.chunked_cross_entropy(hidden[None], weight, targets[None])[0]


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(
    side: str, tokens: int, dtype: torch.dtype, lm_head: tuple, weight_grad: bool, repeats: int
) -> dict:
    vocab, hidden_size = lm_head
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=generator).to(dtype).requires_grad_()
    weight = (
        (torch.randn(vocab, hidden_size, generator=generator) * 0.02).to(dtype).requires_grad_(weight_grad)
    )
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    loss_fn = nanoft_loss if side == "nanoft" else reference_loss

    def run():
        hidden.grad = weight.grad = None
        loss = loss_fn(hidden, weight, targets)
        loss.backward()
        return loss.item()

    loss = run()
    rss_before = rss_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS
    seconds = []
    for _ in range(repeats):
        started = time.process_time()  # CPU time: on a shared machine, time the others take is not counted
        run()
        seconds.append(time.process_time() - started)
    return {
        "seconds": statistics.median(seconds),
        "extra_peak_bytes": rss_bytes("VmHWM") - rss_before,
        "loss": loss,
        "rows_per_chunk": nanoft.loss.rows_per_chunk(vocab, weight_grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4x256", "1x2048"], help="batch x sequence length")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument(
        "--weight-grad", action="store_true", help="also the gradient of the vocabulary matrix"
    )
    parser.add_argument("--lm-head", default="49152x576", help="vocabulary x hidden size")
    parser.add_argument(
        "--min-rows",
        nargs="+",
        type=int,
        default=[nanoft.loss.MIN_ROWS_PER_CHUNK],
        help="nanoft's MIN_ROWS_PER_CHUNK, a measurement each",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--worker", nargs=3, metavar=("SIDE", "TOKENS", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    lm_head = tuple(map(int, args.lm_head.split("x")))
    if args.worker:
        side, tokens, dtype = args.worker
        if args.threads:
            torch.set_num_threads(args.threads)
        nanoft.loss.MIN_ROWS_PER_CHUNK = args.min_rows[0]
        print(json.dumps(measure(side, int(tokens), DTYPES[dtype], lm_head, args.weight_grad, args.repeats)))
        return

    gradients = "the hidden states and the matrix" if args.weight_grad else "the hidden states"
    threads = args.threads or torch.get_num_threads()
    print(
        f"forward + backward to {gradients}, lm_head {args.lm_head} (vocabulary x hidden), {threads} threads"
    )
    header = ["tokens", "dtype", "F.cross_entropy ms", "nanoft rows a chunk", "nanoft ms", "speed"]
    header += ["F.cross_entropy MB", "nanoft MB", "memory"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))

    def worker(side: str, tokens: int, dtype: str, min_rows: int) -> dict:  # a process of its own
        command = [sys.executable, __file__, "--worker", side, str(tokens), dtype, "--lm-head", args.lm_head]
        command += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
        command += ["--min-rows", str(min_rows)] + (["--weight-grad"] if args.weight_grad else [])
        return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)

    results = []
    for dtype in args.dtypes:
        for shape in args.shapes:
            batch, seq_len = map(int, shape.split("x"))
            theirs = worker("reference", batch * seq_len, dtype, args.min_rows[0])
            for min_rows in args.min_rows:
                ours = worker("nanoft", batch * seq_len, dtype, min_rows)
                rows = min(ours["rows_per_chunk"], batch * seq_len)
                their_ms, our_ms = 1e3 * theirs["seconds"], 1e3 * ours["seconds"]
                their_mb, our_mb = theirs["extra_peak_bytes"] / 2**20, ours["extra_peak_bytes"] / 2**20
                cells = [
                    shape,
                    dtype,
                    f"{their_ms:.0f}",
                    str(rows),
                    f"{our_ms:.0f}",
                    f"**{their_ms / our_ms:.2f}x**",
                ]
                cells += [f"{their_mb:.0f}", f"{our_mb:.0f}", f"**{our_mb / max(their_mb, 1e-6):.2f}x**"]
                print("| " + " | ".join(cells) + " |", flush=True)
                results.append({"shape": shape, "dtype": dtype, "reference": theirs, "nanoft": ours})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {"lm_head": args.lm_head, "weight_grad": args.weight_grad, "results": results}, indent=1
            )
        )


if __name__ == "__main__":
    main()
