"""Fine-tune a Llama-family model with LoRA, QLoRA or a full fine-tune. Read it top to bottom.

    python train.py                                              # built-in SmolLM2-135M-Instruct and dataset
    python train.py --model DIR --data train.jsonl --out runs/x  # LoRA r=16 on q_proj,v_proj
    python train.py --model DIR --data train.jsonl --method qlora
    python train.py --out runs/x --resume                        # continue exactly where it stopped
    python train.py --model DIR --plan                           # what fits this hardware, and why
    torchrun --nproc_per_node=4 train.py --out runs/x ...        # DDP, one process per GPU
    torchrun --nproc_per_node=4 train.py --out runs/x --fsdp full_shard  # FSDP2: the model sharded
    python train.py --help                                       # every flag (--config FILE.toml sets them)

`main()` is the recipe: resolve the config, prepare the data, build the model, build the optimizer, train,
report. Each phase is a function below it, in that order; `train_step()` is one optimizer step. The run
directory ends up holding the best adapter (PEFT format) or best weights (Hugging Face format), summary.json,
report.md, resumable checkpoints, TensorBoard logs and metrics.jsonl.
"""

import dataclasses
import time
from pathlib import Path

import torch

import data
import lora
import quant
from nanoft import (
    checkpoint,
    config,
    data_batches,
    data_report,
    default_model,
    distributed,
    errors,
    export,
    interruptions,
    lr_sweep,
    merge,
    monitor,
    planner,
    precision,
    report,
    schedule,
    tokenizer,
    weights,
)


@errors.exit_on_user_error
def main(argv=None):
    started = time.perf_counter()
    train_config = config.parse_config(argv)
    if train_config.plan:  # what fits this model on this hardware, and why; train nothing (nanoft/planner.py)
        plan = planner.plan_for_run(train_config, planning_only=True)
        print(planner.format_plan(plan, train_config.model or default_model.MODEL_NAME))
        return
    run = resolve_config(train_config, started)
    torch.manual_seed(run.config.seed)  # the same on every rank: LoRA's first A is the same everywhere
    training_data = prepare_data(run)
    model, parameter_counts = build_model(run)
    optimizer, scaler = build_optimizer(model, run)
    if run.config.lr_sweep:  # LR range test on ~1% of the data (nanoft/lr_sweep.py), then exit
        sweep_lr(model, training_data.train_batches, run)
        return
    # The input is checked and the model built (bad weights or LoRA targets fail above): from here on the
    # directory holds a run, and resume needs this file (a resumed run rewrites it with its checkpoints).
    if run.dist.is_main and not run.config.resume:
        config.save_config(run.config, run.dir / "config.json")
    progress = checkpoint.Progress()
    if run.config.resume:
        progress = restore_training_state(run, model, optimizer, scaler, training_data)
        run.started -= progress.wall_seconds  # the earlier sessions' wall-clock time counts too
    print_what_to_watch(run, training_data, parameter_counts)
    total_steps, dtype = training_data.total_steps, run.precision.compute_dtype
    unwrapped = distributed.unwrap(model)
    run_monitor = monitor.Monitor(run.dir, run.dist, total_steps, progress.step, unwrapped, dtype, run.config)
    signals = interruptions.StopSignals()  # SIGINT / SIGTERM from here on: finish the step, save, exit
    stop_reason = train(run, model, optimizer, scaler, training_data, progress, run_monitor, signals)
    signals.restore()
    if stop_reason == "signal":
        exit_on_signal(run, run_monitor, signals, progress.step)
    report_run(run, model, training_data, progress, run_monitor, stop_reason)


# ---------------------------------------------------------------- resolve the config


@dataclasses.dataclass
class Run:
    """What every phase needs to know about this run once its config is resolved."""

    # As trained: --method auto's plan applied; lr, --out, --quant and --dtype filled in.
    config: config.TrainConfig
    dist: distributed.Dist  # this process's rank, the number of processes and the device
    dir: Path  # the run directory (--out)
    model_dir: Path  # the Hugging Face model directory trained from (--model, or the built-in one)
    # The dtypes of compute, of the frozen base and of the trained weights, and why.
    precision: precision.Precision
    autocast: torch.autocast  # the forward's mixed precision: on for full fine-tunes in bf16 or fp16 only
    lora_config: lora.LoRAConfig | None  # the adapters to train; None for a full fine-tune
    started: float  # time.perf_counter() when the run started (moved back by earlier sessions' time)
    # Settings this resume changes (checkpoint.resume_changes): recorded in the progress once a step trains.
    resume_changes: list = dataclasses.field(default_factory=list)


