"""Cleaned sentence corpora with deterministic train/validation splits (`sentences.txt` folders).

`cc100_ja_corpus` and `jawiki_corpus` read their download once and write `*_train` and
`*_validation`; splits are whole documents chosen by a seeded hash (re-runs are byte-identical).
Both drop exact repeats of a line (cc100 unless `dedup: false`) and report how many.
Bad lines are skipped up to `max_bad_records` and reported as `skipped_*`; one more fails the step.
"""


from pathlib import Path

from dagster import AssetExecutionContext, AssetOut, MetadataValue, Output, multi_asset

from tinyplm_assets.config import Cc100CorpusConfig, JawikiCorpusConfig, worker_count
from tinyplm_assets.metadata import flat_counts, skipped_records, text_sample
from tinyplm_assets.preflight import check_run
from tinyplm_assets.resources import ArtifactStorage
from tinyplm_lib.corpora.cc100 import build_cc100_corpus
from tinyplm_lib.corpora.jawiki import build_jawiki_corpus
from tinyplm_lib.layout import SENTENCES_FILE


def single_file(directory: Path) -> Path:
    """The one data file of a raw download artifact."""
    files = [p for p in directory.iterdir() if p.is_file() and not p.name.startswith("_")]
    if len(files) != 1:
        raise ValueError(f"{directory}: expected exactly one downloaded file, found {len(files)}")
    return files[0]


def _outputs(prefix: str, staged: dict[str, Path], stats: dict, extra: dict | None = None):
    for split, directory in staged.items():
        yield Output(
            directory,
            output_name=f"{prefix}_{split}",
            metadata={**flat_counts(stats), **skipped_records(stats), **(extra or {}),
                      "sample": text_sample(directory / SENTENCES_FILE)},
        )


def _dedup_metadata(details: dict) -> dict:
    """Whether cc100 was deduplicated (its no_train_overlap check reads this) and the lines it
    found repeated most, with their counts; present either way, so runs compare entry by entry."""
    return {"dedup": MetadataValue.bool(details["dedup"]),
            "duplicate_examples": MetadataValue.json(details.get("duplicate_examples", []))}


@multi_asset(
    name="cc100_ja_corpus",
    group_name="corpora",
    outs={
        "cc100_ja_train": AssetOut(description="cc100-ja training lines (NFKC, whole documents)."),
        "cc100_ja_validation": AssetOut(description="cc100-ja validation lines: whole documents, "
                                        "seeded, no overlap with train."),
    },
)
def cc100_ja_corpus(context: AssetExecutionContext, config: Cc100CorpusConfig,
                    storage: ArtifactStorage, cc100_ja_raw: Path):
    """First `max_lines` non-empty NFKC lines of cc100-ja, each line kept once (unless `dedup: false`),
    split by document. Safe to re-run."""
    check_run(context)
    staged = {split: storage.staging_dir(f"cc100_ja_{split}") for split in ("train", "validation")}
    stats = build_cc100_corpus(single_file(cc100_ja_raw), staged["train"] / SENTENCES_FILE,
                               staged["validation"] / SENTENCES_FILE, config.to_settings(),
                               workers=worker_count(config.workers)).to_dict()
    context.log.info(f"cc100-ja corpus: {stats}")
    yield from _outputs("cc100_ja", staged, stats, _dedup_metadata(stats["details"]))


@multi_asset(
    name="jawiki_corpus",
    group_name="corpora",
    outs={
        "jawiki_train": AssetOut(description="JaWiki training sentences (cleaned, split, deduplicated)."),
        "jawiki_validation": AssetOut(description="JaWiki validation sentences: whole articles, "
                                      "seeded, no overlap with train."),
    },
)
def jawiki_corpus(context: AssetExecutionContext, config: JawikiCorpusConfig,
                  storage: ArtifactStorage, jawiki_raw: Path):
    """Namespace-0 articles cleaned by the original's rules, sentence-split, deduplicated."""
    check_run(context)
    staged = {split: storage.staging_dir(f"jawiki_{split}") for split in ("train", "validation")}
    stats = build_jawiki_corpus(single_file(jawiki_raw), staged["train"] / SENTENCES_FILE,
                                staged["validation"] / SENTENCES_FILE, config.to_settings(),
                                workers=worker_count(config.workers)).to_dict()
    context.log.info(f"JaWiki corpus: {stats}")
    yield from _outputs("jawiki", staged, stats)
