"""Asset checks beside the assets: corpus counts, no split overlap, [UNK] rate, training losses.

Every check is blocking: a failed check fails its step and nothing downstream of its asset runs in
that run. Thresholds are run config of each check's op; the numbers come from `tinyplm_lib.quality`
and this module only turns them into check results (data loaded through the verifying IO manager).
"""

from collections.abc import Mapping
from pathlib import Path

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSpec,
    AssetIn,
    AssetKey,
    Config,
    MetadataValue,
    asset_check,
    multi_asset_check,
)
from pydantic import Field

from tinyplm_lib.layout import METRICS_FILE, SENTENCES_FILE
from tinyplm_lib.quality import (
    Verdict,
    cc100_validation_draw,
    check_split,
    jawiki_validation_draw,
    loss_gain,
    nonfinite_losses,
    read_sentences,
    read_stage_metrics,
    unknown_token_rate,
)


def reported_metadata(context: AssetCheckExecutionContext, key: AssetKey) -> dict:
    """Plain values of the metadata of `key`'s latest materialisation ({} if it has none)."""
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return {}
    return {name: value.value for name, value in event.asset_materialization.metadata.items()}


def _md_list(lines) -> MetadataValue:
    return MetadataValue.md("\n".join(f"- `{line}`" for line in lines) or "(none)")


# ---------------------------------------------------------------------------------------------
# Corpora: counts on disk equal the counts reported, split sizes as the settings promise, and
# no validation sentence that is also a training sentence.


class SplitCheckConfig(Config):
    max_overlap_fraction: float = Field(
        default=0.0, description="largest share of validation lines whose exact text may also be a train line")
    max_sigmas: float = Field(
        default=5.0, description="largest deviation, in binomial standard deviations, of the number of "
        "documents drawn for validation from documents × fraction")

    def overlap_limit(self, reported_validation: Mapping) -> float:
        """The largest overlap share allowed for the split whose validation reported these figures."""
        return self.max_overlap_fraction


class Cc100SplitCheckConfig(SplitCheckConfig):
    # Only for a corpus built with `dedup: false` (as the original's): short lines such as 「はい」
    # recur in different documents, so whole-document splits still share some lines. Measured
    # 3.2% of validation lines on 150k lines of real cc100-format prose (../shared/corpora).
    max_overlap_fraction: float = Field(
        default=0.05, description="largest share of validation lines whose exact text may also be a train line, "
        "when the corpus was built with dedup: false (with dedup, none may)")

    def overlap_limit(self, reported_validation: Mapping) -> float:
        # Deduplicated, each line is in one split only: any shared line is a bug, not a threshold.
        # A materialisation from before the setting existed reports no `dedup` and had none.
        return 0.0 if reported_validation.get("dedup", False) else self.max_overlap_fraction


def _result(key: AssetKey, name: str, verdict: Verdict, ok: str, **metadata) -> AssetCheckResult:
    return AssetCheckResult(asset_key=key, check_name=name, passed=verdict.passed,
                            metadata={**verdict.figures, **metadata},
                            description="; ".join(verdict.problems) if verdict.problems else ok)


def _split_checks(corpus: str, config_type: type, draw, overlap_rule: str):
    train_key, validation_key = AssetKey(f"{corpus}_train"), AssetKey(f"{corpus}_validation")

    @multi_asset_check(
        name=f"{corpus}_split_checks",
        description=f"Line counts of {corpus}_train/validation, the validation draw, and their overlap.",
        specs=[
            AssetCheckSpec("line_counts", asset=train_key, blocking=True,
                           description="Lines on disk equal the lines reported; none blank; not empty."),
            AssetCheckSpec("line_counts", asset=validation_key, blocking=True,
                           description="Lines on disk equal the lines reported; none blank; not empty; "
                           "within the line budget; documents drawn as the validation fraction predicts."),
            AssetCheckSpec("no_train_overlap", asset=validation_key, blocking=True,
                           description=f"Validation lines whose exact text is also a train line: {overlap_rule}."),
        ],
        ins={"train": AssetIn(train_key), "validation": AssetIn(validation_key)},
    )
    def _checks(context: AssetCheckExecutionContext, config: config_type, train: Path, validation: Path):
        reported_validation = reported_metadata(context, validation_key)
        checks = check_split(train / SENTENCES_FILE, validation / SENTENCES_FILE,
                             reported_metadata(context, train_key), reported_validation, draw,
                             max_overlap_fraction=config.overlap_limit(reported_validation),
                             max_sigmas=config.max_sigmas)
        scan = checks.scan
        yield _result(train_key, "line_counts", checks.train_lines, f"{scan.train.lines:,} lines, none blank")
        yield _result(validation_key, "line_counts", checks.validation_lines,
                      f"{scan.validation.lines:,} lines, none blank, draw as expected")
        yield _result(validation_key, "no_train_overlap", checks.overlap,
                      f"{scan.overlap_lines} of {scan.validation.lines:,} validation lines also in train",
                      examples=_md_list(scan.examples))

    return _checks