def resolve_config(train_config: config.TrainConfig, started: float) -> Run:
    """Join the other processes, settle every setting the config left open and check them against the run
    directory and the model, before anything expensive happens."""
    dist = distributed.setup_distributed(train_config.device, timeout_s=train_config.dist_timeout)
    # --method auto: train with the plan's method, micro-batch, accumulation and checkpointing.
    if train_config.method == "auto":
        # Planned on rank 0 alone: free memory differs from rank to rank, and so could the plans.
        plan = planner.plan_for_run(train_config, planning_only=False) if dist.is_main else None
        plan = distributed.scatter_from_main([plan] * dist.world_size if dist.is_main else None, dist)
        train_config = planner.apply_plan(train_config, plan)
        reason = f"{plan.reasons[-1]} (--plan shows why)"
        distributed.print0(dist, f"--method auto: {plan.method}, {plan.layout}; {reason}")
    train_config = train_config.with_defaults()  # the lr by method, --out by a time stamp, NF4 for QLoRA
    run_dir = checkpoint.prepare_run_dir(
        train_config.out, resume=train_config.resume, overwrite=train_config.overwrite, dist=dist
    )
    model_dir = default_model.resolve_model(train_config.model)
    if train_config.gguf:  # a model llama.cpp cannot run is refused now, not after the training
        export.read_exportable(model_dir)
    context = weights.load_config(model_dir).max_position_embeddings
    if train_config.seq_len > context:
        raise errors.UserError(
            f"--seq-len {train_config.seq_len} is longer than the model's context ({context}); lower it"
        )
    lora_config = None
    if train_config.method in ("lora", "qlora"):  # a bad --lora-targets now, not after the data is tokenized
        targets = (
            "all-linear" if train_config.lora_targets == ["all-linear"] else tuple(train_config.lora_targets)
        )
        lora_config = lora.LoRAConfig(
            r=train_config.lora_r,
            alpha=train_config.lora_alpha,
            dropout=train_config.lora_dropout,
            targets=targets,
            use_rslora=train_config.use_rslora,
            use_dora=train_config.use_dora,
            modules_to_save=tuple(train_config.modules_to_save),
        )
        lora.lora_layers(weights.empty_model(model_dir), lora_config)  # on the meta device: no weights read
    dtypes = precision.choose_precision(train_config.dtype, dist.device, train_config.method)
    # Mixed precision for full fine-tunes: fp32 weights, bf16/fp16 matmuls; LoRA needs none (precision.py).
    autocast = torch.autocast(dist.device.type, dtypes.compute_dtype, enabled=dtypes.autocast)
    train_config = dataclasses.replace(train_config, dtype=dtypes.name)
    # Before anything is written: a failed resume leaves the run's config.json as it was.
    if train_config.resume:
        checkpoint.check_resume_config(run_dir, train_config.to_dict())
    return Run(train_config, dist, run_dir, model_dir, dtypes, autocast, lora_config, started)


# ---------------------------------------------------------------- prepare the data


@dataclasses.dataclass
class TrainingData:
    """The tokenized examples in batches, and the optimizer steps they make."""

    tokenizer: tokenizer.Tokenizer
    # This rank's slice of every global batch; .examples: the training split.
    train_batches: data_batches.Batches
    val_batches: data_batches.Batches  # this rank's share of the val split, read whole at every eval
    report: data_report.DataReport  # what was read, deduplicated, dropped and split (summary.json's "data")
    steps_per_epoch: float  # optimizer steps per pass over the training split (under 1: a step spans epochs)
    total_steps: int  # optimizer steps the run takes: --max-steps, or --epochs worth
    warmup_steps: int  # of them, the first ones that ramp the lr up


