"""nanoft/interruptions.py: a step that runs out of memory is retried with half the micro-batch and twice the
accumulation, and makes exactly the update the full step would have made; evaluation recovers too.

Batches are the ones data.Batches makes (padded, and packed with document ids); the failure is a real one
from torch's CPU allocator, asked for an impossible tensor by a forward hook whenever a forward sees more
rows than the "device" holds. The 2-rank cases are in tests/test_distributed.py, train.py under a real
address-space cap in tests/test_train.py.
"""

import weakref

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL

from nanoft.data_batches import Batches
from nanoft.data_cache import TokenizedExamples
from nanoft.distributed import setup_distributed
from nanoft.errors import UserError
from nanoft.interruptions import OOMRecovery, is_out_of_memory
from nanoft.loss import IGNORE_INDEX
from nanoft.model import ModelConfig, Transformer
from train import evaluate

# conftest's tiny Llama at half the width, untied.
TINY = ModelConfig(**{**TINY_MODEL, "hidden_size": 32, "intermediate_size": 64, "tie_word_embeddings": False})
ONE_PROCESS = setup_distributed(device="cpu")


def examples() -> TokenizedExamples:
    """24 examples of 4..15 tokens, the first two of each a prompt without targets (as data.py makes them)."""
    rng = np.random.default_rng(0)
    input_ids, targets = [], []
    for _ in range(24):
        ids = rng.integers(1, TINY.vocab_size, size=int(rng.integers(4, 16))).tolist()
        input_ids.append(ids)
        targets.append([IGNORE_INDEX, IGNORE_INDEX] + ids[3:] + [IGNORE_INDEX])
    return TokenizedExamples.from_lists(input_ids, targets, [f"x:{i}" for i in range(24)], seq_len=32)


def first_batches(n: int, batch_size: int, pack: bool) -> list[dict]:
    loader = iter(Batches(examples(), batch_size, pad_id=0, seed=0, pack=pack))
    return [next(loader) for _ in range(n)]


def device_that_holds_rows(model, max_rows):
    """A real allocator failure whenever a forward sees more rows than this 'device' can hold."""

    def allocate(module, args):
        if args[0].shape[0] > max_rows:
            torch.empty(2**60, dtype=torch.uint8)  # DefaultCPUAllocator: can't allocate memory

    return model.register_forward_pre_hook(allocate)


def forward_backward(model, n_targets, pieces):
    """train.py's forward_backward without the distributed and precision parts."""
    loss_sum_total = torch.zeros(())
    for piece in pieces:
        loss_sum, _ = model(
            piece["input_ids"], piece["targets"], piece["position_ids"], document_ids=piece["document_ids"]
        )
        (loss_sum / n_targets).backward()
        loss_sum_total += loss_sum.detach()
    return loss_sum_total


def train_step(model, optimizer, batches, recovery, log):
    n_targets = sum(int((batch["targets"] != IGNORE_INDEX).sum()) for batch in batches)
    attempt = lambda pieces: forward_backward(model, n_targets, pieces)
    drop_gradients = lambda: optimizer.zero_grad(set_to_none=True)
    loss_sum = recovery.run(
        attempt, batches, 0, ONE_PROCESS, sharded=False, log=log.append, before_retry=drop_gradients
    )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum.item() / n_targets


def test_out_of_memory_is_recognised_and_other_errors_are_not():
    with pytest.raises(RuntimeError) as caught:
        torch.empty(2**60, dtype=torch.uint8)
    assert is_out_of_memory(caught.value)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("could not create a primitive"))  # oneDNN's, seen under prlimit
    assert not is_out_of_memory(ValueError("bad shape"))


@pytest.mark.parametrize("pack", [False, True])
def test_split_keeps_every_row_and_target_of_a_real_batch(pack):
    (batch,) = first_batches(1, batch_size=3, pack=pack)
    assert (batch["document_ids"] is None) != pack  # unpacked batches carry None: the split crashed on it
    recovery = OOMRecovery(micro_batch=3, grad_accum=1)
    recovery.shrink(step=0)
    pieces = recovery.split(batch)
    assert [len(piece["input_ids"]) for piece in pieces] == [2, 1]
    T = batch["input_ids"].shape[1]
    for key in ("input_ids", "targets", "position_ids") + (("document_ids",) if pack else ()):
        # Each piece drops only trailing columns where it has no target: padded back, the batch again.
        fill = {"input_ids": 0, "targets": IGNORE_INDEX, "position_ids": 0, "document_ids": -1}[key]
        restored = torch.cat(
            [torch.nn.functional.pad(p[key], (0, T - p[key].shape[1]), value=fill) for p in pieces]
        )
        kept = batch["targets"] != IGNORE_INDEX if key != "targets" else slice(None)
        assert torch.equal(restored[kept], batch[key][kept]), key
    for piece in pieces:
        assert (piece["targets"][:, -1] != IGNORE_INDEX).any()  # trimmed to the last column with a target
        if not pack:
            assert piece["document_ids"] is None