cc100_ja_split_checks = _split_checks(
    "cc100_ja", Cc100SplitCheckConfig, cc100_validation_draw,
    "none when the corpus was deduplicated (dedup, the default), else within max_overlap_fraction")
jawiki_split_checks = _split_checks("jawiki", SplitCheckConfig, jawiki_validation_draw,
                                    "within max_overlap_fraction (0: none; JaWiki is deduplicated)")


# ---------------------------------------------------------------------------------------------
# Tokenizer: the validation text it will encode must not turn into [UNK] much.


class UnknownTokenCheckConfig(Config):
    max_unk_rate: float = Field(default=0.02, description="largest share of [UNK] among the sample's tokens")
    sample_sentences: int = Field(default=10_000, description="first N jawiki_validation sentences encoded")


@asset_check(asset="wordpiece_tokenizer", name="unknown_token_rate", blocking=True,
             additional_ins={"jawiki_validation": AssetIn("jawiki_validation")})
def wordpiece_unknown_token_rate(config: UnknownTokenCheckConfig, wordpiece_tokenizer: Path,
                                 jawiki_validation: Path) -> AssetCheckResult:
    """[UNK] share on JaWiki validation sentences (text the tokenizer never saw) stays below
    max_unk_rate. Measured: 0.6% for a 4,096-token vocabulary learnt from 95k real JaWiki
    sentences; 4.0% for the demo's, learnt from 690 sentences (the demo profile allows 6%)."""
    sentences = read_sentences(jawiki_validation / SENTENCES_FILE, config.sample_sentences)
    rate = unknown_token_rate(wordpiece_tokenizer, sentences)
    passed = rate["unk_rate"] <= config.max_unk_rate
    culprits = "\n".join(f"- `{word}` × {count}" for word, count in rate["top_unknown_words"])
    return AssetCheckResult(
        passed=passed,
        description=(f"[UNK] rate {rate['unk_rate']:.2%} on {rate['sentences']:,} validation sentences "
                     f"({'within' if passed else 'above'} max_unk_rate {config.max_unk_rate:.2%})"),
        metadata={"unk_rate": rate["unk_rate"], "unk_tokens": rate["unk_tokens"], "tokens": rate["tokens"],
                  "sentences": rate["sentences"], "max_unk_rate": config.max_unk_rate,
                  "top_unknown_words": MetadataValue.md(culprits or "(none)")},
    )


# ---------------------------------------------------------------------------------------------
# Training stages: every loss finite, and the model better than an untrained one.


class StageCheckConfig(Config):
    min_improvement: float = Field(
        default=0.0, description="nats by which the validation loss must fall below the untrained model's")


def _stage_checks(stage: str):
    key = AssetKey(stage)

    @multi_asset_check(
        name=f"{stage}_loss_checks",
        description=f"Losses of {stage} (from its metrics.json) are finite and beat an untrained model.",
        specs=[
            AssetCheckSpec("losses_finite", asset=key, blocking=True,
                           description="No NaN or infinite loss, final or at any logged step."),
            AssetCheckSpec("beats_untrained_model", asset=key, blocking=True,
                           description="Validation loss below that of an untrained model of the same "
                           "shape, on the same sequences and masks, by at least min_improvement."),
        ],
        ins={"model": AssetIn(key)},
    )
    def _checks(config: StageCheckConfig, model: Path):
        metrics = read_stage_metrics(model)
        bad = nonfinite_losses(metrics)
        yield AssetCheckResult(
            asset_key=key, check_name="losses_finite", passed=not bad,
            description=f"{model / METRICS_FILE}: " + "; ".join(bad) if bad else "every loss is finite",
            metadata={"nonfinite_losses": len(bad), "logged_steps": len(metrics.get("history", []))})

        gain = loss_gain(metrics)
        yield AssetCheckResult(
            asset_key=key, check_name="beats_untrained_model", passed=gain.passes(config.min_improvement),
            description=(f"validation loss {gain.eval_loss:.4f} against {gain.untrained_eval_loss:.4f} for an "
                         f"untrained model: {gain.improvement:+.4f} nats "
                         f"(needs > 0 and >= {config.min_improvement:g})"),
            metadata={"eval_loss": gain.eval_loss, "untrained_eval_loss": gain.untrained_eval_loss,
                      "improvement_nats": gain.improvement, "min_improvement": config.min_improvement})

    return _checks


bert_stage1_cc100_loss_checks = _stage_checks("bert_stage1_cc100")
bert_stage2_jawiki_loss_checks = _stage_checks("bert_stage2_jawiki")
