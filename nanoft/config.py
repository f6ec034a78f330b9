"""The training configuration: one dataclass, from which the command line is derived.

    config = parse_config(["--lora-r", "8", "--config", "run.toml"])   # defaults < run.toml < flags
    config = parse_config(["--out", "runs/x", "--resume"])             # defaults < runs/x/config.json < flags

Every field is a flag (`lora_r` -> `--lora-r`) with its help text, and a key of a TOML (or JSON) config file.
Booleans get `--flag` / `--no-flag`; list fields take several values or one comma-separated value.
A field left at None is resolved by `with_defaults` once the method is settled (e.g. the lr by method) and
saved resolved in the run directory, so `--config runs/x/config.json` repeats a run (a run resumed with
another lr or schedule records the changes there, and --config says it cannot repeat that one). Validation is
in `__post_init__`; every problem is a one-line UserError (exit code 2), including argparse's own (unknown
flags, bad values).
"""

import argparse
import json
import math
import os
import sys
import tomllib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path

from nanoft.errors import UserError
from nanoft.precision import DTYPES

# Every choice the command line offers, listed once: the code that implements a choice imports its list from
# here (quant.py, data.py, nanoft/distributed.py); the dtypes are nanoft/precision.py's.
METHODS = ("lora", "qlora", "full", "auto")
QUANT_TYPES = ("nf4", "fp4", "int8")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
DEVICES = ("auto", "cuda", "cpu")
# none: DDP under torchrun; full_shard: ZeRO-3-like (reshard after forward); shard_grad_op: ZeRO-2-like (keep)
FSDP_MODES = ("none", "full_shard", "shard_grad_op")
DATA_FORMATS = ("auto", "alpaca", "chat", "sharegpt", "text")
ALPACA_STYLES = ("auto", "chat", "alpaca")
MERGE_BASES = ("original", "quantized")  # nanoft/merge.py
PER_INVOCATION = ("config", "resume", "overwrite")  # flags that are not part of a run's saved config
# A run resumed with another lr (or schedule, ...) lists the changes under this key of its config.json, so
# that --config with that file says it does not repeat the run.
CHANGED_ON_RESUME = "changed_on_resume"
DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 5e-5}  # the playbook's starting points


