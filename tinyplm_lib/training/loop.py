"""A stage's second phase: the optimizer steps, with logging, evaluation and checkpoints on the way.

`train_loop()` continues a `PreparedStage` from its state's position to `total_steps` (or until
`max_wall_time_s`), updating the state in place; checkpoints are saved every `save_steps` by rank 0.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import TrainingArguments

from tinyplm_lib.layout import TRAINER_DIR
from tinyplm_lib.training.arguments import plain_value
from tinyplm_lib.training.checkpoints import CheckpointSink
from tinyplm_lib.training.cpu_kernels import ChunkedCrossEntropy
from tinyplm_lib.training.distributed import World
from tinyplm_lib.training.model import MaskedLM
from tinyplm_lib.training.packing import MicroBatch, MicroBatches
from tinyplm_lib.training.prepare import PreparedStage


@dataclass(frozen=True)
class LoopEnd:
    """How the loop ended: early (the wall-time budget) or not, after how many seconds in all."""

    stopped_early: bool
    wall_s: float  # including earlier attempts of a resumed stage


def train_loop(stage: PreparedStage, checkpoints: CheckpointSink | None,
               on_step: Callable[[int], None] | None) -> LoopEnd:
    """Train from `stage.state` on; `on_step(step)` runs after every optimizer step and its checkpoint."""
    args, state, world, runtime = stage.arguments.args, stage.state, stage.world, stage.runtime
    save_every = _save_interval(args, stage.total_steps, checkpoints, stage.log)
    forward, loss_sum_of = _forward(stage)
    # The running loss stays on the device: a .item() per micro-batch would stall a GPU.
    loss_sum = torch.tensor(state.running_loss, dtype=torch.float64, device=world.device)
    stopped_early = False
    stage.model.train()
    loader = _loader(stage)
    if state.global_step < stage.total_steps:
        for batch in loader:
            if not _micro_step(stage, forward, loss_sum_of, batch, loss_sum):
                continue  # gradients accumulate until the optimizer-step boundary
            _optimizer_step(stage)
            _after_step(stage, loss_sum, checkpoints, save_every)
            if on_step is not None:
                on_step(state.global_step)
            if runtime.max_wall_time_s is not None and world.broadcast_flag(
                    time.perf_counter() - stage.started >= runtime.max_wall_time_s):
                stopped_early = state.global_step < stage.total_steps
                break
            if state.global_step >= stage.total_steps:
                break
    return LoopEnd(stopped_early=stopped_early, wall_s=time.perf_counter() - stage.started)


def _forward(stage: PreparedStage) -> tuple[torch.nn.Module, Callable]:
    """The model's masked-position forward and the loss, compiled and wrapped for DDP as the runtime asks."""
    # The loss sees a varying number of masked positions: compiled with dynamic shapes, on GPUs only
    # (a CPU runs the chunked loss below, already cache-resident; its Python loop would recompile).
    compile_loss = stage.runtime.compile and stage.world.device.type != "cpu"
    loss_sum_of = torch.compile(masked_loss_sum, dynamic=True) if compile_loss else masked_loss_sum
    forward = MaskedLM(stage.model, compile=stage.runtime.compile)
    if stage.world.distributed:
        device = stage.world.device
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)
    return forward, loss_sum_of


def masked_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the masked positions, in fp32 whatever the autocast dtype."""
    if logits.device.type == "cpu":
        return ChunkedCrossEntropy.apply(logits, targets)
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


def _loader(stage: PreparedStage) -> torch.utils.data.DataLoader:
    """The micro-batches still to train on, from the state's epoch and micro-batch on."""
    args, state, world = stage.arguments.args, stage.state, stage.world
    accumulation = args.gradient_accumulation_steps
    # Only whole optimizer steps per epoch: a shorter tail would otherwise leak its gradients
    # into the next epoch's first step.
    micro_per_epoch = stage.steps_per_epoch * accumulation
    batches = MicroBatches(stage.train_set, args.per_device_train_batch_size, stage.spec, seed=args.seed,
                           per_epoch=micro_per_epoch, start_epoch=state.epoch, start_micro=state.next_micro_index,
                           count=(stage.total_steps - state.global_step) * accumulation,
                           rank=world.rank, world=world.size,
                           # static shapes for the compiled encoder (a new width would recompile it)
                           width=stage.arguments.max_seq_length if stage.runtime.compile else None)
    workers = stage.runtime.dataloader_workers
    return torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers,
                                       pin_memory=world.device.type == "cuda",
                                       prefetch_factor=4 if workers else None,
                                       # Its own generator: drawing worker seeds from the global one
                                       # would shift dropout's random stream on resume.
                                       generator=torch.Generator().manual_seed(args.seed))


