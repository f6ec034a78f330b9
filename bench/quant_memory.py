"""QLoRA's memory, measured: loading, a training step next to transformers + PEFT, and 7B-34B estimates.

    python bench/quant_memory.py                          # all sections; table on stdout, JSON beside it
    python bench/quant_memory.py --sections load estimate # only some (load, train, estimate)

Every measurement runs in a fresh subprocess and reports that process's peak resident memory (VmHWM; not
ru_maxrss, which Linux carries over from the parent through fork and exec) and the peak of its anonymous
memory (RssAnon, sampled every 2 ms), which leaves out memory-mapped files (transformers maps safetensors
shards; nanoft.weights reads them). "load" = peak minus the same process's RSS after its imports. The
subprocesses run with MALLOC_MMAP_THRESHOLD_=65536, so glibc returns freed blocks of 64 KiB and more to the
system and RSS follows live tensors (by default it keeps freed blocks cached, e.g. the short-lived dequantized
weights of the 4-bit layers, which hid most of QLoRA's saving in this table).

- load: SmolLM2-135M and a random-weight model of TinyLlama-1.1B's shape (2.2 GB of bf16 safetensors, written
  once to --synthetic-dir) loaded in bf16 (nanoft.weights.from_pretrained) and in NF4 (quant.load_quantized).
- train: SmolLM2-135M, LoRA r=16 alpha=32 on q_proj/v_proj, no dropout, AdamW lr 2e-4, batches of 4 x 256
  tokens, 2 warm-up steps then --steps timed ones: LoRA over a bf16 base and QLoRA over NF4 (double quant,
  bf16 compute), ours and transformers + PEFT + bitsandbytes with the same settings.
- estimate: the weight bytes of Llama-2-7B/13B and CodeLlama-34B under QLoRA (NF4 + double quant linears,
  bf16 embeddings and lm_head), from their real configs, next to the figures users quote.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Llama-2-7B, Llama-2-13B and CodeLlama-34B from their config.json, and the QLoRA GPU memory users quote.
LLAMA_CONFIGS = {
    "7B": dict(hidden=4096, layers=32, intermediate=11008, vocab=32000, heads=32, kv_heads=32, quoted_gb=8),
    "13B": dict(hidden=5120, layers=40, intermediate=13824, vocab=32000, heads=40, kv_heads=40, quoted_gb=14),
    "34B": dict(hidden=8192, layers=48, intermediate=22016, vocab=32000, heads=64, kv_heads=8, quoted_gb=22),
}
TINYLLAMA_SHAPE = dict(
    model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-5, max_position_embeddings=2048,
)  # fmt: skip
BATCH, SEQ_LEN, LORA_R, LORA_ALPHA, LR = 4, 256, 16, 32, 2e-4


def nf4_linear_bytes(out_features: int, in_features: int) -> int:
    """Bytes bitsandbytes stores for one NF4 double-quant linear (blocks of 64, absmax blocks of 256)."""
    n = out_features * in_features
    blocks = math.ceil(n / 64)
    # packed 4-bit weights, 8-bit absmax per block, fp32 absmax per 256 blocks, 16 + 256 fp32 codes, offset
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * 16 + 4 * 256 + 4


def qlora_weight_bytes(hidden, layers, intermediate, vocab, heads, kv_heads, tied=False) -> dict:
    """Weight bytes of a Llama-shaped model: NF4 decoder linears, bf16 embeddings, lm_head and norms."""
    head_dim = hidden // heads
    shapes = [
        (hidden, hidden),
        (kv_heads * head_dim, hidden),
        (kv_heads * head_dim, hidden),
        (hidden, hidden),
    ]
    shapes += [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]
    linears = layers * sum(nf4_linear_bytes(*shape) for shape in shapes)
    bf16 = 2 * (vocab * hidden * (1 if tied else 2) + (2 * layers + 1) * hidden)
    linear_params = layers * sum(o * i for o, i in shapes)
    return {
        "nf4_bytes": linears + bf16,
        "bf16_bytes": 2 * linear_params + bf16,
        "params": linear_params + bf16 // 2,
    }


# ---------------------------------------------------------------- child processes: one measurement each


class PeakAnonymousMemory:
    """Samples RssAnon in a thread; `.peak` in bytes."""

    def __init__(self):
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        while self.running:
            self.peak = max(self.peak, proc_status_bytes("RssAnon"))
            time.sleep(0.002)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark needs Linux")


def child_load(job: dict) -> dict:
    import torch

    import quant
    from nanoft.weights import from_pretrained

    baseline = proc_status_bytes("VmRSS")
    sampler = PeakAnonymousMemory()
    start = time.perf_counter()
    if job["quant"] == "bf16":
        model = from_pretrained(job["path"], dtype=torch.bfloat16)
    else:
        model = quant.load_quantized(job["path"], quant=job["quant"])
    seconds = time.perf_counter() - start
    # Read every weight once, as the first forward will: a tensor loaded in the file's own dtype is a view of
    # the memory map, and its pages only become resident when touched.
    for parameter in model.parameters():
        parameter.detach().reshape(-1).view(torch.uint8).max()
    weights = quant.quantized_weight_bytes(model)
    return {
        "seconds": seconds,
        "baseline_rss": baseline,
        "peak_anon": sampler.stop(),
        "weight_bytes": weights.stored,
    }


def synthetic_batch(vocab_size: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (BATCH, SEQ_LEN + 1), generator=generator)
    return input_ids[:, :-1], input_ids[:, 1:]  # inputs and next-token targets, (B, T) each


def child_train_ours(job: dict) -> dict:
    import torch

    import quant
    from lora import LoRAConfig, inject_lora
    from nanoft.weights import from_pretrained

    baseline = proc_status_bytes("VmRSS")
    sampler = PeakAnonymousMemory()
    if job["base"] == "bf16":
        model = from_pretrained(job["path"], dtype=torch.bfloat16)
    else:
        model = quant.load_quantized(job["path"], quant="nf4")
    lora_config = LoRAConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, targets=["q_proj", "v_proj"])
    model = inject_lora(model, lora_config)
    optimizer = quant.make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", lr=LR)
    inputs, targets = synthetic_batch(model.config.vocab_size)

    def step():
        loss_sum, n_targets = model(inputs, targets)
        (loss_sum / n_targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run_steps(step, job, baseline, sampler)


def child_train_reference(job: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    baseline = proc_status_bytes("VmRSS")
    sampler = PeakAnonymousMemory()
    options = {"dtype": torch.bfloat16}
    if job["base"] == "nf4":
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        options["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(job["path"], **options)
    lora_config = LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
    )
    model = get_peft_model(model, lora_config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    inputs, _ = synthetic_batch(model.config.vocab_size)
    full = torch.cat([inputs, synthetic_batch(model.config.vocab_size)[1][:, -1:]], dim=1)

    def step():
        # transformers shifts labels itself: the same 4 x 256 next-token targets as ours.
        loss = model(input_ids=full[:, :-1], labels=full[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run_steps(step, job, baseline, sampler)


def run_steps(step, job, baseline, sampler) -> dict:
    for _ in range(2):
        step()  # warm-up: allocator, kernels, optimizer state
    start = time.perf_counter()
    for _ in range(job["steps"]):
        step()
    seconds = (time.perf_counter() - start) / job["steps"]
    return {"step_seconds": seconds, "tokens_per_second": BATCH * SEQ_LEN / seconds, "baseline_rss": baseline,
            "peak_anon": sampler.stop()}  # fmt: skip


def child_main(job: dict) -> None:
    import torch

    torch.manual_seed(0)
    result = {"load": child_load, "ours": child_train_ours, "reference": child_train_reference}[job["kind"]](
        job
    )
    result["peak_rss"] = proc_status_bytes("VmHWM")
    print("RESULT " + json.dumps(result))


def measure(job: dict) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(job)]
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"{job} failed:\n{run.stderr[-3000:]}")
    return {**job, **json.loads(lines[-1].removeprefix("RESULT "))}


# ---------------------------------------------------------------- sections, run from the parent


def write_synthetic_model(path: Path) -> Path:
    """TinyLlama-1.1B's shape with random bf16 weights, in one 2.2 GB safetensors file like the real one."""
    import torch

    from nanoft.model import ModelConfig, Transformer
    from nanoft.weights import save_pretrained

    if (path / "config.json").is_file():
        return path
    config = ModelConfig(**TINYLLAMA_SHAPE)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Transformer(config).named_parameters()}
    generator = torch.Generator().manual_seed(0)
    state = {
        name: (torch.randn(shape, generator=generator) * 0.02).bfloat16() for name, shape in shapes.items()
    }
    save_pretrained(state, config, path, dtype=torch.bfloat16)
    return path


