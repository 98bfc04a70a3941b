"""Asset checks beside the assets: corpus counts, no split overlap, [UNK] rate, training losses.

Every check here is blocking: when it fails, its step fails and the assets downstream of the
checked asset are not materialised in that run, so a bad split never reaches the token shards, a
tokenizer that cannot spell the validation text never reaches encoding, and a stage-1 model
with a NaN loss never becomes stage 2's starting point. Thresholds are run config of each
check's op (`ops: {<op name>: {config: {...}}}`; the launchpad lists them). Checks use the
figures an asset already reported in its materialisation metadata, and read data (loaded
through the IO manager, so verified against the manifest) only for what the metadata lacks.
"""

import json
import math
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

from tinyplm_lib.errors import InputError
from tinyplm_lib.quality import binomial_sigmas, nonfinite_losses, read_sentences, scan_split, unknown_token_rate

SENTENCES = "sentences.txt"  # as written by tinyplm_assets.assets.corpora


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


class Cc100SplitCheckConfig(SplitCheckConfig):
    # cc100 is not deduplicated (nor was it in the original pipeline): short lines such as 「はい」
    # recur in different documents, so whole-document splits still share some lines. Measured
    # 3.2% of validation lines on 150k lines of real cc100-format prose (../shared/corpora).
    max_overlap_fraction: float = Field(
        default=0.05, description="largest share of validation lines whose exact text may also be a train line")


def _validation_draw(corpus: str, reported: dict) -> tuple[int, int, float]:
    """(documents drawn for validation, documents that could be drawn, probability of a draw)."""
    if corpus == "cc100_ja":
        # A drawn document that no longer fit the line budget went to train, counted apart.
        return (reported["documents_validation"] + reported["details.documents_over_validation_budget"],
                reported["documents_read"], reported["details.validation_doc_fraction"])
    # JaWiki counts only articles with a sentence in the length range; others drop out before.
    return (reported["documents_validation"], reported["documents_train"] + reported["documents_validation"],
            reported["details.validation_fraction"])


def _line_problems(split: str, counts, reported: dict) -> list[str]:
    problems = []
    expected = reported.get(f"lines_{split}")
    if expected is None:
        problems.append(f"the materialisation metadata has no lines_{split} to compare with")
    elif counts.lines != expected:
        problems.append(f"{counts.lines} lines on disk but {expected} reported when it was built")
    if counts.lines == 0:
        problems.append("the split is empty")
    if counts.blank_lines:
        problems.append(f"{counts.blank_lines} blank lines, the first at line {counts.first_blank_line}")
    return problems


def _result(key: AssetKey, name: str, problems: list[str], metadata: dict, ok: str) -> AssetCheckResult:
    return AssetCheckResult(asset_key=key, check_name=name, passed=not problems, metadata=metadata,
                            description="; ".join(problems) if problems else ok)


def _split_checks(corpus: str, config_type: type):
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
                           description="Validation lines whose exact text is also a train line stay "
                           "within max_overlap_fraction."),
        ],
        ins={"train": AssetIn(train_key), "validation": AssetIn(validation_key)},
    )
    def _checks(context: AssetCheckExecutionContext, config: config_type, train: Path, validation: Path):
        scan = scan_split(train / SENTENCES, validation / SENTENCES)

        reported = reported_metadata(context, train_key)
        yield _result(train_key, "line_counts", _line_problems("train", scan.train, reported),
                      {"lines": scan.train.lines, "reported_lines": reported.get("lines_train", -1),
                       "blank_lines": scan.train.blank_lines}, f"{scan.train.lines:,} lines, none blank")

        reported = reported_metadata(context, validation_key)
        problems = _line_problems("validation", scan.validation, reported)
        metadata: dict = {"lines": scan.validation.lines, "reported_lines": reported.get("lines_validation", -1),
                          "blank_lines": scan.validation.blank_lines}
        budget = reported.get("details.max_validation_lines")
        if budget is not None:
            metadata["line_budget"] = budget
            if scan.validation.lines > budget:
                problems.append(f"{scan.validation.lines} lines exceed the budget of {budget}")
        try:
            drawn, documents, fraction = _validation_draw(corpus, reported)
        except KeyError as missing:
            problems.append(f"the materialisation metadata has no {missing} to check the draw with")
        else:
            sigmas = binomial_sigmas(drawn, documents, fraction)
            metadata.update({"documents_drawn": drawn, "documents_expected": round(documents * fraction, 1),
                             "draw_sigmas": round(sigmas, 2)})
            if abs(sigmas) > config.max_sigmas:
                problems.append(f"{drawn} of {documents} documents drawn for validation, "
                                f"{documents * fraction:.1f} expected at fraction {fraction:g} "
                                f"({sigmas:+.1f} sigmas, more than {config.max_sigmas:g})")
        yield _result(validation_key, "line_counts", problems, metadata,
                      f"{scan.validation.lines:,} lines, none blank, draw as expected")

        too_many = scan.overlap_fraction > config.max_overlap_fraction
        yield _result(
            validation_key, "no_train_overlap",
            [f"{scan.overlap_lines} validation lines ({scan.overlap_fraction:.2%}) also occur in train, "
             f"more than max_overlap_fraction {config.max_overlap_fraction:.2%}"] if too_many else [],
            {"overlap_lines": scan.overlap_lines, "overlap_distinct": scan.overlap_distinct,
             "overlap_fraction": scan.overlap_fraction, "max_overlap_fraction": config.max_overlap_fraction,
             "examples": _md_list(scan.examples)},
            f"{scan.overlap_lines} of {scan.validation.lines:,} validation lines also in train")

    return _checks


cc100_ja_split_checks = _split_checks("cc100_ja", Cc100SplitCheckConfig)
jawiki_split_checks = _split_checks("jawiki", SplitCheckConfig)


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
    sentences = read_sentences(jawiki_validation / SENTENCES, config.sample_sentences)
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


def _as_float(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


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
        metrics_path = model / "metrics.json"
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(metrics_path, f"cannot read the stage's metrics ({exc})") from exc
        bad = nonfinite_losses(metrics)
        yield AssetCheckResult(
            asset_key=key, check_name="losses_finite", passed=not bad,
            description=f"{metrics_path}: " + "; ".join(bad) if bad else "every loss is finite",
            metadata={"nonfinite_losses": len(bad), "logged_steps": len(metrics.get("history", []))})

        loss, untrained = _as_float(metrics.get("eval_loss")), _as_float(metrics.get("untrained_eval_loss"))
        improvement = untrained - loss  # NaN when either is missing or NaN: never passes
        passed = improvement > 0 and improvement >= config.min_improvement
        yield AssetCheckResult(
            asset_key=key, check_name="beats_untrained_model", passed=passed,
            description=(f"validation loss {loss:.4f} against {untrained:.4f} for an untrained model: "
                         f"{improvement:+.4f} nats (needs > 0 and >= {config.min_improvement:g})"),
            metadata={"eval_loss": loss, "untrained_eval_loss": untrained, "improvement_nats": improvement,
                      "min_improvement": config.min_improvement})

    return _checks


bert_stage1_cc100_loss_checks = _stage_checks("bert_stage1_cc100")
bert_stage2_jawiki_loss_checks = _stage_checks("bert_stage2_jawiki")
