"""Masked-language-model training of one stage, driven by HF `TrainingArguments` JSON files.

`train_stage()` trains a `BertForMaskedLM` — from scratch (stage 1) or from an earlier checkpoint
(stage 2) — on packed token shards, evaluates it on the validation shards (loss, masked-token
accuracy, perplexity, and the same loss for an untrained model of the same shape, as a yardstick),
and writes a standard Hugging Face folder: `model.safetensors`, `config.json`, the tokenizer files
and `metrics.json`. Given a checkpoint sink it saves every `save_steps` and, run again with the same
settings, resumes exactly where the last checkpoint left off. Usable from a notebook:

    train_stage(train_dir, val_dir, tok_dir, out_dir,
                StageOptions(Path("configs/model/bert-tiny-custom.json"), Path("configs/train/stage1.json")),
                checkpoints=LocalCheckpointSink(Path("checkpoints/stage1")))
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForMaskedLM, TrainingArguments, get_scheduler

from tinyplm_lib.errors import ConfigError
from tinyplm_lib.files import sha256_file
from tinyplm_lib.training.arguments import load_training_arguments
from tinyplm_lib.training.checkpoints import (
    FORMAT_VERSION,
    CheckpointSink,
    find_resumable,
    restore_checkpoint,
    save_to_sink,
    settings_fingerprint,
)
from tinyplm_lib.training.curves import loss_curve_png, write_tensorboard
from tinyplm_lib.training.distributed import World, single
from tinyplm_lib.training.packing import IGNORE_INDEX, MaskingSpec, MicroBatches, PackedSequences, mask_tokens
from tinyplm_lib.training.stage_checks import check_stage_inputs

logger = logging.getLogger(__name__)

# Every TrainingArguments field the loop reads that changes its result: a checkpoint made under
# other values is not resumed. save_strategy and save_steps are left out on purpose (saving more
# or less often changes nothing); tests/test_resume.py fails when the loop reads a field not listed.
_RESULT_FIELDS = (
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "lr_scheduler_type", "warmup_steps", "max_steps", "num_train_epochs", "seed", "fp16", "bf16",
    "logging_steps", "eval_strategy", "eval_steps",
)


@dataclass(frozen=True)
class StageOptions:
    """What a stage reads beyond the data: config files, sequence length, evaluation size."""

    model_config: Path
    training_args: Path
    init_from: Path | None = None  # a previous stage's folder; None trains from scratch
    max_seq_length: int | None = None  # None: the JSON's max_seq_length, else 128
    max_eval_sequences: int = 10_000  # cap so evaluating an untrained yardstick stays cheap
    overrides: dict = field(default_factory=dict)  # TrainingArguments fields set by run config


@dataclass(frozen=True)
class RuntimeOptions:
    """Speed-only settings, kept apart from the settings that change what a stage learns.

    They are not part of a checkpoint's fingerprint, so a stage saved on a CPU resumes on a GPU.
    `precision` changes float rounding only: "auto" is bf16 autocast where the device has it
    (CPUs, Ampere and newer GPUs), fp16 with loss scaling on older GPUs, else fp32; the
    TrainingArguments JSON's `fp16`/`bf16` flags are superseded by it. `max_wall_time_s` stops
    training early after that many seconds (for benchmarks at a fixed budget).
    """

    precision: str = "auto"
    tf32: bool = True  # TensorFloat-32 matmuls on CUDA
    compile: bool = False  # torch.compile the encoder (the first steps pay for compilation)
    dataloader_workers: int = 2  # processes building masked batches; 0 = in the training process
    max_wall_time_s: float | None = None

    def resolve_precision(self, device: torch.device) -> str:
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError("precision", f"{self.precision!r}: use auto, bf16, fp16 or fp32")
        if self.precision != "auto":
            if self.precision == "fp16" and device.type != "cuda":
                raise ConfigError("precision", "fp16 needs a CUDA device")
            return self.precision
        if device.type == "cpu" or torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"

    def autocast(self, device: torch.device):
        precision = self.resolve_precision(device)
        if precision == "fp32":
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def build_model(model_config: Path, vocab_size: int, max_seq_length: int, init_from: Path | None):
    """A fresh BertForMaskedLM from a BertConfig JSON, or the weights of `init_from`."""
    if init_from is not None:
        model = BertForMaskedLM.from_pretrained(str(init_from))
        if model.config.vocab_size != vocab_size:
            raise ConfigError(
                "init_from",
                f"{init_from} has vocab_size {model.config.vocab_size} but the tokenizer has {vocab_size}",
            )
        return model
    try:
        config = BertConfig.from_json_file(str(model_config))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError("model_config", f"{model_config}: {exc}") from exc
    if config.vocab_size < vocab_size:
        raise ConfigError(
            "vocab_size",
            f"{model_config} sets vocab_size {config.vocab_size}, smaller than the tokenizer's {vocab_size}",
        )
    # A tokenizer trained on a small corpus may hold fewer tokens than asked for; the embedding
    # matrix follows the tokenizer so no row is dead weight.
    config.vocab_size = vocab_size
    if config.max_position_embeddings < max_seq_length:
        raise ConfigError(
            "max_seq_length",
            f"{max_seq_length} exceeds max_position_embeddings {config.max_position_embeddings} of {model_config}",
        )
    return BertForMaskedLM(config)


def masking_spec(tokenizer_dir: Path, probability: float) -> MaskingSpec:
    """Special and regular ids, read from `vocab.txt` (no MeCab needed on a training machine)."""
    path = Path(tokenizer_dir) / "vocab.txt"
    try:
        tokens = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError("tokenizer", f"{path}: {exc}") from exc
    ids = {token: i for i, token in enumerate(tokens)}
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in ids]
    if missing:
        raise ConfigError("tokenizer", f"{path} lacks the special tokens {missing}")
    # Specials and [unusedN] lead the vocabulary; none is masked, and random replacements skip them.
    first_regular = next((i for i, t in enumerate(tokens) if not (t.startswith("[") and t.endswith("]"))),
                         len(tokens))
    spec = MaskingSpec(vocab_size=len(tokens), mask_id=ids["[MASK]"], pad_id=ids["[PAD]"],
                       special_ids=tuple(range(first_regular)), first_regular_id=first_regular,
                       probability=probability)
    spec.validate()
    return spec


def masked_predictions(model, inputs, attention, labels):
    """(logits, targets) at the masked positions only.

    The encoder runs on every position, but the 768→vocab projection (32,768 columns) only where
    a loss is taken: ~15% of the work of the full `BertForMaskedLM` head. Measured on this CPU
    for the 13M model: ~1.3k → ~3.6k tokens/s (NOTES.md). The model stays a `BertForMaskedLM`.
    """
    hidden = model.bert(input_ids=inputs, attention_mask=attention).last_hidden_state
    selected = labels != IGNORE_INDEX
    return model.cls(hidden[selected]), labels[selected]


@torch.no_grad()
def evaluate(model, dataset: PackedSequences, spec: MaskingSpec, *, batch_size: int,
             device: torch.device, seed: int, max_sequences: int, runtime: RuntimeOptions | None = None) -> dict:
    """Token-weighted MLM loss and accuracy over fixed, seeded masks (same masks for any model)."""
    runtime = runtime or RuntimeOptions(precision="fp32")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    count = min(len(dataset), max_sequences)
    loss_sum, correct, masked = 0.0, 0, 0
    for start in range(0, count, batch_size):
        ids, attention = dataset.batch(np.arange(start, min(start + batch_size, count)))
        inputs, labels = mask_tokens(ids, spec, generator)
        with runtime.autocast(device):
            logits, targets = masked_predictions(model, inputs.to(device), attention.to(device), labels.to(device))
        if targets.numel() == 0:
            continue
        logits = logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        masked += targets.numel()
    model.train()
    if masked == 0:
        raise ConfigError("validation", "the validation split produced no masked tokens to evaluate")
    loss = loss_sum / masked
    return {"loss": loss, "accuracy": correct / masked, "perplexity": math.exp(min(loss, 50.0)),
            "masked_tokens": masked, "sequences": count}


def train_stage(
    train_dir: Path,
    validation_dir: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    options: StageOptions,
    log: Callable[[str], None] = logger.info,
    *,
    checkpoints: CheckpointSink | None = None,
    on_step: Callable[[int], None] | None = None,
    runtime: RuntimeOptions | None = None,
    world: World | None = None,
) -> dict:
    """Train one stage into `out_dir` (a Hugging Face model folder); return its metrics.

    With `checkpoints`, a checkpoint is saved every `save_steps` optimizer steps (save_strategy
    "steps"; never at the last step) and a later call with the same settings and data continues
    from the newest one, ending with the weights and metrics of an uninterrupted run; the sink is
    cleared once `out_dir` is written. `on_step(step)` runs after every optimizer step and its
    checkpoint (tests raise from it to simulate a crash).

    Under torchrun pass `world=distributed.from_env()`: every process trains on its slice of each
    global micro-batch (see `tinyplm_lib.training.distributed`), rank 0 alone evaluates, saves checkpoints
    and writes `out_dir`, and only rank 0 returns the metrics (the others return {}).
    """
    out_dir = Path(out_dir)
    args, extras = load_training_arguments(options.training_args, out_dir / "trainer", options.overrides)
    max_seq_length = options.max_seq_length or int(extras.get("max_seq_length", 128))
    # Model/tokenizer vocab mismatch and sizes, from small files only: before any model or data.
    check_stage_inputs(model_config=options.model_config, tokenizer_dir=tokenizer_dir,
                       init_from=options.init_from, max_seq_length=max_seq_length,
                       max_eval_sequences=options.max_eval_sequences,
                       eval_batch_size=args.per_device_eval_batch_size)
    if options.init_from is not None and not _same_vocab(options.init_from, tokenizer_dir):
        raise ConfigError("init_from", f"{options.init_from}/vocab.txt differs from {tokenizer_dir}/vocab.txt: "
                          "stage 2 must use the tokenizer stage 1 was trained with")
    runtime = runtime or RuntimeOptions()
    spec = masking_spec(tokenizer_dir, float(extras.get("mlm_probability", 0.15)))
    world = world or single()
    device = world.device
    precision = runtime.resolve_precision(device)
    if device.type == "cuda" and runtime.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    model = build_model(options.model_config, spec.vocab_size, max_seq_length, options.init_from).to(device)

    specials = _vocab_ids(tokenizer_dir)
    packing = {"cls_id": specials["[CLS]"], "sep_id": specials["[SEP]"], "pad_id": spec.pad_id}
    train_set = PackedSequences(train_dir, max_seq_length, **packing)
    eval_set = PackedSequences(validation_dir, max_seq_length, **packing)
    if len(train_set) == 0 or len(eval_set) == 0:
        raise ConfigError("corpus", "the train or validation token shards are empty")
    batch = args.per_device_train_batch_size
    accumulation = args.gradient_accumulation_steps
    steps_per_epoch = len(train_set) // (batch * world.size * accumulation)
    if steps_per_epoch == 0:
        raise ConfigError("per_device_train_batch_size", f"{len(train_set)} packed sequences do not fill one "
                          f"optimizer step of {batch} x {world.size} (processes) x {accumulation} "
                          "(gradient_accumulation_steps) sequences")
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    eval_kwargs = {"batch_size": args.per_device_eval_batch_size, "device": device, "runtime": runtime,
                   "seed": args.seed, "max_sequences": options.max_eval_sequences}
    settings = _fingerprint_inputs(args, options, spec, max_seq_length, total_steps, train_set, eval_set)
    settings["processes"] = world.size  # another process count draws other batches: not resumable
    fingerprint = settings_fingerprint(settings)
    resume = _find_resumable(checkpoints, settings, log, world)

    initial_loss = untrained_loss = None  # measured on rank 0 only
    if resume is not None:  # measured by the first attempt; the model is no longer untrained
        initial_loss, untrained_loss = resume["state"]["initial_eval_loss"], resume["state"]["untrained_eval_loss"]
    elif world.is_main:
        initial_loss = untrained_loss = evaluate(model, eval_set, spec, **eval_kwargs)["loss"]
        if options.init_from is not None:
            torch.manual_seed(args.seed)
            fresh = build_model(options.model_config, spec.vocab_size, max_seq_length, None).to(device)
            untrained_loss = evaluate(fresh, eval_set, spec, **eval_kwargs)["loss"]
            del fresh
    if world.is_main:
        log(f"device {device} ({precision}) x {world.size} processes; {len(train_set)} packed sequences of "
            f"≤{max_seq_length} tokens; {total_steps} steps; eval loss before training {initial_loss:.3f}")

    optimizer = _optimizer(model, args)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=args.get_warmup_steps(total_steps),
                              num_training_steps=total_steps)
    # fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not (scaler disabled).
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    history: list[dict] = []
    step, epoch, next_micro, tokens_seen = 0, 0, 0, 0
    running_loss, running_count = 0.0, 0
    started = time.perf_counter()
    if resume is not None:
        for note in restore_checkpoint(resume, model=model, optimizer=optimizer, scheduler=scheduler,
                                       scaler=scaler):
            log(note)
        saved = resume["state"]
        step, epoch, next_micro = saved["global_step"], saved["epoch"], saved["next_micro_index"]
        tokens_seen, history = saved["tokens_seen"], saved["history"]
        running_loss, running_count = saved["running_loss"], saved["running_count"]
        started -= saved["elapsed_s"]
        if world.distributed:  # the checkpoint holds rank 0's random state; dropout differs per rank
            torch.manual_seed(args.seed + 7919 * world.rank + step)
        log(f"resumed from {resume['directory']} at step {step}/{total_steps} "
            f"(epoch {epoch}, micro-batch {next_micro})")
        del resume  # the read copy of weights and moments (three model sizes) is no longer needed
    resumed_from_step = step
    if world.distributed and resumed_from_step == 0 and not world.is_main:
        torch.manual_seed(args.seed + 7919 * world.rank)  # same initial weights, own dropout stream
    save_every = _save_interval(args, total_steps, checkpoints, log)
    # Only whole optimizer steps per epoch: a shorter tail would otherwise leak its gradients
    # into the next epoch's first step.
    micro_per_epoch = steps_per_epoch * accumulation
    if runtime.compile:
        model.bert.compile(dynamic=True)  # in place: parameter names (and the saved file) unchanged
    forward = _MaskedLM(model)
    if world.distributed:
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)
    # The running loss stays on the device: a .item() per micro-batch would stall a GPU.
    loss_sum = torch.tensor(running_loss, dtype=torch.float64, device=device)
    stopped_early = False
    model.train()
    workers = runtime.dataloader_workers
    batches = MicroBatches(train_set, batch, spec, seed=args.seed, per_epoch=micro_per_epoch, start_epoch=epoch,
                           start_micro=next_micro, count=(total_steps - step) * accumulation,
                           rank=world.rank, world=world.size)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                                         # Its own generator: drawing worker seeds from the global one
                                         # would shift dropout's random stream on resume.
                                         generator=torch.Generator().manual_seed(args.seed))
    if step < total_steps:
        for epoch, micro_index, inputs, labels, attention, global_masked, global_tokens in loader:
            tokens_seen += int(global_tokens)
            inputs, labels, attention = (t.to(device, non_blocking=True) for t in (inputs, labels, attention))
            boundary = (micro_index + 1) % accumulation == 0
            # Gradients are all-reduced once per optimizer step, not per accumulated micro-batch.
            with _no_sync(forward, world, boundary):
                with runtime.autocast(device):
                    logits, targets = forward(inputs, attention, labels)
                # Summed over this slice and divided by the global masked count (times the
                # world size, which DDP's gradient averaging divides out): the mean over the
                # global micro-batch, as one process computes it. No masked token gives 0, not NaN.
                loss = (torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
                        * (world.size / max(int(global_masked), 1)))
                scaler.scale(loss / accumulation).backward()
            loss_sum += loss.detach().double()
            running_count += 1
            if not boundary:
                continue
            scaler.unscale_(optimizer)
            if args.max_grad_norm and args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % max(1, int(args.logging_steps)) == 0 or step == total_steps:
                world.sum(loss_sum)  # each rank holds its share of every global micro-batch's mean
                entry = {"step": step, "train_loss": loss_sum.item() / (running_count * world.size),
                         "learning_rate": scheduler.get_last_lr()[0], "tokens_seen": tokens_seen,
                         "elapsed_s": time.perf_counter() - started}
                history.append(entry)
                loss_sum.zero_()
                running_count = 0
                log(f"step {step}/{total_steps} loss {entry['train_loss']:.4f}")
            if _eval_due(args, step, total_steps) and world.is_main:
                eval_loss = evaluate(model, eval_set, spec, **eval_kwargs)["loss"]
                if history and history[-1]["step"] == step:
                    history[-1]["eval_loss"] = eval_loss
                else:
                    history.append({"step": step, "eval_loss": eval_loss})
            if save_every and step % save_every == 0 and step < total_steps and world.is_main:
                # At an optimizer-step boundary the gradients are empty: the state is complete.
                state = {"global_step": step, "epoch": epoch, "next_micro_index": micro_index + 1,
                         "tokens_seen": tokens_seen, "running_loss": loss_sum.item(),
                         "running_count": running_count, "history": history,
                         "elapsed_s": time.perf_counter() - started, "initial_eval_loss": initial_loss,
                         "untrained_eval_loss": untrained_loss, "device": str(device),
                         "fingerprint": fingerprint, "settings": settings}
                save_to_sink(checkpoints, out_dir / "trainer" / f"checkpoint-{step:08d}", step, state,
                             model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
            if on_step is not None:
                on_step(step)
            if runtime.max_wall_time_s is not None and world.broadcast_flag(
                    time.perf_counter() - started >= runtime.max_wall_time_s):
                stopped_early = step < total_steps
                break
            if step >= total_steps:
                break
    wall = time.perf_counter() - started
    if not world.is_main:
        world.barrier()  # rank 0 evaluates and publishes; the others wait for it to finish
        return {}

    final = evaluate(model, eval_set, spec, **eval_kwargs)
    metrics = {
        "eval_loss": final["loss"], "eval_accuracy": final["accuracy"], "perplexity": final["perplexity"],
        "eval_masked_tokens": final["masked_tokens"], "eval_sequences": final["sequences"],
        "initial_eval_loss": initial_loss, "untrained_eval_loss": untrained_loss,
        "train_loss": next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None),
        "global_step": step, "epochs": epoch + 1, "tokens_seen": tokens_seen,
        "tokens_per_s": tokens_seen / wall if wall > 0 else None, "wall_time_s": wall,
        "resumed_from_step": resumed_from_step, "stopped_early": stopped_early, "precision": precision,
        "device": str(device), "processes": world.size, "max_seq_length": max_seq_length,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_sequences": len(train_set), "history": history,
    }
    _save_folder(model, tokenizer_dir, out_dir, metrics, args, options)
    if checkpoints is not None:
        checkpoints.clear()  # only now: the output above is what they were kept for
    log(f"eval loss {final['loss']:.3f} (untrained {untrained_loss:.3f}), "
        f"accuracy {final['accuracy']:.3f}, perplexity {final['perplexity']:.1f}")
    world.barrier()
    return metrics


class _MaskedLM(torch.nn.Module):
    """`masked_predictions` as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs, attention, labels):
        return masked_predictions(self.model, inputs, attention, labels)


