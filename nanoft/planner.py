"""The engineer in the box: which fine-tuning method fits this model on this hardware, and what it costs.

    python train.py --plan [--model DIR] [--max-quality] [--domain-shift] [--plan-memory-gb 24]

    hardware = detect_hardware()                               # GPUs' memory, or host RAM on CPU
    plan = make_plan(load_config(path), hardware, TrainConfig(method="auto"))  # method, batch, lr, memory
    print(format_plan(plan))

The decision framework (a senior engineer's, applied in `make_plan`):
- Full fine-tune only when the user asks for maximum quality (or declares a domain shift, where new knowledge
  needs every weight) AND memory >= 4 x the model's fp32 size. That rule is the mixed-precision Adam budget:
  fp32 weights + fp32 gradients + two fp32 Adam moments = 4 x 4 = 16 bytes per parameter, before activations.
- LoRA on a 16-bit base when memory >= LORA_BAND x the 16-bit model (for a 7B: 24 GiB and up, the framework's
  24-80 GB band); QLoRA (4-bit base) below that (the 8-24 GB band for a 7B), as long as it fits.
- One device if the estimate fits (DDP when there are several, all holding the whole model); FSDP across the
  devices when it fits only sharded; FSDP with CPU offload when even that does not fit.
- A declared domain shift: continued pretraining on raw in-domain text first, then instruction tuning.
Every choice is also checked against `estimate_memory`, so the bands are calibrated on a 7B but the plan is
right for a 135M model too (which fits LoRA on anything and never needs 4-bit).

The memory estimate itself is nanoft/memory.py.
"""

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import lora
from nanoft.config import DEFAULT_LR, TrainConfig
from nanoft.errors import UserError
from nanoft.gates import MIN_EFFECTIVE_BATCH
from nanoft.memory import (
    GiB,
    MemoryEstimate,
    ParameterCount,
    TrainingShape,
    count_parameters,
    estimate_memory,
)
from nanoft.model import ModelConfig
from nanoft.schedule import MIN_LR_RATIO

# Of a device's memory, what tensors may use. CUDA: the rest is the context and the caching allocator's
# fragmentation. CPU: glibc keeps freed blocks cached; bench/memory_estimate.py's 34M model peaked ~1.3x its
# live tensors with the default malloc.
USABLE_FRACTION = {"cuda": 0.9, "cpu": 0.75}
LORA_BAND = 24 / 13.5  # the framework's 24 GiB for a 7B, whose 16-bit weights take 12.6 GiB (13.5 GB)
FULL_RULE_BYTES_PER_PARAM = 16  # 4 x the fp32 model: weights, gradients, Adam m and v


def gib(n_bytes: float) -> str:
    """GiB as the plan prints them: 0.19, 5.6, 114.3 (two digits below 1, so small budgets compare)."""
    value = n_bytes / GiB
    return f"{value:.2f}" if value < 1 else f"{value:.1f}"


@dataclass
class Hardware:
    device_type: str  # "cuda" or "cpu"
    description: str  # e.g. "1 x NVIDIA H100 80GB HBM3 (79.2 GiB)"
    memory_bytes: int  # per device (per process on CPU: the ranks share the host's RAM)
    device_count: int  # ranks that will train: WORLD_SIZE, else the CUDA devices, else 1
    host_memory_bytes: int  # available host RAM, where FSDP CPU offload puts the shards

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * USABLE_FRACTION[self.device_type])