def section_load(args) -> list[dict]:
    from nanoft.default_model import default_model_dir
    from nanoft.weights import load_config

    models = {"SmolLM2-135M (fp32 file)": default_model_dir()}
    models["TinyLlama-1.1B shape (bf16 file)"] = write_synthetic_model(Path(args.synthetic_dir))
    rows = []
    for model_name, path in models.items():
        file_bytes = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
        c = load_config(path)
        shape = (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size, c.num_attention_heads)
        formula = qlora_weight_bytes(*shape, c.num_key_value_heads, tied=c.tie_word_embeddings)
        for quant in ("bf16", "nf4"):
            row = measure({"kind": "load", "path": str(path), "quant": quant})
            # The estimate section's formula, checked against the bytes of a model really quantized.
            estimate = formula["nf4_bytes"] if quant == "nf4" else formula["bf16_bytes"]
            rows.append({"model": model_name, "file_bytes": file_bytes, "formula_bytes": estimate, **row})
    return rows


def section_train(args) -> list[dict]:
    from nanoft.default_model import default_model_dir

    path = str(default_model_dir())
    rows = []
    for base in ("bf16", "nf4"):
        for kind in ("ours", "reference"):
            rows.append(measure({"kind": kind, "path": path, "base": base, "steps": args.steps}))
    return rows


