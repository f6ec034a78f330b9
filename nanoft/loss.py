"""Cross-entropy over a large vocabulary without materialising full fp32 logits.

    loss_sum, n_targets = chunked_cross_entropy(hidden, lm_head_weight, targets)
    loss_sum, n_targets = chunked_cross_entropy(hidden, weight, targets, logits_scaling=8.0)  # Granite
    loss_sum, n_targets = chunked_cross_entropy(hidden, weight, targets, softcap=30.0)  # Gemma 2

A 49,152-word vocabulary at 4 x 2048 tokens is 1.6 GB of fp32 logits, plus as much again for their gradient.
Here the logits exist one chunk of rows at a time: each chunk's softmax gradient is computed right away in the
forward pass (it is `softmax - one_hot`, no need to keep the logits for backward) and multiplied back into
gradients for the hidden states and, when it is trained, the lm_head weight. Only positions that have a target
are projected at all, so masked prompt tokens cost nothing here.

The chunk stays in the compute dtype: softmax reads bf16 logits, sums in fp32 and writes bf16 probabilities,
which are the gradient's input anyway. That is 3 passes over the chunk where upcasting to fp32 and calling
logsumexp took about 10 (measured in bench/loss_vocab.py; on CPU these passes, not the matmuls, were the
cost).
The log-normaliser comes from the largest probability, which never underflows (it is >= 1/vocab):
logsumexp = max_logit - log(p_max). In bf16 that is exact to about +-0.004 per token (one rounding of p_max);
in fp32 to float precision.
Families that reshape their logits (Granite divides them, Gemma 2 caps them with tanh) have it done to each
chunk, and its derivative folded into the chunk's gradient, here as in `final_logits`.
"""

import torch

IGNORE_INDEX = -100
# A chunk holds at least this many logits (rows x vocabulary: 16 MB of bf16, and as much for their
# probabilities; x8 when lm_head's gradient is wanted, see rows_per_chunk)...
LOGITS_PER_CHUNK = 2**23
WEIGHT_GRAD_CHUNK_FACTOR = 8
# ...and at least this many rows, whichever is more. Each chunk's two matmuls read the whole (V, C) weight
# (on CPU oneDNN repacks it too: ~55 ms a matmul for Llama-3.2-1B's 525 MB lm_head), so a large vocabulary's
# thin chunks (65 rows at 128k words, 32 at Gemma's 256k) were bound by that: 1.1-1.8x the time of 256 rows,
# past which the gain was within noise and the memory doubles each time (bench/loss_vocab.py --min-rows;
# bench/README). A GPU wants as many rows for the same reason: fewer leave its matmuls waiting on the reads.
MIN_ROWS_PER_CHUNK = 256


def final_logits(logits, logits_scaling: float = 1.0, softcap: float | None = None):
    """The model's logits from lm_head's output: divided by logits_scaling (Granite), then capped to
    softcap * tanh(logits / softcap) (Gemma 2), as transformers does."""
    if logits_scaling != 1:
        logits = logits / logits_scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def chunked_cross_entropy(hidden, weight, targets, logits_scaling: float = 1.0, softcap: float | None = None):
    """hidden (B, T, C), weight (V, C), targets (B, T) with -100 = ignore -> (fp32 loss sum, int64 count), the
    logits shaped as `final_logits` does."""
    keep = targets != IGNORE_INDEX
    n_targets = keep.sum()
    hidden = hidden[keep]  # (N, C): only the positions that are scored
    # Under no_grad (eval) autograd still reports inputs as needing grads: skip the gradient work ourselves.
    grad_enabled = torch.is_grad_enabled()
    wanted = (grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad)
    shaping = (logits_scaling, softcap)
    return _ChunkedCrossEntropy.apply(hidden, weight, targets[keep], wanted, shaping), n_targets


def rows_per_chunk(vocab_size: int, want_grad_weight: bool) -> int:
    """Positions whose logits are computed at once (nanoft/memory.py counts one such chunk).

    With the weight's gradient wanted (a full fine-tune), every chunk adds a whole (V, C) product to the fp32
    gradient: 45 ms of casting and adding per chunk at SmolLM2's size, so fewer, larger chunks."""
    logits_per_chunk = LOGITS_PER_CHUNK * (WEIGHT_GRAD_CHUNK_FACTOR if want_grad_weight else 1)
    return max(MIN_ROWS_PER_CHUNK, logits_per_chunk // vocab_size)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, wanted, shaping):
        want_grad_hidden, want_grad_weight = wanted
        grad_hidden = torch.empty_like(hidden) if want_grad_hidden else None
        grad_weight = None  # fp32, the sum of every chunk's product
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ctx.weight_dtype = weight.dtype
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            # Cast the (fp32 master) weight once: autocast would cast it again for each matmul below, since
            # it caches only casts of the parameter itself, not of views such as weight.t().
            compute_dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
        chunk_rows = rows_per_chunk(weight.shape[0], want_grad_weight)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows]  # (n, C)
            t = targets[start : start + chunk_rows]  # (n,)
            rows = torch.arange(len(t), device=t.device)
            logits = h @ weight.t()  # (n, V) in the compute dtype, like the reference's matmul
            matmul_dtype = logits.dtype  # bf16 under autocast even when the weights are fp32
            if logits.dtype == torch.float16:
                logits = logits.float()  # fp16 probabilities of 1/vocab would be subnormal: keep fp32 there
            logits_scaling, softcap = shaping
            if logits_scaling != 1:
                logits.div_(logits_scaling)
            if softcap is not None:
                logits.div_(softcap).tanh_().mul_(softcap)
            largest, largest_at = logits.max(dim=-1)  # (n,)
            probs = torch.softmax(logits, dim=-1)  # (n, V), accumulated in fp32 whatever the dtype
            log_normaliser = largest.float() - probs[rows, largest_at].float().log()  # logsumexp of each row
            loss_sum += (log_normaliser - logits[rows, t].float()).sum()
            if not (want_grad_hidden or want_grad_weight):
                continue
            probs[rows, t] -= 1.0  # d loss / d logits = softmax - one_hot
            if softcap is not None:  # d cap(z) / dz = 1 - tanh(z / cap)^2, made in place of the logits
                probs.mul_(logits.div_(softcap).square_().neg_().add_(1))
            if logits_scaling != 1:
                probs.div_(logits_scaling)
            grad_logits = probs.to(matmul_dtype)
            if want_grad_hidden:
                grad_hidden[start : start + chunk_rows] = grad_logits @ weight
            if want_grad_weight:
                chunk = (grad_logits.t() @ h).float()
                grad_weight = chunk if grad_weight is None else grad_weight.add_(chunk)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None
