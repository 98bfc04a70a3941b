"""A training stage's settings, and their checks before any model is built or data read.

`StageOptions` (what a stage learns from) and `RuntimeOptions` (speed only) are the one source of
defaults; `stage_arguments()` reads the HF `TrainingArguments` JSON (run_mlm style accepted) and
resolves `max_seq_length` and `mlm_probability`, for `train_stage` and the Dagster run preflight alike.
torch and transformers are imported by the functions that use them: the Dagster code location
imports this module for the run-config defaults, and must load without them.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tinyplm_lib.errors import ConfigError
from tinyplm_lib.layout import MODEL_CONFIG_FILE, VOCAB_FILE
from tinyplm_lib.tokens.folder import TokenizerFolder

if TYPE_CHECKING:
    import torch
    from transformers import TrainingArguments

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
DEFAULT_MAX_SEQ_LENGTH = 128  # when neither the stage option nor the JSON sets one
DEFAULT_MLM_PROBABILITY = 0.15
BERT_DEFAULT_MAX_POSITIONS = 512  # BertConfig's default max_position_embeddings
MIN_SEQ_LENGTH = 8  # packing.pack_sentences' minimum


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
    compile: bool = False  # torch.compile the encoder and loss (the first steps pay for compilation)
    dataloader_workers: int = 2  # processes building masked batches; 0 = in the training process
    max_wall_time_s: float | None = None
    # "auto": on a CPU "tinyplm_cpu" (training.cpu_kernels: eager attention and dropout rearranged; with
    # attention dropout on, SDPA runs an unfused fallback there), on a GPU "sdpa". "eager" and "sdpa"
    # are Hugging Face's own. The same function whichever is chosen.
    attention: str = "auto"

    def resolve_attention(self, device: torch.device) -> str:
        if self.attention not in ("auto", "eager", "sdpa", "tinyplm_cpu"):
            raise ConfigError("attention", f"{self.attention!r}: use auto, tinyplm_cpu, eager or sdpa")
        if self.attention != "auto":
            return self.attention
        return "tinyplm_cpu" if device.type == "cpu" else "sdpa"

    def resolve_precision(self, device: torch.device) -> str:
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError("precision", f"{self.precision!r}: use auto, bf16, fp16 or fp32")
        if self.precision != "auto":
            if self.precision == "fp16" and device.type != "cuda":
                raise ConfigError("precision", "fp16 needs a CUDA device")
            return self.precision
        import torch

        if device.type == "cpu" or torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"

    def autocast(self, device: torch.device):
        import torch

        precision = self.resolve_precision(device)
        if precision == "fp32":
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@dataclass(frozen=True)
class StageArguments:
    """A stage's TrainingArguments and the run_mlm data arguments it honours, resolved once."""

    args: TrainingArguments
    max_seq_length: int
    extras: dict  # the run_mlm keys of `_RUN_MLM_HONOURED` the JSON set

    @property
    def mlm_probability(self) -> float:
        return float(self.extras.get("mlm_probability", DEFAULT_MLM_PROBABILITY))


def stage_arguments(options: StageOptions, output_dir: Path) -> StageArguments:
    """The stage's TrainingArguments (with the run config's overrides) and its `max_seq_length`:
    the stage option, else the JSON's run_mlm `max_seq_length`, else 128. The one place this rule lives."""
    args, extras = load_training_arguments(options.training_args, output_dir, options.overrides)
    max_seq_length = options.max_seq_length or int(extras.get("max_seq_length", DEFAULT_MAX_SEQ_LENGTH))
    return StageArguments(args=args, max_seq_length=max_seq_length, extras=extras)


def plain_value(value):
    """A TrainingArguments field as JSON has it: an enum (IntervalStrategy, …) becomes its value."""
    return value.value if isinstance(value, enum.Enum) else value


def load_training_arguments(path: Path, output_dir: Path, overrides: dict | None = None):
    """Read a TrainingArguments JSON (run_mlm style accepted); return (args, run_mlm extras).

    Unknown keys and out-of-range values are ConfigErrors naming the file and the setting.
    """
    from transformers import TrainingArguments

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
    except (TypeError, ValueError) as exc:
        raise ConfigError("training_args", f"{path}: {exc}") from exc
    for name in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) <= 0:
            raise ConfigError(name, f"{path}: must be positive, got {getattr(args, name)}")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise ConfigError("max_steps", f"{path}: set max_steps or num_train_epochs above zero")
    return args, extras


