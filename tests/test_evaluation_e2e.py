"""The evaluation assets in the shared demo run: fixed MLM set, JGLUE scores that recompute from
their predictions, the random-init control beside both stages, and the release folder's cards."""

from __future__ import annotations

import json

import pytest
import yaml

from tinyplm_lib.evaluation.jglue_data import recompute_metrics
from tinyplm_lib.evaluation.release import EVALUATION_FILE, JGLUE_TASKS, MODEL_NAMES, RELEASE_FILE

pytestmark = pytest.mark.slow

EVALUATIONS = ["bert_stage1_cc100_eval", "bert_stage2_jawiki_eval", "bert_control_eval"]


@pytest.mark.parametrize("name", EVALUATIONS)
def test_jglue_scores_recompute_from_their_predictions(demo_run, name):
    folder = demo_run.artifacts / name
    summary = json.loads((folder / EVALUATION_FILE).read_text(encoding="utf-8"))
    for task in JGLUE_TASKS:
        written = json.loads((folder / task / "metrics.json").read_text(encoding="utf-8"))
        assert summary["jglue"][task] == written
        recomputed = recompute_metrics(task, folder / task / "predictions.jsonl")
        keys = ("pearson", "spearman") if task == "jsts" else ("accuracy",)
        assert {k: recomputed[k] for k in keys} == {k: written[k] for k in keys}
        rows = (folder / task / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(rows) == written["examples"] > 0
    # The control is scored on JGLUE only: its MLM numbers would be a random model's.
    assert bool(summary["mlm"]) == (name != "bert_control_eval")


def test_stages_are_scored_on_the_same_fixed_mlm_positions(demo_run):
    meta = json.loads((demo_run.artifacts / "mlm_eval_set" / "meta.json").read_text(encoding="utf-8"))
    scored = {name: json.loads((demo_run.artifacts / name / EVALUATION_FILE).read_text(encoding="utf-8"))["mlm"]
              for name in EVALUATIONS[:2]}
    for corpus, counts in meta["corpora"].items():
        assert scored["bert_stage1_cc100_eval"][corpus]["masked_tokens"] == counts["masked_tokens"] > 0
        assert scored["bert_stage2_jawiki_eval"][corpus]["masked_tokens"] == counts["masked_tokens"]


def test_release_folders_have_cards_that_parse_and_match_the_scores(demo_run):
    release = demo_run.artifacts / "bert_release"
    summary = json.loads((release / RELEASE_FILE).read_text(encoding="utf-8"))
    for stage, folder_name in MODEL_NAMES.items():
        card = (release / folder_name / "README.md").read_text(encoding="utf-8")
        assert card.startswith("---\n")
        front = yaml.safe_load(card.split("---\n")[1])
        assert front["language"] == ["ja"] and front["library_name"] == "transformers"
        assert front["pipeline_tag"] == "fill-mask"
        results = {result["dataset"]["name"]: {m["type"]: m["value"] for m in result["metrics"]}
                   for result in front["model-index"][0]["results"]}
        # The demo's JGLUE-format set is not JGLUE's dev split: its scores stay out of the model-index.
        assert not any(name.startswith("JGLUE") for name in results)
        assert "Not JGLUE's dev split" in card
        scores = summary["models"][stage]["jglue"]
        assert "jcqa_accuracy" in scores and scores.keys() <= {"jsts_pearson", "jsts_spearman", "jcqa_accuracy"}
        mlm = [name for name in results if "fixed MLM evaluation set" in name]
        assert len(mlm) == {"stage1": 1, "stage2": 2}[stage]  # the corpora these weights trained on
        assert (release / folder_name / "model.safetensors").is_file()
    assert summary["control"]["jglue"].keys() == summary["models"]["stage2"]["jglue"].keys()
    for png in summary["plots"].values():
        assert (release / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
