"""The model card (front matter, model-index, body) and the run's plots (PNG bytes for the UI).

Pure functions on hand-made CardInfo values; the model-index is read back with huggingface_hub's
own parser, so a card the Hub would misread fails here. Under a second on 2 cores.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import yaml
from huggingface_hub import ModelCard

from tinyplm_lib.evaluation.card import (
    CardInfo,
    CorpusInfo,
    MlmResult,
    StageInfo,
    jglue_scores,
    model_card,
    write_model_card,
)
from tinyplm_lib.evaluation.plots import jglue_scores_png, stage_curves_png
from tinyplm_lib.training.curves import loss_curve_bytes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 60_000  # inlined in Dagster metadata
CC100 = CorpusInfo("cc100", "cc100", "CC-100 (ja)", "ja.txt.xz (statmt.org, 2020)", 1_234_567, 45_678_901)
JAWIKI = CorpusInfo("jawiki", "wikipedia", "Japanese Wikipedia (CirrusSearch)", "jawiki-20240701", 765_432,
                    23_456_789)
STAGE1 = StageInfo("stage1", "cc100", 5000, 40_960_000, 3723.4, "1 x NVIDIA H200, bf16", 128, 0.15)
STAGE2 = StageInfo("stage2", "jawiki", 2000, 16_384_000, 1501.0, "1 x NVIDIA H200, bf16", 128, 0.15)
STAGE2_JGLUE = {"jsts_pearson": 0.6123, "jsts_spearman": 0.5934, "jcqa_accuracy": 0.3811}


def full_info(**changes) -> CardInfo:
    info = CardInfo(
        model_name="tinyplm-bert-13m-stage2", corpora=(CC100, JAWIKI), stages=(STAGE1, STAGE2),
        parameters=12_963_584, num_hidden_layers=6, hidden_size=256, num_attention_heads=8, vocab_size=32_768,
        tokenizer_sample_lines=1_000_000,
        mlm=(MlmResult("cc100", 0.3125, 3.875, 61_440), MlmResult("jawiki", 0.4217, 3.1416, 58_880)),
        jglue=STAGE2_JGLUE,
        jglue_others={"stage1": {"jsts_pearson": 0.55, "jsts_spearman": 0.53, "jcqa_accuracy": 0.35}},
        jglue_control={"jsts_pearson": 0.12, "jsts_spearman": 0.1, "jcqa_accuracy": 0.21},
        jglue_settings={"epochs": 2, "learning_rate": 5e-5, "per_device_train_batch_size": 32, "seed": 42},
    )
    return dataclasses.replace(info, **changes)


def split_card(text: str) -> tuple[dict, str]:
    match = re.fullmatch(r"---\n(.*?)\n---\n(.*)", text, flags=re.DOTALL)
    assert match, "the card must open with a --- delimited YAML block"
    return yaml.safe_load(match.group(1)), match.group(2)


def test_front_matter_parses_and_holds_the_hub_keys():
    metadata, _ = split_card(model_card(full_info(license="cc-by-sa-4.0")))
    assert metadata["language"] == ["ja"]
    assert metadata["license"] == "cc-by-sa-4.0"
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "fill-mask"
    assert metadata["datasets"] == ["cc100", "wikipedia"]
    assert "bert" in metadata["tags"] and "japanese" in metadata["tags"]
    assert [entry["name"] for entry in metadata["model-index"]] == ["tinyplm-bert-13m-stage2"]
    assert split_card(model_card(full_info()))[0]["license"] == "apache-2.0"  # the default


def eval_results(text: str) -> dict[tuple[str, str | None, str], float]:
    """(dataset type, dataset config, metric type) -> value, as the Hub's own parser reads them."""
    card = ModelCard(text)
    if card.data.eval_results is None:
        return {}
    assert card.data.model_name == "tinyplm-bert-13m-stage2"
    return {(r.dataset_type, r.dataset_config, r.metric_type): r.metric_value for r in card.data.eval_results}


def has_none(value) -> bool:
    if isinstance(value, dict):
        return any(has_none(v) for v in value.values())
    if isinstance(value, list):
        return any(has_none(v) for v in value)
    return value is None