def _micro_step(stage: PreparedStage, forward, loss_sum_of, batch: MicroBatch, loss_sum: torch.Tensor) -> bool:
    """Forward and backward of one micro-batch; True when it ends an optimizer step."""
    args, state, world, device = stage.arguments.args, stage.state, stage.world, stage.world.device
    accumulation = args.gradient_accumulation_steps
    state.epoch, state.next_micro_index = batch.epoch, batch.micro_index + 1
    state.tokens_seen += int(batch.global_tokens)
    inputs, labels, attention = (t.to(device, non_blocking=True) for t in (batch.inputs, batch.labels,
                                                                           batch.attention))
    boundary = (batch.micro_index + 1) % accumulation == 0
    # Gradients are all-reduced once per optimizer step, not per accumulated micro-batch.
    with _no_sync(forward, world, boundary):
        with stage.runtime.autocast(device):
            logits, targets = forward(inputs, attention, labels)
        # Summed over this slice and divided by the global masked count (times the world size,
        # which DDP's gradient averaging divides out): the mean over the global micro-batch, as
        # one process computes it. No masked token gives 0, not NaN.
        loss = loss_sum_of(logits, targets) * (world.size / max(int(batch.global_masked), 1))
        stage.scaler.scale(loss / accumulation).backward()
    loss_sum += loss.detach().double()
    state.running_count += 1
    return boundary


def _optimizer_step(stage: PreparedStage) -> None:
    args, optimizer, scaler = stage.arguments.args, stage.optimizer, stage.scaler
    scaler.unscale_(optimizer)
    if args.max_grad_norm and args.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(stage.model.parameters(), args.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    stage.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    stage.state.global_step += 1


def _after_step(stage: PreparedStage, loss_sum: torch.Tensor, checkpoints: CheckpointSink | None,
                save_every: int) -> None:
    """The step's history entry, evaluation and checkpoint, each when due."""
    args, state, world = stage.arguments.args, stage.state, stage.world
    step, total_steps = state.global_step, stage.total_steps
    if step % max(1, int(args.logging_steps)) == 0 or step == total_steps:
        world.sum(loss_sum)  # each rank holds its share of every global micro-batch's mean
        entry = {"step": step, "train_loss": loss_sum.item() / (state.running_count * world.size),
                 "learning_rate": stage.scheduler.get_last_lr()[0], "tokens_seen": state.tokens_seen,
                 "elapsed_s": time.perf_counter() - stage.started}
        state.history.append(entry)
        loss_sum.zero_()
        state.running_count = 0
        stage.log(f"step {step}/{total_steps} loss {entry['train_loss']:.4f}")
    if _eval_due(args, step, total_steps) and world.is_main:
        eval_loss = stage.evaluate()["loss"]
        if state.history and state.history[-1]["step"] == step:
            state.history[-1]["eval_loss"] = eval_loss
        else:
            state.history.append({"step": step, "eval_loss": eval_loss})
    if save_every and step % save_every == 0 and step < total_steps and world.is_main:
        # At an optimizer-step boundary the gradients are empty: the state is complete.
        state.running_loss = loss_sum.item()
        state.elapsed_s = time.perf_counter() - stage.started
        state.save(checkpoints, stage.out_dir / TRAINER_DIR / f"checkpoint-{step:08d}", **stage.trainables())


def _no_sync(forward, world: World, boundary: bool):
    if world.distributed and not boundary:
        return forward.no_sync()
    return contextlib.nullcontext()


def _save_interval(args: TrainingArguments, total_steps: int, checkpoints: CheckpointSink | None, log) -> int:
    if checkpoints is None:
        return 0
    if plain_value(args.save_strategy) != "steps":
        log(f"save_strategy {plain_value(args.save_strategy)!r}: no checkpoints saved (only 'steps' is supported)")
        return 0
    return _interval(args.save_steps, total_steps)


def _eval_due(args: TrainingArguments, step: int, total_steps: int) -> bool:
    if args.eval_strategy != "steps":  # IntervalStrategy is a str enum
        return False
    every = _interval(args.eval_steps or args.logging_steps, total_steps)
    return every > 0 and step % every == 0 and step < total_steps


def _interval(every: float | None, total_steps: int) -> int:
    """Steps between evaluations or saves; below 1 it is a fraction of the run, rounded up as HF does."""
    if not every or every <= 0:
        return 0
    if every < 1:
        return max(1, math.ceil(every * total_steps - 1e-9))  # 0.1 * 300 is 30.000000000000004
    return int(every)