def host_memory() -> tuple[int, int]:
    """(MemAvailable, MemTotal) from /proc/meminfo, in bytes."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        raise UserError("cannot read /proc/meminfo to size host memory; pass --plan-memory-gb")
    values = {
        line.split(":")[0]: int(line.split()[1]) * 1024
        for line in meminfo.read_text().splitlines()
        if line.split()[-1] == "kB"
    }
    return values["MemAvailable"], values["MemTotal"]


def detect_hardware(device: str = "auto", memory_gb: float = 0, device_count: int = 0) -> Hardware:
    """The hardware this run will train on; memory_gb / device_count plan for another machine instead
    (GiB per device as GPUs are sold: a "24 GB" card has 24 GiB; planned devices are taken to be GPUs)."""
    available, total = host_memory()
    world_size = int(os.environ.get("WORLD_SIZE", "0"))
    if memory_gb:
        count = device_count or world_size or 1
        memory = int(memory_gb * GiB)
        description = f"planned: {count} x {memory_gb:g} GiB GPU"
        return Hardware("cuda", description, memory, count, available)
    if device != "cpu" and torch.cuda.is_available():
        count = device_count or world_size or torch.cuda.device_count()
        properties = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        memory = min(p.total_memory for p in properties)  # the smallest device limits every rank
        description = f"{count} x {properties[0].name} ({memory / GiB:.1f} GiB)"
        return Hardware("cuda", description, memory, count, available)
    count = device_count or world_size or 1
    description = f"CPU, {available / GiB:.1f} of {total / GiB:.1f} GiB RAM available"
    if count > 1:
        description += f", shared by {count} processes"
    return Hardware("cpu", description, available // count, count, available)


@dataclass
class Plan:
    method: str  # "full", "lora" or "qlora"
    layout: str  # "single", "ddp", "fsdp" or "fsdp_offload"
    micro_batch: int
    activation_checkpointing: bool
    estimate: MemoryEstimate
    fits: bool  # False only for a method the user fixed that does not fit even at micro-batch 1
    hardware: Hardware
    request: TrainConfig  # what the user asked for (--method auto: let the plan choose)
    compute_bytes: int  # 2 for bf16/fp16, 4 for fp32 (nanoft/precision.py decides)
    parameters: ParameterCount
    reasons: list[str] = field(default_factory=list)

    @property
    def grad_accum(self) -> int:
        """Enough micro-batches for an effective batch of MIN_EFFECTIVE_BATCH, or the user's larger one."""
        ranks = self.hardware.device_count
        wanted = max(MIN_EFFECTIVE_BATCH, self.request.batch_size * self.request.grad_accum * ranks)
        return math.ceil(wanted / (self.micro_batch * ranks))

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.hardware.device_count

    @property
    def lr(self) -> float:
        return self.request.lr or DEFAULT_LR[self.method]


def framework_allows(
    method: str, params: ParameterCount, hardware: Hardware, layout: str, request, compute_bytes
):
    """(allowed, why): the framework's rule for `method` on `layout`, before the estimate decides whether it
    fits. DDP and one device need it all on each device; FSDP pools the devices' memory."""
    devices = hardware.device_count if layout.startswith("fsdp") else 1
    memory = hardware.memory_bytes * devices
    where = f"{devices} x {gib(hardware.memory_bytes)} GiB"
    if method == "full":
        needed = FULL_RULE_BYTES_PER_PARAM * params.total
        rule = f"4 x the fp32 model = {gib(needed)} GiB (16 bytes/parameter: weights, grads, Adam m, v)"
        if not (request.max_quality or request.domain_shift):
            return False, "full fine-tune: not asked for (--max-quality); adapters reach most of its quality"
        if memory < needed:
            return False, f"full fine-tune: {where} is below {rule}"
        wanted = "maximum quality asked for" if request.max_quality else "a domain shift needs capacity"
        return True, f"full fine-tune: {wanted}, and {where} >= {rule}"
    if method == "lora":
        needed = LORA_BAND * compute_bytes * params.total
        band = f"{LORA_BAND:.2f} x the {gib(compute_bytes * params.total)} GiB 16-bit model"
        if memory < needed:
            return False, f"LoRA (16-bit base): {where} is below {band} (the 8-24 GB band for a 7B: 4-bit)"
        return True, f"LoRA (16-bit base): {where} >= {band} (the framework's 24 GB and up for a 7B)"
    return True, "QLoRA (4-bit NF4 base): the smallest footprint, at some quality and speed cost"


def layouts(hardware: Hardware) -> list[str]:
    """Simplest first. FSDP only across several GPUs: on one there is nothing to shard over, and train.py
    runs FSDP only under torchrun."""
    if hardware.device_type == "cpu" or hardware.device_count == 1:
        return ["ddp" if hardware.device_count > 1 else "single"]
    return ["ddp", "fsdp", "fsdp_offload"]


