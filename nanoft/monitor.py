"""Watching a run: the progress bar, TensorBoard, metrics.jsonl, tokens/s, model FLOPs utilisation, memory.

    monitor = Monitor(run_dir, enabled=dist.is_main, total_steps=1000, start_step=0)
    monitor.log_step(step, {"loss": 1.9, "lr": 2e-4, "grad_norm": 0.4, "tokens_per_s": 600.0, "mfu": 0.31})
    monitor.log_eval(step, val_loss=1.7, samples=[(prompt, generated, expected)])
    monitor.print("a line above the bar")
    monitor.close()

Only rank 0 is `enabled`; elsewhere every call does nothing. TensorBoard files go to run_dir/tensorboard
(`tensorboard --logdir runs/`), and every logged step is also a line of run_dir/metrics.jsonl, for plotting
without TensorBoard and for comparing runs step by step.

Model FLOPs utilisation (MFU) = the FLOPs the model needs for the tokens processed per second / the peak
matmul FLOP/s of this device in the compute dtype. FLOPs per token, as in the PaLM paper's appendix B and
nanoGPT's estimate_mfu, for N matmul weights (decoder linears and lm_head; embedding lookups cost nothing),
L layers, attention width d (heads x head dim) and context T:
    full fine-tune:  6 N + 12 L T d       (forward 2N, backward 2N for input gradients + 2N for weight gradients)
    LoRA / QLoRA:    4 N + 6 N_lora + 12 L T d   (the frozen base needs no weight gradients: 2N saved)
The attention term (QK^T and AV: 4 L T d forward, twice that backward) is the same in both. Recomputation by
activation checkpointing is not counted (MFU counts what the model needs, not what the hardware did). The peak
is measured at start-up with a large matrix multiply in the compute dtype, not taken from a datasheet, so MFU
here says how much of this machine's achievable matmul speed the training reaches.
"""

import json
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nanoft.generate import generate

BYTES_PER_KIB = 1024
IGNORE = -100


