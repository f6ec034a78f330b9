"""OOM recovery: a step that runs out of memory is retried with half the micro-batch and twice the
accumulation, and makes exactly the update the full step would have made."""

import pytest
import torch

from nanoft.errors import UserError
from nanoft.interruptions import OOMRecovery, is_out_of_memory
from nanoft.loss import IGNORE_INDEX
from nanoft.model import ModelConfig, Transformer

TINY = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def device_that_holds_rows(model, max_rows):
    """A real allocator failure whenever a forward sees more rows than this 'device' can hold."""

    def allocate(module, args):
        if args[0].shape[0] > max_rows:
            torch.empty(2**60, dtype=torch.uint8)  # DefaultCPUAllocator: can't allocate memory

    return model.register_forward_pre_hook(allocate)


def train_step(model, optimizer, batches, recovery, step, log):
    """One optimizer step with OOM recovery, the way train.py's loop uses it."""
    n_targets = sum((batch["targets"] != IGNORE_INDEX).sum() for batch in batches)
    while True:
        try:
            for batch in batches:
                for piece in recovery.split(batch):
                    loss_sum, _ = model(piece["input_ids"], piece["targets"])
                    (loss_sum / n_targets).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return
        except Exception as error:
            log.append(recovery.handle(error, step, optimizer))


def make_batches(n_batches, rows):
    torch.manual_seed(1)
    ids = torch.randint(0, TINY.vocab_size, (n_batches, rows, 17))
    return [{"input_ids": b[:, :-1], "targets": b[:, 1:], "sample_ids": list(range(rows))} for b in ids]


def test_out_of_memory_is_recognised_and_other_errors_are_not():
    with pytest.raises(RuntimeError) as caught:
        torch.empty(2**60, dtype=torch.uint8)
    assert is_out_of_memory(caught.value)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(ValueError("bad shape"))


def test_recovered_step_equals_the_step_that_fit():
    batches = make_batches(n_batches=2, rows=4)
    torch.manual_seed(0)
    reference = Transformer(TINY)
    model = Transformer(TINY)
    model.load_state_dict(reference.state_dict())
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    train_step(reference, reference_optimizer, batches, OOMRecovery(4, 2), step=0, log=[])
    hook = device_that_holds_rows(model, max_rows=1)
    recovery, log = OOMRecovery(micro_batch=4, grad_accum=2), []
    train_step(model, optimizer, batches, recovery, step=0, log=log)
    hook.remove()

    assert (recovery.micro_batch, recovery.grad_accum) == (1, 8)  # 4 -> 2 -> 1, effective batch still 8
    assert log == [
        "step 0: out of memory at micro-batch 4; retrying the step with micro-batch 2 x accumulation 4 "
        "(effective batch unchanged)",
        "step 0: out of memory at micro-batch 2; retrying the step with micro-batch 1 x accumulation 8 "
        "(effective batch unchanged)",
    ]
    for (name, expected), actual in zip(
        reference.state_dict().items(), model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_gives_up_with_advice_at_micro_batch_one():
    model = Transformer(TINY)
    optimizer = torch.optim.AdamW(model.parameters())
    device_that_holds_rows(model, max_rows=0)
    with pytest.raises(UserError, match="micro-batch 1.*--activation-checkpointing.*--plan"):
        train_step(model, optimizer, make_batches(1, 2), OOMRecovery(2, 1), step=7, log=[])


def test_other_errors_propagate_unchanged():
    recovery = OOMRecovery(4, 8)
    with pytest.raises(ValueError, match="not memory"):
        recovery.handle(ValueError("not memory"), 0, torch.optim.SGD([torch.zeros(1, requires_grad=True)]))
    assert (recovery.micro_batch, recovery.grad_accum) == (4, 8)


def test_split_cuts_every_field_along_rows():
    recovery = OOMRecovery(micro_batch=3, grad_accum=1)
    recovery.handle(torch.OutOfMemoryError("CUDA out of memory"), 0, torch.optim.SGD([torch.zeros(1)]))
    batch = make_batches(1, 3)[0]
    pieces = recovery.split(batch)
    assert [len(p["input_ids"]) for p in pieces] == [2, 1]
    assert [p["sample_ids"] for p in pieces] == [[0, 1], [2]]
    assert torch.equal(torch.cat([p["targets"] for p in pieces]), batch["targets"])