def flag(default, help, choices=None):
    """A config field: its default, its --help text and, optionally, the values it accepts."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # what to train, on what, where to
    model: str = flag("", "Hugging Face model directory (default: the built-in SmolLM2-135M-Instruct)")
    data: list[str] = flag(
        [],
        "training data files: .jsonl/.json (Alpaca, chat, ShareGPT, text) or .txt "
        "(default: the built-in Python-docs instruction set)",
    )
    val_data: list[str] = flag([], "validation data files (default: a seeded --val-frac split of --data)")
    out: str = flag("", "run directory (default: runs/<time stamp>; required under torchrun)")
    config: str = flag("", "TOML or JSON file setting any of these fields by name; flags override it")
    resume: bool = flag(False, "continue the run in --out from its latest checkpoint, exactly")
    overwrite: bool = flag(False, "delete what --out holds and start afresh")

    # method
    method: str = flag(
        "lora",
        "lora: adapters on a 16-bit base; qlora: adapters on a 4-bit base; full: every "
        "weight; auto: let the planner choose",
        METHODS,
    )
    quant: str = flag("", "base weight quantization for --method qlora (default nf4)", QUANT_TYPES)
    lora_r: int = flag(16, "LoRA rank: capacity of the update (8-64 typical)")
    lora_alpha: float = flag(32.0, "LoRA alpha: the update is scaled by alpha / r (keep alpha = 2r)")
    lora_dropout: float = flag(0.05, "dropout on the LoRA input")
    lora_targets: list[str] = flag(["q_proj", "v_proj"], "linear layers that get adapters, or all-linear")

    # data
    data_format: str = flag("auto", "data format (auto detects it from the records)", DATA_FORMATS)
    alpaca_style: str = flag(
        "auto",
        "Alpaca records: the model's chat template, or the Alpaca prompt "
        "(auto: chat when the model has a template)",
        ALPACA_STYLES,
    )
    seq_len: int = flag(1024, "longest sequence in tokens; longer examples are truncated (and counted)")
    val_frac: float = flag(0.05, "fraction of --data held out for validation when --val-data is not given")
    pack: bool = flag(False, "pack several examples per sequence (no padding; attention stays per example)")
    group_by_length: bool = flag(False, "batch examples of similar length together (less padding)")
    dedup: bool = flag(True, "remove exact and near-duplicate records before the split")
    near_dup_threshold: float = flag(
        0.8, "MinHash Jaccard similarity above which records are near-duplicates"
    )
    train_on_everything: bool = flag(False, "train on prompts too, not only on the responses")
    skip_bad_records: bool = flag(False, "skip (and count) malformed records instead of stopping")

    # optimization
    lr: float | None = flag(None, "peak learning rate (default: 2e-4 for LoRA/QLoRA, 5e-5 for full)")
    batch_size: int = flag(4, "sequences per micro-batch per device")
    grad_accum: int = flag(8, "micro-batches accumulated per optimizer step")
    epochs: float = flag(3.0, "passes over the training data at most")
    max_steps: int = flag(0, "optimizer steps to train; overrides --epochs (0: as many as --epochs gives)")
    warmup_frac: float = flag(0.03, "fraction of the steps spent warming the lr up from 0")
    optim: str = flag("adamw", "optimizer (8-bit variants need bitsandbytes)", OPTIMIZERS)
    weight_decay: float = flag(0.01, "AdamW weight decay, applied to matrices only")
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0: off)")
    seed: int = flag(0, "random seed: data order, split, adapter initialisation, dropout")

    # evaluation and checkpoints
    eval_every: int = flag(50, "evaluate on the val split every this many steps (and at step 0 and the end)")
    save_every: int = flag(100, "save a resumable checkpoint every this many steps (and at the end)")
    keep_last: int = flag(2, "resumable checkpoints kept (plus the best one)")
    patience: int = flag(5, "stop after this many evaluations without a better val loss (0: never)")
    merge: bool = flag(False, "also export the best adapter merged into the base model (merged/)")
    merge_base: str = flag(
        "original",
        "what --merge adds the adapter to: the checkpoint's original 16-bit weights, or (qlora) its weights "
        "rounded through --quant as the run's base held them",
        MERGE_BASES,
    )

    # hardware and speed
    device: str = flag("auto", "where to train (auto: cuda when torch sees a GPU, else cpu)", DEVICES)
    dtype: str = flag(
        "auto",
        "compute dtype: bf16 where the hardware has it, else fp16 on GPU, else fp32",
        ("auto", *DTYPES),
    )
    activation_checkpointing: bool = flag(
        False, "recompute activations in backward: less memory, ~30% slower"
    )
    compile: bool = flag(False, "torch.compile each decoder layer")

    # distributed, under torchrun (nanoft/distributed.py)
    fsdp: str = flag(
        "none",
        "shard the model over the torchrun processes (FSDP2): full_shard also frees each layer's gathered "
        "weights after its forward (ZeRO-3-like, least memory), shard_grad_op keeps them until backward "
        "(ZeRO-2-like, less communication); none: DDP, a full copy per process",
        FSDP_MODES,
    )
    fsdp_cpu_offload: bool = flag(
        False, "with --fsdp: keep parameter shards, gradients and optimizer state in CPU RAM"
    )
    dist_timeout: int = flag(
        600, "seconds a process waits for the others before the whole job stops with an error"
    )

    # the engineer in the box: plan, LR range test (nanoft/planner.py, nanoft/lr_sweep.py)
    plan: bool = flag(False, "print the plan (method, memory, batch, lr, what to watch) and exit")
    plan_memory_gb: float = flag(0.0, "plan for GPUs of this many GiB each instead of this machine")
    plan_devices: int = flag(0, "plan for this many GPUs (0: this machine's)")
    max_quality: bool = flag(False, "maximum quality wanted: --method auto may choose a full fine-tune")
    domain_shift: bool = flag(False, "the data is a new domain: the plan adds continued pretraining first")
    lr_sweep: bool = flag(False, "LR range test on ~1% of the data: print a table and an lr, then exit")

    def __post_init__(self):
        for f in fields(self):
            value, choices = getattr(self, f.name), f.metadata["choices"]
            if choices and value not in choices and not (f.name == "quant" and value == ""):
                raise UserError(f"--{kebab(f.name)} {value}: unknown; choose from {', '.join(choices)}")
            # argparse and TOML both read "nan" and "inf" as floats, and every comparison below passes nan.
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{kebab(f.name)} {value}: must be a finite number")
        at_least_one = "batch_size grad_accum seq_len eval_every save_every keep_last lora_r dist_timeout"
        for name in at_least_one.split():
            if getattr(self, name) < 1:
                raise UserError(f"--{kebab(name)} {getattr(self, name)}: must be at least 1")
        not_negative = "max_steps patience grad_clip weight_decay lora_alpha plan_memory_gb plan_devices"
        for name in not_negative.split():
            if getattr(self, name) < 0:
                raise UserError(f"--{kebab(name)} {getattr(self, name)}: must not be negative")
        for name in ("warmup_frac", "lora_dropout", "val_frac"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"--{kebab(name)} {getattr(self, name)}: must be in [0, 1)")
        if self.epochs <= 0:
            raise UserError(f"--epochs {self.epochs}: must be positive")
        if self.lr is not None and not 0 < self.lr < 1:
            raise UserError(
                f"--lr {self.lr}: must be in (0, 1); typical: 1e-4 to 3e-4 for LoRA, 1e-5 to 1e-4 full"
            )
        if self.quant and self.method == "full":
            raise UserError(
                f"--method full trains every weight and cannot use a --quant {self.quant} base; "
                "use --method qlora, or drop --quant"
            )
        if self.quant and self.method == "lora":
            raise UserError(
                f"--quant {self.quant} quantizes the base under LoRA, which is --method qlora; "
                "pass --method qlora"
            )
        if self.merge_base == "quantized" and self.method != "qlora":
            raise UserError(
                f"--merge-base quantized merges into the 4-bit base a --method qlora run trains on; "
                f"--method {self.method} has none: drop --merge-base"
            )
        if self.merge and self.method == "full":
            raise UserError(
                "--merge folds LoRA adapters into the base; a full fine-tune has none (its weights "
                "are saved whole): drop --merge"
            )
        if self.resume and self.overwrite:
            raise UserError(
                "--resume continues the run in --out and --overwrite deletes it; pass one of them"
            )
        if self.resume and not self.out:
            raise UserError("--resume needs --out: the run directory to continue")
        if not self.lora_targets:
            raise UserError("--lora-targets is empty; name linear layers (e.g. q_proj,v_proj) or all-linear")
        # distributed (nanoft/distributed.py, nanoft/fsdp_qlora.py)
        if self.fsdp_cpu_offload and self.fsdp == "none":
            raise UserError(
                "--fsdp-cpu-offload offloads FSDP's shards; add --fsdp full_shard (or shard_grad_op)"
            )
        if self.fsdp != "none" and self.optim != "adamw":
            raise UserError(
                f"--optim {self.optim} cannot update FSDP's sharded parameters (bitsandbytes has no DTensor "
                "support); use --optim adamw with --fsdp, or drop --fsdp (DDP)"
            )
        if self.fsdp != "none" and self.quant == "int8":
            raise UserError(
                "--fsdp cannot shard int8 layers; use --quant nf4 with --fsdp, or drop --fsdp (DDP)"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def with_defaults(self) -> "TrainConfig":
        """The fields left to the trainer, filled in once --method is settled (--method auto's plan picks it):
        the lr by method, --out by a time stamp, NF4 for QLoRA."""
        quant = self.quant or ("nf4" if self.method == "qlora" else "")
        return replace(
            self, lr=self.lr or DEFAULT_LR[self.method], out=self.out or default_out_dir(), quant=quant
        )


def kebab(name: str) -> str:
    return name.replace("_", "-")


def field_type(name: str):
    """int, float, str, bool or list for a field (Optional[X] counts as X)."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints usage and an error and exits 2; nanoft errors are one `error:` line instead."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog=f"python {Path(sys.argv[0]).name}",
        description="Fine-tune a Llama-family model with LoRA, QLoRA or a full fine-tune.",
        argument_default=argparse.SUPPRESS,  # only flags actually given appear, so they can override a file
    )
    for f in fields(TrainConfig):
        kind = field_type(f.name)
        default = f.default if f.default is not MISSING else f.default_factory()
        # By kind, not by value: 0 == False and 1.0 == True, so a dict lookup showed --seed 0 as "off".
        shown = (
            ",".join(default) if kind is list else ("on" if default else "off") if kind is bool else default
        )
        help_text = f.metadata["help"] + (f" (default: {shown})" if shown not in ("", None) else "")
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        name, choices = f"--{kebab(f.name)}", f.metadata["choices"]
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind is list:
            parser.add_argument(name, nargs="+", metavar=f.name.upper(), help=help_text)
        else:
            parser.add_argument(
                name, type=kind, choices=choices, metavar=None if choices else f.name.upper(), help=help_text
            )
    return parser