class Monitor:
    def __init__(self, run_dir, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where it is used

        run_dir = Path(run_dir)
        self.metrics_path = run_dir / "metrics.jsonl"
        keep_metrics_until(self.metrics_path, start_step)  # a resumed run redoes what came after its checkpoint
        # purge_step hides events a crashed run logged after the checkpoint we resume from.
        self.writer = SummaryWriter(run_dir / "tensorboard", purge_step=start_step + 1 if start_step else None)
        # A live bar in a terminal; in a log file (not a TTY) a plain line every 5% of the run instead.
        self.live = sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not self.live)
        self.log_every = max(1, total_steps // 20)
        self.started, self.start_step, self.total_steps = time.perf_counter(), start_step, total_steps
        self.last_eval, self.warned_flat = None, False  # for the overfitting and flat-loss warnings

    def log_step(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if not self.live and (step % self.log_every == 0 or step == self.total_steps):
            seconds = time.perf_counter() - self.started
            eta = seconds / (step - self.start_step) * (self.total_steps - step)
            self.print(f"step {step}/{self.total_steps}: loss {metrics['loss']:.4f}, lr {metrics['lr']:.2e}, "
                       f"{metrics['tokens_per_s']:.0f} tokens/s, {seconds / 60:.1f} min, ETA {eta / 60:.1f} min")
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            lr=f"{metrics['lr']:.2e}",
            tok_s=f"{metrics['tokens_per_s']:.0f}",
            refresh=False,
        )
        for name, value in metrics.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        self.append_metrics({"step": step, **metrics})

    def log_eval(self, step: int, val_loss: float, samples: list[tuple[str, str, str]]) -> None:
        if not self.enabled:
            return
        self.writer.add_scalar("val/loss", val_loss, step)
        if samples:
            text = "\n\n".join(
                f"**prompt** {prompt}\n\n**model** {generated}\n\n**reference** {expected}"
                for prompt, generated, expected in samples
            )
            self.writer.add_text("val/samples", text, step)
        self.writer.flush()
        self.append_metrics({"step": step, "val_loss": val_loss})

    def log_hparams(self, config: dict, results: dict) -> None:
        if not self.enabled:
            return
        plain = {
            key: value if isinstance(value, int | float | str | bool) else str(value)
            for key, value in config.items()
        }
        self.writer.add_hparams(
            plain, {f"hparams/{key}": value for key, value in results.items()}, run_name="hparams"
        )

    def print_eval(
        self, step: int, val_loss: float, progress: dict, train_losses: list[float], flat_advice: str | None
    ) -> None:
        """The eval's line, a warning when val rises while train falls (overfitting) or val stays flat, and
        the first generated sample (the untuned model's answer at step 0, then the fine-tuned one's)."""
        if not self.enabled:
            return
        train = sum(train_losses) / len(train_losses) if train_losses else None
        note = " (baseline, untuned)" if step == 0 else " (best)" if progress["best_step"] == step else ""
        self.print(
            f"step {step}: val loss {val_loss:.4f}{note}" + (f", train loss {train:.4f}" if train else "")
        )
        if self.last_eval and train is not None and self.last_eval[1] is not None:
            last_val, last_train = self.last_eval
            if val_loss > last_val and train < last_train:
                self.print(
                    f"  warning: val loss rose {last_val:.4f} -> {val_loss:.4f} while train loss fell "
                    f"{last_train:.4f} -> {train:.4f}: overfitting begins; the best checkpoint (step "
                    f"{progress['best_step']}) is kept; fewer epochs, more data or a smaller r help"
                )
        if flat_advice and not self.warned_flat:
            self.print(f"  warning: {flat_advice}")
            self.warned_flat = True
        self.last_eval = (val_loss, train)
        for prompt, generated, _ in progress["samples"][:1]:
            self.print(f"  sample: {prompt_tail(prompt)!r} -> {generated[:120]!r}")

    def print(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=sys.stderr if self.live else sys.stdout)

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a") as file:
            file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()


def prompt_tail(prompt: str, chars: int = 70) -> str:
    """The end of a prompt (the question), without the chat template's system text before it."""
    text = " ".join(prompt.split())
    return text if len(text) <= chars else "..." + text[-chars:]


def val_prompts(examples, n: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) of the first n val examples: the tokens before the first trained one,
    and the trained ones (what the model should write)."""
    prompts = []
    for index in range(min(n, len(examples))):
        ids, targets = examples.example(index)
        trained = (targets != IGNORE).nonzero()[0]  # targets[t] is the label of token t + 1
        prompts.append((ids[: trained[0] + 1].tolist(), ids[trained[0] + 1 : trained[-1] + 2].tolist()))
    return prompts


def generate_samples(model, tokenizer, prompts, max_new_tokens: int = 48) -> list[tuple[str, str, str]]:
    """(prompt, greedy continuation, reference) as text, for TensorBoard and the report."""
    samples = []
    for prompt_ids, reference_ids in prompts:
        new_ids = generate(model, tokenizer, prompt_ids, max_new_tokens)
        samples.append(
            (tokenizer.decode(prompt_ids), tokenizer.decode(new_ids), tokenizer.decode(reference_ids))
        )
    model.train()  # generate() leaves the model in eval mode
    return samples


def keep_metrics_until(path: Path, step: int) -> None:
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(row + "\n" for row in rows))


def matmul_weights(model) -> tuple[int, int]:
    """(frozen, trainable) weights that take part in matrix multiplies: every parameter except the
    embedding table, which is only indexed (a tied lm_head shares it and is counted as a matmul), and norms."""
    config = model.config
    frozen = trainable = 0
    for name, param in model.named_parameters():
        if param.dim() < 2 or name == "model.embed_tokens.weight":
            continue
        numel = param.numel() * (2 if param.dtype == torch.uint8 else 1)  # 4-bit: two weights per byte
        if param.requires_grad:
            trainable += numel
        else:
            frozen += numel
    if config.tie_word_embeddings:
        lm_head = config.vocab_size * config.hidden_size
        frozen, trainable = (
            (frozen, trainable + lm_head)
            if model.lm_head.weight.requires_grad
            else (frozen + lm_head, trainable)
        )
    return frozen, trainable


def flops_per_token(model, context: int) -> float:
    """Training FLOPs per token at context length `context` (see the module docstring)."""
    config = model.config
    frozen, trainable = matmul_weights(model)
    attention = 12 * config.num_hidden_layers * context * config.num_attention_heads * config.head_dim
    return 4 * frozen + 6 * trainable + attention


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large matrix multiply in `dtype` on `device`, best of a few: the denominator of MFU."""
    n = 8192 if device.type == "cuda" else 2048
    generator = torch.Generator(device).manual_seed(0)  # not the global one: training's random stream stays put
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    best = float("inf")
    for _ in range(4):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bytes(device: torch.device) -> int:
    """Memory in use now: allocated GPU memory, or this process's resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory used so far: peak allocated GPU memory, or peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * BYTES_PER_KIB  # Linux reports KiB


def write_summary_and_report(run_dir, summary: dict, gates_table: str | None) -> None:
    """summary.json (for programs) and report.md (for people) in the run directory."""
    run_dir = Path(run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    data, config = summary["data"], summary["config"]
    baseline, best, final = summary["baseline_val_loss"], summary["best_val_loss"], summary["final_val_loss"]
    method = config["method"] + (
        f" r={config['lora_r']} alpha={config['lora_alpha']:g} on {','.join(config['lora_targets'])}"
        if config["method"] != "full"
        else ""
    )
    dedup = (
        f"dedup removed {data['exact_duplicates_removed']} exact and {data['near_duplicates_removed']} near "
        "duplicates"
        if data["dedup"]
        else "dedup off"
    )
    lines = [
        f"# nanoft run {run_dir}",
        "",
        f"Stopped: {summary['stop_reason']}.",
        "",
        "| | |",
        "| --- | --- |",
        f"| model | {config['model'] or 'built-in SmolLM2-135M-Instruct'} ({method}, {config['dtype']}) |",
        f"| data | {data['train_examples']} train / {data['val_examples']} val examples; {dedup} |",
        f"| val loss | baseline {baseline:.4f} -> best {best:.4f} at step {summary['best_step']} "
        f"({best / baseline - 1:+.1%}) -> final {final:.4f} |",
        f"| training | {summary['steps']} steps, {summary['tokens_seen']:,} tokens, "
        f"{summary['train_tokens_per_s']:.0f} tokens/s, wall {summary['wall_s'] / 60:.1f} min |",
        f"| peak memory | {summary['peak_memory_bytes'] / 2**30:.2f} GiB |",
        f"| best weights | {summary['best_dir']} |",
        "",
        "## Val loss",
        "",
        "| step | val loss |",
        "| --- | --- |",
        *(f"| {step} | {loss:.4f} |" for step, loss in summary["val_curve"]),
        "",
    ]
    if gates_table:
        lines += ["## Quality gates", "", gates_table]
    lines += ["## Samples at the last eval (greedy)", ""]
    for prompt, generated, reference in summary["samples"]:
        lines += [
            f"- **prompt** `{prompt_tail(prompt, 200)}`",
            f"  - **model**: {' '.join(generated.split())}",
            f"  - **reference**: {' '.join(reference.split())}",
        ]
    lines += ["", "## Config", "", "```json", json.dumps(config, indent=2), "```", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