def _no_sync(forward, world: World, boundary: bool):
    if world.distributed and not boundary:
        return forward.no_sync()
    return contextlib.nullcontext()


def _find_resumable(checkpoints: CheckpointSink | None, settings: dict, log, world: World) -> dict | None:
    """Rank 0 looks first (an S3 sink fills its local cache); the others then read the same files."""
    if checkpoints is None:
        return None
    resume = find_resumable(checkpoints, settings, log) if world.is_main else None
    world.barrier()
    if not world.is_main:
        resume = find_resumable(checkpoints, settings, lambda message: None)
    return resume


def _fingerprint_inputs(args, options: StageOptions, spec: MaskingSpec, max_seq_length: int, total_steps: int,
                        train_set: PackedSequences, eval_set: PackedSequences) -> dict:
    """Everything that changes a stage's result, as JSON: contents and hashes, never paths."""
    training = {name: _plain(getattr(args, name)) for name in _RESULT_FIELDS}
    training["resolved_warmup_steps"] = args.get_warmup_steps(total_steps)
    training["resolved_total_steps"] = total_steps
    settings = {
        "checkpoint_format": FORMAT_VERSION, "training_args": training, "max_seq_length": max_seq_length,
        "max_eval_sequences": options.max_eval_sequences, "masking": asdict(spec),
        "model_config": _read_json(options.model_config, "model_config"),
        "train_shards": train_set.shards.meta, "validation_shards": eval_set.shards.meta,
    }
    if options.init_from is not None:
        init_from = Path(options.init_from)
        settings["init_from"] = {"config": _read_json(init_from / "config.json", "init_from"),
                                 **{p.name: sha256_file(p) for p in sorted(init_from.glob("*.safetensors"))}}
    return json.loads(json.dumps(settings))  # tuples become lists, as they come back from state.json


