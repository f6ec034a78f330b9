"""LR range test: the grid, the recommendation rule, and a real sweep on a tiny model where lr 10 diverges."""

import math
from datetime import timedelta
from pathlib import Path

import torch
from conftest import TINY_MODEL

from nanoft.distributed import Dist, all_reduce_sum, wrap_model
from nanoft.lr_sweep import (
    SweepRow,
    SweepRun,
    lr_grid,
    lr_range_test,
    restartable_train_steps,
    run_lr_sweep,
    sweep_batch_count,
    sweep_table,
)
from nanoft.model import ModelConfig, Transformer
from tests.test_planner import write_tiny_run
from train import main as train_main

# conftest's tiny Llama at half the width, untied.
TINY = ModelConfig(**{**TINY_MODEL, "hidden_size": 32, "intermediate_size": 64, "tie_word_embeddings": False})


def test_grid_is_ten_x_spaced_around_the_default():
    assert lr_grid(2e-4) == [2e-6, 2e-5, 2e-4, 2e-3]
    assert lr_grid(5e-5) == [5e-7, 5e-6, 5e-5, 5e-4]


def test_sweep_uses_one_percent_of_the_data_but_at_least_a_few_batches():
    assert sweep_batch_count(10) == 4
    assert sweep_batch_count(2500) == 25


def test_divergence_rule():
    def diverged(losses, held_out_after=1.0):
        return SweepRow(1e-3, SweepRun(losses, 2.0, held_out_after), window=2).diverged

    assert diverged([2.0, 1.5, 1.4, math.nan])
    assert diverged([2.0, 2.2, 2.5, 2.6])  # the last pass ended above the first
    assert diverged([2.0, 2.2, 5.0, 1.0, 1.0, 1.1])  # spiked past twice the first loss on the way
    assert diverged([2.0, 1.8, 1.5])  # stopped (a NaN) before a second pass
    assert diverged([2.0, 1.8, 1.0, 0.8], held_out_after=2.1)  # memorised: worse on batches it did not see
    assert not diverged([2.0, 2.4, 1.5, 1.9])  # batch noise: the same batches each pass, both fell
    # A tiny lr: the train loss flat within noise (2e-6 on the built-in run: 3.5602 -> 3.5610), the held-out
    # loss a little lower. Not diverged: it ranks by its small drop.
    assert not diverged([3.56, 3.5604, 3.5606, 3.5614], held_out_after=1.99)


def run_with_drop(drop, losses=(3.0, 2.9, 2.5, 2.4)) -> SweepRun:
    return SweepRun(list(losses), 3.0, 3.0 - drop)


def test_recommends_the_largest_lr_whose_held_out_loss_falls_about_as_fast_as_the_best():
    runs = {  # two batches per pass; the drop is the held-out loss's
        1e-6: run_with_drop(0.01),
        1e-5: run_with_drop(1.0),  # best
        1e-4: run_with_drop(0.92),  # within 10% of the best and larger -> chosen
        1e-3: SweepRun([3.0, 6.2, 1.0, 0.9], 3.0, 1.0),  # spiked: diverged however low it ended
    }
    result = lr_range_test(lambda lr, n: runs[lr], default_lr=1e-4, n_steps=4, window=2, grid=list(runs))
    assert result.recommended_lr == 1e-4
    assert [row.diverged for row in result.rows] == [False, False, False, True]
    assert [round(row.drop, 3) for row in result.rows[:3]] == [0.01, 1.0, 0.92]
    table = sweep_table(result)
    assert "recommended lr 0.0001 (--lr 0.0001)" in table and "diverged" in table
    assert "3.0000 -> 2.0800" in table  # the held-out loss before and after, for the chosen row
    flat = lambda lr, n: SweepRun([3.0, 3.1], 3.0, 3.05)
    nothing = lr_range_test(flat, default_lr=1e-4, n_steps=2, window=1)
    assert nothing.recommended_lr is None and "no recommendation" in sweep_table(nothing)
    still = lambda lr, n: SweepRun([3.0, 3.001], 3.0, 3.001)  # too small to move: not diverged either
    unmoved = lr_range_test(still, default_lr=1e-4, n_steps=2, window=1)
    assert not any(row.diverged for row in unmoved.rows) and unmoved.recommended_lr is None
    assert sweep_table(unmoved).count("no drop") == len(unmoved.rows)


