"""Reading HF `TrainingArguments` JSON files, including the original pipeline's run_mlm ones.

`load_training_arguments()` returns the parsed arguments plus the run_mlm data arguments we honour
(`max_seq_length`, `mlm_probability`); unknown keys and out-of-range values are ConfigErrors that
name the file and the setting, raised before any data is read.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainingArguments

from tinyplm_lib.errors import ConfigError

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
