"""Quality gates: did this run do what a careful engineer checks before trusting a fine-tune?

    gates = evaluate_gates(val_curve=[(0, 2.31), (50, 2.02), (100, 1.97)], warmup_steps=10,
                           device_type="cpu", utilisation=None, dedup_counts={"exact": 3, "near": 1},
                           samples_path="run/samples.txt", samples_written=50, train_examples=900,
                           micro_batch=4, grad_accum=8, world_size=1, best_checkpoint=(100, 1.97, "run/best"))
    print(gates_markdown(gates))                      # the table in report.md
    summary["gates"] = [asdict(g) for g in gates]     # the block in summary.json

Each gate is PASS, FAIL or N-A (cannot apply here, with the reason), shows its evidence, and a failed gate
says what to do in the playbook's words. `flat_val_loss_advice` is the in-run check that suggests the LR range
test, and `UtilisationSampler` collects the accelerator utilisation gate 2 needs.
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# An eval more than this far above the best so far is divergence or overfitting, not noise: the val loss of a
# few hundred held-out sequences moves by about 1% between neighbouring evals when training is healthy.
DIVERGENCE_TOLERANCE = 0.05
UTILISATION_TARGET = 85.0  # percent of time a kernel was running
MIN_SAMPLES_WRITTEN = 50
MIN_EFFECTIVE_BATCH = 32
FLAT_WINDOW_STEPS = 100
FLAT_TOLERANCE = 0.01  # relative range of the val loss over the window that counts as "not moving"

ADVICE = {
    "nan": "halve the lr, prefer bf16 over fp16 (fp16 overflows), and check the data (the log names the "
    "batch's sample ids)",
    "divergence": "halve the lr or lengthen the warmup; check the data for broken or mislabelled records",
    "overfitting": "train 1-3 epochs, evaluate every 50-100 steps and keep the best checkpoint; more or more "
    "varied data, or a smaller LoRA rank",
    "flat": "run the LR range test (--lr-sweep) and use the lr it recommends; check that the targets are not "
    "all masked",
    "oom": "halve the micro-batch and double gradient accumulation (effective batch unchanged), or turn on "
    "activation checkpointing",
    "utilisation": "raise the micro-batch until memory is ~90% used (halve accumulation to keep the "
    "effective batch), pack short sequences (--pack), and keep data loading off the critical path",
    "dedup": "run without --no-dedup: duplicates inflate the val score and teach the model to repeat itself",
    "samples": "write 50+ rendered samples and read them before trusting the run: template and masking bugs "
    "show there first",
    "effective_batch": "raise --grad-accum until micro-batch x accumulation x devices >= "
    f"{MIN_EFFECTIVE_BATCH}",
    "baseline": "evaluate the untuned model on the same val data at step 0 (give --val-data or keep the "
    "automatic split) so the gain can be measured",
    "best_checkpoint": "evaluate during training (--eval-every 50-100) and keep the checkpoint with the "
    "lowest val loss, not just the last",
}


@dataclass
class Gate:
    name: str
    status: str  # "PASS", "FAIL" or "N-A"
    evidence: str
    advice: str = ""  # what to do: set when the gate failed, or why it cannot apply


def evaluate_gates(
    *,
    val_curve: list[tuple[int, float]],
    warmup_steps: int,
    device_type: str,
    utilisation: list[float] | None,
    utilisation_note: str = "",
    dedup_counts: dict | None,
    samples_path: str | None,
    samples_written: int,
    train_examples: int,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    best_checkpoint: tuple[int, float, str] | None,
) -> list[Gate]:
    """val_curve: (step, val loss) of every eval, step 0 = the untuned baseline. utilisation: percent
    samples from `UtilisationSampler.samples`; utilisation_note: its `reason` when it could not sample.
    dedup_counts: removed records by method, None when dedup was off. best_checkpoint: (step, val loss,
    directory) of the kept best."""
    return [
        val_loss_gate(val_curve, warmup_steps),
        utilisation_gate(device_type, utilisation, utilisation_note),
        data_checks_gate(dedup_counts, samples_path, samples_written, train_examples),
        effective_batch_gate(micro_batch, grad_accum, world_size),
        baseline_gate(val_curve),
        best_checkpoint_gate(val_curve, best_checkpoint),
    ]


def val_loss_gate(val_curve, warmup_steps) -> Gate:
    """PASS: the final val loss is below the step-0 baseline and no eval after warmup rose more than
    DIVERGENCE_TOLERANCE above the best before it."""
    name = "val loss decreased steadily"
    evidence = "val curve " + format_curve(val_curve)
    if len(val_curve) < 2:
        return Gate(name, "FAIL", evidence + " (fewer than two evals)", ADVICE["best_checkpoint"])
    losses = [loss for _, loss in val_curve]
    if not all(math.isfinite(loss) for loss in losses):
        return Gate(name, "FAIL", evidence + " (non-finite val loss)", ADVICE["nan"])
    baseline, final = losses[0], losses[-1]
    if min(losses[1:]) >= baseline:
        return Gate(name, "FAIL", evidence + f" (never below the baseline {baseline:.4f})", ADVICE["flat"])
    running_best = baseline
    for step, loss in val_curve[1:]:
        if step > warmup_steps and loss > running_best * (1 + DIVERGENCE_TOLERANCE):
            rise = f"{loss / running_best - 1:.0%} above the best {running_best:.4f}"
            # Above the untuned model is divergence; a rise after improving, still below it, is overfitting.
            advice = ADVICE["divergence" if loss > baseline else "overfitting"]
            return Gate(name, "FAIL", f"{evidence} (step {step}: {loss:.4f} is {rise})", advice)
        running_best = min(running_best, loss)
    if final >= baseline:
        evidence += f" (final {final:.4f} >= baseline {baseline:.4f})"
        return Gate(name, "FAIL", evidence, ADVICE["divergence"])
    return Gate(name, "PASS", evidence)


def utilisation_gate(device_type, utilisation, utilisation_note="") -> Gate:
    name = f"accelerator utilisation > {UTILISATION_TARGET:.0f}%"
    if device_type != "cuda":
        return Gate(name, "N-A", f"trained on {device_type}: no accelerator to sample")
    if not utilisation:
        evidence = "no utilisation samples" + (f" ({utilisation_note})" if utilisation_note else "")
        return Gate(name, "N-A", evidence, "install pynvml so torch.cuda.utilization() can read NVML")
    mean = sum(utilisation) / len(utilisation)
    evidence = f"mean {mean:.0f}% over {len(utilisation)} samples (min {min(utilisation):.0f}%)"
    if mean > UTILISATION_TARGET:
        return Gate(name, "PASS", evidence)
    return Gate(name, "FAIL", evidence, ADVICE["utilisation"])


def data_checks_gate(dedup_counts, samples_path, samples_written, train_examples) -> Gate:
    name = f"dedup ran and {MIN_SAMPLES_WRITTEN}+ samples written"
    dedup = "dedup off" if dedup_counts is None else "dedup removed " + format_counts(dedup_counts)
    samples_exist = samples_path is not None and Path(samples_path).is_file()
    samples = f"{samples_written} samples in {samples_path}" if samples_exist else "no samples file"
    if samples_exist and train_examples < MIN_SAMPLES_WRITTEN:  # the rule, where the split is smaller
        samples += f" (all {train_examples} training examples: {MIN_SAMPLES_WRITTEN}, or all when fewer)"
    evidence = f"{dedup}; {samples}"
    advice = []
    if dedup_counts is None:
        advice.append(ADVICE["dedup"])
    # A training split smaller than that is written whole: every sample there is, read them all.
    if not samples_exist or samples_written < min(MIN_SAMPLES_WRITTEN, train_examples):
        advice.append(ADVICE["samples"])
    return Gate(name, "FAIL" if advice else "PASS", evidence, "; ".join(advice))


def effective_batch_gate(micro_batch, grad_accum, world_size) -> Gate:
    effective = micro_batch * grad_accum * world_size
    evidence = f"{micro_batch} micro-batch x {grad_accum} accumulation x {world_size} devices = {effective}"
    if effective >= MIN_EFFECTIVE_BATCH:
        return Gate(f"effective batch >= {MIN_EFFECTIVE_BATCH}", "PASS", evidence)
    needed = math.ceil(MIN_EFFECTIVE_BATCH / (micro_batch * world_size))
    advice = ADVICE["effective_batch"] + f" (--grad-accum {needed})"
    return Gate(f"effective batch >= {MIN_EFFECTIVE_BATCH}", "FAIL", evidence, advice)


def baseline_gate(val_curve) -> Gate:
    name = "compared with the baseline"
    if not val_curve or val_curve[0][0] != 0:
        return Gate(name, "FAIL", "no step-0 eval of the untuned model", ADVICE["baseline"])
    if len(val_curve) < 2:
        return Gate(
            name, "FAIL", f"baseline {val_curve[0][1]:.4f}, no eval after training", ADVICE["baseline"]
        )
    baseline, final = val_curve[0][1], val_curve[-1][1]
    best = min(loss for _, loss in val_curve[1:])
    evidence = (
        f"val loss on the same eval data: baseline {baseline:.4f}, best {best:.4f} "
        f"({best / baseline - 1:+.1%}), final {final:.4f}"
    )
    if best < baseline:
        return Gate(name, "PASS", evidence)
    return Gate(name, "FAIL", evidence + ": training did not improve on the untuned model", ADVICE["flat"])


def best_checkpoint_gate(val_curve, best_checkpoint) -> Gate:
    name = "best checkpoint kept by val loss"
    if best_checkpoint is None or not Path(best_checkpoint[2]).exists():
        return Gate(name, "FAIL", "no best checkpoint on disk", ADVICE["best_checkpoint"])
    step, loss, path = best_checkpoint
    evidence = f"step {step}, val loss {loss:.4f}, in {path}"
    trained = [value for s, value in val_curve if s > 0]
    if trained and loss > min(trained) + 1e-9:
        return Gate(
            name, "FAIL", evidence + f" but the best eval was {min(trained):.4f}", ADVICE["best_checkpoint"]
        )
    return Gate(name, "PASS", evidence)


def flat_val_loss_advice(val_curve, warmup_steps) -> str | None:
    """Call after each eval: a suggestion when the val loss has not moved for FLAT_WINDOW_STEPS steps after
    warmup, else None."""
    if not val_curve:
        return None
    last_step = val_curve[-1][0]
    window = [
        loss for step, loss in val_curve if step > warmup_steps and step >= last_step - FLAT_WINDOW_STEPS
    ]
    spans_window = any(warmup_steps < step <= last_step - FLAT_WINDOW_STEPS for step, _ in val_curve)
    if not spans_window or len(window) < 2 or not all(math.isfinite(loss) for loss in window):
        return None
    if max(window) - min(window) > FLAT_TOLERANCE * abs(min(window)):
        return None
    return (
        f"val loss flat ({min(window):.4f}-{max(window):.4f}) for {FLAT_WINDOW_STEPS} steps after warmup: "
        + ADVICE["flat"]
    )


def gates_markdown(gates: list[Gate]) -> str:
    lines = ["| # | gate | status | evidence | what to do |", "| --- | --- | --- | --- | --- |"]
    for number, gate in enumerate(gates, start=1):
        cells = [str(number), gate.name, f"**{gate.status}**", gate.evidence, gate.advice]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def format_curve(val_curve, max_points=12) -> str:
    points = [f"{step}: {loss:.4f}" for step, loss in val_curve]
    if len(points) > max_points:  # keep the start and the end, where the story is
        points = points[: max_points // 2] + ["..."] + points[-max_points // 2 :]
    return ", ".join(points) or "(no evals)"


def format_counts(counts: dict) -> str:
    return ", ".join(f"{value} {key}" for key, value in counts.items()) or "nothing"


class UtilisationSampler:
    """Percent of time a kernel ran, sampled at most once per `interval_s` from the training loop:

    sampler = UtilisationSampler(device)     # once
    sampler.sample()                         # every step; cheap, rate-limited
    sampler.samples                          # list[float] for evaluate_gates(utilisation=...)

    torch.cuda.utilization() reads NVML (needs pynvml); on CPU, or without NVML, `available` is False and
    `reason` says why. The first `skip_first` samples (start-up, compilation) are dropped.
    """

    def __init__(self, device: torch.device, interval_s: float = 1.0, skip_first: int = 3):
        self.device, self.interval_s, self.skip_first = device, interval_s, skip_first
        self.samples: list[float] = []
        self.seen = 0
        self.last_time = -math.inf
        self.available, self.reason = False, f"trained on {device.type}"
        if device.type == "cuda":
            try:
                torch.cuda.utilization(device)
                self.available, self.reason = True, ""
            except Exception as error:  # pynvml missing or NVML not reachable in this container
                self.reason = f"NVML unavailable ({error})"

    def sample(self) -> None:
        if not self.available or time.monotonic() - self.last_time < self.interval_s:
            return
        self.last_time = time.monotonic()
        self.seen += 1
        try:
            busy = float(torch.cuda.utilization(self.device))
        except Exception as error:  # NVML can fail mid-run (driver reset, lost GPU): stop sampling, train on
            self.available, self.reason = False, f"NVML failed during the run ({error})"
            return
        if self.seen > self.skip_first:
            self.samples.append(busy)
