"""Watching a run: the progress bar, metrics.jsonl, the trackers, tokens/s, model FLOPs utilisation, memory.

    monitor = Monitor(run_dir, dist, total_steps=1000, start_step=0, model=model, dtype=torch.bfloat16,
                      config=config)
    monitor.log_step(step, loss=1.9, lr=2e-4, grad_norm=0.4, tokens=4096, seconds=7.1, context=256)
    monitor.log_eval(step, val_loss, progress, warmup_steps)   # progress: checkpoint.Progress; + warnings
    monitor.print("a line above the bar")
    monitor.finish(config, summary)   # the end of a run that wrote its report: hyperparameters, artifacts
    monitor.close(stop_reason)

Only rank 0 is enabled; elsewhere every call does nothing. Every logged step and eval is a line of
run_dir/metrics.jsonl (for plotting without a tracker, `python -m nanoft.report RUN_DIR`, and for comparing
runs step by step) and goes to the trackers of --report-to (nanoft/tracking.py: TensorBoard, MLflow): train
loss, lr, grad norm, tokens/s, MFU, memory; val loss, best val loss, generated samples; at the end the
hyperparameters and the report's files.

Model FLOPs utilisation (MFU) = the FLOPs the model needs for the tokens processed per second / the peak
matmul FLOP/s of this device in the compute dtype. FLOPs per token, as in the PaLM paper's appendix B and
nanoGPT's estimate_mfu, for N matmul weights (decoder linears and lm_head; embedding lookups cost nothing),
L layers, attention width d (heads x head dim) and context T:
    full fine-tune:  6 N + 12 L T d              (forward 2N; backward 2N for input, 2N for weight gradients)
    LoRA / QLoRA:    4 N + 6 N_lora + 12 L T d   (the frozen base needs no weight gradients: 2N saved)
The attention term (QK^T and AV: 4 L T d forward, twice that backward) is the same in both. Recomputation by
activation checkpointing is not counted (MFU counts what the model needs, not what the hardware did). The peak
is measured at start-up with a large matrix multiply in the compute dtype, not taken from a datasheet, so MFU
here says how much of this machine's achievable matmul speed the training reaches.
"""

import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nanoft import tracking
from nanoft.config import run_settings
from nanoft.gates import UtilisationSampler, flat_val_loss_advice
from nanoft.generate import generate
from nanoft.loss import IGNORE_INDEX

BYTES_PER_KIB = 1024
ARTIFACTS = ("report.md", "config.json", "summary.json", "loss.png")  # what the trackers keep of a run