def test_a_choice_at_the_end_of_the_grid_widens_it_or_is_not_recommended():
    """The QA report: LoRA's sweep recommended 2e-3, the largest lr it tried, knowing nothing past it."""
    tried = []

    def train_steps(drop_of):
        def steps(lr, n):
            tried.append(lr)
            return (
                SweepRun([3.0, 9.0, 1.0, 1.0], 3.0, 1.0)
                if drop_of(lr) is None
                else run_with_drop(drop_of(lr))
            )

        return steps

    # Faster and faster up to 2e-3, then 2e-2 diverges: the widened grid puts 2e-3 inside, recommended.
    drops = {2e-6: 0.01, 2e-5: 0.1, 2e-4: 0.3, 2e-3: 0.6, 2e-2: None}
    result = lr_range_test(train_steps(drops.get), 2e-4, n_steps=4, window=2)
    assert tried == [2e-6, 2e-5, 2e-4, 2e-3, 2e-2] and result.recommended_lr == 2e-3
    assert [row.lr for row in result.rows] == tried and result.rows[-1].diverged
    # Always faster the larger the lr: two widenings (2e-2, 2e-1), still the edge: no recommendation.
    tried.clear()
    result = lr_range_test(train_steps(lambda lr: lr), 2e-4, n_steps=4, window=2)
    assert tried == [2e-6, 2e-5, 2e-4, 2e-3, 2e-2, 0.2] and result.recommended_lr is None
    assert "the largest lr tried (0.2) learned fastest" in sweep_table(result)
    # The smallest lr best: the grid widens downwards.
    tried.clear()
    result = lr_range_test(train_steps(lambda lr: 1e-4 / lr), 2e-4, n_steps=4, window=2)
    assert tried[4:] == [2e-7, 2e-8] and result.recommended_lr is None
    assert "the smallest lr tried (2e-08)" in result.reason
    # Never an lr of 1 or more: from 0.02 the grid stops at 0.2 (2.0 is not tried).
    tried.clear()
    lr_range_test(train_steps(lambda lr: lr), 2e-3, n_steps=4, window=2)
    assert max(tried) == 0.2


def test_real_sweep_on_a_tiny_model_never_recommends_a_divergent_lr():
    torch.manual_seed(0)
    model = Transformer(TINY)
    # A sequence the model can learn (each token predicts the next of a fixed cycle), in every batch.
    cycle = torch.randperm(TINY.vocab_size)
    batches, held_out = (
        [cycle.roll(shift).repeat(1, 2)[:, :32].repeat(4, 1) for shift in s] for s in (range(4), range(4, 6))
    )

    def loss_of_batch(model, ids):
        loss_sum, n_targets = model(ids[:, :-1], ids[:, 1:])
        return loss_sum / n_targets

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_steps = restartable_train_steps(model, batches, held_out, loss_of_batch)
    grid = lr_grid(1e-3) + [10.0]
    result = lr_range_test(train_steps, default_lr=1e-3, n_steps=12, window=4, grid=grid)
    print(sweep_table(result))
    assert [row.lr for row in result.rows] == grid
    assert all(len(row.losses) >= 1 for row in result.rows)
    assert result.rows[-1].diverged
    assert result.recommended_lr in (1e-3, 1e-2)
    # every lr started from the same weights (same first and held-out loss) and the model is left as it was
    assert len({round(row.losses[0], 5) for row in result.rows}) == 1
    assert len({round(row.run.held_out_before, 5) for row in result.rows}) == 1
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    for lr in grid:
        assert f"{lr:>10.2g}" in sweep_table(result)


def test_train_lr_sweep_prints_the_table_and_an_lr(tiny_model_dir, tmp_path, capsys):
    inputs = write_tiny_run(tmp_path, tiny_model_dir())
    train_main([*inputs, "--lr-sweep", "--batch-size", "4", "--out", str(tmp_path / "run")])
    printed = capsys.readouterr().out
    for lr in lr_grid(2e-4):  # LoRA's default, 10x apart
        assert f"{lr:>10.2g}" in printed
    assert "recommended lr" in printed or "no recommendation" in printed
    assert not (tmp_path / "run" / "summary.json").exists()  # nothing was trained
    assert not (tmp_path / "run" / "config.json").exists()  # so the run with the chosen lr may use this --out


def sweep_on_two_ranks(rank: int, store: str, out: str, agree: bool) -> None:
    """One of 2 gloo processes: the same tiny model under DDP; only rank 1's batches hold a token whose
    embedding is inf, so only its loss is NaN. Writes the rank's rows of the sweep to out/rank.pt."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    dist = Dist(
        rank=rank,
        local_rank=rank,
        world_size=2,
        device=torch.device("cpu"),
        is_main=rank == 0,
        backend="gloo",
    )
    torch.manual_seed(0)
    model = Transformer(TINY)
    with torch.no_grad():
        model.model.embed_tokens.weight[TINY.vocab_size - 1] = float("inf")
    model = wrap_model(model, dist)
    generator = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, TINY.vocab_size - 1, (2, 9), generator=generator) for _ in range(4)]
    if rank == 1:
        batches[0][0, 3] = TINY.vocab_size - 1
    mean_loss = lambda model, ids: (lambda s, n: s / n)(*model(ids[:, :-1], ids[:, 1:]))
    mean_over_ranks = (lambda loss: all_reduce_sum(loss.detach(), dist).item() / 2) if agree else None
    result = run_lr_sweep(
        model, batches, 1e-2, mean_loss, lambda p, lr: torch.optim.AdamW(p, lr=lr), None, mean_over_ranks
    )
    torch.save([row.losses for row in result.rows], Path(out) / f"{rank}.pt")
    torch.distributed.destroy_process_group()


def test_under_ddp_every_rank_stops_a_diverging_lr_at_the_same_step(tmp_path):
    """Rank 1's loss is NaN from the first step; with the loss averaged over ranks both ranks see it and stop
    every lr there, together (rank 1 stopping alone would leave rank 0 waiting in DDP's all-reduce)."""
    torch.multiprocessing.spawn(
        sweep_on_two_ranks, args=(str(tmp_path / "store"), str(tmp_path), True), nprocs=2
    )
    for rank in range(2):
        rows = torch.load(tmp_path / f"{rank}.pt")
        assert len(rows) == 4 and all(len(losses) == 1 and math.isnan(losses[0]) for losses in rows), rows
