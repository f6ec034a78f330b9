"""nanoft/schedule.py: linear warmup, then cosine decay to the floor.

python -m pytest tests/test_schedule.py -q
"""

import math

import pytest

from nanoft.schedule import lr_at

MAX_LR, WARMUP, TOTAL = 2e-4, 10, 110


def test_warmup_is_linear_and_starts_above_zero():
    lrs = [lr_at(step, MAX_LR, WARMUP, TOTAL) for step in range(WARMUP + 1)]
    assert lrs[0] == pytest.approx(MAX_LR / (WARMUP + 1))  # the first step already moves the weights
    steps = [b - a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert steps == pytest.approx([MAX_LR / (WARMUP + 1)] * WARMUP)  # equal increments: linear
    assert lrs[WARMUP] == pytest.approx(MAX_LR)  # the peak right after warmup


def test_cosine_decay_to_the_floor():
    decay = [lr_at(step, MAX_LR, WARMUP, TOTAL) for step in range(WARMUP, TOTAL + 5)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))  # never rises after warmup
    middle = WARMUP + (TOTAL - WARMUP) // 2
    assert lr_at(middle, MAX_LR, WARMUP, TOTAL) == pytest.approx((MAX_LR + 0.1 * MAX_LR) / 2)  # cos(pi/2) = 0
    quarter = WARMUP + (TOTAL - WARMUP) // 4
    expected = 0.1 * MAX_LR + 0.5 * (1 + math.cos(math.pi / 4)) * 0.9 * MAX_LR
    assert lr_at(quarter, MAX_LR, WARMUP, TOTAL) == pytest.approx(expected)
    assert lr_at(TOTAL, MAX_LR, WARMUP, TOTAL) == pytest.approx(0.1 * MAX_LR)
    assert lr_at(TOTAL + 100, MAX_LR, WARMUP, TOTAL) == pytest.approx(
        0.1 * MAX_LR
    )  # extended runs: the floor


def test_no_warmup_and_custom_floor():
    assert lr_at(0, MAX_LR, 0, 100, min_lr_ratio=0.0) == pytest.approx(MAX_LR)
    assert lr_at(100, MAX_LR, 0, 100, min_lr_ratio=0.0) == pytest.approx(0.0)
    assert lr_at(0, MAX_LR, 0, 1) == pytest.approx(MAX_LR)  # a one-step run takes its step at the peak
