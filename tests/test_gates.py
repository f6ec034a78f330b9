"""Quality gates on synthetic run histories: each gate's PASS, FAIL and N-A, and what a failure advises."""

import math

import pytest
import torch

from nanoft.gates import (
    ADVICE,
    UtilisationSampler,
    baseline_gate,
    best_checkpoint_gate,
    data_checks_gate,
    effective_batch_gate,
    evaluate_gates,
    flat_val_loss_advice,
    gates_markdown,
    utilisation_gate,
    val_loss_gate,
)

HEALTHY_CURVE = [(0, 2.30), (50, 2.05), (100, 1.98), (150, 1.95), (200, 1.94)]


def healthy_run(tmp_path, **overrides):
    samples = tmp_path / "samples.txt"
    samples.write_text("sample\n" * 50)
    (tmp_path / "best").mkdir(exist_ok=True)
    run = dict(
        val_curve=HEALTHY_CURVE,
        warmup_steps=6,
        device_type="cpu",
        utilisation=None,
        dedup_counts={"exact": 3, "near": 2},
        samples_path=str(samples),
        samples_written=50,
        train_examples=1000,
        micro_batch=4,
        grad_accum=8,
        world_size=1,
        best_checkpoint=(200, 1.94, str(tmp_path / "best")),
    )
    return run | overrides


def test_healthy_cpu_run_passes_every_gate_but_utilisation_which_is_not_applicable(tmp_path):
    gates = evaluate_gates(**healthy_run(tmp_path))
    assert [g.status for g in gates] == ["PASS", "N-A", "PASS", "PASS", "PASS", "PASS"]
    assert "0: 2.3000" in gates[0].evidence and "200: 1.9400" in gates[0].evidence
    assert "trained on cpu" in gates[1].evidence
    assert "3 exact, 2 near" in gates[2].evidence
    assert "4 micro-batch x 8 accumulation x 1 devices = 32" == gates[3].evidence
    assert "baseline 2.3000, best 1.9400" in gates[4].evidence
    assert "step 200, val loss 1.9400" in gates[5].evidence
    assert all(g.advice == "" for g in gates if g.status == "PASS")


def test_val_loss_gate_divergence_overfitting_nan_and_warmup():
    diverged = val_loss_gate([(0, 2.3), (50, 2.0), (100, 3.5)], warmup_steps=10)
    assert diverged.status == "FAIL" and diverged.advice == ADVICE["divergence"]
    assert "step 100: 3.5000" in diverged.evidence
    overfit = val_loss_gate([(0, 2.3), (50, 1.8), (100, 1.85), (150, 2.0)], warmup_steps=10)
    assert overfit.status == "FAIL" and overfit.advice == ADVICE["overfitting"]
    assert "step 150" in overfit.evidence
    nan = val_loss_gate([(0, 2.3), (50, math.nan)], warmup_steps=10)
    assert nan.status == "FAIL" and "halve the lr" in nan.advice
    never = val_loss_gate([(0, 2.3), (50, 2.31), (100, 2.4)], warmup_steps=10)
    assert never.status == "FAIL" and "--lr-sweep" in never.advice
    # A rise during warmup is allowed; within the tolerance after warmup too.
    assert val_loss_gate([(0, 2.3), (5, 2.5), (50, 2.0), (100, 2.05)], warmup_steps=10).status == "PASS"


def test_utilisation_gate_pass_fail_and_not_applicable():
    assert utilisation_gate("cuda", [90.0, 95.0, 88.0]).status == "PASS"
    low = utilisation_gate("cuda", [40.0, 60.0])
    assert low.status == "FAIL" and "mean 50%" in low.evidence and "micro-batch" in low.advice
    assert utilisation_gate("cuda", None, "NVML unavailable").status == "N-A"
    assert "NVML unavailable" in utilisation_gate("cuda", [], "NVML unavailable").evidence
    assert utilisation_gate("cpu", None).status == "N-A"


