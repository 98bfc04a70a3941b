"""JGLUE fine-tuning: a checkpoint, or its random-init control, fine-tuned on JSTS or JCommonsenseQA
with the standard Hugging Face heads and scored on the dev split; files and metrics in `jglue_data`.

    finetune("jsts", ModelSource.pretrained(folder), folder, train, dev, out_dir,
             load_settings(Path("configs/jglue/default.json")))

writes `predictions.jsonl` and `metrics.json` into out_dir (both atomically) and returns the metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from tinyplm_lib.errors import ConfigError, InputError
from tinyplm_lib.evaluation.jglue_data import (
    JSTS,
    Example,
    check_task,
    is_jglue_v13,
    prediction_rows,
    predictions_text,
    read_examples,
    score_rows,
)
from tinyplm_lib.files import atomic_write_json, atomic_write_text
from tinyplm_lib.layout import METRICS_FILE, MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, PREDICTIONS_FILE, VOCAB_FILE
from tinyplm_lib.tokens.folder import TokenizerFolder
from tinyplm_lib.tokens.tokenizer import load_tokenizer
from tinyplm_lib.training.arguments import MIN_SEQ_LENGTH, read_json_object
from tinyplm_lib.training.distributed import pick_device

logger = logging.getLogger(__name__)

PRETRAINED, CONTROL = "pretrained", "control"
# Weights a task head adds to a BertForMaskedLM checkpoint (which has no pooler): drawn fresh.
_NEW_HEAD_PREFIXES = ("classifier.", "bert.pooler.")
MAX_GRAD_NORM = 1.0  # Hugging Face Trainer's default clipping
_LOG_TIMES = 10  # training loss lines per run


@dataclass(frozen=True)
class JglueSettings:
    """A fine-tuning budget, the same for a checkpoint and its control (configs/jglue/*.json; the
    defaults here are configs/jglue/default.json's). `max_train_examples` takes a seeded sample of
    the train file, kept in file order; None = all.
    """

    epochs: int = 3
    learning_rate: float = 1e-4
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 64
    max_seq_length: int = 128
    seed: int = 42
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_train_examples: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "per_device_train_batch_size", "per_device_eval_batch_size"):
            _require(name, getattr(self, name), int, low=1)
        _require("max_seq_length", self.max_seq_length, int, low=MIN_SEQ_LENGTH)
        _require("seed", self.seed, int, low=0)
        _require("learning_rate", self.learning_rate, float, low=0.0, low_open=True)
        _require("warmup_ratio", self.warmup_ratio, float, low=0.0, high=1.0)
        _require("weight_decay", self.weight_decay, float, low=0.0)
        if self.max_train_examples is not None:
            _require("max_train_examples", self.max_train_examples, int, low=1)


def _require(name: str, value, kind: type, *, low: float, high: float | None = None, low_open: bool = False) -> None:
    """A ConfigError naming `name` unless `value` is a `kind` (int counts as float) within the bounds."""
    kinds = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):  # bool is an int
        raise ConfigError(name, f"expected {'a number' if kind is float else 'an integer'}, got {value!r}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else f'{high}]'}"
        raise ConfigError(name, f"{value} is outside {bounds}")


def load_settings(path: Path) -> JglueSettings:
    """Settings from a JSON object; absent keys take the defaults above, `_comment` (a string) is ignored."""
    raw = read_json_object(Path(path), "jglue_settings")
    comment = raw.pop("_comment", "")
    if not isinstance(comment, str):
        raise ConfigError("_comment", f"{path}: expected a string")
    known = [item.name for item in fields(JglueSettings)]
    for key in raw:
        if key not in known:
            raise ConfigError(key, f"{path}: unknown setting; known: {', '.join(known)}")
    try:
        return JglueSettings(**raw)
    except ConfigError as exc:
        raise ConfigError(exc.setting, f"{path}: {exc.reason}") from exc


@dataclass(frozen=True)
class ModelSource:
    """What is fine-tuned: a model folder's weights (`pretrained`) or, as the control, a model of the
    same config.json with every weight drawn at random from the run's seed (`control`)."""

    path: Path
    kind: str

    @classmethod
    def pretrained(cls, folder: Path) -> ModelSource:
        return cls(Path(folder), PRETRAINED)

    @classmethod
    def control(cls, folder: Path) -> ModelSource:
        return cls(Path(folder), CONTROL)

    def __post_init__(self) -> None:
        if self.kind not in (PRETRAINED, CONTROL):
            raise ValueError(f"model source kind {self.kind!r}: use {PRETRAINED!r} or {CONTROL!r}")

    def build(self, task: str, seed: int):
        """The task's HF model; the new head (the control: every weight) is seeded with `seed`."""
        from transformers import AutoConfig, AutoModelForMultipleChoice, AutoModelForSequenceClassification

        config_path = self.path / MODEL_CONFIG_FILE
        if not config_path.is_file():
            raise InputError(config_path, "missing; expected a model folder written by the training stage")
        head = AutoModelForSequenceClassification if check_task(task) == JSTS else AutoModelForMultipleChoice
        options = {"num_labels": 1, "problem_type": "regression"} if task == JSTS else {}
        torch.manual_seed(seed)
        if self.kind == CONTROL:
            return head.from_config(AutoConfig.from_pretrained(str(self.path), **options))
        weights = self.path / MODEL_WEIGHTS_FILE
        if not weights.is_file():
            raise InputError(weights, "missing; a pretrained source needs the folder's weights")
        model, info = head.from_pretrained(str(self.path), output_loading_info=True, **options)
        # Anything else missing would be trained from random weights while reported as pretrained.
        absent = [key for key in info["missing_keys"] if not key.startswith(_NEW_HEAD_PREFIXES)]
        if absent:
            raise InputError(weights, f"lacks encoder weights ({', '.join(sorted(absent)[:3])}, ...)")
        return model


def _check_fit(model, tokenizer, tokenizer_dir: Path, source: ModelSource, settings: JglueSettings) -> None:
    """The tokenizer's ids fit the embedding, and max_seq_length the position table."""
    config = model.config
    if len(tokenizer) > config.vocab_size:
        raise ConfigError("tokenizer_dir", f"{tokenizer_dir} holds {len(tokenizer)} tokens, more than the "
                          f"model's vocab_size {config.vocab_size} ({source.path})")
    if source.kind == PRETRAINED and (source.path / VOCAB_FILE).is_file() \
            and not TokenizerFolder(tokenizer_dir).same_vocab(source.path):
        raise ConfigError("tokenizer_dir", f"{tokenizer_dir} is not the tokenizer {source.path} was trained with")
    if settings.max_seq_length > config.max_position_embeddings:
        raise ConfigError("max_seq_length", f"{settings.max_seq_length} exceeds max_position_embeddings "
                          f"{config.max_position_embeddings} of {source.path}")


class Encoded(NamedTuple):
    """One example's token ids: one sequence per (first, second) pair (JSTS 1, JCommonsenseQA 5)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]


def encode(tokenizer, examples: list[Example], max_seq_length: int) -> list[Encoded]:
    """`[CLS] first [SEP] second [SEP]` with segment ids, the longer side truncated first."""
    firsts = [first for example in examples for first, _ in example.texts]
    seconds = [second for example in examples for _, second in example.texts]
    # token_type_ids must be asked for: transformers 5's BertJapaneseTokenizer omits them by default.
    encoded = tokenizer(firsts, seconds, truncation="longest_first", max_length=max_seq_length,
                        return_token_type_ids=True, return_attention_mask=False)
    per = len(examples[0].texts)
    ids, types = encoded["input_ids"], encoded["token_type_ids"]
    return [Encoded(ids[i * per:(i + 1) * per], types[i * per:(i + 1) * per]) for i in range(len(examples))]


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Model inputs padded to the batch's longest sequence: (B, L), or (B, choices, L) for several."""
    choices = len(batch[0].input_ids)
    length = max(len(sequence) for item in batch for sequence in item.input_ids)
    input_ids = torch.full((len(batch), choices, length), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros_like(input_ids)
    attention_mask = torch.zeros_like(input_ids)
    for row, item in enumerate(batch):
        for choice, (ids, types) in enumerate(zip(item.input_ids, item.token_type_ids, strict=True)):
            input_ids[row, choice, :len(ids)] = torch.tensor(ids)
            token_type_ids[row, choice, :len(types)] = torch.tensor(types)
            attention_mask[row, choice, :len(ids)] = 1
    inputs = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
    return {name: tensor.squeeze(1) for name, tensor in inputs.items()} if choices == 1 else inputs


class TrainResult(NamedTuple):
    steps: int
    train_loss: float  # mean over the last epoch's examples
    seconds: float


def train(model, encoded: list[Encoded], labels: torch.Tensor, settings: JglueSettings, pad_id: int,
          device: torch.device, log: Callable[[str], None]) -> TrainResult:
    """AdamW (no decay on biases and LayerNorm), linear warmup then decay, seeded shuffling."""
    started, count, batch = time.perf_counter(), len(encoded), settings.per_device_train_batch_size
    total = math.ceil(count / batch) * settings.epochs
    decay = [p for name, p in model.named_parameters() if p.ndim > 1 and "LayerNorm" not in name]
    no_decay = [p for name, p in model.named_parameters() if not (p.ndim > 1 and "LayerNorm" not in name)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.learning_rate)
    from transformers import get_linear_schedule_with_warmup

    schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(total * settings.warmup_ratio), total)
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    step, log_every = 0, max(1, total // _LOG_TIMES)
    for _ in range(settings.epochs):
        order = torch.randperm(count, generator=generator)
        loss_sum = torch.zeros((), device=device)
        for start in range(0, count, batch):
            chosen = order[start:start + batch]
            inputs = collate([encoded[i] for i in chosen.tolist()], pad_id)
            loss = model(**{k: v.to(device) for k, v in inputs.items()}, labels=labels[chosen].to(device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach() * len(chosen)
            step += 1
            if step % log_every == 0 or step == total:
                log(f"step {step}/{total} loss {loss.item():.4f} lr {schedule.get_last_lr()[0]:.2e}")
    return TrainResult(steps=step, train_loss=loss_sum.item() / count, seconds=time.perf_counter() - started)


@torch.no_grad()
def predict(model, encoded: list[Encoded], batch_size: int, pad_id: int, device: torch.device) -> np.ndarray:
    """The head's outputs in example order: (N,) JSTS scores, or (N, 5) JCommonsenseQA logits."""
    model.eval()
    outputs = []
    for start in range(0, len(encoded), batch_size):
        inputs = collate(encoded[start:start + batch_size], pad_id)
        outputs.append(model(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu())
    logits = torch.cat(outputs).numpy()
    return logits[:, 0] if model.config.problem_type == "regression" else logits


def sample_train(examples: list[Example], settings: JglueSettings) -> list[Example]:
    """At most `max_train_examples`, drawn with the run's seed and kept in file order."""
    limit = settings.max_train_examples
    if limit is None or limit >= len(examples):
        return examples
    chosen = np.sort(np.random.default_rng(settings.seed).choice(len(examples), size=limit, replace=False))
    return [examples[i] for i in chosen]


def finetune(task: str, model_source: ModelSource, tokenizer_dir: Path, train_path: Path, dev_path: Path,
             out_dir: Path, settings: JglueSettings, log: Callable[[str], None] = logger.info) -> dict:
    """Fine-tune `model_source` on the train file, score the dev file, write predictions and metrics.

    Deterministic on a CPU for a given seed. Re-running overwrites out_dir's two files.
    """
    started = time.perf_counter()
    check_task(task)
    train_set = sample_train(read_examples(task, train_path), settings)
    dev_set = read_examples(task, dev_path)
    tokenizer = load_tokenizer(Path(tokenizer_dir))
    model = model_source.build(task, settings.seed)
    _check_fit(model, tokenizer, Path(tokenizer_dir), model_source, settings)
    device = pick_device()
    model.to(device)
    log(f"{task}: {model_source.kind} {model_source.path} on {device}, {len(train_set)} train / "
        f"{len(dev_set)} dev examples, {settings.epochs} epochs")
    label_type = torch.float32 if task == JSTS else torch.long
    labels = torch.tensor([example.label for example in train_set], dtype=label_type)
    pad_id = tokenizer.pad_token_id
    trained = train(model, encode(tokenizer, train_set, settings.max_seq_length), labels, settings, pad_id,
                    device, log)
    outputs = predict(model, encode(tokenizer, dev_set, settings.max_seq_length),
                      settings.per_device_eval_batch_size, pad_id, device)
    rows = prediction_rows(task, dev_set, outputs)
    metrics = {
        "task": task, **score_rows(task, rows), "train_examples": len(train_set), "steps": trained.steps,
        "train_loss": trained.train_loss, "train_seconds": trained.seconds,
        "seconds": time.perf_counter() - started, "device": str(device), "model_source": model_source.kind,
        "parameters": sum(p.numel() for p in model.parameters()), "settings": asdict(settings),
        # Published-comparable only on JGLUE's own files; a demo or edited set is marked as such.
        "train_is_jglue_v1_3": is_jglue_v13(task, "train", train_path),
        "dev_is_jglue_v1_3": is_jglue_v13(task, "dev", dev_path),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / PREDICTIONS_FILE, predictions_text(rows))
    atomic_write_json(out_dir / METRICS_FILE, metrics, indent=1)  # last: its presence marks a finished run
    scores = {k: metrics[k] for k in ("pearson", "spearman", "accuracy") if k in metrics}
    log(f"{task}: {model_source.kind} {scores} after {trained.steps} steps, {metrics['seconds']:.1f} s")
    return metrics