def _save_interval(args, total_steps: int, checkpoints: CheckpointSink | None, log) -> int:
    if checkpoints is None:
        return 0
    if _plain(args.save_strategy) != "steps":
        log(f"save_strategy {_plain(args.save_strategy)!r}: no checkpoints saved (only 'steps' is supported)")
        return 0
    return _interval(args.save_steps, total_steps)


def _plain(value):
    return value.value if isinstance(value, enum.Enum) else value


def _read_json(path: Path, setting: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(setting, f"{path}: {exc}") from exc


def _vocab_ids(tokenizer_dir: Path) -> dict[str, int]:
    tokens = (Path(tokenizer_dir) / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return {token: i for i, token in enumerate(tokens)}


def _same_vocab(model_dir: Path, tokenizer_dir: Path) -> bool:
    vocab = Path(model_dir) / "vocab.txt"
    return vocab.is_file() and vocab.read_bytes() == (Path(tokenizer_dir) / "vocab.txt").read_bytes()


def _optimizer(model, args: TrainingArguments) -> torch.optim.Optimizer:
    # As in BERT: no weight decay on biases and LayerNorm weights.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon)


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


def _save_folder(model, tokenizer_dir: Path, out_dir: Path, metrics: dict, args, options: StageOptions) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    for item in Path(tokenizer_dir).iterdir():
        if item.is_file() and not item.name.startswith("_"):  # not the storage manifest
            shutil.copy2(item, out_dir / item.name)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    write_tensorboard(metrics["history"], out_dir / "tensorboard")
    loss_curve_png(metrics["history"], out_dir / "loss_curve.png")
    settings = {"training_args": json.loads(args.to_json_string()),
                "stage": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}}
    (out_dir / "training_settings.json").write_text(json.dumps(settings, indent=1, default=str) + "\n",
                                                    encoding="utf-8")
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)
