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

from tinyplm_lib.checkpoints import (FORMAT_VERSION, CheckpointSink, find_resumable, restore_checkpoint,
                                     save_to_sink, settings_fingerprint)
from tinyplm_lib.errors import ConfigError
from tinyplm_lib.packing import MaskingSpec, PackedSequences, collate, mask_tokens
from tinyplm_lib.storage import sha256_file
from tinyplm_lib.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

# Keys of the original run_mlm.py JSON files that are not TrainingArguments. Data/model paths are
# supplied by the pipeline itself, so they are accepted and ignored; the two that change training
# are honoured.
_RUN_MLM_HONOURED = {"max_seq_length", "mlm_probability"}
_RUN_MLM_IGNORED = {
    "model_name_or_path", "model_type", "config_name", "tokenizer_name", "train_file",
    "validation_file", "line_by_line", "pad_to_max_length", "preprocessing_num_workers",
    "overwrite_cache", "cache_dir", "validation_split_percentage", "max_train_samples",
    "max_eval_samples", "overwrite_output_dir", "use_fast_tokenizer", "trust_remote_code",
}
# transformers 5 renamed or folded these v4 fields; old JSON files keep working.
_V4_RENAMES = {"evaluation_strategy": "eval_strategy"}
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


def load_training_arguments(path: Path, output_dir: Path, overrides: dict | None = None):
    """Read a TrainingArguments JSON (run_mlm style accepted); return (args, run_mlm extras)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError("training_args", f"file {path} not found") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError("training_args", f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(raw, dict):
        raise ConfigError("training_args", f"{path}: expected a JSON object")
    raw.update(overrides or {})
    extras = {key: raw.pop(key) for key in list(raw) if key in _RUN_MLM_HONOURED}
    for key in list(raw):
        if key in _RUN_MLM_IGNORED:
            raw.pop(key)
        elif key in _V4_RENAMES:
            raw[_V4_RENAMES[key]] = raw.pop(key)
    if "warmup_ratio" in raw:  # v5 takes a fraction < 1 in warmup_steps instead
        ratio = raw.pop("warmup_ratio")
        if raw.get("warmup_steps"):
            raise ConfigError("warmup_ratio", f"{path}: give warmup_ratio or warmup_steps, not both")
        raw["warmup_steps"] = ratio
    raw["output_dir"] = str(output_dir)
    raw.setdefault("report_to", "none")
    try:
        args = TrainingArguments(**raw)
    except TypeError as exc:
        raise ConfigError("training_args", f"{path}: {exc}") from exc
    except ValueError as exc:
        raise ConfigError("training_args", f"{path}: {exc}") from exc
    for name in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) <= 0:
            raise ConfigError(name, f"{path}: must be positive, got {getattr(args, name)}")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise ConfigError("max_steps", f"{path}: set max_steps or num_train_epochs above zero")
    return args, extras


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def masking_spec(tokenizer, probability: float) -> MaskingSpec:
    vocab = tokenizer.get_vocab()
    ordered = sorted(vocab, key=vocab.__getitem__)
    # Specials and [unusedN] lead the vocabulary; random replacements skip all of them.
    first_regular = next(i for i, tok in enumerate(ordered) if not (tok.startswith("[") and tok.endswith("]")))
    spec = MaskingSpec(
        vocab_size=len(vocab),
        mask_id=tokenizer.mask_token_id,
        pad_id=tokenizer.pad_token_id,
        special_ids=tuple(sorted(set(tokenizer.all_special_ids))),
        first_regular_id=first_regular,
        probability=probability,
    )
    spec.validate()
    return spec


@torch.no_grad()
def evaluate(model, dataset: PackedSequences, spec: MaskingSpec, *, batch_size: int,
             device: torch.device, seed: int, max_sequences: int) -> dict:
    """Token-weighted MLM loss and accuracy over fixed, seeded masks (same masks for any model)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    count = min(len(dataset), max_sequences)
    loss_sum, correct, masked = 0.0, 0, 0
    for start in range(0, count, batch_size):
        ids, attention = collate([dataset[i] for i in range(start, min(start + batch_size, count))], spec.pad_id)
        inputs, labels = mask_tokens(ids, spec, generator)
        inputs, labels, attention = inputs.to(device), labels.to(device), attention.to(device)
        logits = model(input_ids=inputs, attention_mask=attention).logits
        selected = labels != -100
        if not selected.any():
            continue
        picked = logits[selected].float()
        loss_sum += torch.nn.functional.cross_entropy(picked, labels[selected], reduction="sum").item()
        correct += (picked.argmax(-1) == labels[selected]).sum().item()
        masked += int(selected.sum().item())
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
) -> dict:
    """Train one stage into `out_dir` (a Hugging Face model folder); return its metrics.

    With `checkpoints`, a checkpoint is saved every `save_steps` optimizer steps (save_strategy
    "steps"; never at the last step) and a later call with the same settings and data continues
    from the newest one, ending with the weights and metrics of an uninterrupted run; the sink is
    cleared once `out_dir` is written. `on_step(step)` runs after every optimizer step and its
    checkpoint (tests raise from it to simulate a crash).
    """
    out_dir = Path(out_dir)
    args, extras = load_training_arguments(options.training_args, out_dir / "trainer", options.overrides)
    max_seq_length = options.max_seq_length or int(extras.get("max_seq_length", 128))
    if options.init_from is not None and not _same_vocab(options.init_from, tokenizer_dir):
        raise ConfigError("init_from", f"{options.init_from}/vocab.txt differs from {tokenizer_dir}/vocab.txt: "
                          "stage 2 must use the tokenizer stage 1 was trained with")
    tokenizer = load_tokenizer(tokenizer_dir)
    spec = masking_spec(tokenizer, float(extras.get("mlm_probability", 0.15)))
    device = pick_device()
    torch.manual_seed(args.seed)
    model = build_model(options.model_config, spec.vocab_size, max_seq_length, options.init_from).to(device)

    cls_sep = {"cls_id": tokenizer.cls_token_id, "sep_id": tokenizer.sep_token_id}
    train_set = PackedSequences(train_dir, max_seq_length, **cls_sep)
    eval_set = PackedSequences(validation_dir, max_seq_length, **cls_sep)
    if len(train_set) == 0 or len(eval_set) == 0:
        raise ConfigError("corpus", "the train or validation token shards are empty")
    batch = args.per_device_train_batch_size
    accumulation = args.gradient_accumulation_steps
    steps_per_epoch = len(train_set) // (batch * accumulation)
    if steps_per_epoch == 0:
        raise ConfigError("per_device_train_batch_size", f"{len(train_set)} packed sequences do not fill one "
                          f"optimizer step of {batch} x {accumulation} (gradient_accumulation_steps) sequences")
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    eval_kwargs = {"batch_size": args.per_device_eval_batch_size, "device": device,
                   "seed": args.seed, "max_sequences": options.max_eval_sequences}
    settings = _fingerprint_inputs(args, options, spec, max_seq_length, total_steps, train_set, eval_set)
    fingerprint = settings_fingerprint(settings)
    resume = find_resumable(checkpoints, settings, log) if checkpoints is not None else None

    if resume is not None:  # measured by the first attempt; the model is no longer untrained
        initial_loss, untrained_loss = resume["state"]["initial_eval_loss"], resume["state"]["untrained_eval_loss"]
    else:
        initial_loss = untrained_loss = evaluate(model, eval_set, spec, **eval_kwargs)["loss"]
        if options.init_from is not None:
            torch.manual_seed(args.seed)
            fresh = build_model(options.model_config, spec.vocab_size, max_seq_length, None).to(device)
            untrained_loss = evaluate(fresh, eval_set, spec, **eval_kwargs)["loss"]
            del fresh
    log(f"device {device}; {len(train_set)} packed sequences of ≤{max_seq_length} tokens; "
        f"{total_steps} steps; eval loss before training {initial_loss:.3f}")

    optimizer = _optimizer(model, args)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=args.get_warmup_steps(total_steps),
                              num_training_steps=total_steps)
    # fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not (scaler disabled).
    scaler = torch.amp.GradScaler(device.type, enabled=bool(args.fp16 and device.type == "cuda"))
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
        log(f"resumed from {resume['directory']} at step {step}/{total_steps} "
            f"(epoch {epoch}, micro-batch {next_micro})")
        del resume  # the read copy of weights and moments (three model sizes) is no longer needed
    resumed_from_step = step
    save_every = _save_interval(args, total_steps, checkpoints, log)
    # Only whole optimizer steps per epoch: a shorter tail would otherwise leak its gradients
    # into the next epoch's first step.
    micro_per_epoch = steps_per_epoch * accumulation
    generator = torch.Generator()
    model.train()
    while step < total_steps:
        # Shuffle per epoch from (seed, epoch): the order is reproducible and resumable.
        order = np.random.default_rng([args.seed, epoch]).permutation(len(train_set))
        for micro_index in range(next_micro, micro_per_epoch):
            micro_start = micro_index * batch
            ids, attention = collate([train_set[int(i)] for i in order[micro_start:micro_start + batch]], spec.pad_id)
            generator.manual_seed(args.seed * 1_000_003 + epoch * 100_003 + micro_index)
            inputs, labels = mask_tokens(ids, spec, generator)
            with _autocast(device, args):
                loss = model(input_ids=inputs.to(device), attention_mask=attention.to(device),
                             labels=labels.to(device)).loss
            scaler.scale(loss / accumulation).backward()
            tokens_seen += int(attention.sum())
            running_loss, running_count = running_loss + loss.item(), running_count + 1
            if (micro_index + 1) % accumulation:
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
                entry = {"step": step, "train_loss": running_loss / running_count,
                         "learning_rate": scheduler.get_last_lr()[0],
                         "elapsed_s": time.perf_counter() - started}
                history.append(entry)
                running_loss, running_count = 0.0, 0
                log(f"step {step}/{total_steps} loss {entry['train_loss']:.4f}")
            if _eval_due(args, step, total_steps):
                eval_loss = evaluate(model, eval_set, spec, **eval_kwargs)["loss"]
                if history and history[-1]["step"] == step:
                    history[-1]["eval_loss"] = eval_loss
                else:
                    history.append({"step": step, "eval_loss": eval_loss})
            if save_every and step % save_every == 0 and step < total_steps:
                # At an optimizer-step boundary the gradients are empty: the state is complete.
                state = {"global_step": step, "epoch": epoch, "next_micro_index": micro_index + 1,
                         "tokens_seen": tokens_seen, "running_loss": running_loss,
                         "running_count": running_count, "history": history,
                         "elapsed_s": time.perf_counter() - started, "initial_eval_loss": initial_loss,
                         "untrained_eval_loss": untrained_loss, "device": str(device),
                         "fingerprint": fingerprint, "settings": settings}
                save_to_sink(checkpoints, out_dir / "trainer" / f"checkpoint-{step:08d}", step, state,
                             model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
            if on_step is not None:
                on_step(step)
            if step >= total_steps:
                break
        epoch += 1
        next_micro = 0
    wall = time.perf_counter() - started

    final = evaluate(model, eval_set, spec, **eval_kwargs)
    metrics = {
        "eval_loss": final["loss"], "eval_accuracy": final["accuracy"], "perplexity": final["perplexity"],
        "eval_masked_tokens": final["masked_tokens"], "eval_sequences": final["sequences"],
        "initial_eval_loss": initial_loss, "untrained_eval_loss": untrained_loss,
        "train_loss": next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None),
        "global_step": step, "epochs": epoch, "tokens_seen": tokens_seen,
        "tokens_per_s": tokens_seen / wall if wall > 0 else None, "wall_time_s": wall,
        "resumed_from_step": resumed_from_step,
        "device": str(device), "max_seq_length": max_seq_length,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_sequences": len(train_set), "history": history,
    }
    _save_folder(model, tokenizer_dir, out_dir, metrics, args, options)
    if checkpoints is not None:
        checkpoints.clear()  # only now: the output above is what they were kept for
    log(f"eval loss {final['loss']:.3f} (untrained {untrained_loss:.3f}), "
        f"accuracy {final['accuracy']:.3f}, perplexity {final['perplexity']:.1f}")
    return metrics


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


def _autocast(device: torch.device, args: TrainingArguments):
    if args.bf16 and (device.type == "cpu" or torch.cuda.is_bf16_supported()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if args.fp16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(device.type, enabled=False)


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
    settings = {"training_args": json.loads(args.to_json_string()),
                "stage": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}}
    (out_dir / "training_settings.json").write_text(json.dumps(settings, indent=1, default=str) + "\n",
                                                    encoding="utf-8")
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)
