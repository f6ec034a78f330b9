"""The end of a run: summary.json for programs, report.md for people, the quality gates in both.

    summary = write_run_report(run_dir, config, progress, data_report, run_facts)
    for line in summary_lines(summary): print(line)
    python -m nanoft.report RUN_DIR     # loss.png of a run still going (or finished), and where it stands

summary.json holds at least: stop_reason, baseline_val_loss (step 0, the untuned model), best_val_loss,
best_step, final_val_loss, steps, tokens_seen, train_s (in optimizer steps), train_tokens_per_s,
peak_memory_bytes (the most any session of the run used, rank 0's), peak_memory_bytes_per_rank (this session's
peak on every rank: device memory on GPUs, resident memory on CPU), changed_on_resume (settings a resume
changed, and from which step), wall_s, val_curve, samples (prompt, generated, reference at the last eval),
best_dir, data (the data report with dedup counts), config (resolved) and gates (nanoft/gates.py: each PASS /
FAIL / N-A with evidence and what to do).
"""

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from nanoft.data_report import SPOT_CHECK_SAMPLES
from nanoft.errors import UserError, exit_on_user_error
from nanoft.gates import evaluate_gates, gates_markdown
from nanoft.loss_plot import read_metrics, write_loss_plot
from nanoft.monitor import prompt_tail
from nanoft.planner import format_lr

STOP_REASONS = {None: "finished", "early_stop": "early stop (patience)", "nan": "NaN loss"}


def write_run_report(run_dir, config, progress, data_report, facts: dict) -> dict:
    """progress: checkpoint.Progress; facts: stop_reason, steps, total_steps, warmup_steps, best_dir, wall_s,
    peak_memory_bytes_per_rank, device, world_size, utilisation (UtilisationSampler)."""
    run_dir, curve = Path(run_dir), progress.val_curve
    summary = {
        "stop_reason": STOP_REASONS[facts["stop_reason"]],
        "baseline_val_loss": curve[0][1],
        "best_val_loss": progress.best_val_loss,
        "best_step": progress.best_step,
        "final_val_loss": curve[-1][1],
        "steps": facts["steps"],
        "total_steps": facts["total_steps"],
        "tokens_seen": progress.tokens_seen,
        "train_s": progress.train_seconds,  # the optimizer steps alone: what tokens/s divides by
        "train_tokens_per_s": progress.tokens_seen / max(progress.train_seconds, 1e-9),
        "peak_memory_bytes": progress.peak_memory_bytes,  # the most any session of the run used
        "peak_memory_bytes_per_rank": facts["peak_memory_bytes_per_rank"],
        "changed_on_resume": progress.changed_on_resume,
        "wall_s": facts["wall_s"],
        "best_dir": str(facts["best_dir"]),
        "val_curve": curve,
        "samples": progress.samples,
        "data": data_report.to_dict(),
        "config": config.to_dict(),
    }
    dedup = {"exact": data_report.exact_duplicates_removed, "near": data_report.near_duplicates_removed}
    gates = evaluate_gates(
        val_curve=curve,
        warmup_steps=facts["warmup_steps"],
        device_type=facts["device"].type,
        utilisation=facts["utilisation"].samples,
        utilisation_note=facts["utilisation"].reason,
        dedup_counts=dedup if data_report.dedup else None,
        samples_path=str(run_dir / "samples.txt"),
        samples_written=min(SPOT_CHECK_SAMPLES, data_report.train_examples),
        train_examples=data_report.train_examples,
        micro_batch=config.batch_size,
        grad_accum=config.grad_accum,
        world_size=facts["world_size"],
        best_checkpoint=(progress.best_step, progress.best_val_loss, str(facts["best_dir"])),
    )
    summary["gates"] = [asdict(gate) for gate in gates]
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    try:
        write_loss_plot(run_dir)
    except (ImportError, OSError, MemoryError) as error:  # e.g. no address space left to load matplotlib
        print(f"loss.png not written ({error}); python -m nanoft.report {run_dir} draws it later")
    (run_dir / "report.md").write_text(report_markdown(run_dir, summary, gates_markdown(gates)))
    return summary