def prepare_data(run: Run) -> TrainingData:
    """Read, check, deduplicate, tokenize and split the data (data.py), then batch it for this rank."""
    train_config, dist = run.config, run.dist
    model_tokenizer = tokenizer.Tokenizer.from_pretrained(run.model_dir)
    train_examples, val_examples, preparation_report = data.prepare_data(
        train_config.data,  # none: the built-in dataset
        model_tokenizer,
        train_config.seq_len,
        val_paths=train_config.val_data,
        val_frac=train_config.val_frac,
        seed=train_config.seed,
        format=train_config.data_format,
        dedup=train_config.dedup,
        near_dup_threshold=train_config.near_dup_threshold,
        train_on_everything=train_config.train_on_everything,
        skip_bad_records=train_config.skip_bad_records,
        alpaca_style=train_config.alpaca_style,
        run_dir=run.dir if dist.is_main else None,
        log=lambda text: distributed.print0(dist, text),
    )
    if not len(val_examples):  # the best checkpoint is chosen by val loss
        if train_config.val_data:
            why = "no --val-data example has a target left (see the data report above); fix those files"
        elif train_config.val_frac == 0:
            why = "--val-frac 0 and no --val-data; pass --val-frac 0.05 or --val-data FILE"
        else:  # the split holds out at most a quarter of the examples (data.py)
            n = len(train_examples)
            why = f"{n} examples are too few to split (4 at least); add data or pass --val-data"
        raise errors.UserError(f"no validation data: {why}")
    # Tokens added to a tokenizer without resizing the model's embedding would fail deep in the first step.
    largest_id = max(
        model_tokenizer.pad_id, *(int(e.input_ids.max()) for e in (train_examples, val_examples))
    )
    vocab_size = weights.load_config(run.model_dir).vocab_size
    if largest_id >= vocab_size:
        raise errors.UserError(
            f"the tokenized data holds token id {largest_id}, but {run.model_dir}/config.json has vocab_size "
            f"{vocab_size}: its tokenizer.json is not this model's, or tokens were added "
            "without resizing the embeddings"
        )
    # Each rank reads its own slice of every global batch; evaluation covers the whole val split once.
    shard = dict(rank=dist.rank, world_size=dist.world_size, pack=train_config.pack)
    train_batches = data_batches.Batches(
        train_examples,
        train_config.batch_size,
        model_tokenizer.pad_id,
        seed=train_config.seed,
        group_by_length=train_config.group_by_length,
        **shard,
    )
    val_batches = data_batches.Batches(
        val_examples, train_config.batch_size, model_tokenizer.pad_id, shuffle=False, drop_last=False, **shard
    )
    if train_config.pack:
        distributed.print0(dist, "data: " + train_batches.packing_line())
    steps_per_epoch = len(train_batches) / train_config.grad_accum
    # --epochs' micro-batches (a fraction of an epoch counts), in whole steps.
    micro_batches = int(train_config.epochs * len(train_batches))
    total_steps = train_config.max_steps or micro_batches // train_config.grad_accum
    if total_steps == 0:
        per_step = f"{train_config.grad_accum} x {train_config.batch_size} x {dist.world_size}"
        raise errors.UserError(
            f"one step takes {per_step} sequences; "
            f"the training split has {len(train_examples)}: lower --grad-accum or --batch-size"
        )
    warmup_steps = round(train_config.warmup_frac * total_steps)
    return TrainingData(
        model_tokenizer,
        train_batches,
        val_batches,
        preparation_report,
        steps_per_epoch,
        total_steps,
        warmup_steps,
    )


# ---------------------------------------------------------------- build the model