def test_data_checks_gate(tmp_path):
    samples = tmp_path / "samples.txt"
    samples.write_text("x")
    assert data_checks_gate({"exact": 0, "near": 0}, str(samples), 50, 1000).status == "PASS"
    no_dedup = data_checks_gate(None, str(samples), 50, 1000)
    assert no_dedup.status == "FAIL" and "dedup off" in no_dedup.evidence and "--no-dedup" in no_dedup.advice
    few = data_checks_gate({"exact": 1}, str(samples), 10, 1000)
    assert few.status == "FAIL" and "10 samples" in few.evidence and "50+" in few.advice
    all_there_are = data_checks_gate({"exact": 1}, str(samples), 23, 23)  # the QA report's 23
    assert all_there_are.status == "PASS"
    assert all_there_are.evidence.endswith(
        "23 samples in " + str(samples) + " (all 23 training examples: 50, or all when fewer)"
    )
    assert data_checks_gate({"exact": 1}, str(tmp_path / "missing.txt"), 50, 1000).status == "FAIL"


def test_effective_batch_gate_names_the_accumulation_that_fixes_it():
    assert effective_batch_gate(2, 8, 2).status == "PASS"
    small = effective_batch_gate(4, 2, 1)
    assert small.status == "FAIL" and small.evidence.endswith("= 8") and "--grad-accum 8" in small.advice


def test_baseline_gate():
    assert baseline_gate(HEALTHY_CURVE).status == "PASS"
    assert "-15.7%" in baseline_gate(HEALTHY_CURVE).evidence
    assert baseline_gate([(50, 2.0), (100, 1.9)]).status == "FAIL"  # no step-0 eval
    assert baseline_gate([(0, 2.0)]).status == "FAIL"
    worse = baseline_gate([(0, 2.0), (100, 2.1)])
    assert worse.status == "FAIL" and "did not improve" in worse.evidence


def test_best_checkpoint_gate(tmp_path):
    assert best_checkpoint_gate(HEALTHY_CURVE, (200, 1.94, str(tmp_path))).status == "PASS"
    assert best_checkpoint_gate(HEALTHY_CURVE, None).status == "FAIL"
    assert best_checkpoint_gate(HEALTHY_CURVE, (200, 1.94, str(tmp_path / "gone"))).status == "FAIL"
    last_not_best = best_checkpoint_gate(HEALTHY_CURVE, (150, 1.95, str(tmp_path)))
    assert last_not_best.status == "FAIL" and "1.9400" in last_not_best.evidence


def test_flat_val_loss_advice_only_after_warmup_and_a_full_window():
    flat = [(0, 2.3), (50, 2.0), (100, 2.0), (150, 2.001), (200, 2.002)]
    assert "--lr-sweep" in flat_val_loss_advice(flat, warmup_steps=10)
    assert flat_val_loss_advice(flat[:3], warmup_steps=10) is None  # window not yet 100 steps after warmup
    assert flat_val_loss_advice(HEALTHY_CURVE, warmup_steps=10) is None  # still falling by > 1%
    assert flat_val_loss_advice(flat, warmup_steps=120) is None


def test_gates_markdown_is_a_table_with_a_row_per_gate(tmp_path):
    gates = evaluate_gates(**healthy_run(tmp_path, grad_accum=2))
    table = gates_markdown(gates)
    rows = table.strip().splitlines()
    assert len(rows) == 2 + 6
    assert "| 4 | effective batch >= 32 | **FAIL** |" in table and "--grad-accum 8" in table


def test_utilisation_sampler_on_cpu_is_unavailable_with_a_reason():
    sampler = UtilisationSampler(torch.device("cpu"))
    sampler.sample()
    assert not sampler.available and sampler.samples == [] and "cpu" in sampler.reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_utilisation_sampler_on_cuda_collects_percentages():
    sampler = UtilisationSampler(torch.device("cuda"), interval_s=0.0, skip_first=0)
    for _ in range(3):
        torch.randn(2048, 2048, device="cuda") @ torch.randn(2048, 2048, device="cuda")
        sampler.sample()
    if sampler.available:
        assert len(sampler.samples) == 3 and all(0 <= s <= 100 for s in sampler.samples)
