"""What to serve after QLoRA: the 4-bit base + adapter, or a merged 16-bit export, and merged into what?

    python bench/qlora_merge_gap.py                       # SmolLM2-135M, the built-in data, 60 steps
    python bench/qlora_merge_gap.py --steps 200 --seed 1  # longer, another adapter initialisation and order

The built-in SmolLM2 is stored in fp32; Hub checkpoints are bf16, so the bench first writes a bf16 copy and
treats it as "the original 16-bit checkpoint". It trains a short QLoRA run on it (NF4 + double quant base,
LoRA r=16 alpha=32 on all linear layers, AdamW, 4 sequences per step) on the built-in data, then measures the
val loss (per target token, over the same held-out examples) of every way to serve the result:
- 4-bit base + adapter: exactly what was trained;
- merged into the original weights (nanoft/merge.py, base="original", what `--merge` writes by default): the
  bf16 checkpoint's weights + the update, rounded to bf16 once;
- merged into the quantized base (base="quantized", `--merge-base quantized`): each linear weight rounded
  through NF4 first (the base the adapter trained on), + the update, rounded to bf16;
- original bf16 base + adapter, not merged: the merge into the original without its bf16 rounding;
- the merged export quantized to NF4 again (a common way to shrink a merged model for serving);
and, for scale, the 4-bit and bf16 bases without the adapter.

The measurements (README, "QLoRA: which base to merge into") decided --merge's default: the original weights.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import prepare_data  # noqa: E402
from lora import LoRAConfig, LoRALinear, dense_weight, inject_lora, load_adapter, save_adapter  # noqa: E402
from nanoft.data_batches import Batches  # noqa: E402
from nanoft.default_data import default_data_path  # noqa: E402
from nanoft.default_model import default_model_dir  # noqa: E402
from nanoft.merge import merge_adapter  # noqa: E402
from nanoft.tokenizer import Tokenizer  # noqa: E402
from nanoft.weights import copy_tokenizer_files, from_pretrained, save_pretrained  # noqa: E402
from quant import QuantConfig, load_quantized, make_optimizer  # noqa: E402


def run_model(model, batch):
    return model(batch["input_ids"], batch["targets"], position_ids=batch["position_ids"])


@torch.no_grad()
def val_loss(model, val_batches) -> float:
    model.eval()
    loss_sum, n_targets = 0.0, 0
    for batch in val_batches:
        batch_loss, batch_targets = run_model(model, batch)
        loss_sum += batch_loss.item()
        n_targets += batch_targets.item()
    return loss_sum / n_targets


@torch.no_grad()
def rounding_error_relative_to_update(model, dtype=torch.bfloat16) -> float:
    """||round(W + update) - (W + update)|| / ||update|| over the adapted layers: the size of rounding the
    merged weight to `dtype` next to the update it is meant to carry (W: the dequantized 4-bit weight)."""
    error_squared = update_squared = 0.0
    for module in model.modules():
        if isinstance(module, LoRALinear):
            weight = dense_weight(module.base_layer).float()
            update = module.scale * (module.lora_B.weight @ module.lora_A.weight)  # (out, in), fp32
            merged = weight + update
            error_squared += (merged.to(dtype).float() - merged).pow(2).sum().item()
            update_squared += update.pow(2).sum().item()
    return (error_squared / update_squared) ** 0.5


def cpu_model() -> str:
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "?")


def write_bf16_copy(model_dir: Path, path: Path) -> Path:
    """The built-in (fp32) checkpoint as a Hub model would be stored: bf16."""
    model = from_pretrained(model_dir, dtype=torch.bfloat16)
    save_pretrained(model.state_dict(), model.config, path, dtype=torch.bfloat16)
    copy_tokenizer_files(model_dir, path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="QLoRA optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="adapter initialisation and data order")
    parser.add_argument(
        "--val-examples", type=int, default=128, help="held-out examples the val loss is over"
    )
    parser.add_argument("--json", default=str(Path(__file__).with_suffix(".json")), help="results file")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    tokenizer = Tokenizer.from_pretrained(default_model_dir())
    train, val, _ = prepare_data(
        [default_data_path()], tokenizer, seq_len=256, val_frac=0.1, log=lambda *a: None
    )
    train_batches = Batches(train, args.batch_size, tokenizer.pad_id, seed=args.seed)
    val_batches = list(Batches(val, 8, tokenizer.pad_id, shuffle=False, drop_last=False))
    val_batches = val_batches[: max(1, args.val_examples // 8)]

    with tempfile.TemporaryDirectory() as work:
        model_dir = write_bf16_copy(default_model_dir(), Path(work, "bf16"))
        model = load_quantized(model_dir)
        losses = {"4-bit base, no adapter": val_loss(model, val_batches)}
        model = inject_lora(model, LoRAConfig(r=16, alpha=32, dropout=0.0, targets="all-linear"))
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", lr=args.lr)
        start, step = time.perf_counter(), 0
        while step < args.steps:
            for batch in train_batches:
                model.train()
                loss_sum, n_targets = run_model(model, batch)
                (loss_sum / n_targets).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % 10 == 0:
                    print(f"step {step}: train loss {loss_sum.item() / n_targets.item():.4f}", flush=True)
                if step == args.steps:
                    break
        train_seconds = time.perf_counter() - start

        adapter_dir = Path(work, "adapter")
        save_adapter(model, adapter_dir)
        losses["4-bit base + adapter (trained)"] = val_loss(model, val_batches)
        rounding = rounding_error_relative_to_update(model)
        for base in ("original", "quantized"):
            merged_dir = Path(work, f"merged-{base}")  # never model_dir: the next merge reads it
            merge_adapter(model_dir, adapter_dir, merged_dir, base, QuantConfig("nf4"))
            merged = from_pretrained(merged_dir, dtype=torch.bfloat16)
            losses[f"merged into the {base} base (bf16 file)"] = val_loss(merged, val_batches)
        bf16_base = from_pretrained(model_dir, dtype=torch.bfloat16)
        losses["bf16 base, no adapter"] = val_loss(bf16_base, val_batches)
        losses["bf16 base + adapter, not merged"] = val_loss(
            load_adapter(bf16_base, adapter_dir), val_batches
        )
        requantized = load_quantized(Path(work, "merged-original"))
        losses["merged into the original, re-quantized to NF4"] = val_loss(requantized, val_batches)

    served = losses["4-bit base + adapter (trained)"]
    n_val = sum(len(batch["sample_ids"]) for batch in val_batches)
    print(f"\nSmolLM2-135M (bf16 copy), QLoRA {args.steps} steps of {args.batch_size} at lr {args.lr:g}, "
          f"seed {args.seed} ({train_seconds:.0f} s), val loss over {n_val} held-out examples; "
          f"{cpu_model()}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'served as':48} {'val loss':>9} {'gap to trained':>15}")
    for name, loss in losses.items():
        print(f"{name:48} {loss:9.4f} {loss - served:+15.4f}")
    print(f"rounding the merged weights to bf16 changes them by {rounding:.2f} x the norm of the update")
    result = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "cpu": cpu_model(),
        "load_average": os.getloadavg()[0],
        "rounding_error_relative_to_update": rounding,
        "val_loss": losses,
    }
    # One file for every (steps, lr, seed) measured: a new run replaces its own entry.
    path = Path(args.json)
    runs = json.loads(path.read_text()) if path.is_file() else []
    runs = runs if isinstance(runs, list) else []
    key = lambda run: (run["steps"], run["lr"], run["seed"], run["batch_size"])
    runs = [run for run in runs if key(run) != key(result)] + [result]
    path.write_text(json.dumps(sorted(runs, key=key), indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
