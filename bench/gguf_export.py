"""What a GGUF export of SmolLM2-135M-Instruct costs and how far each --outtype moves the model.

    python bench/gguf_export.py                      # every outtype, 16 chat examples of the built-in data
    python bench/gguf_export.py --outtypes q8_0 --examples 4 --json bench/gguf_export.json

For each --outtype: the file's size, the export's wall time and peak RSS (`python -m nanoft.export` in a child
process), and what the stored weights do: the file is read back with nanoft/gguf_convert.py (the dequantized
weights transformers' GGUF loader sees too: tests/test_export.py) and run on chat examples of the built-in
data (prompt and answer) next to the original fp32 model. Reported: the largest |logit difference| over the
largest |logit| per example, worst of all (the tolerance tests/test_export.py asserts), the mean KL divergence
from the original's next-token distribution per token, how often both pick the same top token, and the greedy
answer to "What is the capital of France?".
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanoft.config import GGUF_OUTTYPES  # noqa: E402
from nanoft.default_data import default_data_path  # noqa: E402
from nanoft.default_model import default_model_dir  # noqa: E402
from nanoft.generate import generate  # noqa: E402
from nanoft.gguf_convert import convert_gguf  # noqa: E402
from nanoft.tokenizer import Tokenizer  # noqa: E402
from nanoft.weights import from_pretrained  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# The child's own peak: VmHWM starts afresh at exec, while ru_maxrss keeps the parent's size from the fork.
EXPORT_AND_REPORT_PEAK = (
    "import sys; from nanoft.export import main; main(sys.argv[1:]); "
    "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))"
)


def chat_examples(tokenizer: Tokenizer, n: int) -> list[list[int]]:
    records = [json.loads(line) for line in default_data_path().read_text().splitlines()[:n]]
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}],
            tokenize=True,
        )
        for r in records
    ]


@torch.no_grad()
def compare(original, exported, examples) -> dict:
    worst_gap, kl_sum, same_top, tokens = 0.0, 0.0, 0, 0
    for ids in examples:
        a, b = original(torch.tensor([ids]))[0], exported(torch.tensor([ids]))[0]  # (T, vocab)
        worst_gap = max(worst_gap, ((b - a).abs().max() / a.abs().max()).item())
        log_p, log_q = a.log_softmax(-1), b.log_softmax(-1)
        kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
        same_top += (a.argmax(-1) == b.argmax(-1)).sum().item()
        tokens += len(ids)
    return {"max_logit_gap": worst_gap, "mean_kl": kl_sum / tokens, "same_top1": same_top / tokens}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outtypes", nargs="+", default=list(GGUF_OUTTYPES), choices=GGUF_OUTTYPES)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(next(line for line in cpu.splitlines() if "Model name" in line).strip())
    print("load:", Path("/proc/loadavg").read_text().split()[:3], f"torch {torch.__version__}")
    model_dir = default_model_dir()
    tokenizer = Tokenizer.from_pretrained(model_dir)
    original = from_pretrained(model_dir).eval()
    examples = chat_examples(tokenizer, args.examples)
    question = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in args.outtypes:
            gguf = Path(tmp) / f"smollm2-{outtype}.gguf"
            start = time.perf_counter()
            command = [sys.executable, "-c", EXPORT_AND_REPORT_PEAK, f"--gguf={gguf}", f"--outtype={outtype}"]
            child = subprocess.run(command, capture_output=True, text=True, check=True)
            seconds = time.perf_counter() - start
            convert_gguf(gguf, Path(tmp) / outtype)
            exported = from_pretrained(Path(tmp) / outtype).eval()
            answer = tokenizer.decode(generate(exported, tokenizer, question, max_new_tokens=16))
            rows.append(
                {
                    "outtype": outtype,
                    "file_mb": gguf.stat().st_size / 1e6,
                    "export_s": seconds,
                    "export_peak_mb": int(child.stdout.split()[-1]) * 1024 / 1e6,  # VmHWM is in kB
                    **compare(original, exported, examples),
                    "answer": answer,
                }
            )
    print(f"\n{args.examples} chat examples of the built-in data, {sum(map(len, examples))} tokens\n")
    print("| outtype | file MB | export s | export peak MB | max logit gap | mean KL | same top-1 | answer |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['outtype']} | {r['file_mb']:.0f} | {r['export_s']:.1f} | {r['export_peak_mb']:.0f} | "
            f"{r['max_logit_gap']:.2e} | {r['mean_kl']:.2e} | {r['same_top1']:.1%} | {r['answer']!r} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
