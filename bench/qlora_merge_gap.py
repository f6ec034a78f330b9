"""Which model to serve after QLoRA: the 4-bit base + adapter, or the adapter merged into a bf16 export?

    python bench/qlora_merge_gap.py            # SmolLM2-135M, the built-in data, 60 steps
    python bench/qlora_merge_gap.py --steps 20 --val-examples 64   # quicker

Trains a short QLoRA run (NF4 + double quant base, LoRA r=16 alpha=32 on all linear layers, AdamW lr 2e-4,
4 sequences per step) on the built-in data, then measures the val loss (per target token, over the same
held-out examples) of every way to serve the result:
- 4-bit base + adapter: exactly what was trained;
- merged export, bf16: lora.export_merged dequantizes each 4-bit weight, adds the update in fp32 and rounds
  the sum to bf16 (the update is small next to the weight, so the rounding eats part of it);
- original bf16 base + adapter: the adapter applied to the weights *before* quantization, as happens when a
  QLoRA adapter is merged into the original checkpoint (the adapter learned to correct the 4-bit weights);
- merged bf16 export quantized to NF4 again (a common way to shrink the merged model for serving);
and, for scale, the 4-bit and bf16 bases without the adapter.

Measured (2026-11-24, 60 steps, the held-out examples; bench/qlora_merge_gap.json): 4-bit + adapter 2.953,
merged bf16 export 2.962 (+0.008; rounding changes the merged weights by a fraction of the update's norm, as
unstructured noise), original bf16 base + adapter 2.907 (-0.047; a 200-step run gave +0.016: it depends),
merged export re-quantized to NF4 4.017 (+1.06, nearly the 4-bit base without adapter, 4.032: the update is
smaller than NF4's steps and rounds away; the 200-step run: +1.19). So serve the 4-bit base + adapter, or the
merged bf16 export for engines that want one model; never quantize a merged QLoRA model again, load the
adapter on the 4-bit base.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import prepare_data  # noqa: E402
from lora import (  # noqa: E402
    LoRAConfig,
    LoRALinear,
    dense_weight,
    export_merged,
    inject_lora,
    load_adapter,
    save_adapter,
)
from nanoft.data_batches import Batches  # noqa: E402
from nanoft.default_data import default_data_path  # noqa: E402
from nanoft.default_model import default_model_dir  # noqa: E402
from nanoft.tokenizer import Tokenizer  # noqa: E402
from nanoft.weights import from_pretrained  # noqa: E402
from quant import load_quantized, make_optimizer  # noqa: E402


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="QLoRA optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    parser.add_argument(
        "--val-examples", type=int, default=128, help="held-out examples the val loss is over"
    )
    parser.add_argument("--json", default=str(Path(__file__).with_suffix(".json")), help="results file")
    args = parser.parse_args()
    torch.manual_seed(0)
    model_dir = default_model_dir()
    tokenizer = Tokenizer.from_pretrained(model_dir)
    train, val, _ = prepare_data(
        [default_data_path()], tokenizer, seq_len=256, val_frac=0.1, log=lambda *a: None
    )
    train_batches = Batches(train, args.batch_size, tokenizer.pad_id, seed=0)
    val_batches = list(Batches(val, 8, tokenizer.pad_id, shuffle=False, drop_last=False))
    val_batches = val_batches[: max(1, args.val_examples // 8)]

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

    with tempfile.TemporaryDirectory() as work:
        adapter_dir, merged_dir = Path(work, "adapter"), Path(work, "merged")
        save_adapter(model, adapter_dir)
        losses["4-bit base + adapter (trained)"] = val_loss(model, val_batches)
        rounding = rounding_error_relative_to_update(model)
        export_merged(model, model.config, model_dir, merged_dir, dtype=torch.bfloat16)
        losses["merged export, bf16"] = val_loss(
            from_pretrained(merged_dir, dtype=torch.bfloat16), val_batches
        )
        bf16_base = from_pretrained(model_dir, dtype=torch.bfloat16)
        losses["bf16 base, no adapter"] = val_loss(bf16_base, val_batches)
        losses["original bf16 base + adapter"] = val_loss(load_adapter(bf16_base, adapter_dir), val_batches)
        losses["merged bf16 export re-quantized to NF4"] = val_loss(load_quantized(merged_dir), val_batches)

    served = losses["4-bit base + adapter (trained)"]
    print(f"\nSmolLM2-135M, QLoRA {args.steps} steps of {args.batch_size} ({train_seconds:.0f} s), "
          f"val loss over {sum(len(b['sample_ids']) for b in val_batches)} held-out examples")  # fmt: skip
    print(f"{'served as':40} {'val loss':>9} {'gap to trained':>15}")
    for name, loss in losses.items():
        print(f"{name:40} {loss:9.4f} {loss - served:+15.4f}")
    print(f"rounding the merged weights to bf16 changes them by {rounding:.2f} x the norm of the update")
    result = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "load_average": os.getloadavg()[0],
    }
    result["rounding_error_relative_to_update"] = rounding
    Path(args.json).write_text(json.dumps({**result, "val_loss": losses}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