@pytest.mark.parametrize("pack", [False, True])
def test_recovered_step_equals_the_step_that_fit(pack):
    batches = first_batches(2, batch_size=4, pack=pack)
    torch.manual_seed(0)
    reference = Transformer(TINY)
    model = Transformer(TINY)
    model.load_state_dict(reference.state_dict())
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    expected_loss = train_step(reference, reference_optimizer, batches, OOMRecovery(4, 2), log=[])
    hook = device_that_holds_rows(model, max_rows=1)
    recovery, log = OOMRecovery(micro_batch=4, grad_accum=2), []
    loss = train_step(model, optimizer, batches, recovery, log)
    hook.remove()

    assert (recovery.micro_batch, recovery.grad_accum) == (1, 8)  # 4 -> 2 -> 1, effective batch still 8
    assert log == [
        "step 0: out of memory at micro-batch 4; retrying the step with micro-batch 2 x accumulation 4 "
        "(effective batch unchanged)",
        "step 0: out of memory at micro-batch 2; retrying the step with micro-batch 1 x accumulation 8 "
        "(effective batch unchanged)",
    ]
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    for (name, expected), actual in zip(
        reference.state_dict().items(), model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_the_failed_attempt_is_freed_before_the_retry():
    """The first layer's output in the failed attempt is referenced by nothing but the exception's traceback;
    by the time the retry's forward starts, it is gone."""
    model = Transformer(TINY)
    optimizer = torch.optim.AdamW(model.parameters())
    failed_outputs, alive_at_retry = [], []

    def remember_output(module, args, output):
        hidden_states, _ = output  # a decoder layer returns them with its router logits (None: no experts)
        if hidden_states.shape[0] > 2:  # the attempt that will fail in layer 1
            failed_outputs.append(weakref.ref(hidden_states))

    def note_failed_outputs(module, args):
        alive_at_retry.extend(ref() is not None for ref in failed_outputs)

    model.model.layers[0].register_forward_hook(remember_output)
    model.model.layers[0].register_forward_pre_hook(note_failed_outputs)
    device_that_holds_rows(model.model.layers[1], max_rows=2)  # fails after layer 0 ran
    train_step(model, optimizer, first_batches(1, batch_size=4, pack=False), OOMRecovery(4, 1), log=[])
    assert len(failed_outputs) == 1 and alive_at_retry and not any(alive_at_retry)


def test_gives_up_with_advice_at_micro_batch_one():
    model = Transformer(TINY)
    optimizer = torch.optim.AdamW(model.parameters())
    device_that_holds_rows(model, max_rows=0)
    with pytest.raises(UserError, match="micro-batch 1.*--activation-checkpointing.*--plan"):
        train_step(model, optimizer, first_batches(1, batch_size=2, pack=False), OOMRecovery(2, 1), log=[])


def test_other_errors_propagate_unchanged():
    recovery = OOMRecovery(4, 8)

    def attempt(pieces):
        raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):
        recovery.run(attempt, first_batches(1, 4, pack=False), 0, ONE_PROCESS, sharded=False, log=print)
    assert (recovery.micro_batch, recovery.grad_accum) == (4, 8)


def test_fsdp_over_several_ranks_stops_with_the_advice_line():
    def attempt(pieces):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    recovery = OOMRecovery(4, 1)
    with pytest.raises(UserError, match="under FSDP.*--activation-checkpointing"):
        recovery.run(attempt, first_batches(1, 4, pack=False), 3, ONE_PROCESS, sharded=True, log=print)


@pytest.mark.parametrize("pack", [False, True])
def test_evaluation_recovers_at_a_big_micro_batch(pack):
    torch.manual_seed(0)
    model = Transformer(TINY)
    val_batches = Batches(examples(), 8, pad_id=0, shuffle=False, drop_last=False, pack=pack)
    plain = evaluate(
        model, val_batches, ONE_PROCESS, torch.autocast("cpu", enabled=False), OOMRecovery(8, 1), 0, print
    )
    hook = device_that_holds_rows(model, max_rows=3)
    recovery, log = OOMRecovery(8, 1, evaluation=True), []
    recovered = evaluate(
        model, val_batches, ONE_PROCESS, torch.autocast("cpu", enabled=False), recovery, 5, log.append
    )
    hook.remove()
    assert recovered == pytest.approx(plain, rel=1e-6)
    assert recovery.micro_batch == 2
    assert (
        log[0]
        == "evaluation at step 5: out of memory at micro-batch 8; evaluating with micro-batch 4 from here on"
    )