# --- Checks that read only small files (the model config JSON, the tokenizer's vocab.txt and
# settings, a stage-1 folder's config.json), so a setting that cannot work fails in milliseconds.
# `train_stage` runs `check_stage_inputs` first; the Dagster run preflight runs
# `check_stage_settings` and `check_vocab_setting` when a run starts, before the tokenizer exists.
#
# The vocabulary rule: a model config without `vocab_size` follows the tokenizer. One that sets it
# must equal the tokenizer's `vocab_size` setting, and the tokenizer must hold no more tokens than
# that (a tokenizer trained on a small corpus holds fewer: the embedding then follows the
# tokenizer, so no row is dead weight). Two vocab_size settings that differ are an error, not a
# silent resize.


def read_json_object(path: Path, setting: str) -> dict:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(setting, f"{path}: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(setting, f"{path}: expected a JSON object")
    return value


def check_stage_settings(options: StageOptions, arguments: StageArguments, *,
                         positions_from: Path | None = None) -> None:
    """Sizes that need no data: `max_seq_length` within the model's position table (read from
    `positions_from`, a stage-1 folder's config.json, when given), evaluation sizes >= 1."""
    if options.max_eval_sequences < 1:
        raise ConfigError("max_eval_sequences", f"must be >= 1, got {options.max_eval_sequences}")
    eval_batch_size = arguments.args.per_device_eval_batch_size
    if eval_batch_size < 1:
        raise ConfigError("per_device_eval_batch_size", f"must be >= 1, got {eval_batch_size}")
    source = Path(positions_from) if positions_from is not None else Path(options.model_config)
    config = read_json_object(source, "init_from" if positions_from is not None else "model_config")
    positions = config.get("max_position_embeddings", BERT_DEFAULT_MAX_POSITIONS)
    max_seq_length = arguments.max_seq_length
    if not MIN_SEQ_LENGTH <= max_seq_length <= positions:
        raise ConfigError("max_seq_length", f"{max_seq_length} must lie in [{MIN_SEQ_LENGTH}, {positions}] "
                          f"(max_position_embeddings of {source})")


def check_vocab_setting(model_config: Path, tokenizer_vocab_size: int) -> None:
    """The model config's vocab_size, if set, equals the tokenizer's vocab_size setting."""
    model_vocab = read_json_object(model_config, "model_config").get("vocab_size")
    if model_vocab is not None and model_vocab != tokenizer_vocab_size:
        raise ConfigError("vocab_size", f"{model_config} sets vocab_size {model_vocab} but the tokenizer is "
                          f"trained with vocab_size {tokenizer_vocab_size}: make the two equal, or leave "
                          "vocab_size out of the model config to follow the tokenizer")


def check_model_vocab(model_config: Path, tokenizer: TokenizerFolder) -> int:
    """Apply the vocabulary rule (above) to a trained tokenizer; return the model's size."""
    size, requested = tokenizer.vocab_size, tokenizer.requested_vocab_size
    model_vocab = read_json_object(model_config, "model_config").get("vocab_size")
    if model_vocab is None:
        return size
    if requested is None:  # not made by train_tokenizer: only its real size is known
        requested = size
    check_vocab_setting(model_config, requested)
    if size > model_vocab:
        # The trainer keeps every alphabet character and its ## form whatever vocab_size says.
        raise ConfigError("vocab_size", f"the tokenizer {tokenizer.path} holds {size} tokens, more than its "
                          f"vocab_size {requested} (its alphabet and ## forms did not fit): token ids would "
                          "not fit the model; raise vocab_size in both configs or lower limit_alphabet")
    return size


def check_stage_inputs(options: StageOptions, arguments: StageArguments, tokenizer: TokenizerFolder) -> int:
    """Every check of a stage that needs no data and no model; returns the model's vocab size."""
    init_from = Path(options.init_from) if options.init_from is not None else None
    positions_from = init_from / MODEL_CONFIG_FILE if init_from is not None else None
    check_stage_settings(options, arguments, positions_from=positions_from)
    vocab_size = check_model_vocab(options.model_config, tokenizer)
    if positions_from is not None:
        start_vocab = read_json_object(positions_from, "init_from").get("vocab_size")
        if start_vocab != vocab_size:
            raise ConfigError("init_from", f"{positions_from} has vocab_size {start_vocab} but the tokenizer "
                              f"{tokenizer.path} holds {vocab_size} tokens")
        if not tokenizer.same_vocab(init_from):
            raise ConfigError("init_from", f"{options.init_from}/{VOCAB_FILE} differs from {tokenizer.vocab_path}: "
                              "stage 2 must use the tokenizer stage 1 was trained with")
    return vocab_size
