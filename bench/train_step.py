"""A training step, nanoft against transformers + PEFT, alternating in one run: tokens/s, MFU, peak memory.

    python bench/train_step.py --cases lora-qv --shapes 4x256 --dtypes bf16 --steps 8   # ~3 min on 2 cores
    python bench/train_step.py --dtypes bf16 --steps 6 --json bench/train_step_bf16.json  # 8 cases, ~17 min
    python bench/train_step.py --device cuda --cases lora-qv qlora-nf4 full
    python bench/train_step.py --cases lora-qv --profile 1 --log-dir /tmp/logs          # + profiler tables
    python bench/train_step.py --threads 1                                               # busy shared machine
    python bench/train_step.py --model gemma2 --cases lora-qv --shapes 4x256 --dtypes bf16  # another family
    python bench/train_step.py --model mixtral --cases lora-qv --shapes 4x256 --dtypes bf16 --steps 6  # MoE
    python bench/train_step.py --model llama-1b --cases lora-qv qlora-nf4 --shapes 1x256 --dtypes bf16 \
        --steps 2  # Llama-3.2-1B's shape

Each side runs in its own worker process, so that its peak memory is its own: the model is loaded, two
warm-up steps are taken, then the parent asks the two workers for one step at a time, alternately (nanoft
first on even steps, the reference first on odd ones), so that a noisy machine slows both alike. Tokens/s is
the median over --steps steps; a step is forward + backward + optimizer step + zero_grad(set_to_none=True).
The CPU time of each step is recorded too: with --threads 1 it leaves out the time other processes take the
core, so its ratio ("speed, CPU time") is the one to trust on a machine that others are using.

What both sides do, per case (model: SmolLM2-135M-Instruct, a Hugging Face directory, or a model family of
FAMILY_MODELS: a ~100M model of SmolLM2's widths in that family's architecture, or llama-1b, Llama-3.2-1B's
shape; random bf16 weights written by transformers; data: the same random token ids; every token a target,
i.e. labels=input_ids for transformers and the same ids shifted left for nanoft):
- lora-qv: LoRA r=16, alpha=32, dropout 0.05 on q_proj and v_proj; base weights loaded in --dtype; adapters
  stored in fp32 on both sides (PEFT's default; lora.py's). lora-all: the same on all linears of a block.
- qlora-nf4: the decoder linears as bitsandbytes NF4 Linear4bit (double quant, uint8 storage, compute in
  --dtype), embeddings/norms/lm_head in --dtype, LoRA as lora-qv. transformers: BitsAndBytesConfig with those
  settings, no prepare_model_for_kbit_training (it would turn on gradient checkpointing and fp32 norms).
- full: every weight trains; at bf16 both keep fp32 weights under torch.autocast(bf16), as Trainer(bf16=True)
  and train.py do (bf16 weights would round small updates away).
- Optimizer: AdamW lr 1e-4 over the trainable weights. nanoft: quant.make_optimizer("adamw"), what train.py
  uses; transformers: torch.optim.AdamW(fused=True), Trainer's default optimizer for torch >= 2.8.
- Memory: on CPU nanoft keeps the memory it frees for reuse, as train.py does (nanoft/cpu_allocator.py;
  `--glibc-malloc` leaves glibc's defaults, bench/allocator.py measures the difference); transformers runs
  with glibc's defaults.
- transformers runs its default SDPA attention, use_cache=False, its own loss (fp32 logits of every position).
MFU = model FLOPs per token x tokens/s / the matmul peak measured here at start-up in --dtype (best of the
model's shapes and 2048^3). Model FLOPs: 2 per weight per token forward, +2 for the input gradient, +2 for the
weight gradient when the weight trains; attention 4 x heads x head_dim x (T+1)/2 forward (causal), x3 in all.
Memory: CPU = the worker's peak RSS (VmHWM) during the timed steps (reset after warm-up), CUDA = peak
allocated. The worker's peak over its whole life (loading included) is in the JSON too.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nanoft.cpu_allocator import choose_for_run  # noqa: E402
from nanoft.loss import IGNORE_INDEX  # noqa: E402

LORA_TARGETS = {
    "lora-qv": ["q_proj", "v_proj"],
    "lora-all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qlora-nf4": ["q_proj", "v_proj"],
}
CASES = [*LORA_TARGETS, "full"]
# --model gemma2 / qwen3 / mixtral: SmolLM2-135M's widths and vocabulary over 12 layers, in each family's
# architecture (Gemma 2: four norms a layer, GeGLU, soft-capped attention and logits, every other layer a
# 128-token window, tied embeddings; Qwen3: q/k norms; Mixtral: 8 experts of the MLP's width a layer, each
# token through 2 of them: 294M parameters, 103M of them active).
# --model llama-1b: Llama-3.2-1B's shape (2048 wide, MLP 8192, 16 layers, 32 query and 8 key/value heads,
# 128,256-word vocabulary, tied; 1.24B parameters): users fine-tune 1-8B models, whose matmuls are wider than
# SmolLM2's 576 and leave the elementwise work a smaller share.
SMOLLM2_SIZES = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
LLAMA_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
    max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000,
    eos_token_id=128001, rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192),
)  # fmt: skip
FAMILY_MODELS = {  # --model NAME: (model_type, config.json settings)
    "gemma2": ("gemma2", dict(SMOLLM2_SIZES, head_dim=64, sliding_window=128, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(SMOLLM2_SIZES, head_dim=64, tie_word_embeddings=True)),
    "mixtral": (
        "mixtral",
        dict(
            SMOLLM2_SIZES, head_dim=64, tie_word_embeddings=True, num_local_experts=8, num_experts_per_tok=2
        ),
    ),
    "llama-1b": ("llama", LLAMA_1B),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LORA_R, LORA_ALPHA, LORA_DROPOUT, LR, WARMUP_STEPS = 16, 32, 0.05, 1e-4, 2


# ---------------------------------------------------------------- the two sides


def write_family_model(name: str, path: Path) -> None:
    """A random model of FAMILY_MODELS' shape, written by transformers (in bf16: the 1B one would take
    5 GB in fp32)."""
    import transformers

    model_type, settings = FAMILY_MODELS[name]
    config = transformers.AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)


def build_nanoft(case, dtype, device, model_dir, compile_layers):
    """(trainable model, loss function of (input_ids, labels)) the way train.py builds them."""
    from lora import LoRAConfig, inject_lora
    from nanoft.weights import from_pretrained
    from quant import load_quantized, make_optimizer

    if case == "qlora-nf4":
        model = load_quantized(model_dir, quant="nf4", compute_dtype=dtype, device=device)
    else:
        model = from_pretrained(model_dir, dtype=torch.float32 if case == "full" else dtype, device=device)
    if case in LORA_TARGETS:
        inject_lora(model, LoRAConfig(LORA_R, LORA_ALPHA, LORA_DROPOUT, targets=tuple(LORA_TARGETS[case])))
    if compile_layers:
        for layer in model.model.layers:
            layer.compile()
    autocast = full_autocast(case, dtype, device)

    def loss(input_ids, labels):
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]  # shifted here, as data.py does; transformers shifts inside
        with autocast:
            loss_sum, n_targets = model(input_ids, targets)
        return loss_sum / n_targets

    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", lr=LR)
    return model, loss, optimizer


def build_reference(case, dtype, device, model_dir):
    """The same with transformers + PEFT (+ bitsandbytes), set up as its Trainer would."""
    import peft
    import transformers

    quantization_config = None
    if case == "qlora-nf4":
        quantization_config = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.float32 if case == "full" else dtype,
        quantization_config=quantization_config,
        device_map={"": device} if quantization_config else None,
    ).to(device)
    if case in LORA_TARGETS:
        lora_config = peft.LoraConfig(
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=LORA_DROPOUT,
            target_modules=LORA_TARGETS[case],
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, lora_config)
    autocast = full_autocast(case, dtype, device)

    def loss(input_ids, labels):
        with autocast:
            return model(input_ids=input_ids, labels=labels, use_cache=False).loss

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, fused=True)
    return model, loss, optimizer


def full_autocast(case, dtype, device):
    return (
        torch.autocast(device.type, dtype=dtype)
        if case == "full" and dtype != torch.float32
        else nullcontext()
    )


# ---------------------------------------------------------------- worker process: one side, one setting


def peak_rss_bytes() -> int:
    """VmHWM: this process's own peak resident memory (ru_maxrss would include the pre-exec parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS


def worker(args) -> None:
    """Load, warm up, then answer `step` / `profile` / `memory` lines from the parent with JSON lines."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints and progress bars go to stderr, never into the protocol
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side == "nanoft" and device.type == "cpu" and not args.glibc_malloc:
        choose_for_run(sharded=False)  # as train.py does on CPU: freed memory kept, matmul kernels bounded
    batch, seq_len = map(int, args.shape.split("x"))
    torch.manual_seed(0)
    started = time.perf_counter()
    if args.side == "nanoft":
        model, loss_fn, optimizer = build_nanoft(args.case, dtype, device, args.model, args.compile)
    else:
        model, loss_fn, optimizer = build_reference(args.case, dtype, device, args.model)
    model.train()
    input_ids = torch.randint(
        0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(1)
    )
    input_ids = input_ids.to(device)

    def step() -> dict:
        synchronize(device)
        wall_started, cpu_started = time.perf_counter(), time.process_time()
        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        loss = loss_fn(input_ids, input_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds = time.perf_counter() - wall_started
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "seconds": seconds,
            "cpu_seconds": time.process_time() - cpu_started,
            "system_seconds": usage.ru_stime - usage_before.ru_stime,  # e.g. the kernel zeroing fresh pages
            "page_faults": usage.ru_minflt - usage_before.ru_minflt,
            "loss": loss.item(),
        }

    for _ in range(WARMUP_STEPS):
        step()
    reply = {
        "ready": True,
        "load_and_warmup_seconds": time.perf_counter() - started,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
    print(json.dumps(reply), file=protocol)
    for command in sys.stdin:
        command = command.strip()
        if command == "step":
            print(json.dumps(step()), file=protocol)
        elif command == "profile":
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as profiler:
                step()
            sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(profiler.key_averages().table(sort_by=sort_by, row_limit=25), file=sys.stderr, flush=True)
            print(json.dumps({"profiled": True}), file=protocol)
        elif command == "memory":
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
            print(json.dumps({"step_peak_bytes": peak}), file=protocol)
            return


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Worker:
    """A worker subprocess seen from the parent: send a command line, read one JSON line back."""

    def __init__(self, side, case, shape, dtype, args):
        command = [sys.executable, __file__, "--worker", side, "--case", case, "--shape", shape]
        command += ["--dtype", dtype, "--device", args.device, "--model", str(args.model)]
        command += ["--compile"] if args.compile and side == "nanoft" else []
        command += ["--glibc-malloc"] if args.glibc_malloc else []
        command += ["--threads", str(args.threads)] if args.threads else []
        self.side = side
        self.log = open(Path(args.log_dir) / f"{side}-{case}-{shape}-{dtype}.log", "w")
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        self.ready = self.read()

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.log.flush()
            tail = Path(self.log.name).read_text()[-3000:]
            raise RuntimeError(f"{self.side} worker died; the end of {self.log.name}:\n{tail}")
        return json.loads(line)

    def finish(self) -> dict:
        memory = self.ask("memory")
        self.process.wait()
        self.log.close()
        return memory


# ---------------------------------------------------------------- parent: peak, FLOPs, alternation, table


def matmul_peak_flops(dtype, device, tokens, config) -> float:
    """Best FLOP/s of the model's matmul shapes (and 2048^3) in `dtype`, each the best of 5 runs."""
    C, M = config.hidden_size, config.intermediate_size
    shapes = [(tokens, C, M), (tokens, C, C), (tokens, M, C), (2048, 2048, 2048)]
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        a @ b
        for _ in range(5):
            synchronize(device)
            started = time.perf_counter()
            a @ b
            synchronize(device)
            best = max(best, 2 * m * k * n / (time.perf_counter() - started))
    return best


