"""The sparse mixture-of-experts block of Mixtral and Qwen3-MoE, and the router's load-balancing loss.

    moe = SparseMoE(config, experts=[MLP(...) for _ in range(config.num_experts)])   # model.py builds it
    y, router_logits = moe(x)                 # (B, T, C), (B*T, num_experts)
    aux = load_balancing_loss([router_logits, ...], config.num_experts_per_tok, token_mask)

Token choice: a linear router scores every expert for each token, each token goes to its top k experts, and
its output is their outputs weighted by the softmax probabilities (renormalised over the k where the family
does). The experts are ordinary gated MLPs, one module each under the checkpoint's names
(`experts.3.w1` ...), so checkpoints load as they are and lora.py / quant.py swap their nn.Linears like any
other. Dispatch groups the (token, expert) pairs by expert and runs each expert once on all of its tokens:
a loop over experts, never over tokens.
"""

import torch
import torch.nn.functional as F
from torch import nn


class SparseMoE(nn.Module):
    def __init__(self, config, experts: list[nn.Module]):
        super().__init__()
        # The router; Hugging Face calls it `gate` (not an MLP's gate_proj).
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(experts)
        self.top_k, self.normalise_top_k = config.num_experts_per_tok, config.norm_topk_prob
        self.jitter_noise = config.router_jitter_noise

    def route(self, router_logits):
        """(N, k) weights (fp32) and indices of each token's top-k experts. Softmax in fp32, as transformers
        does: bf16 probabilities would tie and pick other experts."""
        probabilities = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probabilities, self.top_k, dim=-1)
        if self.normalise_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, chosen

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C)
        if self.training and self.jitter_noise > 0:  # Mixtral's multiplicative jitter on the router's input
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        router_logits = self.gate(x)  # (N, experts)
        weights, chosen = self.route(router_logits)  # (N, k), (N, k)

        # The N * k (token, expert) pairs sorted by expert: each expert's tokens are one contiguous slice.
        order = chosen.flatten().argsort(stable=True)  # (N * k,) positions in the flattened (N, k)
        tokens = order // self.top_k  # the token of each pair, grouped by expert
        per_expert = torch.bincount(chosen.flatten(), minlength=len(self.experts)).tolist()  # one device sync
        grouped = x[tokens].split(per_expert)
        # In training every expert runs, on no tokens if none chose it, so each of its weights has a
        # gradient (zero) and DDP, which expects one for every trainable parameter, does not wait for it.
        # Decoding skips them (most experts, one token at a time; a 4-bit linear costs as much on none).
        outputs = torch.cat(
            [
                expert(tokens_in)
                for expert, tokens_in in zip(self.experts, grouped, strict=True)
                if len(tokens_in) or torch.is_grad_enabled()
            ]
        )
        # Weighted in fp32 and added back at each token's row (its k outputs, in expert order).
        weighted = (outputs * weights.flatten()[order, None]).to(x.dtype)  # (N * k, C)
        y = torch.zeros_like(x).index_add_(0, tokens, weighted)
        return y.view(B, T, C), router_logits


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, token_mask=None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss as transformers computes it (`load_balancing_loss_func`): the
    number of experts times the sum over experts of (the share of top-k choices it got) x (its mean router
    probability), both taken over the tokens of all MoE layers together. Minimal (1) when load is even.

    router_logits: each MoE layer's (N, experts); token_mask: (B, T) with N = B * T, False on padding (the
    attention mask in transformers), or None to count every token."""
    num_experts = router_logits[0].shape[-1]
    device = router_logits[0].device
    counted = torch.ones(router_logits[0].shape[0], device=device) if token_mask is None else token_mask
    counted = counted.reshape(-1).float()  # (N,)
    choices = torch.zeros(num_experts, device=device)  # top-k choices per expert, summed over layers
    probability = torch.zeros(num_experts, device=device)  # router probabilities per expert, summed
    rows = 0.0
    for logits in router_logits:
        # In the logits' dtype, like transformers (the routing itself uses fp32).
        probabilities = F.softmax(logits, dim=-1)
        chosen = torch.topk(probabilities, top_k, dim=-1).indices  # (N, k)
        choices = choices.scatter_add(0, chosen.flatten(), counted.repeat_interleave(top_k))
        probability = probability + (probabilities.float() * counted[:, None]).sum(dim=0)
        rows = rows + counted.sum()
    return num_experts * torch.sum((choices / rows) * (probability / rows))
