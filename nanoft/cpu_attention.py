"""Causal attention on CPU with plain batched matmuls, which run near the CPU's matmul peak.

    y = grouped_attention(q, k, v, bias, scale)   # q (B, H, T, D), k, v (B, KVH, S, D), bias (B|1, 1, T, S)
    y = grouped_attention(q, k, v, bias, scale, softcap=50.0)   # Gemma 2's capped scores (SDPA has none)

SDPA's CPU flash kernel works in small tiles, and its backward is far from matmul speed: it took a fifth of a
LoRA step of SmolLM2-135M at 4 x 256 tokens. Two ways round it, chosen by size:
- short sequences keep the (B, H, T, S) softmax probabilities for backward, as autograd would: about half
  SDPA's time at 4 x 256 (bench/levers.py);
- long ones go through query blocks and recompute each block's probabilities in backward, flash attention's
  trade made with blocks big enough for fast matmuls: memory O(T) like SDPA, and at 1 x 2048 in bf16 about
  0.65x SDPA's time per layer, forward and backward (bench/attention.py). In fp32 SDPA stays faster there,
  so fp32 long sequences go to SDPA (`uses_matmul_attention`).
Both skip what the causal mask hides: a query block looks only at the keys up to its last query.
"""

import torch

# Keep the probabilities when B x heads x T x S is at most this: 8 MB of bf16 per layer.
CPU_ATTENTION_SCORES = 2**22
BLOCK_QUERIES = 128  # 128 and 256 were equal at 1 x 2048 and 1 x 4096; 512 slower (bench/attention.py)


def uses_matmul_attention(device_type: str, element_bytes: int, batch, heads, queries, keys) -> bool:
    """Whether the model computes attention here rather than with SDPA: on CPU in bf16 and fp16 always, in
    fp32 only while the probabilities are kept (SDPA's fp32 kernel beats the blocks: 1.2x their speed at
    1 x 2048 in bench/attention.py)."""
    if device_type != "cpu":
        return False
    return element_bytes < 4 or keeps_attention_probabilities(batch, heads, queries, keys)


def keeps_attention_probabilities(batch: int, heads: int, queries: int, keys: int) -> bool:
    """Whether grouped_attention keeps the probabilities for backward (else it recomputes them)."""
    return batch * heads * queries * keys <= CPU_ATTENTION_SCORES


def grouped_attention(q, k, v, bias, scale: float, softcap: float | None = None):
    """softmax(cap(q k^T * scale) + bias) v, cap(s) = softcap * tanh(s / softcap) when softcap is given. bias
    holds 0 (may look) and -inf (may not) and is at least causal when S = T (no cache): the queries up to t
    never look past key t. Returns (B, H, T, D)."""
    B, H, T, _ = q.shape
    S = k.shape[2]
    if S != T or T < 2:
        return _grouped_attention(q, k, v, bias, scale, softcap)
    if not keeps_attention_probabilities(B, H, T, S):
        return _BlockwiseAttention.apply(q, k, v, bias, scale, softcap)
    # The first half of the queries may not look at the second half of the keys: computing the halves apart
    # skips that masked quarter of the matmuls, softmax and kept probabilities.
    half = T // 2
    v = v.contiguous()  # then both halves read it through views, not copies
    first = _grouped_attention(
        q[:, :, :half], k[:, :, :half], v[:, :, :half], bias[..., :half, :half], scale, softcap
    )
    second = _grouped_attention(q[:, :, half:], k, v, bias[..., half:, :], scale, softcap)
    return torch.cat((first, second), dim=2)


def _grouped_attention(q, k, v, bias, scale, softcap):
    B, H, T, D = q.shape
    _, _, probs, _ = _probabilities(q, k, bias, scale, softcap)
    n_kv_heads, S = k.shape[1], k.shape[2]
    return (probs @ v.reshape(B * n_kv_heads, S, D)).view(B, H, T, D)


def _probabilities(q, k, bias, scale, softcap):
    """The query heads that share a key/value head are stacked along time: one (G*T, D) x (D, S) matmul per
    key/value head instead of G, and no copies of k. Returns the stacked scaled q (B*KVH, G*T, D), k
    (B*KVH, S, D), the probabilities (B*KVH, G*T, S), bf16 in and out of a softmax summed in fp32, and the
    capped scores' tanh (None without softcap), which backward needs: d cap(s) / ds = 1 - tanh^2."""
    B, H, T, D = q.shape
    n_kv_heads, S = k.shape[1], k.shape[2]
    group = H // n_kv_heads
    q = (q * scale).reshape(B * n_kv_heads, group * T, D)
    k = k.reshape(B * n_kv_heads, S, D)
    scores = (q @ k.transpose(1, 2)).view(B, n_kv_heads, group, T, S)
    tanh = None
    if softcap is not None:  # before the mask, as Gemma 2 does
        tanh = torch.tanh(scores / softcap)
        scores = tanh * softcap
    probs = torch.softmax(scores + bias[:, :, None], dim=-1)
    return q, k, probs.view(B * n_kv_heads, group * T, S), tanh


def _query_blocks(T: int):
    """(start, end) of each block of queries; block [start, end) looks at keys [0, end)."""
    return [(start, min(start + BLOCK_QUERIES, T)) for start in range(0, T, BLOCK_QUERIES)]


class _BlockwiseAttention(torch.autograd.Function):
    """grouped_attention a block of queries at a time; keeps q, k, v and the bias, not the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale, softcap):
        v = v.contiguous()
        y = torch.empty_like(q)
        for start, end in _query_blocks(q.shape[2]):
            block_bias = bias[..., start:end, :end]
            y[:, :, start:end] = _grouped_attention(
                q[:, :, start:end], k[:, :, :end], v[:, :, :end], block_bias, scale, softcap
            )
        ctx.save_for_backward(q, k, v, bias)
        ctx.scale, ctx.softcap = scale, softcap
        return y

    @staticmethod
    def backward(ctx, grad_y):
        q, k, v, bias = ctx.saved_tensors
        B, H, _, D = q.shape
        n_kv_heads = k.shape[1]
        grad_q = torch.empty_like(q)
        # k and v gather a gradient from every block below them: summed in fp32, rounded once.
        grad_k = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for start, end in _query_blocks(q.shape[2]):
            n = end - start
            q_block, k_block, probs, tanh = _probabilities(
                q[:, :, start:end], k[:, :, :end], bias[..., start:end, :end], ctx.scale, ctx.softcap
            )
            grad_y_block = grad_y[:, :, start:end].reshape(B * n_kv_heads, H // n_kv_heads * n, D)
            grad_v[:, :, :end] += (probs.transpose(1, 2) @ grad_y_block).view(B, n_kv_heads, end, D)
            grad_probs = grad_y_block @ v[:, :, :end].reshape(B * n_kv_heads, end, D).transpose(1, 2)
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            if tanh is not None:
                grad_scores = grad_scores * (1 - tanh.square()).view(grad_scores.shape)
            grad_q[:, :, start:end] = (grad_scores @ k_block).view(B, H, n, D) * ctx.scale
            grad_k[:, :, :end] += (grad_scores.transpose(1, 2) @ q_block).view(B, n_kv_heads, end, D)
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None
