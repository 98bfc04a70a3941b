"""Whole-run config checks, called explicitly: every asset's first line is `check_run(context)`.

Dagster rejects unknown keys and wrong types; `check_run_config` rejects values out of range and
assets that disagree (tokenizer vs model vocab_size), once per run and process, reading small files
only: the run's first step fails in milliseconds with a ConfigError naming the run-config path.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dagster import AssetExecutionContext

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
from tinyplm_assets.resources import hold_asset_locks
from tinyplm_lib.errors import ConfigError
from tinyplm_lib.tokens.tokenizer import TokenizerSettings
from tinyplm_lib.training.arguments import check_stage_settings, check_vocab_setting, stage_arguments

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
    arguments = stage_arguments(options, Path(tempfile.gettempdir()) / "tinyplm-preflight")
    check_stage_settings(options, arguments)
    if config.runtime.precision not in _PRECISIONS:
        raise ConfigError("runtime.precision", f"{config.runtime.precision!r}: use {', '.join(_PRECISIONS)}")
    if config.runtime.dataloader_workers < 0:
        raise ConfigError("runtime.dataloader_workers", f"must be >= 0, got {config.runtime.dataloader_workers}")
    config.distributed.check()


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
        raise ConfigError(f"ops.{op}.config.{exc.setting}", exc.reason) from exc


def assets_in_run(context: AssetExecutionContext) -> set[str]:
    """Names of the assets the run of a step context materialises (its selection, or the whole job)."""
    # The step's job is the run's job, subset to the run's asset selection: no need to import
    # the definitions (which import every asset, and so this module).
    return {key.to_user_string() for key in context.job_def.asset_layer.selected_asset_keys}


_checked_runs: set[str] = set()


def check_run(context: AssetExecutionContext) -> None:
    """`check_run_config` for the run of an asset's step context, once per run id in this process.

    Called explicitly as the first line of every asset (tests/test_definitions.py asserts it)
    rather than from a resource's setup, so a reader of an asset sees it. The step's inputs are
    loaded before its body runs: the run's first steps (downloads) have none, and a run started
    further down fails after loading its inputs, still before any work.
    Then, every step, it takes the locks of the assets the step writes (`hold_asset_locks`).
    """
    if context.run_id not in _checked_runs:
        check_run_config(context.run_config, assets_in_run(context))
        _checked_runs.add(context.run_id)
    hold_asset_locks(context)
