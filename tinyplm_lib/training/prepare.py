"""A stage's first phase: inputs checked, arguments loaded, model built, data packed, resume state found.

`prepare_stage()` returns a `PreparedStage`, all that the loop (`training.loop`) and the finish
(`training.stage`) need: with a matching checkpoint in the sink, the model, optimizer, scheduler,
grad-scaler, RNG states and progress are those it saved.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainingArguments, get_scheduler

from tinyplm_lib.errors import ConfigError
from tinyplm_lib.layout import TRAINER_DIR
from tinyplm_lib.tokens.folder import TokenizerFolder
from tinyplm_lib.training.arguments import (
    RuntimeOptions,
    StageArguments,
    StageOptions,
    check_stage_inputs,
    stage_arguments,
)
from tinyplm_lib.training.checkpoints import CheckpointSink, settings_fingerprint
from tinyplm_lib.training.cpu_kernels import CPU_ATTENTION, use_fast_dropout
from tinyplm_lib.training.distributed import World, single
from tinyplm_lib.training.model import build_model, evaluate, masking_spec, packed_sequences
from tinyplm_lib.training.packing import MaskingSpec, PackedSequences
from tinyplm_lib.training.state import TrainingState, find_checkpoint, stage_settings

# A non-main rank's dropout stream: seed + this x rank (+ the step when resumed).
_RANK_SEED_STRIDE = 7919


@dataclass
class PreparedStage:
    """A stage ready to train: its settings, data, model, optimisation objects and progress."""

    options: StageOptions
    runtime: RuntimeOptions
    world: World
    arguments: StageArguments
    precision: str  # "bf16", "fp16" or "fp32", resolved for the device
    tokenizer: TokenizerFolder
    spec: MaskingSpec
    model: torch.nn.Module
    train_set: PackedSequences
    eval_set: PackedSequences
    steps_per_epoch: int  # whole optimizer steps only
    total_steps: int
    out_dir: Path
    log: Callable[[str], None]
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    state: TrainingState | None = None
    started: float = 0.0  # time.perf_counter() when elapsed_s was 0 (earlier attempts included)
    resumed_from_step: int = 0

    def evaluate(self, model: torch.nn.Module | None = None) -> dict:
        """`model.evaluate` of this stage's model (or `model`) on its validation sequences."""
        args = self.arguments.args
        return evaluate(model if model is not None else self.model, self.eval_set, self.spec,
                        batch_size=args.per_device_eval_batch_size, device=self.world.device,
                        runtime=self.runtime, seed=args.seed, max_sequences=self.options.max_eval_sequences)

    def trainables(self) -> dict:
        """The live objects a checkpoint saves beside the state, by `write_checkpoint`'s names."""
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler}


def prepare_stage(train_dir: Path, validation_dir: Path, tokenizer_dir: Path, out_dir: Path,
                  options: StageOptions, log: Callable[[str], None], *, checkpoints: CheckpointSink | None,
                  runtime: RuntimeOptions | None, world: World | None) -> PreparedStage:
    """Check, load and build everything a stage needs, then restore its newest matching checkpoint."""
    stage = _build(train_dir, validation_dir, tokenizer_dir, Path(out_dir), options, log,
                   runtime or RuntimeOptions(), world or single())
    world, args = stage.world, stage.arguments.args
    settings = stage_settings(stage.arguments, options, stage.spec, stage.total_steps, stage.train_set,
                              stage.eval_set, world.size)
    fingerprint = settings_fingerprint(settings)
    resume = find_checkpoint(checkpoints, settings, log, world)
    initial_loss, untrained_loss = _baseline_losses(stage, resume)
    if world.is_main:
        log(f"device {world.device} ({stage.precision}) x {world.size} processes; {len(stage.train_set)} packed "
            f"sequences of ≤{stage.arguments.max_seq_length} tokens; {stage.total_steps} steps; "
            f"eval loss before training {initial_loss:.3f}")
    stage.optimizer = _optimizer(stage.model, args)
    stage.scheduler = get_scheduler(args.lr_scheduler_type, stage.optimizer,
                                    num_warmup_steps=args.get_warmup_steps(stage.total_steps),
                                    num_training_steps=stage.total_steps)
    # fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not (scaler disabled).
    stage.scaler = torch.amp.GradScaler(world.device.type, enabled=stage.precision == "fp16")
    stage.started = time.perf_counter()
    identity = {"device": str(world.device), "fingerprint": fingerprint, "settings": settings}
    if resume is None:
        stage.state = TrainingState(initial_eval_loss=initial_loss, untrained_eval_loss=untrained_loss, **identity)
    else:
        stage.state = TrainingState.restore(resume, **identity, **stage.trainables(), log=log)
        step = stage.state.global_step
        if world.distributed:  # the checkpoint holds rank 0's random state; dropout differs per rank
            torch.manual_seed(args.seed + _RANK_SEED_STRIDE * world.rank + step)
        log(f"resumed from {resume['directory']} at step {step}/{stage.total_steps} "
            f"(epoch {stage.state.epoch}, micro-batch {stage.state.next_micro_index})")
        del resume  # the read copy of weights and moments (three model sizes) is no longer needed
    stage.started -= stage.state.elapsed_s
    stage.resumed_from_step = stage.state.global_step
    if world.distributed and stage.resumed_from_step == 0 and not world.is_main:
        torch.manual_seed(args.seed + _RANK_SEED_STRIDE * world.rank)  # same initial weights, own dropout stream
    return stage


