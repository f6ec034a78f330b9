"""LoRA: train two small matrices beside each frozen linear layer, save them in PEFT's format.

    model = inject_lora(from_pretrained(path), LoRAConfig(r=16, alpha=32, targets="all-linear"))
    ... train: only the adapters have requires_grad ...
    save_adapter(model, "out/adapter", base_model_name_or_path=path)   # PEFT and vLLM load this directory
    model = load_adapter(from_pretrained(path), "out/adapter")
    merge_lora(model)                                                  # fold the updates in, in memory
    # a merged Hugging Face model on disk, streamed from the base checkpoint: nanoft/merge.py

A linear layer y = W x + b (W: out x in) gets a low-rank update, y = W x + b + scale * B A dropout(x), with
A (r x in) and B (out x r). A starts Kaiming-uniform and B at zero: step 0 is exactly the base model, and the
first gradient still reaches B (were both zero, neither would ever move). scale = alpha / r keeps the update's
size independent of r at a fixed alpha; rsLoRA's alpha / sqrt(r) keeps it from fading at large r. DoRA
(arxiv.org/abs/2402.09353) also learns each output row's length: W' = m * (W + scale B A) / ||W + scale B A||.

Names. The wrapper keeps the original layer as `base_layer` (PEFT's in-memory name) and the adapters as
`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector` (PEFT's on-disk names). So the adapter keys on disk
are ours prefixed with `base_model.model.` (`lora_state_dict`), and the base's Hugging Face names are ours
without `.base_layer` (`base_state_dict`): no renaming tables, no state-dict hooks.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from nanoft.cpu_dropout import CPUFriendlyDropout
from nanoft.errors import UserError
from nanoft.memory import unknown_targets_error
from nanoft.moe import SparseMoE
from nanoft.weights import write_atomically

PEFT_PREFIX = "base_model.model."
ADAPTER_NAMES = ("lora_A", "lora_B", "lora_magnitude_vector")


@dataclass
class LoRAConfig:
    r: int = 16  # rank of the update B A
    alpha: float = 32  # the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.05  # dropout on the adapter's input only; the base path never sees it
    targets: tuple[str, ...] | str = ("q_proj", "v_proj")  # layer names in the blocks, or "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()  # modules trained in full, e.g. ("embed_tokens",) for new tokens

    def __post_init__(self):
        if self.targets != "all-linear":  # "q_proj,v_proj" (from a command line) or a list of names
            names = self.targets.split(",") if isinstance(self.targets, str) else self.targets
            self.targets = tuple(name.strip() for name in names if name.strip())
        if not self.targets:
            raise UserError("LoRA targets are empty; give layer names like q_proj,v_proj or all-linear")
        if not isinstance(self.r, int) or self.r <= 0:
            raise UserError(f"LoRA rank r={self.r} must be a positive integer (e.g. 16)")
        if self.alpha <= 0:
            raise UserError(f"LoRA alpha={self.alpha} must be positive (e.g. 2 * r)")
        if not 0 <= self.dropout < 1:
            raise UserError(f"LoRA dropout={self.dropout} must be in [0, 1)")
        self.modules_to_save = tuple(self.modules_to_save)


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """What B A is multiplied by: alpha / r, or rsLoRA's alpha / sqrt(r)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def dense_weight(layer: nn.Linear) -> torch.Tensor:
    """The (out, in) weight of a linear layer as floats; bitsandbytes 4-bit and 8-bit ones dequantized."""
    weight = layer.weight
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes.functional as bnb

        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # After an eval forward on a CPU with AVX512-BF16, bitsandbytes repacks the weight for its
            # inference kernel; undo that (as its state_dict saving does) so dequantize_4bit reads it right.
            unpacked = bnb._convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            weight.data, weight.quant_state = unpacked
        return bnb.dequantize_4bit(weight.data, weight.quant_state)
    if type(layer).__name__ == "Linear4bit":  # FSDP gathered its packed bytes (nanoft/fsdp_qlora.py)
        import bitsandbytes.functional as bnb

        return bnb.dequantize_4bit(weight, layer.quant_state)
    if type(weight).__name__ == "Int8Params":
        import bitsandbytes.functional as bnb

        row_scales = layer.state.SCB if layer.state.SCB is not None else weight.SCB
        return bnb.int8_vectorwise_dequant(weight.data, row_scales)
    return weight


def is_quantized(layer: nn.Module) -> bool:
    return type(getattr(layer, "weight", None)).__name__ in ("Params4bit", "Int8Params")