def read_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config {path}: file not found")
    try:
        values = json.loads(file.read_text()) if file.suffix == ".json" else tomllib.loads(file.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise UserError(
            f"--config {path}: not valid {file.suffix.lstrip('.').upper() or 'TOML'} ({error})"
        ) from None
    known = {f.name for f in fields(TrainConfig)} | {CHANGED_ON_RESUME}
    values = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(
            f"--config {path}: unknown setting '{unknown[0]}' (settings are the flag names, e.g. lora_r = 16)"
        )
    return {key: value for key, value in values.items() if key not in PER_INVOCATION + (CHANGED_ON_RESUME,)}


def recorded_changes(path: str) -> list[str]:
    """The settings a run's config.json says were changed on resume ("lr 2e-4 -> 1e-3 from step 63")."""
    file = Path(path)
    return json.loads(file.read_text()).get(CHANGED_ON_RESUME, []) if file.suffix == ".json" else []


def check_types(values: dict, source: str) -> dict:
    """Values from a file as the field types want them (TOML has ints where floats are meant, etc.)."""
    checked = {}
    for name, value in values.items():
        kind = field_type(name)
        if kind is list:
            value = [value] if isinstance(value, str) else value
            ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        elif kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool) or value is None
            value = float(value) if ok and value is not None else value
        else:
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not ok:
            raise UserError(f"{source}: '{name}' must be {kind.__name__}, got {value!r}")
        checked[name] = value
    return checked


