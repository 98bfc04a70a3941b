"""The release folder: both checkpoints with a model card each, the evaluation plots and a summary.

`write_release` copies each stage's Hugging Face folder, states in its README.md (card.py) what the
run measured: corpora, stages, the fixed-set MLM scores and the JGLUE dev scores beside the other
stage's and the random-init control's, and draws the loss curves and the score bars (plots.py).
Nothing is filled in: a number the run did not record is an error naming what is missing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tinyplm_lib.errors import StorageError
from tinyplm_lib.evaluation.card import (
    JGLUE_METRICS,
    REFERENCE_NAME,
    REFERENCE_SCORES,
    CardInfo,
    CorpusInfo,
    MlmResult,
    StageInfo,
    jglue_scores,
    write_model_card,
)
from tinyplm_lib.evaluation.jglue_data import JCOMMONSENSEQA, JSTS
from tinyplm_lib.evaluation.plots import jglue_scores_png, stage_curves_png
from tinyplm_lib.files import atomic_write_bytes, atomic_write_json
from tinyplm_lib.layout import METRICS_FILE, MODEL_CONFIG_FILE, TOKENIZER_INFO_FILE

EVALUATION_FILE = "evaluation.json"  # an evaluation folder's summary: {"model_source", "mlm", "jglue"}
RELEASE_FILE = "release.json"
JGLUE_TASKS = (JSTS, JCOMMONSENSEQA)
# Release folder name and model-index name of each stage, and the corpus it trained on.
MODEL_NAMES = {"stage1": "tinyplm-bert-stage1-cc100", "stage2": "tinyplm-bert-stage2-jawiki"}
STAGE_CORPUS = {"stage1": "cc100", "stage2": "jawiki"}
PLOTS = {"loss_curves": "loss_curves.png", "jglue_scores": "jglue_scores.png"}


def jglue_file(raw_dir: Path, split: str) -> Path:
    """`train.json` / `dev.json` (or `.json.gz`) of a JGLUE download artifact."""
    for name in (f"{split}.json", f"{split}.json.gz"):
        if (Path(raw_dir) / name).is_file():
            return Path(raw_dir) / name
    raise StorageError(f"{raw_dir}: no {split}.json or {split}.json.gz; re-materialise the JGLUE download")


@dataclass(frozen=True)
class ReleaseInputs:
    """Where everything comes from: model folders and evaluation folders by stage name ("stage1",
    "stage2"; evaluations also "control"), and the recorded metadata of the upstream assets
    (`cc100_ja_tokens`, `jawiki_tokens`: "train.num_sentences", "train.num_tokens"; the raw
    downloads: "url", "file", "dump_date")."""

    models: dict[str, Path]
    evaluations: dict[str, Path]
    upstream: dict[str, dict]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StorageError(f"{path}: missing; re-materialise the asset that writes it") from None


def _recorded(upstream: dict[str, dict], asset: str, key: str):
    value = upstream.get(asset, {}).get(key)
    if value is None:
        raise StorageError(f"no recorded {key!r} for {asset}: materialise {asset} in this Dagster instance "
                           "(the release reads its counts from the materialisation metadata)")
    return value


def _corpora(upstream: dict[str, dict]) -> dict[str, CorpusInfo]:
    wiki_raw = upstream.get("jawiki_raw", {})
    wiki_dump = f"jawiki-{wiki_raw['dump_date']}" if wiki_raw.get("dump_date") else wiki_raw.get("file", "unrecorded")
    cc100_dump = upstream.get("cc100_ja_raw", {}).get("file", "unrecorded")
    return {
        "cc100": CorpusInfo("cc100", "cc100", "CC-100 (ja)", cc100_dump,
                            int(_recorded(upstream, "cc100_ja_tokens", "train.num_sentences")),
                            int(_recorded(upstream, "cc100_ja_tokens", "train.num_tokens"))),
        "jawiki": CorpusInfo("jawiki", "wikipedia", "Japanese Wikipedia (CirrusSearch dump)", wiki_dump,
                             int(_recorded(upstream, "jawiki_tokens", "train.num_sentences")),
                             int(_recorded(upstream, "jawiki_tokens", "train.num_tokens"))),
    }


def _stage_info(name: str, metrics: dict) -> StageInfo:
    hardware = f"{metrics['processes']} × {metrics['device']}, {metrics['precision']}"
    return StageInfo(name, STAGE_CORPUS[name], int(metrics["global_step"]), int(metrics["tokens_seen"]),
                     float(metrics["wall_time_s"]), hardware, int(metrics["max_seq_length"]),
                     float(metrics["mlm_probability"]))


def _card_info(name: str, inputs: ReleaseInputs, metrics: dict, corpora: dict[str, CorpusInfo],
               stages: dict[str, StageInfo], evaluations: dict[str, dict],
               scores: dict[str, dict[str, float]]) -> CardInfo:
    folder = inputs.models[name]
    config = _read_json(folder / MODEL_CONFIG_FILE)
    order = list(MODEL_NAMES)[: list(MODEL_NAMES).index(name) + 1]  # the stages that led to these weights
    trained_on = {STAGE_CORPUS[s] for s in order}
    # The card reports MLM on the corpora these weights trained on; release.json keeps every set's.
    mlm = tuple(MlmResult(corpus, float(r["accuracy"]), float(r["loss"]), int(r["masked_tokens"]))
                for corpus, r in evaluations[name]["mlm"].items() if corpus in trained_on)
    return CardInfo(
        model_name=MODEL_NAMES[name], corpora=tuple(corpora[STAGE_CORPUS[s]] for s in order),
        stages=tuple(stages[s] for s in order), parameters=int(metrics["parameters"]),
        num_hidden_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
        num_attention_heads=config["num_attention_heads"], vocab_size=config["vocab_size"],
        tokenizer_sample_lines=int(_read_json(folder / TOKENIZER_INFO_FILE)["sample_lines"]),
        mlm=mlm, jglue=scores.get(name, {}),
        jglue_others={other: s for other, s in scores.items() if other not in (name, "control")},
        jglue_control=scores.get("control", {}),
        jglue_settings=next(iter(evaluations[name]["jglue"].values()), {}).get("settings", {}),
        jglue_official=all(metrics.get("dev_is_jglue_v1_3", False) for evaluation in evaluations.values()
                           for metrics in evaluation["jglue"].values()),
    )


def scores_table(scores: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per model (and the published reference), one column per JGLUE score."""
    rows = {**scores, REFERENCE_NAME: REFERENCE_SCORES}
    lines = ["| model | " + " | ".join(m.label for m in JGLUE_METRICS.values()) + " |",
             "|---|" + "---:|" * len(JGLUE_METRICS)]
    for model, values in rows.items():
        cells = [f"{values[key]:.3f}" if key in values else "–" for key in JGLUE_METRICS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_release(inputs: ReleaseInputs, out_dir: Path, copy: Callable = shutil.copy2) -> dict:
    """Fill `out_dir` (empty) with both model folders and their cards, the plots and `release.json`."""
    out_dir = Path(out_dir)
    evaluations = {name: _read_json(Path(folder) / EVALUATION_FILE) for name, folder in inputs.evaluations.items()}
    scores = {name: jglue_scores(evaluation["jglue"]) for name, evaluation in evaluations.items()}
    corpora = _corpora(inputs.upstream)
    model_metrics = {name: _read_json(Path(folder) / METRICS_FILE) for name, folder in inputs.models.items()}
    stages = {name: _stage_info(name, metrics) for name, metrics in model_metrics.items()}
    models = {}
    for name, folder in inputs.models.items():
        target = out_dir / MODEL_NAMES[name]
        shutil.copytree(folder, target, copy_function=copy,
                        ignore=shutil.ignore_patterns("_manifest.json"))  # the store's, not the model's
        write_model_card(target, _card_info(name, inputs, model_metrics[name], corpora, stages, evaluations, scores))
        models[name] = {"folder": target.name, "jglue": scores.get(name, {}),
                        "mlm": evaluations[name]["mlm"] if name in evaluations else {}}
    atomic_write_bytes(out_dir / PLOTS["loss_curves"],
                       stage_curves_png({name: m["history"] for name, m in model_metrics.items()}))
    atomic_write_bytes(out_dir / PLOTS["jglue_scores"], jglue_scores_png(scores))
    summary = {"models": models, "control": {"jglue": scores.get("control", {})}, "plots": PLOTS,
               "scores_table": scores_table(scores)}
    atomic_write_json(out_dir / RELEASE_FILE, summary, indent=1, ensure_ascii=False)
    return summary