def model_flops_per_token(config, seq_len: int, case: str) -> float:
    """Of a mixture of experts, the k experts each token passes through."""
    from nanoft.memory import count_parameters

    C, D, H, KV = config.hidden_size, config.head_dim, config.num_attention_heads, config.num_key_value_heads
    shapes = {
        "q_proj": (C, H * D),
        "k_proj": (C, KV * D),
        "v_proj": (C, KV * D),
        "o_proj": (H * D, C),
        "gate_proj": (C, config.intermediate_size),
        "up_proj": (C, config.intermediate_size),
        "down_proj": (config.intermediate_size, C),
    }
    weights = count_parameters(config).block_linear_active + config.vocab_size * C
    attention = config.num_hidden_layers * 4 * H * D * (seq_len + 1) / 2
    if case == "full":
        return 6 * weights + 3 * attention
    adapters = config.num_hidden_layers * sum(LORA_R * sum(shapes[name]) for name in LORA_TARGETS[case])
    return 4 * weights + 3 * attention + 6 * adapters


def run_setting(case, shape, dtype, args, peaks, config) -> dict:
    load_average = os.getloadavg()[0]
    workers = {side: Worker(side, case, shape, dtype, args) for side in ("nanoft", "reference")}
    steps = {side: [] for side in workers}
    for i in range(args.steps):
        for side in ("nanoft", "reference") if i % 2 == 0 else ("reference", "nanoft"):
            steps[side].append(workers[side].ask("step"))
    for _ in range(args.profile):
        for side, w in workers.items():
            print(f"--- profile of one {side} step: see {w.log.name}", flush=True)
            w.ask("profile")
    batch, seq_len = map(int, shape.split("x"))
    flops = model_flops_per_token(config, seq_len, case)
    result = {
        "case": case,
        "shape": shape,
        "dtype": dtype,
        "flops_per_token": flops,
        "load_average": load_average,
    }
    for side, w in workers.items():
        memory = w.finish()
        tokens_per_second = batch * seq_len / statistics.median(step["seconds"] for step in steps[side])
        result[side] = {
            "tokens_per_second": tokens_per_second,
            "tokens_per_cpu_second": batch
            * seq_len
            / statistics.median(s["cpu_seconds"] for s in steps[side]),
            "mfu": flops * tokens_per_second / peaks[dtype],
            "step_seconds": [step["seconds"] for step in steps[side]],
            "step_cpu_seconds": [step["cpu_seconds"] for step in steps[side]],
            "first_loss": steps[side][0]["loss"],
            "load_and_warmup_seconds": w.ready["load_and_warmup_seconds"],
            "step_peak_bytes": memory["step_peak_bytes"],
            "process_peak_rss_bytes": max(memory["step_peak_bytes"], w.ready["peak_rss_bytes"]),
        }
    ours, theirs = result["nanoft"], result["reference"]
    result["speed_ratio"] = ours["tokens_per_second"] / theirs["tokens_per_second"]
    result["cpu_time_speed_ratio"] = ours["tokens_per_cpu_second"] / theirs["tokens_per_cpu_second"]
    result["memory_ratio"] = result["nanoft"]["step_peak_bytes"] / result["reference"]["step_peak_bytes"]
    return result


