"""End to end through real `dagster` processes: the demo profile, then one asset re-materialised.

The whole graph runs once per session with `dagster job execute` (the README's CLI form, storing in
a moto_server bucket: conftest's `demo_run`, shared with test_s3_pipeline.py and
test_ui_browser.py); the tests read its artifacts, load the stage-2 folder with plain transformers,
and re-materialise `bert_stage2_jawiki` alone in a new process on a local copy of that machine.
"""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO_ROOT
from demo_instance import ASSET_STEPS, CHECK_STEPS, copy_demo, machine_env, run_dagster, succeeded_steps

pytestmark = pytest.mark.slow

UPSTREAM = ["wordpiece_tokenizer", "jawiki_tokens", "bert_stage1_cc100", "cc100_ja_train"]
FAST_TRAINING = REPO_ROOT / "tests" / "configs" / "fast-training.yaml"


def test_demo_materialises_every_asset(demo_run):
    assert succeeded_steps(demo_run.dagster_home) == ASSET_STEPS | CHECK_STEPS
    for name in ["cc100_ja_train", "cc100_ja_validation", "jawiki_train", "jawiki_validation",
                 "bert_stage2_jawiki"]:
        assert (demo_run.artifacts / name / "_manifest.json").is_file(), name


def test_stage2_folder_loads_offline_and_fills_masks(demo_run):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM, pipeline

    folder = str(demo_run.artifacts / "bert_stage2_jawiki")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForMaskedLM.from_pretrained(folder)
    assert type(tokenizer).__name__ == "BertJapaneseTokenizer"
    assert isinstance(model, BertForMaskedLM)
    assert tokenizer.model_max_length == 128
    predictions = pipeline("fill-mask", model=model, tokenizer=tokenizer)("町の図書館は[MASK]に開館した。")
    assert len(predictions) == 5
    assert all(p["token_str"] and 0.0 <= p["score"] <= 1.0 for p in predictions)


def test_stage2_validation_loss_beats_untrained_model(demo_run):
    metrics = json.loads((demo_run.artifacts / "bert_stage2_jawiki" / "metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["untrained_eval_loss"] - 0.5
    assert metrics["perplexity"] > 1 and 0 < metrics["eval_accuracy"] < 1
    stage1 = json.loads((demo_run.artifacts / "bert_stage1_cc100" / "metrics.json").read_text())
    assert stage1["eval_loss"] < stage1["untrained_eval_loss"]


def test_downstream_asset_rematerialises_alone_from_storage(demo_run, tmp_path):
    machine = copy_demo(demo_run, tmp_path)  # its local store: nothing can come from the bucket
    artifacts = machine.artifacts
    before = {name: (artifacts / name / "_manifest.json").stat().st_mtime_ns for name in UPSTREAM}
    old_manifest = (artifacts / "bert_stage2_jawiki" / "_manifest.json").stat().st_mtime_ns
    # 30 steps instead of the demo's 300: what is tested here is where the inputs come from.
    run_dagster(["asset", "materialize", "-m", "tinyplm_assets.definitions", "--select", "bert_stage2_jawiki",
                 "-c", "configs/demo.yaml", "-c", str(FAST_TRAINING)], machine.env)
    assert succeeded_steps(machine.dagster_home) == {"bert_stage2_jawiki", "bert_stage2_jawiki_loss_checks"}
    assert {name: (artifacts / name / "_manifest.json").stat().st_mtime_ns for name in UPSTREAM} == before
    assert (artifacts / "bert_stage2_jawiki" / "_manifest.json").stat().st_mtime_ns > old_manifest


def test_definitions_validate_and_full_profile_config_is_valid(tmp_path):
    run_dagster(["definitions", "validate", "-m", "tinyplm_assets.definitions"], machine_env(tmp_path), timeout=300)
    from dagster import validate_run_config

    from tinyplm_assets.definitions import defs

    full = yaml.safe_load((REPO_ROOT / "configs" / "full.yaml").read_text())
    demo = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())
    for job_name in ("pretrain_all",):
        job = defs.resolve_job_def(job_name)
        assert validate_run_config(job, full)
        assert validate_run_config(job, demo)
    broken = yaml.safe_load((REPO_ROOT / "configs" / "full.yaml").read_text())
    broken["ops"]["cc100_ja_corpus"]["config"]["max_lines"] = "many"
    with pytest.raises(Exception, match="max_lines"):
        validate_run_config(defs.resolve_job_def("pretrain_all"), broken)
