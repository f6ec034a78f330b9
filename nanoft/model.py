"""The decoder of the model families people fine-tune, in plain PyTorch: Llama 2/3, Mistral, Qwen2, Qwen3,
SmolLM2/3, Gemma 1/2/3, Phi-3/Phi-4, OLMo 2, Granite, and the mixtures of experts Mixtral and Qwen3-MoE.

    config = ModelConfig.from_hf(json.load(open("config.json")))
    model = Transformer(config)
    logits = model(input_ids)                            # (B, T, vocab)
    loss_sum, n_targets = model(input_ids, targets)      # summed over targets != -100

Every family is the Llama block with a few switches: the fields of ModelConfig under "what the families
change", each with the families that use it, all set from a family's config.json in one function,
`family_settings`: the place to read what a family does differently.
Mixtral and Qwen3-MoE swap the MLP for nanoft/moe.py's block of experts.
Parameter names are exactly Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, Phi-3's fused
`qkv_proj`, Mixtral's `block_sparse_moe.experts.0.w1`, ...), so checkpoints load without renaming and
lora.py / quant.py can swap any `nn.Linear` by walking `named_modules()`. Loading and saving Hugging Face
directories lives in nanoft/weights.py.
"""

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanoft.cpu_attention import grouped_attention, uses_matmul_attention
from nanoft.errors import UserError
from nanoft.loss import chunked_cross_entropy, final_logits
from nanoft.moe import SparseMoE, load_balancing_loss

# model_type -> the transformers class that loads it (written into config.json's "architectures").
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",  # Llama 2/3, SmolLM2
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",  # Gemma 3 1B, or the language model of a larger one
    "phi3": "Phi3ForCausalLM",  # Phi-3, Phi-3.5-mini, Phi-4, Phi-4-mini
    "olmo2": "Olmo2ForCausalLM",
    "granite": "GraniteForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
SLIDING, FULL = "sliding_attention", "full_attention"  # config.json's layer_types
# config.json keys that mean the same in every family.
SHARED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype",
)  # fmt: skip


def unsupported(what: str) -> UserError:
    return UserError(f"{what} is not supported; nanoft supports model_type {', '.join(ARCHITECTURES)}")


