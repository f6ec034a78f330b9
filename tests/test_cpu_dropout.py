"""nanoft/cpu_dropout.py: the cheaper CPU mask is still dropout: the share dropped, the scale, the seed."""

import torch

from nanoft.cpu_dropout import CPUFriendlyDropout


def test_drops_the_share_p_and_scales_the_rest_like_nn_dropout():
    dropout = CPUFriendlyDropout(0.25).train()
    x = torch.randn(256, 1024)
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01  # 262,144 draws: the share is within 1% of 1 - p
    torch.testing.assert_close(y[kept], x[kept] / 0.75)  # survivors scaled by 1 / (1 - p), as nn.Dropout
    assert kept.any(dim=0).all() and (~kept).any(dim=0).all()  # no column always kept or always dropped


def test_same_seed_same_mask_and_eval_is_the_identity():
    dropout, x = CPUFriendlyDropout(0.1).train(), torch.randn(8, 300)
    torch.manual_seed(0)
    first = dropout(x)
    torch.manual_seed(0)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(dropout(x), first)  # the stream moved on: the next mask differs
    assert torch.equal(dropout.eval()(x), x)


def test_bf16_inputs_keep_their_dtype():
    dropout, x = CPUFriendlyDropout(0.5).train(), torch.randn(4, 64, dtype=torch.bfloat16)
    y = dropout(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y[y != 0], x[y != 0] * 2)