def test_model_index_carries_exactly_the_numbers_passed_in():
    results = eval_results(model_card(full_info()))
    assert results == {
        ("cc100", None, "accuracy"): 0.3125, ("cc100", None, "loss"): 3.875,
        ("wikipedia", None, "accuracy"): 0.4217, ("wikipedia", None, "loss"): 3.1416,
        ("shunk031/JGLUE", "JSTS", "pearsonr"): 0.6123, ("shunk031/JGLUE", "JSTS", "spearmanr"): 0.5934,
        ("shunk031/JGLUE", "JCommonsenseQA", "accuracy"): 0.3811,
    }
    index = split_card(model_card(full_info()))[0]["model-index"][0]["results"]
    assert {r["task"]["type"] for r in index} == {"fill-mask", "text-classification", "multiple-choice"}
    assert {r["dataset"]["split"] for r in index} == {"validation"}
    assert all(r["dataset"]["name"] for r in index)
    # Scores straight from numpy (scipy, torch .item() aside) are written as plain YAML floats.
    numpy_scores = model_card(full_info(jglue={"jsts_pearson": np.float32(0.5), "jcqa_accuracy": np.float64(0.25)}))
    assert eval_results(numpy_scores)[("shunk031/JGLUE", "JSTS", "pearsonr")] == 0.5


def test_results_not_measured_are_omitted_never_null():
    # Stage 1 before its JGLUE runs: MLM results only, no JGLUE entry and no null anywhere.
    no_jglue = model_card(full_info(jglue={}, jglue_others={}, jglue_control={}))
    assert {key[0] for key in eval_results(no_jglue)} == {"cc100", "wikipedia"}
    assert not has_none(split_card(no_jglue)[0]) and "null" not in no_jglue and "None" not in no_jglue
    assert "No JGLUE results yet." in no_jglue
    # Only JSTS finished: JCommonsenseQA is absent from the model-index; its table cell shows a dash.
    jsts_only = model_card(full_info(jglue={"jsts_pearson": 0.6, "jsts_spearman": 0.58}))
    assert {key[1] for key in eval_results(jsts_only)} == {None, "JSTS"}
    assert re.search(r"\| \*\*tinyplm-bert-13m-stage2\*\* \| 0\.600 \| 0\.580 \| – \|", jsts_only)
    # Nothing measured at all: no model-index key.
    bare, _ = split_card(model_card(full_info(mlm=(), jglue={}, jglue_others={}, jglue_control={})))
    assert "model-index" not in bare


def test_body_names_the_sources_the_run_and_how_to_load_it():
    _, body = split_card(model_card(full_info(repo_id="someone/tinyplm-ja")))
    for expected in ("CC-100 (ja)", "Japanese Wikipedia (CirrusSearch)", "jawiki-20240701", "1,234,567",
                     "45,678,901", "5,000", "1 h 02 min", "25 min 01 s", "1 x NVIDIA H200, bf16", "32,768",
                     "MeCab", "unidic-lite", "WordPiece", "12,963,584"):
        assert expected in body, expected
    assert 'AutoTokenizer.from_pretrained("someone/tinyplm-ja")' in body
    assert 'AutoModelForMaskedLM.from_pretrained("someone/tinyplm-ja")' in body
    assert 'pipeline("fill-mask"' in body and "pip install transformers torch fugashi unidic-lite" in body
    assert "CC BY-SA 4.0" in body and "Common Crawl terms of use" in body
    # The scores table: this model, the other stage, the control, the published reference and chance.
    assert "| **tinyplm-bert-13m-stage2** | 0.612 | 0.593 | 0.381 |" in body
    assert "| stage1 | 0.550 | 0.530 | 0.350 |" in body
    assert "| control: same architecture, random init, same budget | 0.120 | 0.100 | 0.210 |" in body
    assert "| Tohoku BERT base (published) | 0.909 | 0.868 | 0.808 |" in body
    assert "| chance | – | – | 0.200 |" in body
    assert "epochs=2, learning_rate=5e-05" in body


def test_a_wikipedia_only_card_quotes_only_wikipedia_terms():
    info = full_info(corpora=(JAWIKI,), stages=(dataclasses.replace(STAGE2, name="stage1"),),
                     mlm=(MlmResult("jawiki", 0.4, 3.2, 1000),))
    metadata, body = split_card(model_card(info))
    assert metadata["datasets"] == ["wikipedia"]
    assert "Common Crawl" not in body and "CC-100" not in body


