"""Fine-tune a Llama-family model with LoRA, QLoRA or a full fine-tune. Read it top to bottom.

    python train.py                                              # built-in SmolLM2-135M-Instruct and dataset
    python train.py --model DIR --data train.jsonl --out runs/x  # LoRA r=16 on q_proj,v_proj
    python train.py --model DIR --data train.jsonl --method qlora
    python train.py --out runs/x --resume                        # continue exactly where it stopped
    python train.py --model DIR --plan                           # what fits this hardware, and why
    torchrun --nproc_per_node=4 train.py --out runs/x ...        # DDP, one process per GPU
    torchrun --nproc_per_node=4 train.py --out runs/x --fsdp full_shard  # FSDP2: the model sharded
    python train.py --help                                       # every flag (--config FILE.toml sets them)

config -> devices -> data -> model (4-bit for QLoRA) -> LoRA or full -> optimizer and schedule -> (resume)
-> the loop (evaluate, checkpoint, one optimizer step over accumulated micro-batches) -> the final report.
The run directory ends up holding the best adapter (PEFT format) or best weights (Hugging Face format),
summary.json, report.md, resumable checkpoints, TensorBoard logs and metrics.jsonl.
"""

import itertools
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from data import prepare_data
from lora import (
    PEFT_PREFIX,
    LoRAConfig,
    export_merged,
    inject_lora,
    peft_expert_adapters_caveat,
    save_adapter,
    trainable_parameters_line,
)
from nanoft.checkpoint import (
    check_resume_config,
    latest_checkpoint,
    load_checkpoint,
    new_progress,
    prepare_run_dir,
    prune_checkpoints,
    record_eval,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_directory_atomically,
)
from nanoft.config import DEFAULT_LR, default_out_dir, hyperparameter_notes, parse_config, save_config
from nanoft.cpu_allocator import keep_freed_memory
from nanoft.data_batches import Batches
from nanoft.data_report import SPOT_CHECK_SAMPLES
from nanoft.default_data import default_data_path
from nanoft.default_model import resolve_model
from nanoft.distributed import (
    all_reduce_sum,
    clip_grad_norm,
    full_state_dict,
    gather_to_main,
    gradient_sync,
    is_fsdp,
    load_full_state_dict,
    load_optimizer_state_dict,
    optimizer_state_dict,
    print0,
    scatter_from_main,
    seed_for_rank,
    setup_distributed,
    teardown,
    unwrap,
    wrap_model,
)
from nanoft.errors import UserError, exit_on_user_error
from nanoft.interruptions import OOMRecovery, StopSignals
from nanoft.loss import IGNORE_INDEX
from nanoft.lr_sweep import run_lr_sweep, sweep_table
from nanoft.monitor import Monitor, generate_samples, peak_memory_bytes, val_prompts
from nanoft.planner import format_plan, plan_for_run
from nanoft.precision import choose_precision
from nanoft.report import nan_advice, summary_lines, write_run_report
from nanoft.schedule import lr_at
from nanoft.tokenizer import Tokenizer
from nanoft.weights import copy_tokenizer_files, from_pretrained, load_config, save_pretrained
from quant import load_quantized, make_optimizer


def to_device(batch: dict, device) -> dict:
    return {
        key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()
    }


def forward(model, batch: dict):
    """(fp32 sum of the target tokens' cross-entropy, number of target tokens) of one batch."""
    ids, targets = batch["input_ids"], batch["targets"]
    return model(
        ids,
        targets,
        position_ids=batch["position_ids"],
        document_ids=batch["document_ids"],
        real_tokens=batch["real_tokens"],
    )


