"""nanoft/cpu_attention.py against float64 references: outputs and gradients, both of its ways (probabilities
kept, and recomputed block by block), with causal, padding, packed-document and sliding-window masks, grouped
heads, and Gemma 2's soft-capped scores."""

import pytest
import torch
import torch.nn.functional as F

from nanoft.cpu_attention import BLOCK_QUERIES, grouped_attention, keeps_attention_probabilities

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def allowed_keys(kind: str, batch: int, T: int) -> torch.Tensor:
    """(B, 1, T, T) bool, as nanoft.model builds them: causal, plus padding or documents; each query sees
    itself."""
    allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(batch, T, T).clone()
    if kind == "padding":  # row 0 left-padded, row 1 right-padded
        real = torch.ones(batch, T, dtype=torch.bool)
        real[0, : T // 3] = False
        real[1, -T // 5 :] = False
        allowed &= real[:, None, :]
    if kind == "documents":  # row 0: three documents, row 1: two
        documents = torch.zeros(batch, T, dtype=torch.long)
        documents[0, T // 4 :] = 1
        documents[0, T // 2 + 7 :] = 2
        documents[1, T - 200 :] = 1
        allowed &= documents[:, :, None] == documents[:, None, :]
    if kind == "window":  # a sliding layer: each query sees its last 40 keys
        positions = torch.arange(T)
        allowed &= positions[None, :] > positions[:, None] - 40
    return (allowed | torch.eye(T, dtype=torch.bool))[:, None]


def eager_attention(q, k, v, allowed, scale, softcap):
    """The reference the way transformers' eager attention computes it (Gemma 2's when softcap is set)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("kind", ["causal", "padding", "documents", "window"])
@pytest.mark.parametrize("T", [96, 1100])  # 96: probabilities kept; 1100: blocks, the last one partial
def test_outputs_and_gradients_equal_the_reference(kind, T, softcap):
    batch = 2
    assert keeps_attention_probabilities(batch, HEADS, T, T) == (T == 96)
    assert T == 96 or T % BLOCK_QUERIES != 0
    torch.manual_seed(0)
    q = torch.randn(batch, HEADS, T, HEAD_DIM)
    k, v = (torch.randn(batch, KV_HEADS, T, HEAD_DIM) for _ in range(2))
    grad_y = torch.randn(batch, HEADS, T, HEAD_DIM)
    allowed = allowed_keys(kind, batch, T)
    bias = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))

    def outputs_and_gradients(attention, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        y = attention(*inputs)
        y.backward(grad_y.to(dtype))
        return [y, *(t.grad for t in inputs)]

    scale = 0.3  # not head_dim ** -0.5: Gemma 2 and Granite set their own
    ours = outputs_and_gradients(
        lambda q, k, v: grouped_attention(q, k, v, bias, scale, softcap), torch.float32
    )
    reference = outputs_and_gradients(
        lambda q, k, v: eager_attention(q, k, v, allowed, scale, softcap), torch.float64
    )
    for name, mine, expected in zip(["y", "dq", "dk", "dv"], ours, reference, strict=True):
        torch.testing.assert_close(mine, expected.float(), rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_blocks_stay_within_a_percent_of_float64():
    """In bf16 the blocks add k's and v's gradients over the blocks in fp32, rounding once."""
    T, batch = 1100, 1
    torch.manual_seed(0)
    q = torch.randn(batch, HEADS, T, HEAD_DIM)
    k, v = (torch.randn(batch, KV_HEADS, T, HEAD_DIM) for _ in range(2))
    allowed = allowed_keys("causal", batch, T)
    bf16 = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    bias = torch.zeros(allowed.shape, dtype=torch.bfloat16).masked_fill_(~allowed, float("-inf"))
    grouped_attention(*bf16, bias, HEAD_DIM**-0.5).sum().backward()
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*exact, attn_mask=allowed, enable_gqa=True).sum().backward()
    for name, low, high in zip(["dq", "dk", "dv"], bf16, exact, strict=True):
        relative = (low.grad.double() - high.grad).norm() / high.grad.norm()
        assert relative < 0.01, (name, float(relative))