def _build(train_dir: Path, validation_dir: Path, tokenizer_dir: Path, out_dir: Path, options: StageOptions,
           log: Callable[[str], None], runtime: RuntimeOptions, world: World) -> PreparedStage:
    """Settings checked from small files first, then the model built and the data packed."""
    arguments = stage_arguments(options, out_dir / TRAINER_DIR)
    tokenizer = TokenizerFolder(tokenizer_dir)
    # Model/tokenizer vocab mismatch and sizes, from small files only: before any model or data.
    check_stage_inputs(options, arguments, tokenizer)
    spec = masking_spec(tokenizer, arguments.mlm_probability)
    device = world.device
    precision = runtime.resolve_precision(device)
    if device.type == "cuda" and runtime.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    args, max_seq_length = arguments.args, arguments.max_seq_length
    torch.manual_seed(args.seed)
    model = build_model(options.model_config, spec.vocab_size, max_seq_length, options.init_from).to(device)
    attention = runtime.resolve_attention(device)
    model.set_attn_implementation(attention)  # speed only: the same function
    if attention == CPU_ATTENTION:
        use_fast_dropout(model)  # the same dropout, drawn faster (no weights change)
    train_set = packed_sequences(train_dir, tokenizer, spec, max_seq_length)
    eval_set = packed_sequences(validation_dir, tokenizer, spec, max_seq_length)
    if len(train_set) == 0 or len(eval_set) == 0:
        raise ConfigError("corpus", "the train or validation token shards are empty")
    batch, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    steps_per_epoch = len(train_set) // (batch * world.size * accumulation)
    if steps_per_epoch == 0:
        raise ConfigError("per_device_train_batch_size", f"{len(train_set)} packed sequences do not fill one "
                          f"optimizer step of {batch} x {world.size} (processes) x {accumulation} "
                          "(gradient_accumulation_steps) sequences")
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    return PreparedStage(options=options, runtime=runtime, world=world, arguments=arguments, precision=precision,
                         tokenizer=tokenizer, spec=spec, model=model, train_set=train_set, eval_set=eval_set,
                         steps_per_epoch=steps_per_epoch, total_steps=total_steps, out_dir=out_dir, log=log)


def _baseline_losses(stage: PreparedStage, resume: dict | None) -> tuple[float | None, float | None]:
    """(eval loss before training, eval loss of an untrained model of the same shape), on rank 0 only."""
    if resume is not None:  # measured by the first attempt; the model is no longer untrained
        return resume["state"]["initial_eval_loss"], resume["state"]["untrained_eval_loss"]
    if not stage.world.is_main:
        return None, None
    initial_loss = untrained_loss = stage.evaluate()["loss"]
    options = stage.options
    if options.init_from is not None:
        torch.manual_seed(stage.arguments.args.seed)
        fresh = build_model(options.model_config, stage.spec.vocab_size, stage.arguments.max_seq_length,
                            None).to(stage.world.device)
        untrained_loss = stage.evaluate(fresh)["loss"]
        del fresh
    return initial_loss, untrained_loss


def _optimizer(model, args: TrainingArguments) -> torch.optim.Optimizer:
    # As in BERT: no weight decay on biases and LayerNorm weights.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon)