def build_model(run: Run):
    """The model to train: the base (4-bit for QLoRA), LoRA adapters on it or every weight trainable, then
    wrapped for DDP or FSDP. Returns it with its (trainable, total) parameter counts.

    It is built empty on the meta device, where nothing is allocated, and its weights are read once it has
    its final shape (wrap_model: under FSDP each rank then reads and holds only its shards)."""
    train_config, dist = run.config, run.dist
    model = weights.empty_model(run.model_dir, run.precision.base_dtype)
    quantize = quant_config = None
    if train_config.method == "qlora":  # the decoder's linears become bitsandbytes layers, quantized as read
        quant_config = qlora_quant_config(run)
        quant.quantize_linears(model, quant_config)
        quantize = quant.weight_quantizer(quant_config, dist.device)
    if run.lora_config:  # freezes the base; adapters are fp32, made on the device the weights will be on
        model = lora.inject_lora(model, run.lora_config, device=dist.device)
        if run.lora_config.use_dora:  # before sharding, so every rank starts from rank 0's magnitudes
            lora.init_dora_magnitudes(model, base_weight_reader(run, quant_config))
        distributed.print0(dist, lora.trainable_parameters_line(model))
        if caveat := lora.peft_expert_adapters_caveat(model):
            distributed.print0(dist, caveat)
    model.activation_checkpointing = train_config.activation_checkpointing
    # Each layer compiled in place, before wrap_model shards it: FSDP's hooks stay out of the graph.
    if train_config.compile:
        for layer in model.model.layers:
            layer.compile()
    # (trainable, all); a 4-bit weight counted as one, not half a byte.
    parameters = lora.count_parameters(model)
    # DDP under torchrun; --fsdp shards instead. FSDP's mixed precision only where autocast would be used
    # (full fine-tunes): a LoRA base is already stored in the compute dtype and its adapters stay fp32.
    mixed_precision = run.precision.compute_dtype if run.precision.autocast else None
    load = lambda model, device: weights.load_weights(model, run.model_dir, device, quantize=quantize)
    model = distributed.wrap_model(
        model, dist, train_config.fsdp, train_config.fsdp_cpu_offload, mixed_precision, load=load
    )
    # From here on (dropout) each rank draws its own random numbers.
    torch.manual_seed(distributed.seed_for_rank(train_config.seed, dist))
    return model, parameters


def qlora_quant_config(run: Run) -> quant.QuantConfig:
    """How QLoRA stores the base: --quant, in the compute dtype, with lm_head (the loss multiplies by it) and
    the modules_to_save it trains kept 16-bit."""
    skip = ("lm_head", *run.config.modules_to_save)
    return quant.QuantConfig(run.config.quant, compute_dtype=run.precision.compute_dtype, skip=skip)


def base_weight_reader(run: Run, quant_config: quant.QuantConfig | None):
    """base_weight(layer name): the layer's weight read from the checkpoint as the model will hold it, in the
    base dtype or (QLoRA) rounded through the 4-bit quantization (DoRA's magnitudes start from it)."""
    stored = {tensor.name: tensor for tensor in weights.checkpoint_tensors(run.model_dir)}

    def base_weight(name: str) -> torch.Tensor:
        weight = stored[name + ".weight"].read()
        if quant_config is not None:
            return merge.as_quantized(weight, quant_config)
        return weight.to(run.precision.base_dtype)

    return base_weight


# ---------------------------------------------------------------- build the optimizer


def build_optimizer(model, run: Run):
    """AdamW (or an 8-bit one, quant.py) over the trainable weights, and fp16's gradient scaler."""
    # Weight decay pulls matrices towards zero; on norm gains and biases it would only distort the model.
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": run.config.weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = quant.make_optimizer(groups, run.config.optim, lr=run.config.lr)  # fused AdamW on CUDA, CPU
    scaler = torch.amp.GradScaler(run.dist.device.type, enabled=run.precision.grad_scaler)  # fp16 only
    return optimizer, scaler


def sweep_lr(model, train_batches, run: Run) -> None:
    """--lr-sweep: the LR range test (nanoft/lr_sweep.py) prints a table and an lr; nothing is trained."""

    def mean_loss(model, batch):
        with run.autocast:
            loss_sum, n_targets = forward(model, to_device(batch, run.dist.device))
        return loss_sum / n_targets

    dist = run.dist
    make_sweep_optimizer = lambda params, lr: quant.make_optimizer(params, run.config.optim, lr=lr)
    make_scaler = lambda: torch.amp.GradScaler(dist.device.type, enabled=run.precision.grad_scaler)
    # Every rank takes the mean over ranks: all see the same loss and stop a diverging lr together.
    mean_over_ranks = lambda rank_loss: (
        distributed.all_reduce_sum(rank_loss.detach(), dist).item() / dist.world_size
    )
    result = lr_sweep.run_lr_sweep(
        model, train_batches, run.config.lr, mean_loss, make_sweep_optimizer, make_scaler, mean_over_ranks
    )
    distributed.print0(run.dist, lr_sweep.sweep_table(result))
    distributed.teardown(run.dist)


