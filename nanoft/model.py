"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) in plain PyTorch.

    config = ModelConfig.from_hf(json.load(open("config.json")))
    model = Transformer(config)
    logits = model(input_ids)                            # (B, T, vocab)
    loss_sum, n_targets = model(input_ids, targets)      # summed over targets != -100

Parameter names are exactly Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so checkpoints
load without renaming and lora.py / quant.py can swap any `nn.Linear` by walking `named_modules()`.
Loading and saving Hugging Face directories lives in nanoft/weights.py.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanoft.cpu_attention import grouped_attention, uses_matmul_attention
from nanoft.errors import UserError
from nanoft.loss import chunked_cross_entropy

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    """The subset of a Hugging Face `config.json` that defines the architecture."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = multi-head attention (no GQA)
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    sliding_window: int | None = None  # Mistral v0.1: each token sees only the last `sliding_window` tokens
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"model_type '{self.model_type}' is not supported; "
                f"nanoft supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.model_type == "qwen2":
            self.attention_bias = True  # Qwen2 always has q/k/v biases; its config.json does not say so
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UserError(
                    f"rope scaling '{rope_type}' is not supported; "
                    f"nanoft supports {', '.join(SUPPORTED_ROPE_TYPES)}"
                )
            self.rope_scaling = {**self.rope_scaling, "rope_type": rope_type}
            if rope_type == "default":
                self.rope_scaling = None

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Read a Hugging Face config dict (transformers 4 or 5 layout)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in hf.items() if k in known}
        # transformers 5 moves rope_theta and rope_scaling into one `rope_parameters` dict.
        rope_parameters = hf.get("rope_parameters")
        if isinstance(rope_parameters, dict):
            values["rope_theta"] = rope_parameters.get("rope_theta", values.get("rope_theta", 10000.0))
            if rope_parameters.get("rope_type", "default") != "default":
                values["rope_scaling"] = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        if hf.get("model_type") == "qwen2":
            if not hf.get("use_sliding_window", False):
                values["sliding_window"] = None
        if hf.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"model_type '{hf.get('model_type')}' is not supported; "
                f"nanoft supports {', '.join(SUPPORTED_MODEL_TYPES)} (Llama 2/3, Mistral, Qwen2, SmolLM)"
            )
        # The MLP here is SwiGLU without biases: anything else would load and quietly compute the wrong thing.
        if hf.get("hidden_act", "silu") not in ("silu", "swish"):
            raise UserError(f"hidden_act '{hf['hidden_act']}' is not supported; nanoft's MLP uses silu")
        if hf.get("mlp_bias", False):
            raise UserError("mlp_bias: true is not supported; nanoft's MLP has no biases")
        return cls(**values)

    def to_hf(self) -> dict:
        """A config.json dict that transformers loads."""
        hf = {f.name: getattr(self, f.name) for f in fields(self)}
        hf["architectures"] = [
            {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
                self.model_type
            ]
        ]
        hf["hidden_act"] = "silu"
        if self.model_type == "qwen2":
            del hf["attention_bias"]
            hf["use_sliding_window"] = self.sliding_window is not None
        if self.model_type == "llama":
            del hf["sliding_window"]
            hf["mlp_bias"] = False
        return hf


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class _RMSNormFunction(torch.autograd.Function):
    """weight * (x / rms(x)), normalised in fp32 and cast back before the weight, as the reference does.

    Written out for memory: autograd of those seven small ops saves x in fp32; this saves x as it came (bf16)
    plus one fp32 number per row (72 MB less in a SmolLM2 LoRA step at 4 x 256), at the same speed
    (bench/levers.py).
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        # bf16 * fp32 computes in fp32, so x is never copied to fp32 as a whole.
        rstd = torch.rsqrt(
            torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32) ** 2 / x.shape[-1] + eps
        )
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x * rstd  # (..., C) fp32
        grad_normed = (grad * weight).float()
        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed)), all in fp32
        mean_dot = torch.linalg.vecdot(grad_normed, normed, dim=-1).unsqueeze(-1) / x.shape[-1]
        grad_x = (torch.addcmul(grad_normed, normed, mean_dot, value=-1) * rstd).to(x.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    interpolated = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return torch.where(is_medium, interpolated, scaled)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Keys and values of every layer for incremental decoding: fixed size, filled left to right."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype, device):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # tokens already stored

    def update(self, layer: int, k, v):
        end = self.length + k.shape[2]
        if end > self.keys.shape[3]:
            raise UserError(f"KV cache holds {self.keys.shape[3]} tokens; asked for {end}")
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # q * cos + rotate_half(q) * sin in one kernel less; with the contiguous term first the result is
        # contiguous in (B, H, T, D), which the attention below can reshape without a copy.
        q = torch.addcmul(rotate_half(q) * sin, q, cos)
        k = torch.addcmul(rotate_half(k) * sin, k, cos)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)  # (B, KVH, S, D), S = cached + T
        if mask is not None and mask.is_floating_point():
            y = grouped_attention(q, k, v, mask)
        else:
            group = self.n_heads // self.n_kv_heads
            if group > 1 and q.is_cuda and not cuda_sdpa_shares_kv_heads(q.dtype, self.head_dim, mask):
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, S, D)
                group = 1
            # enable_gqa lets SDPA share each key/value head across its query heads without copying them.
            # No mask means causal; a single new token after a cache sees every cached key, so no mask at all.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=group > 1
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def cuda_sdpa_shares_kv_heads(dtype: torch.dtype, head_dim: int, mask) -> bool:
    """Whether SDPA on CUDA runs grouped-query attention in a fused kernel as it is. Only flash attention
    shares key/value heads (fp16/bf16, head_dim <= 256, no mask); otherwise, a packed or sliding-window mask
    above all, SDPA falls back to its math kernel, whose (B, H, T, S) scores take O(T^2) memory. Repeating
    k and v per query head (O(T)) lets the memory-efficient kernel, which takes masks, run instead."""
    return mask is None and dtype in (torch.float16, torch.bfloat16) and head_dim <= 256


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(_SwiGLUFunction.apply(self.gate_proj(x), self.up_proj(x)))