class LoRALinear(nn.Module):
    """A linear layer (nn.Linear, or a bitsandbytes one used as is, never copied) plus a LoRA update."""

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        dropout: float,
        use_rslora=False,
        use_dora=False,
        device=None,
    ):
        super().__init__()
        self.base_layer = base_layer
        # Beside the base weight, or on `device` when the base is still on the meta device (train.py loads it
        # after FSDP has sharded the model): the adapters are drawn now, from the seed, alike on every rank.
        on_meta = base_layer.weight.device.type == "meta"
        device = device if on_meta else base_layer.weight.device
        # fp32 adapters even on a bf16 base: the optimizer updates them, and bf16 would round small steps off.
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT and the LoRA paper's code
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = CPUFriendlyDropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = lora_scale(r, alpha, use_rslora)
        self.use_dora = use_dora
        if use_dora and on_meta:  # no W yet: init_dora_magnitudes fills m once it is read (NaN until then)
            nan = torch.full((base_layer.out_features,), math.nan, device=device)
            self.lora_magnitude_vector = nn.Parameter(nan)
        elif use_dora:  # B = 0, so m = ||W||: the layer starts as the base
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm(dense_weight(base_layer)))
        self.merged = False
        self.dequantized_by_merge = False

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + scale B A|| per output row in fp32, detached: the DoRA paper (sec. 4.3) treats it as a
        constant. One (out, in) fp32 temporary: scale B A, with W added in place."""
        with torch.no_grad():
            combined = (self.lora_B.weight @ self.lora_A.weight).mul_(self.scale).add_(weight)  # (out, in)
            return torch.linalg.norm(combined, dim=1)

    def forward(self, x):
        result = self.base_layer(x)  # (..., out), in the base's compute dtype
        if self.merged:
            return result
        # The fp32 adapters are cast to x's dtype, as autocast would, not x up to fp32 as PEFT does: the
        # update is rounded to x's dtype when added anyway, and casting two r-row matrices costs less than
        # casting (..., in) activations and their gradients (bench/lora_linear.py: faster than PEFT in bf16).
        lora_A, lora_B = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        x = self.dropout(x)
        update = F.linear(F.linear(x, lora_A) * self.scale, lora_B)  # scale (..., r), cheaper than (..., out)
        if self.use_dora:
            # m / ||W + scale B A|| (W + scale B A) x, written as a correction on top of the base output.
            # W is the base's own weight (dequantized for a 4/8-bit base), not a copy: the matmul below keeps
            # it for backward, and a copy per layer would stay alive until then.
            weight = dense_weight(self.base_layer)
            magnitude_scale = (self.lora_magnitude_vector / self.weight_norm(weight)).to(x.dtype)  # (out,)
            if self.training and isinstance(self.dropout, nn.Dropout):
                base_without_bias = F.linear(x, weight.to(x.dtype))  # W dropout(x), exactly as PEFT
            else:
                bias = self.base_layer.bias
                base_without_bias = result if bias is None else result - bias
            update = (magnitude_scale - 1) * base_without_bias + magnitude_scale * update
        return result + update.to(result.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold the update into the base weight: inference at the base's cost. Dequantizes a 4/8-bit base."""
        if self.merged:
            return
        weight, lora_A, lora_B = dense_weight(self.base_layer), self.lora_A.weight, self.lora_B.weight
        magnitude = self.lora_magnitude_vector if self.use_dora else None
        if self.use_dora:  # unmerge must divide by this very norm
            self.norm_at_merge = torch.linalg.norm(merged_weight(weight, lora_A, lora_B, self.scale), dim=1)
        weight = merged_weight(weight, lora_A, lora_B, self.scale, magnitude)
        if is_quantized(self.base_layer):
            self.base_layer = dense_linear(self.base_layer, weight)
            self.dequantized_by_merge = True
        else:  # in place, so optimizers and FSDP keep pointing at the same Parameter
            self.base_layer.weight.copy_(weight)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        if self.dequantized_by_merge:
            raise UserError("cannot unmerge LoRA from a quantized base: merging dequantized it; reload it")
        weight = self.base_layer.weight.float()
        if self.use_dora:
            weight = weight / (self.lora_magnitude_vector / self.norm_at_merge)[:, None]
        weight = weight - self.scale * (self.lora_B.weight @ self.lora_A.weight).float()
        self.base_layer.weight.copy_(weight)
        self.merged = False