def print_what_to_watch(run: Run, training_data: TrainingData, parameters) -> None:
    """The model line, then each key hyperparameter and what to watch to know it works (planner.py)."""
    train_config, dist = run.config, run.dist
    trainable, total = parameters
    distributed.print0(
        dist,
        f"{run.model_dir} ({total / 1e6:.0f}M), {train_config.method}, on {dist.device} x {dist.world_size}",
    )
    notes = planner.hyperparameter_notes(
        train_config,
        world_size=dist.world_size,
        steps_per_epoch=training_data.steps_per_epoch,
        total_steps=training_data.total_steps,
        warmup_steps=training_data.warmup_steps,
        trainable=trainable,
        total=total,
        precision=run.precision.reason,
    )
    for line in notes:
        distributed.print0(dist, "  " + line)


# ---------------------------------------------------------------- train


def train(
    run: Run, model, optimizer, scaler, training_data: TrainingData, progress, run_monitor, signals
) -> str | None:
    """The loop: evaluate (at step 0, the untuned baseline, then every --eval-every steps) keeping the best
    weights, save a checkpoint every --save-every steps, take one optimizer step; until the last step, early
    stopping, a signal or a NaN loss. Then the final evaluation and checkpoint. Returns why it stopped: None
    when it finished, "early_stop", "signal" or "nan"."""
    train_config, dist = run.config, run.dist
    total_steps, warmup_steps = training_data.total_steps, training_data.warmup_steps
    train_batches, val_batches = training_data.train_batches, training_data.val_batches
    prompts = monitor.val_prompts(val_batches.examples, n=3)  # generated from at every eval
    micro_batches = epoch_after_epoch(train_batches)
    # Out of memory: the step or the eval retried in smaller pieces (nanoft/interruptions.py).
    oom = interruptions.OOMRecovery(train_config.batch_size, train_config.grad_accum)
    eval_oom = interruptions.OOMRecovery(train_config.batch_size, 1, evaluation=True)
    first_step, stop_reason = progress.step, None  # a resumed run's first step is checkpointed already
    step, resume_changes = first_step, run.resume_changes

    def evaluate_and_keep_best():
        val_loss = evaluate(model, val_batches, dist, run.autocast, eval_oom, step, run_monitor.print)
        if progress.record_eval(step, val_loss):
            save_best_weights(model, run)
        if dist.is_main and not distributed.is_fsdp(model):  # FSDP would need every rank to take part
            unwrapped = distributed.unwrap(model)
            progress.samples = monitor.generate_samples(unwrapped, training_data.tokenizer, prompts)
        run_monitor.log_eval(step, val_loss, progress, warmup_steps)

    def record_peak_memory():  # the run's peak takes in this session's once it has trained
        progress.peak_memory_bytes = max(progress.peak_memory_bytes, run_monitor.memory.peak())

    def save_checkpoint():
        progress.wall_seconds = time.perf_counter() - run.started
        record_peak_memory()
        save_training_state(run, model, optimizer, scaler, train_batches, progress)

    while step < total_steps and stop_reason is None:
        if step % train_config.eval_every == 0 and not progress.evaluated_at(step):
            evaluate_and_keep_best()
        # Checked outside the eval as well: a run resumed after its early stop stops again, at once.
        if train_config.patience and progress.evals_since_best >= train_config.patience:
            stop_reason, patience, best = "early_stop", train_config.patience, progress.best_step
            run_monitor.print(f"early stop: no better val loss in {patience} evals (best at step {best})")
        elif step > first_step and step % train_config.save_every == 0:
            save_checkpoint()
        if stop_reason is None and signals.received(dist):  # on any rank: every rank stops at this step
            stop_reason = "signal"
        if stop_reason is None:
            step_started = time.perf_counter()
            batches = [next(micro_batches) for _ in range(train_config.grad_accum)]
            lr = schedule.lr_at(step, train_config.lr, warmup_steps, total_steps)
            done = train_step(model, optimizer, scaler, batches, lr, step, run, oom, run_monitor)
            if done is None:  # NaN or inf: stopped before the update, the weights stay as they were
                stop_reason = "nan"
                sources = [
                    train_batches.examples.sources[i] for batch in batches for i in batch["sample_ids"]
                ]
                bad_samples = distributed.gather_to_main(sources, dist)  # "file:line" of the step's records
                distributed.print0(
                    dist, report.nan_advice(step + 1, train_config.lr, sum(bad_samples or [], []))
                )
            else:
                train_loss, grad_norm, n_tokens, router_aux_loss = done
                step += 1
                seconds = time.perf_counter() - step_started
                progress.step, progress.tokens_seen = step, progress.tokens_seen + n_tokens
                progress.train_seconds += seconds
                progress.changed_on_resume += resume_changes  # this session trains with them from here on
                resume_changes = []
                context = max(batch["input_ids"].shape[1] for batch in batches)
                run_monitor.log_step(
                    step,
                    train_loss,
                    lr,
                    grad_norm,
                    tokens=n_tokens,
                    seconds=seconds,
                    context=context,
                    router_aux_loss=router_aux_loss,
                )

    if stop_reason is None and not progress.evaluated_at(step):  # the final val loss of the last weights
        evaluate_and_keep_best()
    if step > first_step:  # a session that trained nothing leaves the run as it was
        record_peak_memory()  # (a NaN stop saves no checkpoint at its step)
        if stop_reason != "nan":  # the checkpoint to resume from
            save_checkpoint()
    return stop_reason