def halvings(micro_batch: int) -> list[int]:
    sizes = [micro_batch]
    while sizes[-1] > 1:
        sizes.append(sizes[-1] // 2)
    return sizes


def fit_batch(config: ModelConfig, method: str, layout: str, hardware: Hardware, request, compute_bytes: int):
    """(micro_batch, checkpointing, estimate) that fits, or None. Halving the micro-batch (accumulating more)
    costs nothing in quality; checkpointing costs ~30% more compute, so it comes only when micro-batch 1
    does not fit."""
    checkpointing_options = [True] if request.activation_checkpointing else [False, True]
    for checkpointing in checkpointing_options:
        for micro_batch in halvings(request.batch_size):
            shape = training_shape(
                method, layout, micro_batch, checkpointing, hardware, request, compute_bytes
            )
            estimate = estimate_memory(config, shape)
            host_needed = estimate.host_offload * hardware.device_count
            host_usable = USABLE_FRACTION["cpu"] * hardware.host_memory_bytes
            if estimate.total <= hardware.usable_bytes and host_needed <= host_usable:
                return micro_batch, checkpointing, estimate
    return None


def training_shape(
    method, layout, micro_batch, checkpointing, hardware, request, compute_bytes
) -> TrainingShape:
    """What the memory estimate needs to know of a candidate: the method, layout and micro-batch tried, the
    rest as the user asked (request: the TrainConfig)."""
    return TrainingShape(
        method=method,
        micro_batch=micro_batch,
        seq_len=request.seq_len,
        activation_checkpointing=checkpointing,
        compute_bytes=compute_bytes,
        lora_r=request.lora_r,
        lora_targets=request.lora_targets,
        lora_dropout=request.lora_dropout,
        use_dora=request.use_dora,
        modules_to_save=tuple(request.modules_to_save),
        optim=request.optim,
        packed=request.pack,
        shards=hardware.device_count if layout.startswith("fsdp") else 1,
        cpu_offload=layout == "fsdp_offload",
        ddp=layout == "ddp",
        device_type=hardware.device_type,
    )


# The methods, most to least faithful to the data: make_plan tries them in this order.
METHOD_NAMES = {
    "full": "full fine-tune",
    "lora": "LoRA on a 16-bit base",
    "qlora": "QLoRA on a 4-bit NF4 base",
}
DOMAIN_SHIFT_ADVICE = (
    "domain shift declared: first continue pretraining on raw in-domain text (--data-format text), with a "
    "full fine-tune if memory allows or LoRA on all-linear with r >= 64 (new knowledge needs more capacity "
    "than a new style), then instruction-tune the result"
)
LAYOUT_WHY = {
    "single": "fits one device",
    "ddp": "fits one device, so each of the devices holds the whole model (DDP)",
    "fsdp": "too big for one device: FSDP shards weights, gradients and optimizer states across the devices",
    "fsdp_offload": "too big even sharded: FSDP with CPU offload keeps the shards in host RAM (slow)",
}


def make_plan(config: ModelConfig, hardware: Hardware, request: TrainConfig, compute_bytes: int = 2) -> Plan:
    """The least lossy method the framework allows that fits, on the simplest layout, at the largest
    micro-batch up to the user's (request: the TrainConfig; method "auto" lets the plan choose); raises
    UserError when nothing fits (a method fixed by the user is planned anyway, marked as not fitting)."""
    params = count_parameters(config)
    reasons = [DOMAIN_SHIFT_ADVICE] if request.domain_shift else []
    candidates = tuple(METHOD_NAMES) if request.method == "auto" else (request.method,)
    for method in candidates:
        for layout in layouts(hardware):
            if request.method == "auto":
                allowed, why = framework_allows(method, params, hardware, layout, request, compute_bytes)
            else:
                allowed, why = True, f"{method}: chosen with --method (--method auto lets the plan choose)"
            fit = fit_batch(config, method, layout, hardware, request, compute_bytes) if allowed else None
            if fit is not None:  # (micro_batch, checkpointing, estimate)
                reasons += [why, f"{method} {LAYOUT_WHY[layout]}: {gib(fit[2].total)} GiB per device"]
                return Plan(method, layout, *fit, True, hardware, request, compute_bytes, params, reasons)
        if not allowed:  # the last layout pools the most memory: if the rule refused it, it refused them all
            reasons.append(why)
            continue
        most_sharded = layouts(hardware)[-1]
        shape = training_shape(method, most_sharded, 1, True, hardware, request, compute_bytes)
        smallest = estimate_memory(config, shape)
        reasons.append(
            f"{method}: needs {gib(smallest.total)} GiB per device even at micro-batch 1 with "
            f"checkpointing, more than the {gib(hardware.usable_bytes)} GiB usable"
        )
    if request.method == "auto":
        raise UserError(
            f"no method fits {hardware.description}: QLoRA needs {gib(smallest.total)} GiB per device "
            "at micro-batch 1 with checkpointing; use a smaller model, a shorter --seq-len, or more devices"
        )
    return Plan(
        request.method,
        most_sharded,
        1,
        True,
        smallest,
        False,
        hardware,
        request,
        compute_bytes,
        params,
        reasons,
    )


LAYOUT_NAMES = {
    "single": "one device",
    "ddp": "DDP",
    "fsdp": "FSDP (ZeRO-3-like sharding)",
    "fsdp_offload": "FSDP + CPU offload",
}


# What to watch to know each hyperparameter is working, and what to do when it is not: printed at the start of
# every run (hyperparameter_notes) and by --plan (watch_list), each from this one table.
WATCH = {
    "lr": "loss should fall within the first 100 steps; NaN or spikes -> halve it; flat -> try --lr-sweep",
    "warmup": "a loss spike right after warmup -> lengthen warmup or lower the lr",
    "effective batch": f">= {MIN_EFFECTIVE_BATCH} keeps updates steady; out of memory -> halve --batch-size, "
    "double --grad-accum",
    "micro-batch": "memory below the limit (out of memory: it is halved and accumulation doubled "
    "automatically)",
    "seq len": "the data report's truncated count: more than a few % truncated -> raise --seq-len",
    "epochs": "val loss rising while train loss falls is overfitting -> the best checkpoint is kept; use "
    "fewer epochs",
    "lora": "train loss stalls high -> raise r or use all-linear",
    "full": "watch for forgetting (val on general data)",
    "grad clip": "the grad norm should settle below it; clipped every step -> lower the lr",
    "weight decay": "on matrices only (never on norms or biases)",
    "eval": "val loss should be below the baseline by the first eval",
    "activation checkpointing": "on: ~30% slower steps for much less activation memory; turn off if memory "
    "allows",
    "rslora": "a loss spike early -> lower the lr; a larger r adds capacity without shrinking the update",
    "dora": "slower steps (the rows' norms of W + s B A at every forward) for a val loss that should beat "
    "plain LoRA's at the same r: if it does not, drop --use-dora",
    "dora on 4-bit with dropout": "each adapted layer's dequantized weight is kept until backward: "
    "--lora-dropout 0 or --activation-checkpointing frees it",
    "modules_to_save": "far more weights than the adapters: val loss rising while train falls comes sooner "
    "-> fewer epochs; needed for tokens the data adds (their rows start untrained), rarely otherwise",
    "4-bit base": "compare the val loss of the 4-bit base + adapter with the --merge export (the adapter on "
    "the original 16-bit weights) before serving",
}


def watch_list(plan: Plan) -> list[tuple[str, str]]:
    """(hyperparameter and value, what to watch to know it is working) for every knob of the plan."""
    request = plan.request
    if plan.method == "full":
        method = ("full fine-tune", WATCH["full"])
    else:
        lora = f"LoRA r {request.lora_r}, alpha {request.lora_alpha:g}, dropout {request.lora_dropout:g}"
        method = (f"{lora}, on {','.join(request.lora_targets)}", WATCH["lora"])
    watch = [
        (f"lr {format_lr(plan.lr)}", WATCH["lr"]),
        method,
        (f"warmup {request.warmup_frac:.0%} of steps, cosine to {MIN_LR_RATIO:.0%}", WATCH["warmup"]),
        (f"effective batch {plan.effective_batch}", WATCH["effective batch"]),
        (f"micro-batch {plan.micro_batch}", WATCH["micro-batch"]),
        (f"seq len {request.seq_len}", WATCH["seq len"]),
        (f"epochs {request.epochs:g}, eval every {request.eval_every}", WATCH["epochs"]),
        (f"grad clip {request.grad_clip:g}", WATCH["grad clip"]),
        (f"weight decay {request.weight_decay:g}", WATCH["weight decay"]),
        (
            "activation checkpointing " + ("on" if plan.activation_checkpointing else "off"),
            WATCH["activation checkpointing"],
        ),
    ]
    if plan.method != "full":
        watch += lora_variant_watch(request, plan.method)
    if plan.method == "qlora":
        watch.append(("4-bit base", WATCH["4-bit base"]))
    return watch


def lora_variant_watch(config: TrainConfig, method: str) -> list[tuple[str, str]]:
    """(variant, what to watch) for the LoRA variants a run uses (method: "lora" or "qlora", as planned)."""
    watch = []
    if config.use_rslora:
        sqrt_r = f"{math.sqrt(config.lora_r):.3g}"
        watch.append(
            (
                "rsLoRA (scale alpha / sqrt(r))",
                f"the update is sqrt(r) = {sqrt_r}x plain LoRA's at this r and alpha: {WATCH['rslora']}",
            )
        )
    if config.use_dora:
        dequantized = method == "qlora" and config.lora_dropout > 0
        extra = f"; on a 4-bit base with dropout {WATCH['dora on 4-bit with dropout']}" if dequantized else ""
        watch.append(("DoRA (each adapted layer also learns its rows' lengths)", WATCH["dora"] + extra))
    if config.modules_to_save:
        saved = ",".join(config.modules_to_save)
        watch.append(
            (
                f"modules_to_save {saved} (trained whole, in the base's dtype, saved in the adapter)",
                WATCH["modules_to_save"],
            )
        )
    return watch


def hyperparameter_notes(
    config: TrainConfig,
    *,
    world_size: int,
    steps_per_epoch: float,
    total_steps: int,
    warmup_steps: int,
    trainable: int,
    total: int,
    precision: str,
) -> list[str]:
    """One line per key hyperparameter of the run: its value, then what to watch (WATCH)."""
    lr_source = f"default for {config.method}" if config.lr == DEFAULT_LR.get(config.method) else "set"
    batch = config.batch_size * config.grad_accum * world_size
    epochs = f"{total_steps / steps_per_epoch:.2g} epochs of {steps_per_epoch:.3g} steps"
    lines = [
        f"lr {config.lr:.0e} ({lr_source}): {WATCH['lr']}",
        f"schedule: warmup {warmup_steps} of {total_steps} steps ({config.warmup_frac:.0%}), then cosine to "
        f"{config.lr * MIN_LR_RATIO:.0e}: {WATCH['warmup']}",
        f"effective batch {batch} = {config.batch_size} per device x {config.grad_accum} accumulation x "
        f"{world_size} device(s): {WATCH['effective batch']}",
        f"{total_steps} steps = {epochs}: {WATCH['epochs']}",
    ]
    if config.method in ("lora", "qlora"):
        base = f" on a {config.quant} base" if config.method == "qlora" else ""
        scale = lora.lora_scale(config.lora_r, config.lora_alpha, config.use_rslora)
        lines.append(
            f"LoRA r={config.lora_r} alpha={config.lora_alpha:g} (scale {scale:.3g}) "
            f"on {','.join(config.lora_targets)}{base}: {trainable:,} of {total:,} weights train "
            f"({trainable / total:.2%}); {WATCH['lora']}"
        )
        lines += [f"{variant}: {watch}" for variant, watch in lora_variant_watch(config, config.method)]
    else:
        lines.append(f"full fine-tune: all {trainable:,} weights train; {WATCH['full']}")
    lines += [
        f"grad clip {config.grad_clip:g}: {WATCH['grad clip']}",
        f"weight decay {config.weight_decay:g} {WATCH['weight decay']}",
        f"eval every {config.eval_every} steps and at step 0 (the baseline): {WATCH['eval']}; early stop "
        f"after {config.patience or 'no'} evals without a new best",
        f"precision {precision}",
    ]
    return lines


def format_plan(plan: Plan, model_name: str = "") -> str:
    p, e, hw = plan.parameters, plan.estimate, plan.hardware
    c = plan.compute_bytes
    dtype = "bf16" if c == 2 else "fp32"
    tokens = f"{plan.micro_batch} x {plan.request.seq_len} tokens"
    lines = [
        f"nanoft plan{' for ' + model_name if model_name else ''}: {p.total / 1e9:.2f}B parameters "
        f"({p.block_linear / 1e9:.2f}B in the decoder blocks' linears, {p.embedding / 1e9:.2f}B embedding"
        + (f", {p.lm_head / 1e9:.2f}B lm_head)" if p.lm_head else ", lm_head tied)")
        + (f"; {p.active / 1e9:.2f}B active per token (experts)" if p.active < p.total else ""),
        f"hardware: {hw.description}; usable {gib(hw.usable_bytes)} GiB per device "
        f"({USABLE_FRACTION[hw.device_type]:.0%})",
        "",
        f"method: {METHOD_NAMES[plan.method]}, {LAYOUT_NAMES[plan.layout]}"
        + ("" if plan.fits else "  ** estimated NOT to fit: expect out-of-memory **"),
        "why:",
        *(f"  - {reason}" for reason in plan.reasons),
        "",
        f"memory per device (GiB) at micro-batch {tokens}:",
    ]
    weights = {"full": f"fp32 master + {dtype} autocast copies", "lora": f"{dtype} base", "qlora": "NF4 base"}
    rows = [
        (f"weights ({weights[plan.method]})", e.weights),
        ("adapters (fp32 + compute-dtype copies)", e.adapters),
        ("gradients (trainable only)", e.gradients),
        (f"optimizer states ({plan.request.optim})", e.optimizer),
        (
            "activations without checkpointing" + ("" if plan.activation_checkpointing else "  <- used"),
            e.activations_full,
        ),
        (
            "activations with checkpointing" + ("  <- used" if plan.activation_checkpointing else ""),
            e.activations_checkpointed,
        ),
        ("logits / loss (chunks of 2^25 logits, never all)", e.logits_loss),
        *([("DoRA row norms (one layer's fp32 W + s B A)", e.dora_norm)] if e.dora_norm else []),
        ("kernel workspace", e.workspace),
    ]
    lines += [f"  {name:<52}{value / GiB:>8.2f}" for name, value in rows]
    lines.append(f"  {'total (peak)':<52}{e.total / GiB:>8.2f}  of {gib(hw.usable_bytes)} usable")
    if e.host_offload:
        lines.append(f"  {'host RAM for the offloaded shards (per rank)':<52}{e.host_offload / GiB:>8.2f}")
    lines += [
        "",
        f"batch: micro-batch {plan.micro_batch} x accumulation {plan.grad_accum} x {hw.device_count} "
        f"device(s) = effective batch {plan.effective_batch} (>= {MIN_EFFECTIVE_BATCH})",
        f"lr {format_lr(plan.lr)} with {plan.request.optim}: linear warmup over "
        f"{plan.request.warmup_frac:.0%} of the steps, then cosine decay to {MIN_LR_RATIO:.0%} of the peak",
        "",
        "what to watch:",
    ]
    lines += [f"  - {name}: {what}" for name, what in watch_list(plan)]
    return "\n".join(lines)


def format_lr(lr: float) -> str:
    """2e-4, 5e-5, 1.5e-4: how people write learning rates."""
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def apply_plan(config: TrainConfig, plan: Plan) -> TrainConfig:
    """The TrainConfig as --method auto trains it: the plan's method, micro-batch, accumulation and
    checkpointing, and FSDP where the plan shards the model (with CPU offload where it offloads)."""
    return replace(
        config,
        method=plan.method,
        batch_size=plan.micro_batch,
        grad_accum=plan.grad_accum,
        activation_checkpointing=plan.activation_checkpointing,
        fsdp="full_shard" if plan.layout.startswith("fsdp") and config.fsdp == "none" else config.fsdp,
        fsdp_cpu_offload=config.fsdp_cpu_offload or plan.layout == "fsdp_offload",
    )


def plan_for_run(config: TrainConfig, planning_only: bool) -> Plan:
    """The plan for a TrainConfig. `--plan` (planning_only) counts every visible GPU and shows the
    framework's choice next to the configured --method; `--method auto` counts the processes that will
    train (WORLD_SIZE, else 1)."""
    from nanoft.default_model import resolve_model  # lazily: only planning needs them
    from nanoft.precision import choose_compute_dtype
    from nanoft.weights import load_config

    model_config = load_config(resolve_model(config.model))
    if config.plan_memory_gb:
        compute_bytes = 2  # planned GPUs are taken to have bf16 (Ampere and newer)
    else:
        device = torch.device("cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu")
        compute_bytes = choose_compute_dtype(config.dtype, device)[0].itemsize
    device_count = config.plan_devices or (0 if planning_only else int(os.environ.get("WORLD_SIZE", "1")))
    hardware = detect_hardware(config.device, config.plan_memory_gb, device_count)
    if not planning_only:
        return make_plan(model_config, hardware, config, compute_bytes)
    try:
        plan = make_plan(model_config, hardware, replace(config, method="auto"), compute_bytes)
    except UserError as nothing_fits:  # show the smallest method's memory, marked as not fitting
        plan = make_plan(model_config, hardware, replace(config, method="qlora"), compute_bytes)
        plan.reasons = [str(nothing_fits)]
    if config.method not in ("auto", plan.method):
        configured = make_plan(model_config, hardware, config, compute_bytes)
        where = LAYOUT_NAMES[configured.layout]
        verdict = (
            f"fits at micro-batch {configured.micro_batch} on {where}" if configured.fits else "does NOT fit"
        )
        needs = f"{gib(configured.estimate.total)} GiB per device"
        plan.reasons.append(
            f"--method {config.method} as configured {verdict} ({needs}); --method auto trains with this "
            "plan's choice"
        )
    return plan