@pytest.mark.parametrize(("changes", "field"), [
    ({"jglue": {"jnli_accuracy": 0.5}}, "jglue"),
    ({"jglue_control": {"jsts_pearson": float("nan")}}, "jglue_control['jsts_pearson']"),
    ({"jglue_others": {"stage1": {"jcqa_accuracy": None}}}, "jglue_others['stage1']['jcqa_accuracy']"),
    ({"mlm": (MlmResult("oscar", 0.1, 5.0, 10),)}, "mlm[0].corpus"),
    ({"stages": (dataclasses.replace(STAGE1, corpus="cc-100"),)}, "stages[0].corpus"),
])
def test_bad_card_info_names_the_field(changes, field):
    with pytest.raises(ValueError, match=re.escape(f"CardInfo.{field}")):
        model_card(full_info(**changes))


def test_jglue_scores_reads_metrics_json_by_task():
    metrics = {"jsts": {"pearson": 0.61, "spearman": 0.59, "examples": 1457},
               "jcommonsenseqa": {"accuracy": 0.38, "examples": 1119}}
    assert jglue_scores(metrics) == {"jsts_pearson": 0.61, "jsts_spearman": 0.59, "jcqa_accuracy": 0.38}
    assert jglue_scores({"jcommonsenseqa": {"accuracy": 0.38}}) == {"jcqa_accuracy": 0.38}


def test_write_model_card_writes_readme_readable_by_all(tmp_path):
    path = write_model_card(tmp_path, full_info())
    assert path == tmp_path / "README.md"
    assert path.read_text(encoding="utf-8") == model_card(full_info())
    assert path.stat().st_mode & 0o777 == 0o644


# --- plots ----------------------------------------------------------------------------------------

HISTORY1 = [{"step": s, "train_loss": 10.0 - s / 20, "learning_rate": 1e-3} for s in range(10, 110, 10)] + [
    {"step": s, "eval_loss": 9.8 - s / 25} for s in (50, 100)]
HISTORY2 = [{"step": s, "train_loss": 6.5 - s / 40, "learning_rate": 5e-4} for s in range(10, 60, 10)] + [
    {"step": 50, "eval_loss": 6.0}]
SCORES = {"stage1": {"jsts_pearson": 0.55, "jsts_spearman": 0.53, "jcqa_accuracy": 0.35},
          "stage2": STAGE2_JGLUE, "control": {"jsts_pearson": -0.02, "jsts_spearman": 0.01, "jcqa_accuracy": 0.2}}


@pytest.mark.parametrize("render", [
    lambda history: loss_curve_bytes(history),
    lambda history: stage_curves_png({"stage1": history, "stage2": HISTORY2}),
    lambda history: jglue_scores_png({**SCORES, "stage1": {"jsts_pearson": history[0]["train_loss"] / 20}}),
], ids=["loss_curve", "stage_curves", "jglue_scores"])
def test_plots_are_small_deterministic_pngs(render):
    first, again = render(HISTORY1), render(HISTORY1)
    assert first[:8] == PNG_SIGNATURE
    assert len(first) < MAX_PNG_BYTES
    assert first == again, "identical inputs must give identical bytes"
    changed = [{**HISTORY1[0], "train_loss": 7.0}, *HISTORY1[1:]]
    assert render(changed) != first, "the plot must depend on its input"


def test_plots_accept_missing_results_and_refuse_unknown_metrics():
    assert loss_curve_bytes([])[:8] == PNG_SIGNATURE  # "no steps logged"
    partial = jglue_scores_png({"stage1": {"jsts_pearson": 0.5}, "control": {}})
    assert partial[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="jnli"):
        jglue_scores_png({"stage1": {"jnli_accuracy": 0.5}})


def test_scores_from_other_files_than_jglue_stay_out_of_the_model_index():
    card = model_card(full_info(jglue_official=False))
    assert {key[1] for key in eval_results(card)} == {None}  # the MLM results only
    assert "Not JGLUE's dev split" in card and "| **tinyplm-bert-13m-stage2** | 0.612 |" in card