def section_estimate(args) -> list[dict]:
    rows = []
    for name, config in LLAMA_CONFIGS.items():
        shape = {k: v for k, v in config.items() if k != "quoted_gb"}
        rows.append({"model": name, "quoted_gb": config["quoted_gb"], **qlora_weight_bytes(**shape)})
    return rows


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for row in cells:  # first column left-aligned, numbers right-aligned
        print(
            "  ".join(
                [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
            )
        )


def print_tables(results: dict) -> None:
    mb = 2**20
    if "load" in results:
        rows = []
        for r in results["load"]:
            sizes = [r["file_bytes"], r["weight_bytes"], r["formula_bytes"], r["peak_rss"]]
            sizes += [r["peak_rss"] - r["baseline_rss"], r["peak_anon"]]
            rows.append([r["model"], r["quant"]] + [size // mb for size in sizes] + [r["seconds"]])
        header = [
            "model",
            "as",
            "file MB",
            "weights MB",
            "formula MB",
            "peak RSS MB",
            "load MB",
            "peak anon MB",
        ]
        header.append("seconds")
        print_table("Loading ('load' = peak RSS - RSS after imports)", header, rows)
    if "train" in results:
        by = {(r["kind"], r["base"]): r for r in results["train"]}
        rows = []
        for base in ("bf16", "nf4"):
            ours, ref = by[("ours", base)], by[("reference", base)]
            rss, speed = (
                ours["peak_rss"] / ref["peak_rss"],
                ours["tokens_per_second"] / ref["tokens_per_second"],
            )
            rows.append([base, ours["peak_rss"] // mb, ref["peak_rss"] // mb, rss,
                         ours["tokens_per_second"], ref["tokens_per_second"], speed])  # fmt: skip
        header = ["base", "ours RSS MB", "ref RSS MB", "RSS ratio", "ours tok/s", "ref tok/s", "speed ratio"]
        print_table(
            f"SmolLM2-135M LoRA r={LORA_R} q/v, {BATCH} x {SEQ_LEN} tokens; ref = transformers+PEFT",
            header,
            rows,
        )
    if "estimate" in results:
        gb = 1e9
        rows = [
            [
                r["model"],
                f"{r['params'] / 1e9:.2f}B",
                r["bf16_bytes"] / gb,
                r["nf4_bytes"] / gb,
                r["quoted_gb"],
            ]
            for r in results["estimate"]
        ]
        header = ["model", "params", "bf16 GB", "QLoRA weights GB", "quoted QLoRA GPU GB"]
        print_table(
            "Weights under QLoRA (NF4 + double quant linears, bf16 embeddings and lm_head)", header, rows
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections", nargs="+", default=["load", "train", "estimate"], help="what to measure"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed training steps after 2 warm-up steps")
    synthetic_dir = os.path.join(tempfile.gettempdir(), "nanoft_tinyllama_shape")
    parser.add_argument(
        "--synthetic-dir", default=synthetic_dir, help="where the random 1.1B model is written"
    )
    parser.add_argument("--json", default=str(REPO / "bench" / "quant_memory.json"), help="results file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(json.loads(args.child))
    sections = {"load": section_load, "train": section_train, "estimate": section_estimate}
    results = {name: sections[name](args) for name in args.sections}
    results["load_average"] = os.getloadavg()[0]  # the machine is shared: timings mean little when it is busy
    print_tables(results)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