@torch.no_grad()
def merged_weight(weight, lora_A, lora_B, scale: float, magnitude=None) -> torch.Tensor:
    """W + scale B A in fp32; with DoRA's magnitude m, each row scaled to length m: m (W + scale B A) / ||.||.
    The weight that computes what LoRALinear does (PEFT merges the same way)."""
    weight = weight.float() + scale * (lora_B.float() @ lora_A.float())
    if magnitude is not None:
        weight = (magnitude.float() / torch.linalg.norm(weight, dim=1))[:, None] * weight
    return weight


def dense_linear(quantized: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    """A frozen nn.Linear in the quantized layer's compute dtype holding `weight`."""
    dtype = getattr(quantized, "compute_dtype", None) or torch.float32
    bias = quantized.bias is not None
    dense = nn.Linear(quantized.in_features, quantized.out_features, bias, device=weight.device, dtype=dtype)
    dense.weight.data.copy_(weight)
    if bias:
        dense.bias.data.copy_(quantized.bias)
    return dense.requires_grad_(False)


def matches(module_name: str, names) -> bool:
    """PEFT's rule for target_modules / modules_to_save (and quant.py's skip): the full name, or its ending
    after a dot."""
    return any(module_name == name or module_name.endswith("." + name) for name in names)


def lora_layers(model: nn.Module, cfg: LoRAConfig):
    """(the decoder blocks' linears as (name, module), ids of the targeted ones, the modules_to_save), or a
    UserError naming what does not exist. The model may be on the meta device: train.py checks a config
    against the model's layer names this way before it reads any data."""
    # isinstance(nn.Linear) also finds bitsandbytes Linear4bit / Linear8bitLt: they subclass it.
    blocks = model.model.layers.named_modules(prefix="model.layers")
    linears = [(name, m) for name, m in blocks if isinstance(m, nn.Linear)]
    targets = () if cfg.targets == "all-linear" else cfg.targets
    if unknown := [target for target in targets if not any(matches(name, [target]) for name, _ in linears)]:
        raise unknown_targets_error(unknown, {name.rpartition(".")[2] for name, _ in linears})
    # all-linear leaves out the mixture-of-experts routers (`gate`), as PEFT does on transformers 5's models
    # (there the router is not an nn.Linear); naming `gate` puts adapters on them.
    routers = {id(m.gate) for m in model.modules() if isinstance(m, SparseMoE)}
    targeted = {
        id(m) for name, m in linears if matches(name, targets) or not targets and id(m) not in routers
    }
    modules = dict(model.named_modules())
    saved = [m for name, m in modules.items() if cfg.modules_to_save and matches(name, cfg.modules_to_save)]
    if missing := [n for n in cfg.modules_to_save if not any(matches(name, [n]) for name in modules)]:
        names = sorted({name.rpartition(".")[2] for name in modules if name and not name[-1].isdigit()})
        raise UserError(f"modules_to_save {missing} are not in the model; its modules: {', '.join(names)}")
    if any(id(inner) in targeted for module in saved for inner in module.modules()):
        raise UserError("modules_to_save must not hold LoRA targets; name whole layers such as embed_tokens")
    if any(is_quantized(inner) for module in saved for inner in module.modules()):
        raise UserError("modules_to_save holds 4/8-bit layers, which cannot train; load them unquantized")
    return linears, targeted, saved


def inject_lora(model: nn.Module, cfg: LoRAConfig, device=None) -> nn.Module:
    """Wrap the targeted linear layers of the decoder blocks (never lm_head), freeze everything else.
    device: where the adapters go when the base is on the meta device (else beside its weights)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise UserError("the model already has LoRA adapters; inject or load only once")
    linears, targeted, saved = lora_layers(model, cfg)
    model.requires_grad_(False)
    for name, linear in linears:
        if id(linear) in targeted:
            parent, _, child = name.rpartition(".")
            wrapped = LoRALinear(linear, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.use_dora, device)
            setattr(model.get_submodule(parent), child, wrapped)
    for module in saved:  # trained in place: on a tied model, embed_tokens and lm_head move together
        module.requires_grad_(True)
    model.lora_config = cfg  # save_adapter writes it
    return model


@torch.no_grad()
def init_dora_magnitudes(model: nn.Module, base_weight) -> None:
    """DoRA's m = ||W|| per row (B = 0: each layer starts as the base) for adapters injected on the meta
    device, before the model is sharded. base_weight(layer name): that layer's (out, in) weight as the run
    will hold it (a 4-bit one dequantized), read from the checkpoint one layer at a time."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and module.use_dora:
            weight = base_weight(name).to(module.lora_A.weight.device)
            module.lora_magnitude_vector.copy_(module.weight_norm(weight))


def peft_expert_adapters_caveat(model: nn.Module) -> str | None:
    """One line when PEFT 0.21 will not load this model's adapters as they are onto transformers 5's model of
    the same checkpoint, which holds each layer's experts fused in 3-D parameters (PEFT converts per-expert
    adapters to those, under the conditions below); None when it will (tests/test_moe.py)."""
    layers = model.model.layers
    adapted = {
        name.rpartition(".")[2]
        for layer in layers
        if layer.has_experts
        for name, module in getattr(layer, layer.feed_forward_name).experts.named_modules()
        if isinstance(module, LoRALinear)
    }
    if not adapted:
        return None
    problems = []
    if model.lora_config.dropout:
        problems.append(f"lora_dropout is {model.lora_config.dropout} (train with --lora-dropout 0)")
    gate_name, up_name, _ = model.config.expert_projection_names
    if len(adapted & {gate_name, up_name}) == 1:
        problems.append(f"name both {gate_name} and {up_name} (transformers fuses them)")
    dense_mlps = [layer.mlp for layer in layers if not layer.has_experts]
    if any(isinstance(module, LoRALinear) for mlp in dense_mlps for module in mlp.modules()):
        problems.append("it leaves the dense layers' MLP (mlp_only_layers) without their adapters")
    if not problems:
        return None
    return "note: PEFT will not load these expert adapters onto transformers 5's model: " + "; ".join(
        problems
    )


def trainable_parameters_line(model: nn.Module) -> str:
    """PEFT's print_trainable_parameters line, word for word."""
    trainable, total = count_parameters(model)
    percent = 100 * trainable / total
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) as PEFT counts them: a Params4bit holds 2 weights per byte of storage. PEFT copies
    modules_to_save and counts the copy too; we train them in place, so "all" is smaller by that much."""
    trainable = total = 0
    for param in model.parameters():  # shared (tied) tensors are listed once
        is_4bit = type(param).__name__ == "Params4bit" and param.bnb_quantized  # on meta: not packed yet
        n = param.numel() * 2 * param.element_size() if is_4bit else param.numel()
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def lora_state_dict(model: nn.Module, gathered: dict | None = None) -> dict[str, torch.Tensor]:
    """The trainable tensors (adapters and modules_to_save) under PEFT's on-disk names: the model's own, or
    `gathered` ones (by parameter name, a tied weight once: distributed.full_state_dict under FSDP)."""
    trainable = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    # remove_duplicate=False lists a tied lm_head under its own name too, as PEFT's files with
    # ensure_weight_tying carry both. Not state_dict(): on rank 0 alone under FSDP its hook reshards the
    # model, and the ranks' next forwards then disagree on what to gather (a hang under shard_grad_op).
    return {
        PEFT_PREFIX + name: param.detach() if gathered is None else gathered[trainable[id(param)]]
        for name, param in model.named_parameters(remove_duplicate=False)
        if id(param) in trainable
    }


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under Hugging Face names: adapters left out, `.base_layer` removed."""
    return {
        name.replace(".base_layer.", "."): tensor
        for name, tensor in model.state_dict().items()
        if not any(f".{adapter}" in name for adapter in ADAPTER_NAMES)
    }


