"""Checks of a training stage's settings, made before any model is built or data read.

They read only small files (the model config JSON, the tokenizer's vocab.txt and settings, a
stage-1 folder's config.json), so a setting that cannot work fails in milliseconds. Every error
is a ConfigError naming the setting to change. `train_stage` runs `check_stage_inputs` first;
the Dagster run preflight (`tinyplm_assets/preflight.py`) runs `check_stage_settings` and
`check_vocab_setting` when a run starts, before the tokenizer even exists.

The vocabulary rule: a model config without `vocab_size` follows the tokenizer. One that sets it
must equal the tokenizer's `vocab_size` setting, and the tokenizer must hold no more tokens than
that (a tokenizer trained on a small corpus holds fewer: the embedding then follows the tokenizer,
so no row is dead weight). Two vocab_size settings that differ are an error, not a silent resize.
"""

from __future__ import annotations

import json
from pathlib import Path

from tinyplm_lib.errors import ConfigError

TOKENIZER_INFO_FILE = "tinyplm_tokenizer.json"  # written by tokenizer.train_tokenizer
BERT_DEFAULT_MAX_POSITIONS = 512  # BertConfig's default max_position_embeddings
MIN_SEQ_LENGTH = 8  # packing.pack_sentences' minimum


def read_json_object(path: Path, setting: str) -> dict:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(setting, f"{path}: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(setting, f"{path}: expected a JSON object")
    return value


def check_stage_settings(*, model_config: Path, max_seq_length: int, max_eval_sequences: int,
                         eval_batch_size: int, positions_from: Path | None = None) -> None:
    """Sizes that need no data: `max_seq_length` within the model's position table (read from
    `positions_from`, a stage-1 folder's config.json, when given), evaluation sizes >= 1."""
    if max_eval_sequences < 1:
        raise ConfigError("max_eval_sequences", f"must be >= 1, got {max_eval_sequences}")
    if eval_batch_size < 1:
        raise ConfigError("per_device_eval_batch_size", f"must be >= 1, got {eval_batch_size}")
    source = Path(positions_from) if positions_from is not None else Path(model_config)
    config = read_json_object(source, "init_from" if positions_from is not None else "model_config")
    positions = config.get("max_position_embeddings", BERT_DEFAULT_MAX_POSITIONS)
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


def tokenizer_vocab(tokenizer_dir: Path) -> tuple[int, int | None]:
    """(tokens in vocab.txt, the vocab_size the tokenizer was trained with, None if unknown)."""
    path = Path(tokenizer_dir) / "vocab.txt"
    try:
        size = len(path.read_text(encoding="utf-8").splitlines())
    except OSError as exc:
        raise ConfigError("tokenizer", f"{path}: {exc}") from exc
    info_path = Path(tokenizer_dir) / TOKENIZER_INFO_FILE
    info = read_json_object(info_path, "tokenizer") if info_path.is_file() else {}
    requested = info.get("requested_vocab_size")
    return size, requested if isinstance(requested, int) else None


def check_model_vocab(model_config: Path, tokenizer_dir: Path) -> int:
    """Apply the vocabulary rule (module docstring) to a trained tokenizer; return the model's size."""
    size, requested = tokenizer_vocab(tokenizer_dir)
    model_vocab = read_json_object(model_config, "model_config").get("vocab_size")
    if model_vocab is None:
        return size
    if requested is None:  # not made by train_tokenizer: only its real size is known
        requested = size
    check_vocab_setting(model_config, requested)
    if size > model_vocab:
        # The trainer keeps every alphabet character and its ## form whatever vocab_size says.
        raise ConfigError("vocab_size", f"the tokenizer {tokenizer_dir} holds {size} tokens, more than its "
                          f"vocab_size {requested} (its alphabet and ## forms did not fit): token ids would "
                          "not fit the model; raise vocab_size in both configs or lower limit_alphabet")
    return size


def check_stage_inputs(*, model_config: Path, tokenizer_dir: Path, init_from: Path | None,
                       max_seq_length: int, max_eval_sequences: int, eval_batch_size: int) -> int:
    """Every check of a stage that needs no data and no model; returns the model's vocab size."""
    positions_from = Path(init_from) / "config.json" if init_from is not None else None
    check_stage_settings(model_config=model_config, max_seq_length=max_seq_length,
                         max_eval_sequences=max_eval_sequences, eval_batch_size=eval_batch_size,
                         positions_from=positions_from)
    vocab_size = check_model_vocab(model_config, tokenizer_dir)
    if positions_from is not None:
        start_vocab = read_json_object(positions_from, "init_from").get("vocab_size")
        if start_vocab != vocab_size:
            raise ConfigError("init_from", f"{positions_from} has vocab_size {start_vocab} but the tokenizer "
                              f"{tokenizer_dir} holds {vocab_size} tokens")
    return vocab_size