def train_step(model, optimizer, scaler, batches, lr: float, step: int, run: Run, oom, run_monitor):
    """One optimizer step over the step's micro-batches: (train loss, grad norm, tokens, a mixture of experts'
    load-balancing loss or None) over all ranks, or None when the loss is NaN or inf (then nothing is
    updated).

    The loss is normalised by the number of target tokens in all the micro-batches, on all ranks (counted
    first), so every token weighs the same however the tokens fall into micro-batches; a mean of
    per-micro-batch means would overweight short ones."""
    dist = run.dist
    # Counted on the CPU, where the batches are, and summed over ranks there: no wait for the GPU.
    counts = torch.tensor(data_batches.token_counts(batches))
    n_targets, n_tokens = distributed.all_reduce_sum(counts, dist).tolist()
    # Out of memory on any rank: all retry the step, its micro-batches cut in halves (interruptions.py).
    sums = oom.run(
        lambda pieces: forward_backward(model, dist, scaler, run.autocast, n_targets, pieces),
        batches,
        step,
        dist,
        sharded=distributed.is_fsdp(model) and dist.world_size > 1,
        log=run_monitor.print,
        before_retry=lambda: optimizer.zero_grad(set_to_none=True),
    )
    # DDP: once per step, now that every rank's micro-batches ran.
    distributed.all_reduce_gradients(model, dist)
    scaler.unscale_(optimizer)  # so clipping sees the true gradients (fp16)
    grad_norm = distributed.clip_grad_norm(model, run.config.grad_clip)
    # The step's one wait for the GPU: the loss (and router loss) and the gradient norm come back together.
    loss_sum_total, router_aux_sum, grad_norm = torch.cat(
        [distributed.all_reduce_sum(sums, dist), grad_norm.reshape(1)]
    ).tolist()
    train_loss = loss_sum_total / n_targets
    has_router_loss = distributed.unwrap(model).router_aux_loss is not None
    router_aux_loss = router_aux_sum / dist.world_size if has_router_loss else None
    if not torch.tensor(train_loss).isfinite():  # NaN or inf: stop before the update, the weights stay
        optimizer.zero_grad(set_to_none=True)
        return None
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return train_loss, grad_norm, n_tokens, router_aux_loss


def epoch_after_epoch(batches):
    """The batches of one epoch after another, without end (each `for` over Batches is the next epoch)."""
    while True:
        yield from batches


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on `device`. To a GPU through pinned memory, without waiting for the copy: the
    host runs ahead to the next micro-batch while the GPU still works on this one."""
    if device.type != "cuda":
        return batch
    return {
        key: value.pin_memory().to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
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


def forward_backward(model, dist, scaler, autocast, n_targets: int, pieces: list[dict]) -> torch.Tensor:
    """Forward and backward of a step's micro-batches, the gradients adding up on this rank (each piece's loss
    divided by the step's target tokens on all ranks); returns, on the device, (the summed loss, the mean over
    the pieces of a mixture of experts' load-balancing loss, 0 without one: its share is in the loss)."""
    sums = torch.zeros(2, device=dist.device)
    for batch in pieces:
        with distributed.local_gradients(model), autocast:
            loss_sum, _ = forward(model, to_device(batch, dist.device))
        # x world_size: DDP and FSDP average gradients over ranks; we want their sum.
        scaler.scale(loss_sum * dist.world_size / n_targets).backward()
        sums[0] += loss_sum.detach()
        if (router_aux_loss := distributed.unwrap(model).router_aux_loss) is not None:
            sums[1] += router_aux_loss / len(pieces)
    return sums