def merge_lora(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.unmerge()
    return model


def save_adapter(model: nn.Module, path, base_model_name_or_path="", tensors: dict | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors, as peft 0.21 writes them (PEFT and vLLM load them).

    tensors: the trainable tensors under the model's own names, when the model does not hold them whole (under
    FSDP, distributed.full_state_dict gathers them); by default the model's own (lora_state_dict)."""
    cfg, path = model.lora_config, Path(path)
    path.mkdir(parents=True, exist_ok=True)
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    targets = sorted({name.rpartition(".")[2] for name in wrapped})
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear | LoRALinear)}
    if {name for name in linears if matches(name, targets)} != wrapped:
        targets = sorted(wrapped)  # adapters on only some layers of a kind: list those by full name
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "modules_to_save": list(cfg.modules_to_save) or None,
        # Keeps a trained embed_tokens tied to lm_head in PEFT, as it is here (the file then holds both).
        "ensure_weight_tying": model.config.tie_word_embeddings and model.lm_head.weight.requires_grad,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    # clone: safetensors refuses tensors that share memory (a tied embed_tokens / lm_head pair).
    tensors = {name: t.to("cpu").clone().contiguous() for name, t in lora_state_dict(model, tensors).items()}
    config_json = json.dumps(peft_config, indent=2)
    write_atomically(path / "adapter_config.json", lambda tmp: Path(tmp).write_text(config_json))
    write_atomically(
        path / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp, {"format": "pt"})
    )