def split_commas(values: dict) -> dict:
    """`--lora-targets q_proj,v_proj` and `--lora-targets q_proj v_proj` mean the same."""
    return {
        name: [item for value in values[name] for item in value.split(",") if item]
        if field_type(name) is list
        else values[name]
        for name in values
    }


def parse_config(argv=None) -> TrainConfig:
    """The config from defaults, then the run's saved config (with --resume), then --config, then flags."""
    flags = vars(build_parser().parse_args(argv))
    values = {}
    out = flags.get("out")
    if flags.get("config"):
        values.update(check_types(read_config_file(flags["config"]), f"--config {flags['config']}"))
        out = flags.get("out", values.get("out"))
        if (changes := recorded_changes(flags["config"])) and os.environ.get("RANK", "0") == "0":
            print(
                f"note: --config {flags['config']} is the config of a run resumed with other settings "
                f"({'; '.join(changes)}): this run trains with its last settings from step 0, so it does not "
                "repeat that run (its summary.json has the history)",
                file=sys.stderr,
            )
    if flags.get("resume") and out and not flags.get("overwrite"):
        saved = Path(out) / "config.json"
        if not saved.is_file():
            raise UserError(
                f"--resume: {saved} not found; --out must be the directory of a run started earlier"
            )
        values = {**check_types(read_config_file(str(saved)), str(saved)), **values}
    values.update(flags)
    return TrainConfig(**split_commas(values))


def save_config(config: TrainConfig, path, changed_on_resume: list[str] = ()) -> None:
    """The resolved config as JSON, readable back with --config (resume/overwrite are per invocation), and
    the settings a resume changed, if any: that file alone cannot repeat the run then."""
    values = {key: value for key, value in config.to_dict().items() if key not in PER_INVOCATION}
    if changed_on_resume:
        values[CHANGED_ON_RESUME] = list(changed_on_resume)
    Path(path).write_text(json.dumps(values, indent=2) + "\n")


def default_out_dir() -> str:
    if "RANK" in os.environ:  # ranks would each pick their own time stamp
        raise UserError("--out is required under torchrun, so every rank writes to the same run directory")
    return f"runs/{datetime.now().strftime('%Y%m%d-%H%M%S')}"