@torch.no_grad()
def evaluate(model, val_batches, dist, autocast, oom, step: int, log) -> float:
    """Val loss per target token over the whole val split (each rank its share, summed over ranks). Out of
    memory: this rank halves its val micro-batch and goes on (nanoft/interruptions.py)."""
    model.eval()

    def attempt(pieces):
        sums = torch.zeros(2, dtype=torch.float64, device=dist.device)  # (loss sum, target tokens)
        for piece in pieces:
            with autocast:
                loss_sum, n_targets = forward(model, to_device(piece, dist.device))
            sums += torch.stack([loss_sum.double(), n_targets.double()])
        return sums

    sharded = distributed.is_fsdp(model) and dist.world_size > 1
    totals = torch.zeros(2, dtype=torch.float64, device=dist.device)
    n_batches = 0
    for batch in val_batches:
        totals += oom.run(attempt, [batch], step, dist, sharded=sharded, log=log, agree=False)
        n_batches += 1
    if distributed.is_fsdp(model):
        # FSDP's forward is a collective: where this rank's share of the last batch was empty, it still joins
        # the others' forward, with one token and no target.
        for _ in range(len(val_batches) - n_batches):
            with autocast:
                model(**to_device(data_batches.no_target_batch(), dist.device))
    model.train()
    totals = distributed.all_reduce_sum(totals, dist)
    return (totals[0] / totals[1]).item()


def save_best_weights(model, run: Run) -> None:
    """The run's best weights so far: run_dir/adapter in PEFT format, or run_dir/model for full fine-tunes."""
    dist, model_dir = run.dist, run.model_dir
    if run.config.method == "full":
        state = distributed.full_state_dict(model, dist, trainable_only=False)  # all ranks call: FSDP gathers
        if dist.is_main:
            write = lambda tmp: (
                weights.save_pretrained(state, distributed.unwrap(model).config, tmp),
                weights.copy_tokenizer_files(model_dir, tmp),
            )
            checkpoint.write_directory_atomically(run.dir / "model", write)
        return
    # Under FSDP each rank holds a shard of each adapter: gather them (every rank calls) for rank 0 to write.
    adapter = (
        distributed.full_state_dict(model, dist, trainable_only=True) if distributed.is_fsdp(model) else None
    )
    if dist.is_main:
        unwrapped, base = distributed.unwrap(model), str(model_dir)
        write = lambda tmp: lora.save_adapter(unwrapped, tmp, base_model_name_or_path=base, tensors=adapter)
        checkpoint.write_directory_atomically(run.dir / "adapter", write)


def save_training_state(run: Run, model, optimizer, scaler, train_batches, progress) -> None:
    """A resumable checkpoint; every rank calls this (weights, optimizer shards and RNGs are gathered)."""
    dist = run.dist
    trainable = distributed.full_state_dict(model, dist, trainable_only=True)
    optimizer_state = distributed.optimizer_state_dict(model, optimizer, dist)
    rng_states = distributed.gather_to_main(checkpoint.rng_state(), dist)
    if dist.is_main:
        state = {**progress.to_dict(), "data": train_batches.state_dict(), "scaler": scaler.state_dict()}
        settings = run.config.to_dict()
        checkpoint.save(run.dir, progress.step, trainable, optimizer_state, rng_states, state, settings)
        checkpoint.prune(run.dir, run.config.keep_last, keep_step=progress.best_step)
        # A resumed run's config.json changes once it has trained (a resume that trains nothing leaves it).
        changes = [report.change_line(change) for change in progress.changed_on_resume]
        config.save_config(run.config, run.dir / "config.json", changes)