class _SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up. Autograd would keep gate, up and silu(gate) for backward; this keeps gate and up and
    recomputes silu(gate), one (B, T, intermediate) tensor less per layer (90 MB of a SmolLM2 LoRA step at
    4 x 256 tokens) for one more elementwise kernel."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)  # the fused kernel autograd uses for silu
        return grad_gate, grad * F.silu(gate)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Hugging Face's `model.` prefix: embeddings, decoder layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("rope_inv_freq", rope_inverse_frequencies(config), persistent=False)
        self.activation_checkpointing = False  # recompute each layer in backward: less memory, ~30% more time

    def reset_rope(self, device=None):
        """Recompute the RoPE frequencies (they are not in checkpoints; needed after building on meta)."""
        self.rope_inv_freq = rope_inverse_frequencies(self.config).to(device or self.lm_head.weight.device)

    def forward(
        self,
        input_ids,
        targets=None,
        position_ids=None,
        attention_mask=None,
        document_ids=None,
        kv_cache=None,
    ):
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        # Under autocast (full fine-tunes) x is fp32 but q and k come out of the matmuls in bf16: build cos,
        # sin and the attention bias in bf16 too, or every q * cos would promote the attention to fp32.
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        cos, sin = self._rope(position_ids, dtype)
        mask = self._attention_mask(B, T, past, attention_mask, document_ids, input_ids.device)
        heads = self.config.num_attention_heads
        if uses_matmul_attention(device_type, dtype.itemsize, B, heads, T, past + T):  # faster than SDPA here
            mask = self._attention_bias(mask, T, past, dtype, x.device)
        for layer in self.model.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.model.norm(x)
        if targets is None:
            return self.lm_head(x)  # (B, T, vocab)
        return chunked_cross_entropy(x, self.lm_head.weight, targets)

    def _rope(self, position_ids, dtype):
        # Angles in fp32 (bf16 positions lose precision past 256), then cast like the reference.
        angles = position_ids[..., None].float() * self.rope_inv_freq.float()  # (B, T, D/2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, D)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _attention_mask(self, B, T, past, attention_mask, document_ids, device):
        """None means plain causal attention (SDPA's fast path); otherwise a (B, 1, T, S) boolean mask."""
        window = self.config.sliding_window
        needs_window = window is not None and past + T > window
        if attention_mask is None and document_ids is None and not needs_window and (past == 0 or T == 1):
            return None
        query_pos = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
        key_pos = torch.arange(past + T, device=device)[None, :]  # (1, S)
        allowed = (key_pos <= query_pos)[None].expand(B, T, past + T)  # (B, T, S)
        if needs_window:
            allowed = allowed & (key_pos > query_pos - window)
        if attention_mask is not None:  # (B, S): 0 marks padding on either side
            allowed = allowed & attention_mask[:, None, -(past + T) :].bool()
        if document_ids is not None:  # (B, T): packed examples never see each other
            allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])
        # A padding query may see nothing at all; let it see itself so SDPA gives no NaN.
        allowed = allowed | (key_pos == query_pos)
        return allowed[:, None]

    def _attention_bias(self, mask, T, past, dtype, device):
        """grouped_attention's form of a mask: (B or 1, 1, T, S), 0 where a query may look, else -inf."""
        if mask is None:  # plain causal
            query_pos = torch.arange(past, past + T, device=device)[:, None]
            mask = (torch.arange(past + T, device=device)[None, :] <= query_pos)[None, None]
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
