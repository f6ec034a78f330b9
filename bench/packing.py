"""Padded, length-grouped and packed batches: train.py's real-token throughput on the same data.

    python bench/packing.py                          # the built-in data and model, 6 steps each
    python bench/packing.py --steps 10 --json bench/packing.json -- --data my.jsonl --seq-len 512

Runs `python train.py` once per batching (default: rows padded to the longest in the batch;
`--group-by-length`; `--pack`) for --steps optimizer steps with evaluation only at the start and end, and
reads each run's summary.json: tokens/s counts real tokens (never padding), so it is the work done per
second; peak memory and wall time come along. Arguments after `--` go to every train.py run.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BATCHINGS = {"padded": [], "grouped by length": ["--group-by-length"], "packed": ["--pack"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("train_args", nargs="*", help="after --: more train.py flags for every run")
    args = parser.parse_args()

    results = []
    print("| batching | real tokens/s | vs padded | tokens trained | peak memory GiB | wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as scratch:
        for name, flags in BATCHINGS.items():
            out = Path(scratch) / name.replace(" ", "-")
            steps = ["--max-steps", str(args.steps), "--eval-every", str(args.steps)]
            command = [sys.executable, "train.py", "--out", str(out), *steps, *flags, *args.train_args]
            subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
            summary = json.loads((out / "summary.json").read_text())
            row = {
                "batching": name,
                "tokens_per_s": summary["train_tokens_per_s"],
                "tokens_seen": summary["tokens_seen"],
                "peak_memory_gib": summary["peak_memory_bytes"] / 2**30,
                "wall_s": summary["wall_s"],
            }
            results.append(row)
            speed = row["tokens_per_s"] / results[0]["tokens_per_s"]
            cells = [name, f"{row['tokens_per_s']:.0f}", f"{speed:.2f}x", f"{row['tokens_seen']:,}"]
            cells += [f"{row['peak_memory_gib']:.2f}", f"{row['wall_s']:.0f}"]
            print("| " + " | ".join(cells) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