def restore_training_state(run: Run, model, optimizer, scaler, training_data: TrainingData):
    """Load the latest checkpoint (read by rank 0, sent to the others; under FSDP each rank reads its own rows
    of the tensors) and say what this resume changes; return the run's progress."""
    dist, latest, train_batches = run.dist, checkpoint.latest(run.dir), training_data.train_batches
    saved = checkpoint.restore_checkpoint(latest, model, optimizer, dist)
    state = distributed.scatter_from_main([saved["state"]] * dist.world_size if dist.is_main else None, dist)
    train_batches.load_state_dict(state.pop("data"))
    scaler.load_state_dict(state.pop("scaler"))
    # Last: nothing may draw from the random generators after this.
    checkpoint.set_rng_state(distributed.scatter_from_main(saved.get("rng"), dist))
    progress = checkpoint.Progress(**state)
    distributed.print0(dist, f"resumed from {latest} at step {progress.step}")
    run.resume_changes = checkpoint.resume_changes(run.dir, run.config.to_dict(), progress.step)
    for change in run.resume_changes:
        distributed.print0(dist, f"  {report.change_line(change)}")
    if progress.step >= training_data.total_steps:
        distributed.print0(
            dist,
            f"nothing left to train: the run is at step {progress.step} of {training_data.total_steps}; it "
            "stays as it was (raise --max-steps or --epochs to train on)",
        )
    return progress


# ---------------------------------------------------------------- report


def exit_on_signal(run: Run, run_monitor, signals, step: int) -> None:
    """A signal stopped the run after saving a checkpoint: say how to continue, exit with 128 + its number."""
    run_monitor.close("signal")
    saved = f"checkpoint saved; continue with: python train.py --out {run.dir} --resume"
    distributed.print0(
        run.dist, f"stopped by {signals.name} at step {step}: " + (saved if step else "nothing to save yet")
    )
    distributed.teardown(run.dist)
    raise SystemExit(128 + signals.number)


def report_run(run: Run, model, training_data: TrainingData, progress, run_monitor, stop_reason) -> None:
    """summary.json and report.md with the quality gates, the final lines, then the best adapter merged into
    the base (--merge) and the best weights as a GGUF file (--gguf); a run stopped by a NaN loss then exits
    with an error."""
    train_config, dist = run.config, run.dist
    best_dir = run.dir / ("model" if train_config.method == "full" else "adapter")
    peak_memory_per_rank = distributed.gather_to_main(run_monitor.memory.peak(), dist)  # this session's
    if dist.is_main:
        facts = dict(
            stop_reason=stop_reason,
            steps=progress.step,
            total_steps=training_data.total_steps,
            warmup_steps=training_data.warmup_steps,
            best_dir=best_dir,
            wall_s=time.perf_counter() - run.started,
            peak_memory_bytes_per_rank=peak_memory_per_rank,
            device=dist.device,
            world_size=dist.world_size,
            utilisation=run_monitor.utilisation,
        )
        summary = report.write_run_report(run.dir, train_config, progress, training_data.report, facts)
        run_monitor.finish(train_config, summary)
        for line in report.summary_lines(summary):
            print(line)
    run_monitor.close(stop_reason)
    distributed.teardown(dist)
    # After teardown: the merge reads the checkpoint and the best adapter from disk (nanoft/merge.py), so the
    # other ranks are gone and none waits in a collective past --dist-timeout while rank 0 merges.
    if train_config.merge and dist.is_main:
        quant_config = qlora_quant_config(run) if train_config.quant else None
        merged_dir, merge_base = run.dir / "merged", train_config.merge_base
        merged = merge.merge_adapter(run.model_dir, best_dir, merged_dir, merge_base, quant_config)
        print(merge.merge_line(merged, best_dir, run.model_dir, merged_dir, merge_base, train_config.quant))
    # The best weights for llama.cpp: an adapter merged into the fp32 base.
    if train_config.gguf and dist.is_main:
        source, adapter = (best_dir, None) if train_config.method == "full" else (run.model_dir, best_dir)
        gguf_type = train_config.gguf
        gguf = export.export_gguf(source, run.dir / f"model-{gguf_type}.gguf", gguf_type, adapter)
        print(f"gguf ({gguf_type}): {gguf}; llama-cli -m {gguf} -cnv")
    if stop_reason == "nan":
        raise SystemExit(
            f"error: loss is NaN or inf at step {progress.step + 1}; stopped, best weights kept in {best_dir}"
        )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before training started (nothing to save), or twice: quit quietly
        raise SystemExit(130) from None
