"""bench/jglue.py end to end at a tiny size: slices of the real corpora and JGLUE files, the demo model
config, 3-second stages and 16-example fine-tunes; the report's structure and its recomputed scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.jglue import main, recomputed_equal
from tinyplm_lib.evaluation.jglue_data import JCOMMONSENSEQA, JSTS, read_predictions
from tinyplm_lib.layout import METRICS_FILE, PREDICTIONS_FILE

from conftest import REPO_ROOT

SHARED_JGLUE = REPO_ROOT.parent / "shared" / "jglue"
DEV_EXAMPLES = 64
SETTINGS = {"_comment": "test", "epochs": 1, "learning_rate": 1e-3, "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 32, "max_seq_length": 64, "seed": 3, "warmup_ratio": 0.1,
            "weight_decay": 0.01, "max_train_examples": 16}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, web_sample, wiki_sample) -> tuple[dict, Path]:
    assert (SHARED_JGLUE / "jsts-v1.3-train.json.gz").is_file(), f"missing shared JGLUE files in {SHARED_JGLUE}"
    root = tmp_path_factory.mktemp("bench-jglue")
    settings = root / "jglue.json"
    settings.write_text(json.dumps(SETTINGS), encoding="utf-8")
    report = main(["--web", str(web_sample), "--wiki", str(wiki_sample), "--jglue", str(SHARED_JGLUE),
                   "--stage-seconds", "3", "--jglue-settings", str(settings), "--json", str(root / "out.json"),
                   "--work", str(root / "work"), "--workers", "1",
                   "--model-config", str(REPO_ROOT / "configs/model/bert-demo.json"), "--max-lines", "3000",
                   "--max-documents", "60", "--vocab-size", "2000", "--limit-alphabet", "1500",
                   "--mlm-eval-sequences", "64", "--max-dev-examples", str(DEV_EXAMPLES)])
    return report, root


def test_report_structure(bench_run):
    report, root = bench_run
    assert json.loads((root / "out.json").read_text(encoding="utf-8")) == report
    assert report["command"].startswith("python -m bench.jglue --web ")
    assert report["machine"]["cores"] >= 1 and len(report["machine"]["load_average_after"]) == 3
    budget = report["budget"]
    assert budget["stage_seconds"] == 3.0 and budget["jglue_settings"]["max_train_examples"] == 16
    assert budget["training_args"]["stage1"]["max_seq_length"] == 128
    assert "warmup_ratio" not in budget["training_args"]["stage2"]
    for name in ("stage1", "stage2"):
        stage = budget["stages"][name]
        assert stage["steps"] >= 1 and stage["tokens_seen"] > 0 and stage["wall_time_s"] >= 3.0
    assert report["stages"]["stage2"]["init_from"] == report["stages"]["stage1"]["folder"]
    assert set(report["models"]) == {"stage1", "stage2", "control"}
    for name in ("stage1", "stage2"):
        for corpus in ("cc100", "jawiki"):
            mlm = report["models"][name]["mlm"][corpus]
            assert 0.0 <= mlm["accuracy"] <= 1.0 and mlm["loss"] > 0
            assert 1 <= mlm["sequences"] == report["mlm_eval_set"][corpus]["sequences"] <= 64
    assert report["models"]["control"]["mlm"] is None
    for runs in report["models"].values():
        jsts, jcqa = runs["jglue"][JSTS], runs["jglue"][JCOMMONSENSEQA]
        assert {"pearson", "spearman", "steps", "seconds"} <= set(jsts) and {"accuracy", "steps"} <= set(jcqa)
        assert jsts["train_examples"] == jcqa["train_examples"] == 16 and jsts["steps"] == jcqa["steps"] == 2
        assert jsts["examples"] == jcqa["examples"] == DEV_EXAMPLES
        assert 0.0 <= jcqa["accuracy"] <= 1.0
        for task, run in runs["jglue"].items():
            assert len(read_predictions(task, Path(run["folder"]) / PREDICTIONS_FILE)) == DEV_EXAMPLES
    assert set(report["comparison"]) == {"jsts_pearson", "jsts_spearman", "jcommonsenseqa_accuracy"}
    assert report["recomputed_equal"] is True


def test_recomputed_equal_detects_a_changed_prediction(bench_run):
    report, _ = bench_run
    folder = Path(report["models"]["stage2"]["jglue"][JCOMMONSENSEQA]["folder"])
    assert recomputed_equal(JCOMMONSENSEQA, folder)
    lines = (folder / PREDICTIONS_FILE).read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[0])
    # One answer flipped between right and wrong: the accuracy moves by 1/64.
    row["prediction"] = (row["label"] + 1) % 5 if row["prediction"] == row["label"] else row["label"]
    (folder / PREDICTIONS_FILE).write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n", encoding="utf-8")
    assert not recomputed_equal(JCOMMONSENSEQA, folder)
    assert json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))["examples"] == DEV_EXAMPLES