@dataclass
class ModelConfig:
    """The architecture: the Llama block's sizes, then what each family changes in it (defaults: Llama)."""

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
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    # ---- what the families change in the Llama block (family_settings sets these from config.json)
    # Biases of q, k, v and o_proj (when config.json says so: Llama, Qwen3, Gemma, OLMo 2, Granite), or of
    # q, k, v only (Qwen2, always).
    attention_bias: bool = False
    attention_output_bias: bool | None = None  # o_proj's bias; None = attention_bias (Qwen2: False)
    # The MLP's gate activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU: Gemma 1/2/3).
    hidden_act: str = "silu"
    # RMSNorm's weight: "llama" w * bf16(x / rms); "olmo2" bf16(w * x / rms) (OLMo 2); "gemma"
    # bf16((1 + w) * x / rms), w stored around 0 (Gemma 1/2/3). All normalise in fp32; the last two scale in
    # fp32 too (bf16 standing for the compute dtype).
    norm_style: str = "llama"
    # Where the norms sit: "pre" before attention and MLP (Llama); "sandwich" also after each, before the
    # residual add (Gemma 2/3: four norms a layer); "post" only after each (OLMo 2: h = x + norm(attn(x))).
    norm_placement: str = "pre"
    # RMSNorm on q and k before RoPE: "head" over each head's head_dim (Qwen3, Gemma 3), "width" over the
    # whole projected q and k before they are split into heads (OLMo 2). None: no q/k norm.
    qk_norm: str | None = None
    # Phi-3/Phi-4: q, k, v in one `qkv_proj` (rows Q, then K, then V), gate and up in one `gate_up_proj` (gate
    # rows first), kept fused in memory as in the checkpoint.
    fused_projections: bool = False
    # Per layer, "full_attention" or "sliding_attention" (sees the last `sliding_window` tokens only): Qwen2/3
    # (the layers from max_window_layers on), SmolLM3, Gemma 2 (every other), Gemma 3 (5 of 6). None: every
    # layer slides when sliding_window is set (Mistral v0.1, Phi-3-mini), else none.
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    # SmolLM3: 0 marks a layer that uses no positional encoding at all (NoPE): every 4th by default.
    no_rope_layers: list[int] | None = None
    # Gemma 3: the sliding layers' RoPE base (unscaled); the full layers use rope_theta and rope_scaling.
    rope_local_base_freq: float | None = None
    # Phi-3 family configs (Phi-4-mini: 0.75): RoPE turns only the first int(head_dim * factor) dims.
    partial_rotary_factor: float = 1.0
    # Embeddings times this, rounded to their dtype: Gemma sqrt(hidden_size), Granite (12 in its releases).
    embedding_multiplier: float = 1.0
    # Granite: each attention and MLP output times this before it is added to the residual stream.
    residual_multiplier: float = 1.0
    # The attention scale: Granite gives it (attention_multiplier); Gemma 2/3 use query_pre_attn_scalar **
    # -0.5; everyone else head_dim ** -0.5.
    attention_multiplier: float | None = None
    query_pre_attn_scalar: float | None = None
    # Gemma 2: attention scores become cap * tanh(scores / cap) before the mask (no SDPA kernel does it).
    attn_logit_softcapping: float | None = None
    # Gemma 2 (Gemma 3 when set): the logits become cap * tanh(logits / cap), in training's loss too.
    final_logit_softcapping: float | None = None
    # Granite: the logits are divided by this.
    logits_scaling: float = 1.0

    # ---- mixtures of experts (Mixtral, Qwen3-MoE): nanoft/moe.py's block takes the MLP's place
    num_experts: int = 0  # experts in each MoE layer; 0: every layer has the dense MLP
    num_experts_per_tok: int = 2  # top-k: the experts each token is sent to
    moe_intermediate_size: int | None = None  # each expert's MLP width (Qwen3-MoE); None: intermediate_size
    # Renormalise the k chosen probabilities to sum to 1: Mixtral always, Qwen3-MoE when its config says so.
    norm_topk_prob: bool = True
    # Qwen3-MoE: experts in layer i when (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers;
    # the other layers keep the dense MLP (intermediate_size wide).
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # Mixtral: in training the router's input is scaled by uniform noise in [1 - j, 1 + j] (0 in releases).
    router_jitter_noise: float = 0.0
    # Add router_aux_loss_coef x the router's load-balancing loss (nanoft/moe.py) to the training loss, as
    # transformers does when config.json has output_router_logits: true.
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    # Checkpoint names: the block's (Mixtral: "block_sparse_moe") and each expert's gate, up and down
    # projections (Mixtral: w1, w3, w2).
    moe_block_name: str = "mlp"
    expert_projection_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise unsupported(f"model_type '{self.model_type}'")
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.attention_output_bias is None:
            self.attention_output_bias = self.attention_bias
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            supported = " or ".join(ACTIVATIONS)
            raise UserError(f"hidden_act '{self.hidden_act}' is not supported; nanoft's MLP uses {supported}")
        if self.layer_types is None:
            self.layer_types = [SLIDING if self.sliding_window else FULL] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {SLIDING, FULL}:
            layers = self.num_hidden_layers
            raise UserError(f"layer_types must give '{FULL}' or '{SLIDING}' for each of the {layers} layers")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise UserError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise UserError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and num_experts "
                f"({self.num_experts})"
            )
        self.expert_projection_names = tuple(self.expert_projection_names)
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

    @property
    def attention_scale(self) -> float:
        if self.attention_multiplier is not None:
            return self.attention_multiplier
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def has_experts(self, layer_index: int) -> bool:
        """Whether the layer's MLP is a mixture of experts (Qwen3-MoE may keep some layers dense)."""
        return (
            self.num_experts > 0
            and (layer_index + 1) % self.decoder_sparse_step == 0
            and layer_index not in self.mlp_only_layers
        )

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Read a Hugging Face config dict (transformers 4 or 5 layout)."""
        model_type = hf.get("model_type")
        if model_type == "gemma3":
            raise UserError(
                "model_type 'gemma3' is Gemma 3 with its vision tower, which nanoft does not load; "
                "fine-tune a text-only Gemma 3 (model_type gemma3_text, e.g. google/gemma-3-1b-it)"
            )
        if model_type not in ARCHITECTURES:
            raise unsupported(f"model_type '{model_type}'")
        if hf.get("mlp_bias", False):
            raise UserError("mlp_bias: true is not supported; nanoft's MLP has no biases")
        if hf.get("use_bidirectional_attention"):
            raise UserError("use_bidirectional_attention: true (an embedding model) is not supported")
        # The family's defaults first, then what config.json says (transformers 5 writes every key; older
        # checkpoints leave out keys that had their default, e.g. Gemma's tie_word_embeddings).
        settings = family_settings(hf)
        return cls(
            model_type=model_type, **{**settings, **{key: hf[key] for key in SHARED_KEYS if key in hf}}
        )

    def to_hf(self) -> dict:
        """A config.json dict that transformers loads as the same model (from_hf reads it back unchanged)."""
        hf = {key: getattr(self, key) for key in SHARED_KEYS}
        hf |= {"model_type": self.model_type, "architectures": [ARCHITECTURES[self.model_type]]}
        hf |= {"rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling}
        family = self.model_type
        activation_key = "hidden_activation" if family in ("gemma2", "gemma3_text") else "hidden_act"
        hf[activation_key] = self.hidden_act
        if family not in ("mistral", "qwen2", "phi3", "mixtral"):
            hf["attention_bias"] = self.attention_bias
        if family in ("llama", "smollm3", "granite"):
            hf["mlp_bias"] = False
        if family in (
            "mistral",
            "qwen2",
            "qwen3",
            "smollm3",
            "gemma2",
            "gemma3_text",
            "phi3",
            "mixtral",
            "qwen3_moe",
        ):
            hf["sliding_window"] = self.sliding_window
        if family in ("qwen2", "qwen3", "smollm3", "gemma2", "gemma3_text"):
            hf["layer_types"] = self.layer_types
        if family in ("qwen2", "qwen3", "smollm3", "qwen3_moe"):
            hf["use_sliding_window"] = SLIDING in self.layer_types
        if family == "smollm3":
            hf["no_rope_layers"] = self.no_rope_layers
        if family in ("gemma2", "gemma3_text"):
            hf["query_pre_attn_scalar"] = self.query_pre_attn_scalar
            hf["final_logit_softcapping"] = self.final_logit_softcapping
            hf["attn_logit_softcapping"] = self.attn_logit_softcapping
        if family == "gemma3_text":
            hf["rope_local_base_freq"] = self.rope_local_base_freq
        if family == "phi3":
            hf["partial_rotary_factor"] = self.partial_rotary_factor
        if family == "granite":
            hf["embedding_multiplier"] = self.embedding_multiplier
            hf["residual_multiplier"] = self.residual_multiplier
            hf["attention_multiplier"] = self.attention_multiplier
            hf["logits_scaling"] = self.logits_scaling
        if family in ("mixtral", "qwen3_moe"):
            hf["num_local_experts" if family == "mixtral" else "num_experts"] = self.num_experts
            for key in ("num_experts_per_tok", "output_router_logits", "router_aux_loss_coef"):
                hf[key] = getattr(self, key)
        if family == "mixtral":
            hf["router_jitter_noise"] = self.router_jitter_noise
        if family == "qwen3_moe":
            for key in ("moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"):
                hf[key] = getattr(self, key)
        # A family's switches follow from its config.json: a config built by hand with other ones would be
        # saved as a model that transformers builds differently.
        if (reread := ModelConfig.from_hf(hf)) != self:
            differing = [f.name for f in fields(self) if getattr(reread, f.name) != getattr(self, f.name)]
            raise ValueError(
                f"this {self.model_type} config differs in {differing} from what its config.json makes; "
                f"build family configs with ModelConfig.from_hf({{'model_type': '{self.model_type}', ...}})"
            )
        return hf


def family_settings(hf: dict) -> dict:
    """What a family changes in the Llama block, read from its config.json (a missing key takes the default of
    the family's transformers config class). The one place to read a family's differences."""
    family, get = hf["model_type"], hf.get
    settings = read_rope(hf)
    if family in (
        "llama",
        "qwen3",
        "smollm3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "olmo2",
        "granite",
        "qwen3_moe",
    ):
        settings["attention_bias"] = get("attention_bias", False)
    if family in ("mistral", "phi3", "mixtral"):  # the window applies to every layer
        settings["sliding_window"] = get("sliding_window")
    if family == "qwen2":  # q/k/v biases, never in config.json; o_proj has none
        settings |= dict(attention_bias=True, attention_output_bias=False)
    if family in ("qwen2", "qwen3"):
        # The window is used only with use_sliding_window, and then from layer max_window_layers on.
        window = get("sliding_window") if get("use_sliding_window", False) else None
        first = get("max_window_layers", 28)
        derived = [SLIDING if window and i >= first else FULL for i in range(hf["num_hidden_layers"])]
        settings |= dict(sliding_window=window, layer_types=get("layer_types") or derived)
    if family == "qwen3":
        settings |= dict(qk_norm="head", head_dim=128)
    if family == "qwen3_moe":  # Qwen3's attention; a window (with use_sliding_window) on every layer
        window = get("sliding_window") if get("use_sliding_window", False) else None
        settings |= dict(qk_norm="head", sliding_window=window)
    if family == "smollm3":
        every = get("no_rope_layer_interval", 4)
        no_rope = get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(hf["num_hidden_layers"])]
        window = get("sliding_window") if get("use_sliding_window", False) else None
        derived = [SLIDING if window and not uses_rope else FULL for uses_rope in no_rope]
        settings |= dict(
            no_rope_layers=no_rope, tie_word_embeddings=True, layer_types=get("layer_types") or derived
        )
        settings["sliding_window"] = get("sliding_window")
    if family in ("gemma", "gemma2", "gemma3_text"):
        settings |= dict(norm_style="gemma", head_dim=256, tie_word_embeddings=True)
        settings["embedding_multiplier"] = hf["hidden_size"] ** 0.5
        settings["hidden_act"] = get("hidden_activation", "gelu_pytorch_tanh")
    if family == "gemma":
        # Gemma 1's releases say "gelu" and mean the tanh approximation (as transformers reads them).
        activation = get("hidden_act", "gelu_pytorch_tanh")
        settings["hidden_act"] = "gelu_pytorch_tanh" if activation == "gelu" else activation
    if family in ("gemma2", "gemma3_text"):
        # Without layer_types: windows on all but the last layer of each group of 2 (Gemma 2) or 6 (Gemma 3).
        every = 2 if family == "gemma2" else get("sliding_window_pattern", 6)
        derived = [SLIDING if (i + 1) % every else FULL for i in range(hf["num_hidden_layers"])]
        settings |= dict(norm_placement="sandwich", layer_types=get("layer_types") or derived)
        settings |= dict(
            query_pre_attn_scalar=get("query_pre_attn_scalar", 256),
            sliding_window=get("sliding_window", 4096),
        )
    if family == "gemma2":
        settings["attn_logit_softcapping"] = get("attn_logit_softcapping", 50.0)
        settings["final_logit_softcapping"] = get("final_logit_softcapping", 30.0)
    if family == "gemma3_text":  # transformers' Gemma 3 ignores attn_logit_softcapping
        settings |= dict(qk_norm="head", final_logit_softcapping=get("final_logit_softcapping"))
    if family == "phi3":
        settings["fused_projections"] = True
        settings["rms_norm_eps"] = 1e-5
    if family == "olmo2":
        settings |= dict(norm_style="olmo2", norm_placement="post", qk_norm="width", rms_norm_eps=1e-5)
    if family == "granite":
        multipliers = (
            "embedding_multiplier",
            "residual_multiplier",
            "attention_multiplier",
            "logits_scaling",
        )
        settings |= {key: get(key, 1.0) for key in multipliers}
    if family in ("mixtral", "qwen3_moe"):
        # config.json may call it num_experts or num_local_experts (transformers reads either).
        experts = get("num_local_experts", get("num_experts", 8 if family == "mixtral" else 128))
        settings |= dict(
            num_experts=experts,
            num_experts_per_tok=get("num_experts_per_tok", 2 if family == "mixtral" else 8),
            output_router_logits=get("output_router_logits", False),
            router_aux_loss_coef=get("router_aux_loss_coef", 0.001),
        )
    if family == "mixtral":
        settings |= dict(moe_block_name="block_sparse_moe", expert_projection_names=("w1", "w3", "w2"))
        settings |= dict(router_jitter_noise=get("router_jitter_noise", 0.0), rms_norm_eps=1e-5)
    if family == "qwen3_moe":
        settings |= dict(
            moe_intermediate_size=get("moe_intermediate_size", 768),
            norm_topk_prob=get("norm_topk_prob", False),
            decoder_sparse_step=get("decoder_sparse_step", 1),
            mlp_only_layers=get("mlp_only_layers") or [],
        )
    if family not in ("gemma", "gemma2", "gemma3_text"):
        activation = get("hidden_act", "silu")
        settings["hidden_act"] = "silu" if activation == "swish" else activation
    return settings


def read_rope(hf: dict) -> dict:
    """rope_theta, rope_scaling (and Gemma 3's local base, Phi-3's partial factor) from the transformers 4
    keys or transformers 5's `rope_parameters` (per layer type for Gemma 3)."""
    family, get = hf["model_type"], hf.get
    default_theta = {"smollm3": 2_000_000.0, "gemma3_text": 1_000_000.0, "mixtral": 1_000_000.0}.get(
        family, 10000.0
    )
    rope = {"rope_theta": get("rope_theta", default_theta), "rope_scaling": get("rope_scaling")}
    parameters = get("rope_parameters")
    if family == "gemma3_text":
        rope["rope_local_base_freq"] = get("rope_local_base_freq", 10000.0)
        if isinstance(parameters, dict) and FULL in parameters:
            local = parameters.get(SLIDING) or {}
            if local.get("rope_type", "default") != "default":
                raise unsupported(f"RoPE scaling on Gemma 3's sliding layers ('{local['rope_type']}')")
            rope["rope_local_base_freq"] = local.get("rope_theta", 10000.0)
            parameters = parameters[FULL]
    if isinstance(parameters, dict):
        rope["rope_theta"] = parameters.get("rope_theta", rope["rope_theta"])
        if parameters.get("rope_type", "default") != "default":
            ignored = ("rope_theta", "partial_rotary_factor")
            rope["rope_scaling"] = {k: v for k, v in parameters.items() if k not in ignored}
    if family == "phi3":
        factor = (parameters or {}).get("partial_rotary_factor", get("partial_rotary_factor", 1.0))
        rope["partial_rotary_factor"] = factor
    return rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, style: str = "llama"):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if style == "gemma" else torch.ones(dim))  # 1 + 0 = 1
        self.eps, self.style = eps, style

    def forward(self, x):
        return _RMSNormFunction.apply(x, self.weight, self.eps, self.style)