def read_adapter_config(path) -> tuple[LoRAConfig, dict]:
    """The LoRAConfig an adapter directory (ours or PEFT's) describes, and its adapter_config.json as read."""
    config_file, weights_file = Path(path) / "adapter_config.json", Path(path) / "adapter_model.safetensors"
    for file in (config_file, weights_file):
        if not file.is_file():
            raise UserError(f"{file}: not found; give a directory saved by save_adapter or PEFT")
    try:
        peft_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{config_file}: not valid JSON ({error})") from None
    supported = {"peft_type": "LORA", "bias": "none", "fan_in_fan_out": False, "lora_bias": False}
    supported |= {
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "exclude_modules": None,
    }
    supported |= {"target_parameters": None, "trainable_token_indices": None, "layer_replication": None}
    for key, value in supported.items():
        if peft_config.get(key, value) not in (value, None):
            raise UserError(f"{config_file}: {key}={peft_config[key]!r} is not supported, only {value!r}")
    targets = peft_config["target_modules"]
    if isinstance(targets, str) and targets != "all-linear":
        raise UserError(
            f"{config_file}: target_modules as a regex ({targets!r}) is not supported; list names"
        )
    get = peft_config.get
    cfg = LoRAConfig(
        r=get("r"),
        alpha=get("lora_alpha"),
        dropout=get("lora_dropout", 0.0),
        targets=targets if isinstance(targets, str) else tuple(targets),
        use_rslora=get("use_rslora", False),
        use_dora=get("use_dora", False),
        modules_to_save=tuple(dict.fromkeys(get("modules_to_save") or ())),
    )
    return cfg, peft_config


def adapter_base_model(path) -> Path:
    """The base model directory an adapter names (adapter_config.json's base_model_name_or_path); a UserError
    naming it and --model when it is not a directory on this machine (a Hub id, or another machine's path)."""
    _, peft_config = read_adapter_config(path)
    base = peft_config.get("base_model_name_or_path")
    config_file = Path(path) / "adapter_config.json"
    if not base:
        raise UserError(f"{config_file} names no base model (base_model_name_or_path); pass --model DIR")
    if not Path(base).expanduser().is_dir():
        raise UserError(
            f"{config_file}: its base model {base} is not a directory here; pass --model DIR (that model's "
            "Hugging Face directory)"
        )
    return Path(base).expanduser()


def read_adapter_tensors(path) -> dict[str, torch.Tensor]:
    """An adapter directory's tensors under our names (`model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    tensors = {}
    with safe_open(Path(path) / "adapter_model.safetensors", framework="pt") as adapter:
        for key in adapter.keys():
            # PEFT's in-memory names work too: `.default` (the adapter's name), the modules_to_save copy.
            name = re.sub(r"\.(modules_to_save\.)?default(?=\.|$)", "", key.removeprefix(PEFT_PREFIX))
            tensors[name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")] = (
                adapter.get_tensor(key)
            )
    return tensors


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Inject LoRA as an adapter directory (ours or PEFT's) describes it, then load its tensors."""
    cfg, _ = read_adapter_config(path)
    weights_file = Path(path) / "adapter_model.safetensors"
    inject_lora(model, cfg)
    ours, loaded = model.state_dict(keep_vars=True), set()
    with torch.no_grad():
        for name, tensor in read_adapter_tensors(path).items():
            key = PEFT_PREFIX + name
            if name not in ours or not ours[name].requires_grad:
                raise UserError(f"{weights_file}: tensor '{key}' matches nothing trainable in this model")
            target = ours[name]
            if tensor.shape != target.shape:
                raise UserError(
                    f"{weights_file}: '{key}' has shape {tuple(tensor.shape)}, this model needs "
                    f"{tuple(target.shape)}; was the adapter trained on another base model?"
                )
            target.copy_(tensor)
            loaded.add(id(target))
    if missing := [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in loaded]:
        raise UserError(
            f"{weights_file}: lacks {len(missing)} adapter tensors, e.g. '{PEFT_PREFIX}{missing[0]}'"
        )
    return model