def report_markdown(run_dir: Path, summary: dict, gates_table: str) -> str:
    data, config = summary["data"], summary["config"]
    baseline, best, final = summary["baseline_val_loss"], summary["best_val_loss"], summary["final_val_loss"]
    method = config["method"]
    if method != "full":
        method += (
            f" r={config['lora_r']} alpha={config['lora_alpha']:g} on {','.join(config['lora_targets'])}"
        )
    dedup = "dedup off"
    if data["dedup"]:
        dedup = (
            f"dedup removed {data['exact_duplicates_removed']} exact, {data['near_duplicates_removed']} near"
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
        f"| training | {summary['steps']} steps, {time_line(summary)} |",
        f"| peak memory | {summary['peak_memory_bytes'] / 2**30:.2f} GiB |",
        *(f"| changed on resume | {change_line(change)} |" for change in summary["changed_on_resume"]),
        f"| best weights | {summary['best_dir']} |",
        "",
        "## Val loss",
        "",
        "![train and val loss](loss.png)",
        "",
        "| step | val loss |",
        "| --- | --- |",
        *(f"| {step} | {loss:.4f} |" for step, loss in summary["val_curve"]),
        "",
        "## Quality gates",
        "",
        gates_table,
        "## Samples at the last eval (greedy)",
        "",
    ]
    for prompt, generated, reference in summary["samples"]:
        lines += [
            f"- **prompt** `{prompt_tail(prompt, 200)}`",
            f"  - **model**: {' '.join(generated.split())}",
            f"  - **reference**: {' '.join(reference.split())}",
        ]
    lines += ["", "## Config", "", "```json", json.dumps(config, indent=2), "```", ""]
    return "\n".join(lines)


def summary_lines(summary: dict) -> list[str]:
    """What the run prints at its end."""
    run_dir, trackers = Path(summary["best_dir"]).parent, summary["config"]["report_to"]
    gates = summary["gates"]
    failed = [gate["name"] for gate in gates if gate["status"] == "FAIL"]
    return [
        f"done ({summary['stop_reason']}): {summary['steps']} steps, {time_line(summary)}, peak memory "
        f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB",
        *(f"changed on resume: {change_line(change)}" for change in summary["changed_on_resume"]),
        f"val loss: baseline {summary['baseline_val_loss']:.4f} -> best {summary['best_val_loss']:.4f} "
        f"at step {summary['best_step']} -> final {summary['final_val_loss']:.4f}",
        f"quality gates: {len(gates) - len(failed)} of {len(gates)} pass or do not apply"
        + (f"; failed: {', '.join(failed)} (see report.md)" if failed else ""),
        f"best weights: {summary['best_dir']}; report: {run_dir / 'report.md'}"
        + (f"; tensorboard --logdir {run_dir / 'tensorboard'}" if "tensorboard" in trackers else "")
        + (f"; MLflow run {run_dir.resolve().name}" if "mlflow" in trackers else ""),
    ]


def change_line(change: dict) -> str:
    """A setting changed on resume, as people write it: "lr 2e-4 -> 1e-3 from step 63"."""
    show = lambda value: (
        format_lr(value)
        if change["setting"] == "lr"
        else f"{value:g}"
        if isinstance(value, float)
        else str(value)
    )
    return f"{change['setting']} {show(change['from'])} -> {show(change['to'])} from step {change['step']}"


def time_line(summary: dict) -> str:
    """Tokens over the time spent in optimizer steps, and the wall time (loading, evals, checkpoints too)
    apart: "404 tokens in 3.0 min" of wall time next to tokens/s of training time read as a contradiction."""
    return (
        f"{summary['tokens_seen']:,} tokens in {summary['train_s'] / 60:.1f} min of training "
        f"({summary['train_tokens_per_s']:.0f} tokens/s); wall time {summary['wall_s'] / 60:.1f} min"
    )


def nan_advice(step: int, lr: float, sources: list[str]) -> str:
    """What to try after a NaN or inf loss, naming the records of the offending batch."""
    return (
        f"loss became NaN or inf at step {step}; that step was not applied. What to try:\n"
        f"  - halve the lr (--lr {lr / 2:.1e}); loss spikes before the NaN point the same way\n"
        "  - --dtype bf16 instead of fp16 (fp16 overflows), or fp32 to rule precision out\n"
        f"  - check the data: the batch held {', '.join(sources)}"
    )


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m nanoft.report", description="Draw a run's loss.png from its metrics.jsonl."
    )
    parser.add_argument("run_dir", help="the run directory (train.py's --out)")
    run_dir = Path(parser.parse_args(argv).run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl; give a run directory of train.py after its first step")
    train, val = read_metrics(run_dir / "metrics.jsonl")
    path = write_loss_plot(run_dir)
    line = f"{path}: {len(train)} steps"
    if train:
        line += f", train loss {train[-1][1]:.4f} at step {train[-1][0]}"
    if val:
        best_step, best_loss = min(val, key=lambda point: point[1])
        line += f"; val loss: baseline {val[0][1]:.4f}, best {best_loss:.4f} at step {best_step}"
        line += f", last {val[-1][1]:.4f} at step {val[-1][0]}"
    print(line)


if __name__ == "__main__":
    main()