@torch.no_grad()
def evaluate(model, val_batches, dist, autocast) -> float:
    """Val loss per target token over the whole val split (each rank its share, summed over ranks)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=dist.device)  # (loss sum, target tokens)
    n_batches = 0
    for batch in val_batches:
        with autocast:
            loss_sum, n_targets = forward(model, to_device(batch, dist.device))
        totals += torch.stack([loss_sum.double(), n_targets.double()])
        n_batches += 1
    if is_fsdp(model):
        # FSDP's forward is a collective: where this rank's share of the last batch was empty, it still joins
        # the others' forward, with one token and no target.
        no_target = {
            "input_ids": torch.zeros((1, 1), dtype=torch.long),
            "targets": torch.full((1, 1), IGNORE_INDEX),
        }
        for _ in range(len(val_batches) - n_batches):
            with autocast:
                model(**to_device(no_target, dist.device))
    model.train()
    totals = all_reduce_sum(totals, dist)
    return (totals[0] / totals[1]).item()


def save_best_weights(model, dist, run_dir: Path, model_dir: Path, method: str) -> None:
    """The run's best weights so far: run_dir/adapter in PEFT format, or run_dir/model for full fine-tunes."""
    if method == "full":
        weights = full_state_dict(model, dist, trainable_only=False)  # every rank calls: FSDP gathers
        if dist.is_main:
            write = lambda tmp: (
                save_pretrained(weights, unwrap(model).config, tmp),
                copy_tokenizer_files(model_dir, tmp),
            )
            write_directory_atomically(run_dir / "model", write)
        return
    # Under FSDP each rank holds a shard of each adapter: gather them (every rank calls) for rank 0 to write.
    adapter = full_state_dict(model, dist, trainable_only=True) if is_fsdp(model) else None
    if dist.is_main:
        base = str(model_dir)
        write = lambda tmp: save_adapter(unwrap(model), tmp, base_model_name_or_path=base, tensors=adapter)
        write_directory_atomically(run_dir / "adapter", write)


def export_best_merged(model, best_dir: Path, model_dir: Path, out_dir: Path, dtype) -> None:
    """Load the best adapter back into the model and write it merged into the base (a plain HF model)."""
    best = load_file(best_dir / "adapter_model.safetensors")
    _, unexpected = model.load_state_dict(
        {name.removeprefix(PEFT_PREFIX): tensor for name, tensor in best.items()}, strict=False
    )
    assert not unexpected, unexpected  # the adapter was written from this very model
    write_directory_atomically(
        out_dir, lambda tmp: export_merged(model, model.config, model_dir, tmp, dtype=dtype)
    )


def save_training_state(run_dir, model, optimizer, scaler, train_batches, progress, config, dist) -> None:
    """A resumable checkpoint; every rank calls this (weights, optimizer shards and RNGs are gathered)."""
    trainable = full_state_dict(model, dist, trainable_only=True)
    optimizer_state = optimizer_state_dict(model, optimizer, dist)
    rng_states = gather_to_main(rng_state(), dist)
    if dist.is_main:
        state = {**progress, "data": train_batches.state_dict(), "scaler": scaler.state_dict()}
        step = progress["step"]
        save_checkpoint(run_dir, step, trainable, optimizer_state, rng_states, state, config.to_dict())
        prune_checkpoints(run_dir, config.keep_last, keep_step=progress["best_step"])


def restore_training_state(run_dir, model, optimizer, scaler, train_batches, dist) -> dict:
    """Load the latest checkpoint (read by rank 0, sent to the others); return the run's progress."""
    checkpoint = load_checkpoint(latest_checkpoint(run_dir)) if dist.is_main else {}
    load_full_state_dict(model, checkpoint.get("trainable", {}), dist)
    load_optimizer_state_dict(model, optimizer, checkpoint.get("optimizer", {}), dist)
    state = scatter_from_main([checkpoint["state"]] * dist.world_size if dist.is_main else None, dist)
    train_batches.load_state_dict(state.pop("data"))
    scaler.load_state_dict(state.pop("scaler"))
    set_rng_state(scatter_from_main(checkpoint.get("rng"), dist))  # last: nothing may draw from them after
    print0(dist, f"resumed from {latest_checkpoint(run_dir)} at step {state['step']}")
    return {**new_progress(), **state}