class _RMSNormFunction(torch.autograd.Function):
    """x / rms(x), normalised in fp32, times the weight as config.norm_style says (ModelConfig).

    Written out for memory: autograd of those seven small ops saves x in fp32; this saves x as it came (bf16)
    plus one fp32 number per row (72 MB less in a SmolLM2 LoRA step at 4 x 256), at the same speed
    (bench/levers.py).
    """

    @staticmethod
    def forward(ctx, x, weight, eps, style):
        # On CPU a kernel over bf16 and fp32 first copies its bf16 input to fp32 as a whole (CUDA's cast as
        # they read): cast x once for both the norm and the product, not once in each (61 copies of the
        # hidden states less in a SmolLM2 step: `python bench/levers.py --copies`).
        x32 = x.float() if x.device.type == "cpu" else x
        rstd = torch.rsqrt(
            torch.linalg.vector_norm(x32, dim=-1, keepdim=True, dtype=torch.float32) ** 2 / x.shape[-1] + eps
        )
        ctx.save_for_backward(x, weight, rstd)
        ctx.style = style
        if style == "llama":  # cast back, then scale
            return weight * (x32 * rstd).to(x.dtype)
        return (fp32_scale(weight, style) * (x32 * rstd)).to(x.dtype)  # scale in fp32, then cast back

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x * rstd  # (..., C) fp32
        if ctx.style == "llama":
            grad_normed = (grad * weight).float()
        else:
            grad_normed = grad.float() * fp32_scale(weight, ctx.style)
        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed)), all in fp32
        mean_dot = torch.linalg.vecdot(grad_normed, normed, dim=-1).unsqueeze(-1) / x.shape[-1]
        grad_x = (torch.addcmul(grad_normed, normed, mean_dot, value=-1) * rstd).to(x.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            if ctx.style == "llama":
                grad_weight = (grad * normed.to(x.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
            else:
                grad_weight = (grad.float() * normed).flatten(0, -2).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None, None


def fp32_scale(weight, style: str):
    """What the normalised x is multiplied by: w (OLMo 2) or 1 + w (Gemma), in fp32."""
    return weight.float() + 1 if style == "gemma" else weight.float()


def rope_inverse_frequencies(dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    """(dim / 2,) inverse frequencies of RoPE over `dim` dimensions of each head."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
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


def layer_rope(config: ModelConfig, layer_index: int) -> str | None:
    """Which RoPE a layer uses: "global" (rope_theta, rope_scaling), "local" (Gemma 3's sliding layers) or
    None (SmolLM3's NoPE layers)."""
    if config.no_rope_layers is not None and not config.no_rope_layers[layer_index]:
        return None
    if config.rope_local_base_freq is not None and config.layer_types[layer_index] == SLIDING:
        return "local"
    return "global"


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x (B, H, T, D) turned by the angles in cos and sin (.., T, rotary dims); the dims past them kept."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        # x * cos + rotate_half(x) * sin in one kernel less; with the contiguous term first the result is
        # contiguous in (B, H, T, D), which the attention can reshape without a copy.
        return torch.addcmul(rotate_half(x) * sin, x, cos)
    turned, kept = x[..., :rotary], x[..., rotary:]  # partial rotary (Phi-3 family)
    return torch.cat((torch.addcmul(rotate_half(turned) * sin, turned, cos), kept), dim=-1)


class KVCache:
    """Keys and values of every layer for incremental decoding: fixed size, filled left to right. Sliding
    layers keep every key too; their mask hides the ones past the window."""

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
        self.scale, self.softcap = config.attention_scale, config.attn_logit_softcapping
        C, bias = config.hidden_size, config.attention_bias
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.fused, self.widths = config.fused_projections, (q_width, kv_width, kv_width)
        if self.fused:  # one (C, Q + K + V) matmul, rows as Hugging Face stores them
            self.qkv_proj = nn.Linear(C, q_width + 2 * kv_width, bias=bias)
        else:
            self.q_proj = nn.Linear(C, q_width, bias=bias)
            self.k_proj = nn.Linear(C, kv_width, bias=bias)
            self.v_proj = nn.Linear(C, kv_width, bias=bias)
        self.o_proj = nn.Linear(q_width, C, bias=config.attention_output_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm is not None:
            q_dim, k_dim = (self.head_dim, self.head_dim) if config.qk_norm == "head" else (q_width, kv_width)
            self.q_norm = RMSNorm(q_dim, config.rms_norm_eps, config.norm_style)
            self.k_norm = RMSNorm(k_dim, config.rms_norm_eps, config.norm_style)

    def project(self, x):
        """q (B, T, H*D), k and v (B, T, KVH*D): from one fused matmul or three."""
        if self.fused:
            q, k, v = self.qkv_proj(x).split(self.widths, dim=-1)
            # v in a tensor of its own: attention keeps v for backward, and a view would keep all of the fused
            # output alive with it.
            return q, k, v.contiguous()
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def normalise_qk(self, q, k):
        # Back to q's dtype: under autocast a Llama-style norm's fp32 weight would make q and k fp32, and the
        # whole attention with them (transformers lets that happen); with fp32 or bf16 weights it is a no-op.
        return self.q_norm(q).to(q.dtype), self.k_norm(k).to(k.dtype)

    def forward(self, x, rope, mask, kv_cache):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        if self.qk_norm == "width":  # OLMo 2: over all heads at once
            q, k = self.normalise_qk(q, k)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":  # Qwen3, Gemma 3: each head on its own
            q, k = self.normalise_qk(q, k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, KVH, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)  # (B, KVH, S, D), S = cached + T
        if mask is not None and mask.is_floating_point():
            y = grouped_attention(q, k, v, mask, self.scale, self.softcap)
        else:
            group = self.n_heads // self.n_kv_heads
            if group > 1 and q.is_cuda and not cuda_sdpa_shares_kv_heads(q.dtype, self.head_dim, mask):
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, S, D)
                group = 1
            # enable_gqa lets SDPA share each key/value head across its query heads without copying them.
            # No mask means causal; a single new token after a cache sees every cached key, so no mask at all.
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None and T > 1,
                scale=self.scale,
                enable_gqa=group > 1,
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def cuda_sdpa_shares_kv_heads(dtype: torch.dtype, head_dim: int, mask) -> bool:
    """Whether SDPA on CUDA runs grouped-query attention in a fused kernel as it is. Only flash attention
    shares key/value heads (fp16/bf16, head_dim <= 256, no mask); otherwise, a packed or sliding-window mask
    above all, SDPA falls back to its math kernel, whose (B, H, T, S) scores take O(T^2) memory. Repeating
    k and v per query head (O(T)) lets the memory-efficient kernel, which takes masks, run instead."""
    return mask is None and dtype in (torch.float16, torch.bfloat16) and head_dim <= 256


class MLP(nn.Module):
    """The gated MLP: down(act(gate(x)) * up(x)); also each expert of a mixture of experts, then `width` wide
    under the checkpoint's `names` for gate, up and down (Mixtral: w1, w3, w2)."""

    def __init__(self, config: ModelConfig, width=None, names=("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        C, M = config.hidden_size, width or config.intermediate_size
        self.fused = config.fused_projections
        self.names = names
        if self.fused:
            self.gate_up_proj = nn.Linear(C, 2 * M, bias=False)
        else:
            self.add_module(names[0], nn.Linear(C, M, bias=False))
            self.add_module(names[1], nn.Linear(C, M, bias=False))
        self.add_module(names[2], nn.Linear(M, C, bias=False))
        self.activation = config.hidden_act

    def forward(self, x):
        # Looked up by name: lora.py and quant.py replace the linears in place.
        gate_name, up_name, down_name = self.names
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = getattr(self, gate_name)(x), getattr(self, up_name)(x)
        return getattr(self, down_name)(_GatedActivation.apply(gate, up, self.activation))


class _GatedActivation(torch.autograd.Function):
    """act(gate) * up (silu: SwiGLU; gelu_pytorch_tanh: GeGLU). Autograd would keep gate, up and act(gate) for
    backward; this keeps gate and up and recomputes act(gate), one (B, T, intermediate) tensor less per layer
    (90 MB of a SmolLM2 LoRA step at 4 x 256 tokens) for one more elementwise kernel."""

    @staticmethod
    def forward(ctx, gate, up, activation):
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return ACTIVATIONS[activation](gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        # The fused kernels autograd uses for silu and gelu.
        if ctx.activation == "silu":
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        else:
            grad_gate = torch.ops.aten.gelu_backward(grad * up, gate, approximate="tanh")
        return grad_gate, grad * ACTIVATIONS[ctx.activation](gate), None


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.norm_placement, self.residual_multiplier = config.norm_placement, config.residual_multiplier
        self.sliding_window = config.sliding_window if config.layer_types[layer_index] == SLIDING else None
        self.rope = layer_rope(config, layer_index)

        def norm():
            return RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_style)

        if config.norm_placement != "post":
            self.input_layernorm = norm()
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = norm()  # "pre": the MLP's input norm, despite its name
        if config.norm_placement == "sandwich":
            self.pre_feedforward_layernorm = norm()
        if config.norm_placement != "pre":
            self.post_feedforward_layernorm = norm()
        self.has_experts = config.has_experts(layer_index)
        if self.has_experts:  # under the checkpoint's name: `mlp`, or Mixtral's `block_sparse_moe`
            width, names = config.moe_intermediate_size, config.expert_projection_names
            experts = [MLP(config, width, names) for _ in range(config.num_experts)]
            self.add_module(config.moe_block_name, SparseMoE(config, experts))
            self.feed_forward_name = config.moe_block_name
        else:
            self.mlp = MLP(config)
            self.feed_forward_name = "mlp"

    def forward(self, x, rope, mask, kv_cache=None):
        """(B, T, C) -> (B, T, C), and the router's logits (B*T, experts) in a mixture-of-experts layer, else
        None (the load-balancing loss reads them)."""
        if self.norm_placement == "pre":  # Llama
            x = self.add(x, self.self_attn(self.input_layernorm(x), rope, mask, kv_cache))
            feed_forward, router_logits = self.feed_forward(self.post_attention_layernorm(x))
            return self.add(x, feed_forward), router_logits
        if self.norm_placement == "sandwich":  # Gemma 2/3
            attention = self.self_attn(self.input_layernorm(x), rope, mask, kv_cache)
            x = self.add(x, self.post_attention_layernorm(attention))
            feed_forward, router_logits = self.feed_forward(self.pre_feedforward_layernorm(x))
            return self.add(x, self.post_feedforward_layernorm(feed_forward)), router_logits
        x = self.add(x, self.post_attention_layernorm(self.self_attn(x, rope, mask, kv_cache)))  # OLMo 2
        feed_forward, router_logits = self.feed_forward(x)
        return self.add(x, self.post_feedforward_layernorm(feed_forward)), router_logits

    def feed_forward(self, x):
        """The MLP's or the experts' output, and the router's logits (None for the MLP)."""
        block = getattr(self, self.feed_forward_name)
        return block(x) if self.has_experts else (block(x), None)

    def add(self, x, branch):
        """The residual add (Granite scales the branch first)."""
        return x + branch if self.residual_multiplier == 1 else x + branch * self.residual_multiplier


class Backbone(nn.Module):
    """Hugging Face's `model.` prefix: embeddings, decoder layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_style)


class LMHead(nn.Linear):
    """Hugging Face's `lm_head`: the logits (its forward), or the training loss straight from the hidden
    states (cross_entropy, chunk by chunk: nanoft/loss.py). The loss is a method of the module that holds
    the weight so that FSDP, which gathers a unit's weights around its forward and the methods registered
    like it, can make lm_head a unit of its own, gathered at the loss only (distributed.shard_model)."""

    def cross_entropy(self, x, targets, logits_scaling: float, softcap: float | None):
        return chunked_cross_entropy(x, self.weight, targets, logits_scaling, softcap)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope_names = sorted({layer.rope for layer in self.model.layers} - {None})  # see layer_rope
        for name, inv_freq in self.rope_frequencies().items():
            self.register_buffer(f"rope_{name}_inv_freq", inv_freq, persistent=False)
        self.activation_checkpointing = False  # recompute each layer in backward: less memory, ~30% more time
        # The load-balancing loss of the last training forward (mixtures of experts with
        # output_router_logits), for the step log.
        self.router_aux_loss = None

    def rope_frequencies(self) -> dict[str, torch.Tensor]:
        """The inverse frequencies of each RoPE the layers use (see layer_rope)."""
        config = self.config
        bases = {
            "global": (config.rope_theta, config.rope_scaling),
            "local": (config.rope_local_base_freq, None),
        }
        return {name: rope_inverse_frequencies(config.rotary_dim, *bases[name]) for name in self.rope_names}

    def reset_rope(self, device=None):
        """Recompute the RoPE frequencies (they are not in checkpoints; needed after building on meta)."""
        for name, inv_freq in self.rope_frequencies().items():
            setattr(self, f"rope_{name}_inv_freq", inv_freq.to(device or self.lm_head.weight.device))

    def forward(
        self,
        input_ids,
        targets=None,
        position_ids=None,
        attention_mask=None,
        document_ids=None,
        kv_cache=None,
        real_tokens=None,
    ):
        """input_ids (B, T); position_ids (B, T), default 0.. after the cache; attention_mask (B, cached + T),
        0 on padding; document_ids (B, T): packed documents never see each other; real_tokens (B, T) bool,
        False on padding, for the load-balancing loss (default: attention_mask's 1s, else every token).
        Returns the logits (B, T, vocab), or with targets (B, T) the summed loss and the number of targets."""
        B, T = input_ids.shape
        config, past = self.config, kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        if config.embedding_multiplier != 1:
            # Rounded to the embeddings' dtype first, like transformers for Gemma (sqrt(3072): 55.5 in bf16).
            x = x * torch.tensor(config.embedding_multiplier, dtype=x.dtype)
        # Under autocast (full fine-tunes) x is fp32 but q and k come out of the matmuls in bf16: build cos,
        # sin and the attention bias in bf16 too, or every q * cos would promote the attention to fp32.
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        ropes = {name: self._rope(position_ids, dtype, name) for name in self.rope_names}
        windows = {layer.sliding_window for layer in self.model.layers}
        masks = {
            w: self._attention_mask(B, T, past, attention_mask, document_ids, w, x.device) for w in windows
        }
        # Soft-capped scores have no SDPA kernel; otherwise the matmuls are used where they beat SDPA.
        sizes = (B, config.num_attention_heads, T, past + T)
        if config.attn_logit_softcapping or uses_matmul_attention(device_type, dtype.itemsize, *sizes):
            masks = {w: self._attention_bias(mask, T, past, dtype, x.device) for w, mask in masks.items()}
        router_logits = []  # each MoE layer's (B*T, experts)
        for layer in self.model.layers:
            rope, mask = ropes.get(layer.rope), masks[layer.sliding_window]
            if self.activation_checkpointing and self.training:
                x, layer_router_logits = checkpoint(layer, x, rope, mask, use_reentrant=False)
            else:
                x, layer_router_logits = layer(x, rope, mask, kv_cache)
            if layer_router_logits is not None:
                router_logits.append(layer_router_logits)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.model.norm(x)
        if targets is None:
            logits = self.lm_head(x)  # (B, T, vocab)
            return final_logits(logits, config.logits_scaling, config.final_logit_softcapping)
        loss_sum, n_targets = self.lm_head.cross_entropy(
            x, targets, config.logits_scaling, config.final_logit_softcapping
        )
        if config.output_router_logits and router_logits and self.training:
            # transformers' training loss is the mean cross-entropy + coef x aux: added here as a sum over the
            # targets, so that loss_sum / n_targets is that loss and across micro-batches the aux loss weighs
            # like their targets. Evaluation keeps the plain cross-entropy. Padding is not counted (the
            # attention mask's 0s, or real_tokens' False).
            counted = real_tokens if real_tokens is not None else attention_mask
            aux_loss = load_balancing_loss(router_logits, config.num_experts_per_tok, counted)
            self.router_aux_loss = aux_loss.detach()
            loss_sum = loss_sum + config.router_aux_loss_coef * aux_loss * n_targets
        return loss_sum, n_targets

    def _rope(self, position_ids, dtype, name):
        # Angles in fp32 (bf16 positions lose precision past 256), then cast like the reference.
        inv_freq = getattr(self, f"rope_{name}_inv_freq")
        angles = position_ids[..., None].float() * inv_freq.float()  # (B, T, rotary / 2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, rotary)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _attention_mask(self, B, T, past, attention_mask, document_ids, window, device):
        """None means plain causal attention (SDPA's fast path); otherwise a (B or 1, 1, T, S) boolean mask,
        S = past + T. `window`: a sliding layer's, each query sees its last `window` keys only."""
        needs_window = window is not None and past + T > window
        if attention_mask is None and document_ids is None and not needs_window and (past == 0 or T == 1):
            return None
        query_pos = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
        key_pos = torch.arange(past + T, device=device)[None, :]  # (1, S)
        allowed = (key_pos <= query_pos)[None]  # (1, T, S)
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
