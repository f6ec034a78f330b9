"""What keeping freed memory (nanoft/cpu_allocator.py) is worth: a nanoft step with and without it.

    python bench/allocator.py                                   # lora-qv, qlora-nf4, full; bf16 4 x 256
    python bench/allocator.py --cases full --steps 10

Two nanoft workers of bench/train_step.py, one as train.py runs on CPU (freed memory kept for reuse), one with
glibc's malloc as it comes (`--glibc-malloc`), alternating steps in one run so a noisy machine slows both
alike. Per worker: median step time, the page faults and system CPU time of a step (getrusage, the cost of the
kernel handing out fresh zeroed pages), and peak resident memory during the timed steps.
"""

import argparse
import statistics
import sys
import tempfile
from copy import copy
from pathlib import Path

from train_step import CASES, Worker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanoft.default_model import default_model_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=["lora-qv", "qlora-nf4", "full"])
    parser.add_argument("--shape", default="4x256", help="micro-batch x sequence length")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant after 2 warm-up steps")
    args = parser.parse_args()
    args.device, args.model, args.compile, args.threads = "cpu", str(default_model_dir()), False, 0
    print("| case | malloc | s / step | page faults / step | system s / step | peak MB | speed |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for case in args.cases:
        workers = {}
        for variant, glibc_malloc in (("freed memory kept", False), ("glibc defaults", True)):
            variant_args = copy(args)
            variant_args.glibc_malloc = glibc_malloc
            variant_args.log_dir = tempfile.mkdtemp(prefix="nanoft-allocator-")
            workers[variant] = Worker("nanoft", case, args.shape, args.dtype, variant_args)
        steps = {variant: [] for variant in workers}
        for i in range(args.steps):
            for variant in list(workers)[:: 1 if i % 2 == 0 else -1]:
                steps[variant].append(workers[variant].ask("step"))
        seconds = {variant: statistics.median(s["seconds"] for s in steps[variant]) for variant in workers}
        for variant, w in workers.items():
            memory = w.finish()
            faults = statistics.median(s["page_faults"] for s in steps[variant])
            system = statistics.median(s["system_seconds"] for s in steps[variant])
            speed = seconds["glibc defaults"] / seconds[variant]
            print(
                f"| {case} | {variant} | {seconds[variant]:.3f} | {faults:,.0f} | {system:.3f} "
                f"| {memory['step_peak_bytes'] / 2**20:.0f} | {speed:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
