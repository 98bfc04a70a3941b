"""End to end through real `dagster` processes: the demo profile, then one asset re-materialised.

The whole graph runs once per session with `dagster job execute` (the README's CLI form) into a
temporary TINYPLM_HOME/DAGSTER_HOME; the tests then load the stage-2 folder with plain
transformers, and re-materialise `bert_stage2_jawiki` alone in a new process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

DAGSTER = str(Path(sys.executable).with_name("dagster"))
UPSTREAM = ["wordpiece_tokenizer", "jawiki_tokens", "bert_stage1_cc100", "cc100_ja_train"]
# The ops of tinyplm_assets/checks.py: a blocking check's step succeeds only if its checks pass.
CHECK_STEPS = {"cc100_ja_split_checks", "jawiki_split_checks", "wordpiece_tokenizer_unknown_token_rate",
               "bert_stage1_cc100_loss_checks", "bert_stage2_jawiki_loss_checks"}


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(TINYPLM_HOME=str(tmp / "home"), DAGSTER_HOME=str(tmp / "dagster_home"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DAGSTER_DISABLE_TELEMETRY="1")
    (tmp / "dagster_home").mkdir(parents=True, exist_ok=True)
    (tmp / "dagster_home" / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    return env


def _dagster(args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([DAGSTER, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def _succeeded_steps(dagster_home: str | Path) -> set[str]:
    """Steps that succeeded in the newest run of an instance, read from its event log.

    (Parsing the CLI output is not enough: step processes write to one stream concurrently.)
    """
    from dagster import DagsterEventType, DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    with DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home))) as instance:
        run = instance.get_runs(limit=1)[0]
        return {event.step_key for event in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_SUCCESS)}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    env = _env(tmp)
    result = _dagster(["job", "execute", "-m", "tinyplm_assets.definitions", "-j", "pretrain_all",
                       "-c", "configs/demo.yaml"], env)
    artifacts = tmp / "home" / "artifacts"
    return {"env": env, "artifacts": artifacts, "output": result.stdout + result.stderr}


def test_demo_materialises_every_asset(demo_run):
    steps = _succeeded_steps(demo_run["env"]["DAGSTER_HOME"])
    assert steps == {"cc100_ja_raw", "jawiki_raw", "cc100_ja_corpus", "jawiki_corpus", "tokenizer_sample",
                     "wordpiece_tokenizer", "cc100_ja_tokens", "jawiki_tokens", "bert_stage1_cc100",
                     "bert_stage2_jawiki"} | CHECK_STEPS
    for name in ["cc100_ja_train", "cc100_ja_validation", "jawiki_train", "jawiki_validation",
                 "bert_stage2_jawiki"]:
        assert (demo_run["artifacts"] / name / "_manifest.json").is_file(), name


def test_stage2_folder_loads_offline_and_fills_masks(demo_run):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM, pipeline

    folder = str(demo_run["artifacts"] / "bert_stage2_jawiki")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForMaskedLM.from_pretrained(folder)
    assert type(tokenizer).__name__ == "BertJapaneseTokenizer"
    assert isinstance(model, BertForMaskedLM)
    assert tokenizer.model_max_length == 128
    predictions = pipeline("fill-mask", model=model, tokenizer=tokenizer)("町の図書館は[MASK]に開館した。")
    assert len(predictions) == 5
    assert all(p["token_str"] and 0.0 <= p["score"] <= 1.0 for p in predictions)


def test_stage2_validation_loss_beats_untrained_model(demo_run):
    metrics = json.loads((demo_run["artifacts"] / "bert_stage2_jawiki" / "metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["untrained_eval_loss"] - 0.5
    assert metrics["perplexity"] > 1 and 0 < metrics["eval_accuracy"] < 1
    stage1 = json.loads((demo_run["artifacts"] / "bert_stage1_cc100" / "metrics.json").read_text())
    assert stage1["eval_loss"] < stage1["untrained_eval_loss"]


def test_downstream_asset_rematerialises_alone_from_storage(demo_run):
    artifacts = demo_run["artifacts"]
    before = {name: (artifacts / name / "_manifest.json").stat().st_mtime_ns for name in UPSTREAM}
    old_manifest = (artifacts / "bert_stage2_jawiki" / "_manifest.json").stat().st_mtime_ns
    _dagster(["asset", "materialize", "-m", "tinyplm_assets.definitions", "--select", "bert_stage2_jawiki",
             "-c", "configs/demo.yaml"], demo_run["env"])
    assert _succeeded_steps(demo_run["env"]["DAGSTER_HOME"]) == {"bert_stage2_jawiki", "bert_stage2_jawiki_loss_checks"}
    assert {name: (artifacts / name / "_manifest.json").stat().st_mtime_ns for name in UPSTREAM} == before
    assert (artifacts / "bert_stage2_jawiki" / "_manifest.json").stat().st_mtime_ns > old_manifest


def test_definitions_validate_and_full_profile_config_is_valid(demo_run):
    _dagster(["definitions", "validate", "-m", "tinyplm_assets.definitions"], demo_run["env"], timeout=300)
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