def print_row(r) -> None:
    ours, theirs = r["nanoft"], r["reference"]
    cells = [r["case"], r["shape"], r["dtype"], f"{ours['tokens_per_second']:.0f}"]
    cells += [f"{theirs['tokens_per_second']:.0f}", f"**{r['speed_ratio']:.2f}x**"]
    cells += [f"{r['cpu_time_speed_ratio']:.2f}x", f"{100 * ours['mfu']:.0f}%", f"{100 * theirs['mfu']:.0f}%"]
    cells += [f"{ours['step_peak_bytes'] / 2**20:.0f}", f"{theirs['step_peak_bytes'] / 2**20:.0f}"]
    cells += [f"**{r['memory_ratio']:.2f}x**", f"{r['load_average']:.1f}"]
    print("| " + " | ".join(cells) + " |", flush=True)


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), ""
    )
    return f"{os.cpu_count()}-core {model or platform.machine()} CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=CASES, help="what trains")
    parser.add_argument(
        "--shapes", nargs="+", default=["4x256", "1x2048"], help="micro-batch x sequence length"
    )
    parser.add_argument(
        "--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES), help="compute dtype"
    )
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side after 2 warm-up steps")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    parser.add_argument(
        "--model",
        default=None,
        help=f"Hugging Face model dir, or one of {', '.join(FAMILY_MODELS)} (random weights; llama-1b: "
        "Llama-3.2-1B's shape, the rest SmolLM2's sizes; default: the built-in SmolLM2)",
    )
    parser.add_argument("--compile", action="store_true", help="nanoft: torch.compile each decoder layer")
    parser.add_argument(
        "--glibc-malloc", action="store_true", help="nanoft: leave glibc's malloc settings as they are"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: torch's)")
    parser.add_argument("--profile", type=int, default=0, help="profile this many extra steps per side")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--log-dir", default=None, help="worker logs (default: a temporary directory)")
    parser.add_argument("--worker", choices=["nanoft", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.side = args.worker
        return worker(args)

    from nanoft.default_model import default_model_dir
    from nanoft.weights import load_config

    if args.threads:
        torch.set_num_threads(args.threads)  # the peak below is measured with the workers' thread count
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="nanoft-bench-")
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    if args.model in FAMILY_MODELS:
        write_family_model(args.model, Path(args.log_dir) / args.model)
        args.model = str(Path(args.log_dir) / args.model)
    args.model = args.model or str(default_model_dir())
    config = load_config(args.model)
    tokens = max(int(b) * int(t) for b, t in (shape.split("x") for shape in args.shapes))
    peaks = {
        dtype: matmul_peak_flops(DTYPES[dtype], torch.device(args.device), tokens, config)
        for dtype in args.dtypes
    }
    machine = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    threads = args.threads or torch.get_num_threads()
    print(f"{datetime.now():%Y-%m-%d %H:%M} {machine}, {threads} threads, torch {torch.__version__}")
    print("matmul peak: " + ", ".join(f"{dtype} {peak / 1e9:.0f} GFLOP/s" for dtype, peak in peaks.items()))
    print(f"median of {args.steps} alternating steps after {WARMUP_STEPS} warm-up; logs in {args.log_dir}\n")
    header = ["case", "B x T", "dtype", "nanoft tok/s", "HF+PEFT tok/s", "speed", "speed, CPU time"]
    header += ["nanoft MFU", "HF MFU", "nanoft MB", "HF MB", "memory", "load avg"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    results = []
    for dtype in args.dtypes:
        for shape in args.shapes:
            for case in args.cases:
                results.append(run_setting(case, shape, dtype, args, peaks, config))
                print_row(results[-1])
    load_after = os.getloadavg()[0]
    print(f"\nload average at the end: {load_after:.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "date": f"{datetime.now():%Y-%m-%d %H:%M}",
            "machine": machine,
            "torch": torch.__version__,
            "compile": args.compile,
            "threads": threads,
            "matmul_peak_flops": peaks,
            "load_average_end": load_after,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