class Monitor:
    def __init__(self, run_dir, dist, total_steps: int, start_step: int, model, dtype: torch.dtype, config):
        self.enabled = dist.is_main
        self.memory = MemoryPeaks(dist.device)  # on every rank: the summary reports each rank's peak
        if not self.enabled:
            return
        self.run_dir, self.metrics_path = Path(run_dir), Path(run_dir) / "metrics.jsonl"
        keep_metrics_until(self.metrics_path, start_step)  # a resumed run redoes what followed its checkpoint
        settings = run_settings(config)  # the resolved config, as config.json holds it
        self.trackers = tracking.open_trackers(config.report_to, run_dir, settings, start_step)
        # A live bar in a terminal; in a log file (not a TTY) a plain line every 5% of the run instead.
        self.live = sys.stderr.isatty()
        self.bar = tqdm(
            total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not self.live
        )
        self.log_every = max(1, total_steps // 20)
        self.started, self.start_step, self.total_steps = time.perf_counter(), start_step, total_steps
        self.model_config, self.weights = model.config, matmul_weights(model)  # for MFU
        self.device, self.world_size = dist.device, dist.world_size
        self.peak_flops = measure_peak_flops(dist.device, dtype)
        self.utilisation = UtilisationSampler(dist.device)  # GPU busy time, for the quality gates
        self.train_losses, self.last_eval, self.warned_flat = [], None, False  # for the warnings at evals

    def log_step(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float,
        tokens: int,
        seconds: float,
        context: int,
        router_aux_loss: float | None = None,
    ) -> None:
        """One optimizer step: `tokens` processed by all ranks in `seconds`, sequences `context` long;
        `router_aux_loss`: a mixture of experts' load-balancing loss (in `loss` times its coefficient)."""
        if not self.enabled:
            return
        self.train_losses.append(loss)
        self.utilisation.sample()
        tokens_per_s = tokens / seconds
        flops_per_s = (
            tokens_per_s / self.world_size * flops_per_token(self.model_config, *self.weights, context)
        )
        mfu = flops_per_s / self.peak_flops  # per device
        metrics = dict(
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            tokens_per_s=tokens_per_s,
            mfu=mfu,
            **self.memory.step(),
        )
        if router_aux_loss is not None:
            metrics["router_aux_loss"] = router_aux_loss
        for tracker in self.trackers:
            tracker.log_metrics({f"train/{name}": value for name, value in metrics.items()}, step)
        self.append_metrics({"step": step, **metrics})
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
        if not self.live and (step % self.log_every == 0 or step == self.total_steps):
            minutes = (time.perf_counter() - self.started) / 60
            eta = minutes / (step - self.start_step) * (self.total_steps - step)
            aux = f" (router aux {router_aux_loss:.4f})" if router_aux_loss is not None else ""
            self.print(
                f"step {step}/{self.total_steps}: loss {loss:.4f}{aux}, lr {lr:.2e}, "
                f"{tokens_per_s:.0f} tokens/s, "
                f"MFU {mfu:.0%}, {minutes:.1f} min, ETA {eta:.1f} min"
            )

    def log_eval(self, step: int, val_loss: float, progress, warmup_steps: int) -> None:
        """An eval's line; a warning when val rises while train falls (overfitting) or stays flat after
        warmup (try the lr range test); the first generated sample (the untuned model's at step 0)."""
        if not self.enabled:
            return
        samples = progress.samples
        text = [
            f"**prompt** {prompt}\n\n**model** {generated}\n\n**reference** {reference}"
            for prompt, generated, reference in samples
        ]
        for tracker in self.trackers:
            tracker.log_metrics({"val/loss": val_loss, "val/best_loss": progress.best_val_loss}, step)
            tracker.log_text("val/samples", "\n\n---\n\n".join(text), step)
        self.append_metrics({"step": step, "val_loss": val_loss})

        train = sum(self.train_losses) / len(self.train_losses) if self.train_losses else None
        self.train_losses = []
        note = " (baseline, untuned)" if step == 0 else " (best)" if progress.best_step == step else ""
        self.print(
            f"step {step}: val loss {val_loss:.4f}{note}" + (f", train loss {train:.4f}" if train else "")
        )
        if self.last_eval and train is not None and self.last_eval[1] is not None:
            last_val, last_train = self.last_eval
            if val_loss > last_val and train < last_train:
                self.print(
                    f"  warning: val loss rose {last_val:.4f} -> {val_loss:.4f} while train loss fell "
                    f"{last_train:.4f} -> {train:.4f}: overfitting begins; the best checkpoint (step "
                    f"{progress.best_step}) is kept; fewer epochs, more data or a smaller r help"
                )
        flat = flat_val_loss_advice(progress.val_curve, warmup_steps)
        if flat and not self.warned_flat:
            self.print(f"  warning: {flat}")
            self.warned_flat = True
        self.last_eval = (val_loss, train)
        for prompt, generated, _ in samples[:1]:
            self.print(f"  sample: {prompt_tail(prompt)!r} -> {generated[:100]!r}")

    def finish(self, config, summary: dict) -> None:
        """The end of a run whose report is written: the trackers get the hyperparameters beside the best val
        loss, and the report's files."""
        if not self.enabled:
            return
        artifacts = [self.run_dir / name for name in ARTIFACTS if (self.run_dir / name).is_file()]
        for tracker in self.trackers:
            tracker.finish(run_settings(config), {"best_val_loss": summary["best_val_loss"]}, artifacts)

    def print(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=sys.stderr if self.live else sys.stdout)

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a") as file:
            file.write(json.dumps(row) + "\n")

    def close(self, stop_reason: str | None) -> None:
        """stop_reason: None (finished), "early_stop", "nan" or "signal" (the run can be resumed)."""
        if self.enabled:
            self.bar.close()
            for tracker in self.trackers:
                tracker.close(stop_reason)


def prompt_tail(prompt: str, chars: int = 70) -> str:
    """The end of a prompt (the question), without the chat template's system text before it."""
    text = " ".join(prompt.split())
    return text if len(text) <= chars else "..." + text[-chars:]


def val_prompts(examples, n: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) of the first n val examples: the tokens before the first trained one,
    and the first run of trained ones (what the model should write). A multi-turn chat's later answers
    follow user turns the prompt does not hold, so they are not part of the reference."""
    prompts = []
    for index in range(min(n, len(examples))):
        ids, targets = examples.example(index)
        trained = (targets != IGNORE_INDEX).nonzero()[0]  # targets[t] is the label of token t + 1
        first_run = np.split(trained, np.flatnonzero(np.diff(trained) > 1) + 1)[0]
        prompts.append((ids[: first_run[0] + 1].tolist(), ids[first_run[0] + 1 : first_run[-1] + 2].tolist()))
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
    """(frozen, trainable) weights that take part in matrix multiplies: the decoder's and lm_head's; not the
    norms, nor the embedding table (only indexed) unless tied to lm_head (then listed once, by its name).
    Per token: of a mixture of experts' experts, the share of num_experts_per_tok."""
    frozen = trainable = 0
    for name, param in model.named_parameters():
        if param.dim() < 2 or (name == "model.embed_tokens.weight" and not model.config.tie_word_embeddings):
            continue
        quant_state = getattr(param, "quant_state", None)  # 4-bit weights are packed two to a byte
        numel = quant_state.shape.numel() if quant_state is not None else param.numel()
        if ".experts." in name:  # a mixture of experts: each token passes through k of them
            numel = numel * model.config.num_experts_per_tok // model.config.num_experts
        if param.requires_grad:
            trainable += numel
        else:
            frozen += numel
    return frozen, trainable


def flops_per_token(config, frozen: int, trainable: int, context: int) -> float:
    """Training FLOPs per token at context length `context` (see the module docstring)."""
    attention = 12 * config.num_hidden_layers * context * config.num_attention_heads * config.head_dim
    return 4 * frozen + 6 * trainable + attention


def measure_peak_flops(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> float:
    """FLOP/s of a large matrix multiply in `dtype` on `device`: the denominator of MFU. The best of several
    tries, since other work on a shared machine slows some of them (then MFU reads high, even above 100%)."""
    n = 8192 if device.type == "cuda" else 2048
    generator = torch.Generator(device).manual_seed(0)  # its own: training's random stream stays untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryPeaks:
    """Memory by step and over the run: each logged step's peak, with the peak counter reset after it (so a
    step that needed more shows as that step), and the run's peak, which those resets do not lose.

    GPU: bytes allocated by tensors (now, and the step's peak) and reserved by torch's caching allocator
    (what the GPU really lends this process; a gap between the two is fragmentation). CPU: the process's
    resident memory, the step's peak through Linux's resettable high-water mark (VmHWM, /proc/self/clear_refs;
    it also resets ru_maxrss, so the run's peak is kept here).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.run_peak = peak_since_reset(device)  # loading the model, before the first step

    def step(self) -> dict[str, int]:
        """memory_bytes (now), memory_peak_bytes (the step's most), memory_reserved_bytes (GPU only)."""
        step_peak = peak_since_reset(self.device)
        self.run_peak = max(self.run_peak, step_peak)
        metrics = {"memory_bytes": memory_bytes(self.device), "memory_peak_bytes": step_peak}
        if self.device.type == "cuda":
            metrics["memory_reserved_bytes"] = torch.cuda.memory_reserved(self.device)
        reset_peak(self.device)
        return metrics

    def peak(self) -> int:
        """The most memory the run has used so far."""
        return max(self.run_peak, peak_since_reset(self.device))


def memory_bytes(device: torch.device) -> int:
    """Memory in use now: allocated GPU memory, or this process's resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_since_reset(device: torch.device) -> int:
    """Peak allocated GPU memory, or peak resident memory on CPU, since the start or the last reset_peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    return int(kib) * BYTES_PER_KIB


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # 5: reset the peak resident set size to the current one
    except OSError:  # not Linux, or /proc read-only: steps then report the peak so far
        pass
