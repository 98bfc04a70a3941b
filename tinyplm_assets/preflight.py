"""Whole-run config checks, made as a run's steps start and before any of them does work.

Dagster rejects unknown keys and wrong types before a run starts, but not a value out of range nor
two assets' settings that disagree (the tokenizer's vocab_size and a model JSON's): those failed
only when the step reading them ran, for the training steps after hours of preprocessing.
`check_run_config` builds the Config of every asset in the run (from the run config, defaults
for the rest), runs the library's validation and the cross-asset checks, reading only small
files. `ArtifactStorage.setup_for_execution` runs it once per run and process, so the run's first
step fails in milliseconds; errors name the run-config path of the setting.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tinyplm_assets.config import (
    Cc100CorpusConfig,
    JawikiCorpusConfig,
    Stage1Config,
    Stage2Config,
    TokenizerConfig,
    TokenizerSampleConfig,
    TokenShardsConfig,
    TrainingStageConfig,
)
from tinyplm_lib.errors import ConfigError
from tinyplm_lib.tokens.tokenizer import TokenizerSettings
from tinyplm_lib.training.arguments import load_training_arguments
from tinyplm_lib.training.stage_checks import check_stage_settings, check_vocab_setting

# The op that computes each asset: the corpus multi-assets write two assets from one op.
OP_OF_ASSET = {"cc100_ja_train": "cc100_ja_corpus", "cc100_ja_validation": "cc100_ja_corpus",
               "jawiki_train": "jawiki_corpus", "jawiki_validation": "jawiki_corpus"}
_PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def _workers(config) -> None:
    if config.workers < 0:
        raise ConfigError("workers", f"must be >= 0 (0: every core), got {config.workers}")


def _corpus(config) -> None:
    config.to_settings()
    _workers(config)


def _tokenizer_sample(config: TokenizerSampleConfig) -> None:
    TokenizerSettings(sample_size=config.sample_size, seed=config.seed).validate()


def _tokenizer(config: TokenizerConfig) -> None:
    config.to_settings()
    _workers(config)


def _token_shards(config: TokenShardsConfig) -> None:
    if config.shard_lines < 1:
        raise ConfigError("shard_lines", f"must be >= 1, got {config.shard_lines}")
    _workers(config)


def _training_stage(config: TrainingStageConfig) -> None:
    options = config.to_options()  # resolves both JSON paths: a missing file is a ConfigError
    # TrainingArguments only checks its values here; nothing is written to output_dir.
    args, extras = load_training_arguments(options.training_args,
                                           Path(tempfile.gettempdir()) / "tinyplm-preflight",
                                           options.overrides)
    max_seq_length = options.max_seq_length or int(extras.get("max_seq_length", 128))
    check_stage_settings(model_config=options.model_config, max_seq_length=max_seq_length,
                         max_eval_sequences=options.max_eval_sequences,
                         eval_batch_size=args.per_device_eval_batch_size)
    if config.runtime.precision not in _PRECISIONS:
        raise ConfigError("runtime.precision", f"{config.runtime.precision!r}: use {', '.join(_PRECISIONS)}")
    if config.runtime.dataloader_workers < 0:
        raise ConfigError("runtime.dataloader_workers", f"must be >= 0, got {config.runtime.dataloader_workers}")
    if config.distributed.processes < 0:
        raise ConfigError("distributed.processes", f"must be >= 0, got {config.distributed.processes}")


CHECKS: dict[str, tuple[type, Callable]] = {
    "cc100_ja_corpus": (Cc100CorpusConfig, _corpus),
    "jawiki_corpus": (JawikiCorpusConfig, _corpus),
    "tokenizer_sample": (TokenizerSampleConfig, _tokenizer_sample),
    "wordpiece_tokenizer": (TokenizerConfig, _tokenizer),
    "cc100_ja_tokens": (TokenShardsConfig, _token_shards),
    "jawiki_tokens": (TokenShardsConfig, _token_shards),
    "bert_stage1_cc100": (Stage1Config, _training_stage),
    "bert_stage2_jawiki": (Stage2Config, _training_stage),
}
_STAGES = ("bert_stage1_cc100", "bert_stage2_jawiki")


def check_run_config(run_config: dict, assets: set[str]) -> None:
    """Validate the config of every op that computes one of `assets` (asset names).

    An error is a ConfigError whose setting is its run-config path, e.g.
    `ops.wordpiece_tokenizer.config.vocab_size`. Assets without settings (downloads) are skipped.
    """
    op_configs = {op: (section or {}).get("config") or {}
                  for op, section in (run_config.get("ops") or {}).items()}
    ops = {OP_OF_ASSET.get(asset, asset) for asset in assets}
    built = {}
    for op in sorted(ops & CHECKS.keys()):
        config_class, check = CHECKS[op]
        with _named(op):
            built[op] = config_class(**op_configs.get(op, {}))
            check(built[op])
    # Across assets: the model JSONs against the tokenizer this run trains. (A run that trains
    # no tokenizer uses a stored one: train_stage checks against that one when it starts.)
    if "wordpiece_tokenizer" in built:
        vocab_size = built["wordpiece_tokenizer"].vocab_size
        for op in sorted(ops & set(_STAGES)):
            check_vocab_setting(built[op].to_options().model_config, vocab_size)


@contextmanager
def _named(op: str) -> Iterator[None]:
    """Re-raise a ConfigError from `op`'s checks with the setting's full run-config path."""
    try:
        yield
    except ConfigError as exc:
        if exc.setting.startswith("ops."):
            raise
        raise ConfigError(f"ops.{op}.config.{exc.setting}", exc._message) from exc


def assets_in_run(dagster_run) -> set[str] | None:
    """Names of the assets a run materialises; None when unknown (a job not in the definitions)."""
    if dagster_run.asset_selection:
        return {key.to_user_string() for key in dagster_run.asset_selection}
    from tinyplm_assets.definitions import defs  # imported late: definitions imports resources

    jobs = {job.name: job for job in defs.resolve_all_job_defs()}
    job = jobs.get(dagster_run.job_name)
    if job is None:
        return None
    return {key.to_user_string() for key in job.asset_layer.selected_asset_keys}


_checked_runs: set[str] = set()


def check_run(dagster_run) -> None:
    """`check_run_config` for a run, once per run id in this process."""
    if dagster_run.run_id in _checked_runs:
        return
    assets = assets_in_run(dagster_run)
    if assets is None:  # e.g. an ephemeral test job: check the ops its config names
        assets = set((dagster_run.run_config.get("ops") or {}).keys())
    check_run_config(dagster_run.run_config, assets)
    _checked_runs.add(dagster_run.run_id)