@exit_on_user_error
def main(argv=None):
    started = time.perf_counter()
    # ---------------------------------------------------------------- config, plan, devices
    config = parse_config(argv)
    if config.plan:  # print what fits this model on this hardware, and why; train nothing (nanoft/planner.py)
        print(format_plan(plan_for_run(config, planning_only=True), config.model or "SmolLM2-135M-Instruct"))
        return
    dist = setup_distributed(config.device, timeout_s=config.dist_timeout)
    if dist.device.type == "cpu":
        keep_freed_memory()  # reuse what a step frees, not fault in fresh pages (nanoft/cpu_allocator.py)
    if config.method == "auto":  # train with the plan's method, micro-batch, accumulation and checkpointing
        # Planned on rank 0 alone: free memory differs from rank to rank, and so could the plans.
        plan = plan_for_run(config, planning_only=False) if dist.is_main else None
        plan = scatter_from_main([plan] * dist.world_size if dist.is_main else None, dist)
        config = replace(
            config,
            method=plan.method,
            batch_size=plan.micro_batch,
            grad_accum=plan.grad_accum,
            activation_checkpointing=plan.activation_checkpointing,
            fsdp="full_shard" if plan.layout.startswith("fsdp") and config.fsdp == "none" else config.fsdp,
            fsdp_cpu_offload=config.fsdp_cpu_offload or plan.layout == "fsdp_offload",
        )
        print0(dist, f"--method auto: {plan.method}, {plan.layout}; {plan.reasons[-1]} (--plan shows why)")
    quant = config.quant or ("nf4" if config.method == "qlora" else "")
    config = replace(
        config, lr=config.lr or DEFAULT_LR[config.method], out=config.out or default_out_dir(), quant=quant
    )
    run_dir = prepare_run_dir(config.out, resume=config.resume, overwrite=config.overwrite, dist=dist)
    if config.resume:  # a failed resume must leave the run's config.json as it was
        check_resume_config(run_dir, config.to_dict())
    model_dir = resolve_model(config.model)
    model_config = load_config(model_dir)
    if config.seq_len > model_config.max_position_embeddings:
        raise UserError(
            f"--seq-len {config.seq_len} is longer than the model's context "
            f"({model_config.max_position_embeddings}); lower it"
        )
    precision = choose_precision(config.dtype, dist.device, config.method)
    config = replace(config, dtype=precision.name)
    # Mixed precision for full fine-tunes: fp32 weights, bf16/fp16 matmuls; LoRA needs none (precision.py).
    autocast = (
        torch.autocast(dist.device.type, precision.compute_dtype) if precision.autocast else nullcontext()
    )
    torch.manual_seed(config.seed)  # the same on every rank: LoRA's initial A must be identical everywhere

    # ---------------------------------------------------------------- data
    tokenizer = Tokenizer.from_pretrained(model_dir)
    train_examples, val_examples, data_report = prepare_data(
        config.data or [default_data_path()],
        tokenizer,
        config.seq_len,
        val_paths=config.val_data,
        val_frac=config.val_frac,
        seed=config.seed,
        format=config.data_format,
        dedup=config.dedup,
        near_dup_threshold=config.near_dup_threshold,
        train_on_everything=config.train_on_everything,
        skip_bad_records=config.skip_bad_records,
        alpaca_style=config.alpaca_style,
        run_dir=run_dir if dist.is_main else None,
        log=lambda text: print0(dist, text),
    )
    if not len(val_examples):  # the best checkpoint is chosen by val loss
        if config.val_data:
            why = "no --val-data example has a target left (see the data report above); fix those files"
        elif config.val_frac == 0:
            why = "--val-frac 0 and no --val-data; pass --val-frac 0.05 or --val-data FILE"
        else:  # the split holds out at most a quarter of the examples (data.py)
            n = len(train_examples)
            why = f"{n} examples are too few to split (4 at least); add data or pass --val-data"
        raise UserError(f"no validation data: {why}")
    # Tokens added to a tokenizer without resizing the model's embedding would fail deep in the first step.
    largest_id = max(tokenizer.pad_id, *(int(e.input_ids.max()) for e in (train_examples, val_examples)))
    if largest_id >= model_config.vocab_size:
        raise UserError(
            f"the tokenized data holds token id {largest_id}, but {model_dir}/config.json has vocab_size "
            f"{model_config.vocab_size}: its tokenizer.json is not this model's, or tokens were added "
            "without resizing the embeddings"
        )
    # Each rank reads its own slice of every global batch; evaluation covers the whole val split once.
    shard = dict(rank=dist.rank, world_size=dist.world_size, pack=config.pack)
    train_batches = Batches(
        train_examples,
        config.batch_size,
        tokenizer.pad_id,
        seed=config.seed,
        group_by_length=config.group_by_length,
        **shard,
    )
    val_batches = Batches(
        val_examples, config.batch_size, tokenizer.pad_id, shuffle=False, drop_last=False, **shard
    )
    steps_per_epoch = len(train_batches) / config.grad_accum  # under 1 when a step spans epochs
    total_steps = config.max_steps or math.floor(config.epochs * len(train_batches) / config.grad_accum)
    if total_steps == 0:
        raise UserError(
            f"one step takes {config.grad_accum} x {config.batch_size} x {dist.world_size} sequences; "
            f"the training split has {len(train_examples)}: lower --grad-accum or --batch-size"
        )
    warmup_steps = round(config.warmup_frac * total_steps)

    # ---------------------------------------------------------------- model: quantized base for QLoRA
    if config.method == "qlora":
        model = load_quantized(
            model_dir, quant=config.quant, compute_dtype=precision.compute_dtype, device=dist.device
        )
    else:
        model = from_pretrained(model_dir, dtype=precision.base_dtype, device=dist.device)

    # ---------------------------------------------------------------- LoRA adapters, or every weight trains
    if config.method in ("lora", "qlora"):
        targets = "all-linear" if config.lora_targets == ["all-linear"] else tuple(config.lora_targets)
        lora_config = LoRAConfig(config.lora_r, config.lora_alpha, config.lora_dropout, targets)
        model = inject_lora(model, lora_config)  # freezes the base; adapters are fp32
        print0(dist, trainable_parameters_line(model))
        if caveat := peft_expert_adapters_caveat(model):
            print0(dist, caveat)
    model.activation_checkpointing = config.activation_checkpointing
    if config.compile:
        for layer in model.model.layers:
            layer.compile()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    # DDP under torchrun; --fsdp shards instead. FSDP's mixed precision only where autocast would be used
    # (full fine-tunes): a LoRA base is already stored in the compute dtype and its adapters stay fp32.
    mixed_precision = precision.compute_dtype if precision.autocast else None
    model = wrap_model(model, dist, config.fsdp, config.fsdp_cpu_offload, mixed_precision)
    torch.manual_seed(seed_for_rank(config.seed, dist))  # from here on (dropout), each rank its own stream

    # ---------------------------------------------------------------- optimizer and schedule
    # Weight decay pulls matrices towards zero; on norm gains and biases it would only distort the model.
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = make_optimizer(groups, config.optim, lr=config.lr)  # fused AdamW on CUDA and CPU
    scaler = torch.amp.GradScaler(dist.device.type, enabled=precision.grad_scaler)  # fp16 only

    if config.lr_sweep:  # LR range test on ~1% of the data (nanoft/lr_sweep.py), then exit

        def mean_loss(model, batch):
            with autocast:
                loss_sum, n_targets = forward(model, to_device(batch, dist.device))
            return loss_sum / n_targets

        make_sweep_optimizer = lambda params, lr: make_optimizer(params, config.optim, lr=lr)
        result = run_lr_sweep(model, train_batches, config.lr, mean_loss, make_sweep_optimizer)
        print0(dist, sweep_table(result))
        teardown(dist)
        return

    # The input is checked and the model built (bad weights or LoRA targets fail above): from here on the
    # directory holds a run, and resume needs this file.
    if dist.is_main:
        save_config(config, run_dir / "config.json")

    # ---------------------------------------------------------------- resume, and what to watch
    progress = new_progress()
    if config.resume:
        progress = restore_training_state(run_dir, model, optimizer, scaler, train_batches, dist)
    print0(dist, f"{model_dir} ({n_total / 1e6:.0f}M), {config.method}, on {dist.device} x {dist.world_size}")
    for line in hyperparameter_notes(
        config,
        world_size=dist.world_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        trainable=n_trainable,
        total=n_total,
        precision=precision.reason,
    ):
        print0(dist, "  " + line)
    monitor = Monitor(run_dir, dist, total_steps, progress["step"], unwrap(model), precision.compute_dtype)
    prompts = val_prompts(val_examples, n=3)  # generated from at every eval, to see what the model writes
    micro_batches = itertools.chain.from_iterable(itertools.repeat(train_batches))  # epoch after epoch
    signals = StopSignals()  # SIGINT / SIGTERM: finish this step, save a checkpoint, exit
    oom = OOMRecovery(config.batch_size, config.grad_accum)  # out of memory: halve micro-batches
    step, stop_reason = progress["step"], None

    # ---------------------------------------------------------------- the loop
    while True:
        # Evaluate at step 0 (the untuned baseline), every --eval-every steps and at the end; keep the best.
        finished = step == total_steps or stop_reason is not None
        evaluated = progress["val_curve"] and progress["val_curve"][-1][0] == step
        if (step % config.eval_every == 0 or finished) and not evaluated and stop_reason is None:
            val_loss = evaluate(model, val_batches, dist, autocast)
            if record_eval(progress, step, val_loss):
                save_best_weights(model, dist, run_dir, model_dir, config.method)
            if dist.is_main and not is_fsdp(model):  # FSDP would need every rank to take part
                progress["samples"] = generate_samples(unwrap(model), tokenizer, prompts)
            monitor.log_eval(step, val_loss, progress, warmup_steps)
        # Checked outside the eval as well: a run resumed after its early stop stops again, at once.
        patience_spent = config.patience and progress["evals_since_best"] >= config.patience
        if patience_spent and not finished and stop_reason is None:
            stop_reason = "early_stop"
            monitor.print(
                f"early stop: no better val loss in {config.patience} evals (best at step "
                f"{progress['best_step']})"
            )
        # Save a checkpoint to resume from: every --save-every steps, at the end, and when a signal stops us.
        finished = step == total_steps or stop_reason is not None
        if step > 0 and (step % config.save_every == 0 or finished) and stop_reason != "nan":
            progress["wall_seconds"] += time.perf_counter() - started
            started = time.perf_counter()
            save_training_state(run_dir, model, optimizer, scaler, train_batches, progress, config, dist)
        if finished:
            break
        if signals.received(dist):  # on any rank: go round once more to save the checkpoint, then stop
            stop_reason = "signal"
            continue

        # One optimizer step over grad_accum micro-batches. The loss is normalised by the number of target
        # tokens in all of them, on all ranks (counted first), so every token weighs the same however the
        # tokens fall into micro-batches; a mean of per-micro-batch means would overweight short ones.
        step_started = time.perf_counter()
        batches = [next(micro_batches) for _ in range(config.grad_accum)]
        counts = [
            sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches),
            sum(int(train_examples.lengths[b["sample_ids"]].sum()) for b in batches),
        ]
        n_targets, n_tokens = all_reduce_sum(torch.tensor(counts, device=dist.device), dist).tolist()
        while True:  # out of memory: the same step again, each micro-batch cut in halves (interruptions.py)
            try:
                pieces = [piece for batch in batches for piece in oom.split(batch)]
                loss_sum_total = torch.zeros((), device=dist.device)
                router_aux_total = torch.zeros((), device=dist.device)  # mixtures of experts (model.py)
                for micro_step, batch in enumerate(pieces):
                    # DDP all-reduces gradients only in the last micro-batch's backward; others accumulate.
                    with gradient_sync(model, enabled=micro_step == len(pieces) - 1), autocast:
                        loss_sum, _ = forward(model, to_device(batch, dist.device))
                    # x world_size: DDP and FSDP average gradients over ranks; we want their sum.
                    scaler.scale(loss_sum * dist.world_size / n_targets).backward()
                    loss_sum_total += loss_sum.detach()
                    if unwrap(model).router_aux_loss is not None:  # its share is in loss_sum already
                        router_aux_total += unwrap(model).router_aux_loss / len(pieces)
                break
            except Exception as error:
                monitor.print(oom.handle(error, step, optimizer))  # re-raises anything but out-of-memory
        train_loss = all_reduce_sum(loss_sum_total, dist).item() / n_targets
        router_aux_loss = None
        if unwrap(model).router_aux_loss is not None:
            router_aux_loss = all_reduce_sum(router_aux_total, dist).item() / dist.world_size
        if not math.isfinite(train_loss):  # stop before the update: the weights stay as they were
            stop_reason = "nan"
            sources = [train_examples.sources[i] for batch in batches for i in batch["sample_ids"]]
            bad_samples = gather_to_main(sources, dist)  # "file:line" of every record in the step, all ranks
            continue
        lr = lr_at(step, config.lr, warmup_steps, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.unscale_(optimizer)  # so clipping sees the true gradients (fp16)
        grad_norm = clip_grad_norm(model, config.grad_clip or math.inf).item()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        seconds = time.perf_counter() - step_started
        progress["tokens_seen"] += n_tokens
        progress.update(step=step, train_seconds=progress["train_seconds"] + seconds)
        context = max(b["input_ids"].shape[1] for b in batches)
        monitor.log_step(
            step,
            train_loss,
            lr,
            grad_norm,
            tokens=n_tokens,
            seconds=seconds,
            context=context,
            router_aux_loss=router_aux_loss,
        )

    # ---------------------------------------------------------------- final report
    signals.restore()
    if stop_reason == "signal":
        monitor.close()
        saved = f"checkpoint saved; continue with: python train.py --out {run_dir} --resume"
        print0(
            dist, f"stopped by {signals.name} at step {step}: " + (saved if step else "nothing to save yet")
        )
        teardown(dist)
        sys.exit(128 + signals.number)
    if stop_reason == "nan":
        print0(dist, nan_advice(step + 1, config.lr, sum(bad_samples or [], [])))
    best_dir = run_dir / ("model" if config.method == "full" else "adapter")
    if config.merge and dist.is_main:
        merge_into = unwrap(model)
        if is_fsdp(model):  # the shards cannot be merged in place: rank 0 loads a whole base into CPU memory
            merge_into = inject_lora(
                load_quantized(model_dir, quant=config.quant, compute_dtype=precision.compute_dtype)
                if config.method == "qlora"
                else from_pretrained(model_dir, dtype=precision.base_dtype),
                lora_config,
            )
        export_best_merged(merge_into, best_dir, model_dir, run_dir / "merged", precision.compute_dtype)
    if dist.is_main:
        facts = dict(
            stop_reason=stop_reason,
            steps=step,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            best_dir=best_dir,
            wall_s=progress["wall_seconds"] + time.perf_counter() - started,
            peak_memory_bytes=peak_memory_bytes(dist.device),
            device_type=dist.device.type,
            world_size=dist.world_size,
            utilisation=monitor.utilisation,
            samples_written=min(SPOT_CHECK_SAMPLES, len(train_examples)),
        )
        summary = write_run_report(run_dir, config, progress, data_report, facts)
        monitor.log_hparams(config.to_dict(), {"best_val_loss": summary["best_val_loss"]})
        for line in summary_lines(summary):
            print(line)
    monitor.close()
    teardown(dist)
    if stop_reason == "nan":
        sys.exit(f"error: loss is NaN or inf at step {step + 1}; stopped, best weights kept in {best_dir}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before training started (nothing to save), or twice: quit quietly
        sys.exit(130)
