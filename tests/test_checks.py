"""Asset checks: the measures they use, their wiring, and that a failed check stops training.

From pure functions (`tinyplm_lib.quality`) to in-process `materialize()` runs of the real asset
graph on the demo corpus (one worker per step, a temporary store): the data checks pass and let
the token shards be built; a split that shares lines, a tokenizer over its [UNK] limit, or a
stage-1 model that does not beat an untrained one each fail the run before the assets below
them are materialised. Also the metadata the UI shows: samples, tokenisation, links to inputs.
"""

from __future__ import annotations

import base64
import json
import math
import re
import unicodedata
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, DagsterEventType, DagsterInstance, MetadataValue, materialize

from tinyplm_assets.checks import (
    Cc100SplitCheckConfig,
    SplitCheckConfig,
    StageCheckConfig,
    bert_stage1_cc100_loss_checks,
)
from tinyplm_assets.definitions import defs
from tinyplm_assets.resources import ArtifactIOManager, ArtifactStorage
from tinyplm_lib.errors import InputError
from tinyplm_lib.quality import (
    binomial_sigmas,
    cc100_validation_draw,
    check_split,
    jawiki_validation_draw,
    nonfinite_losses,
    scan_split,
)

from conftest import REPO_ROOT

DEMO_OPS = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())["ops"]
# Steps that would otherwise start a process pool per step: one worker keeps the tests quick.
POOLED = {"cc100_ja_corpus", "jawiki_corpus", "wordpiece_tokenizer", "cc100_ja_tokens", "jawiki_tokens"}
DATA_ASSETS = ["cc100_ja_raw", "jawiki_raw", "cc100_ja_train", "cc100_ja_validation", "jawiki_train",
               "jawiki_validation", "tokenizer_sample", "wordpiece_tokenizer", "cc100_ja_tokens", "jawiki_tokens"]
DATA_OPS = ["cc100_ja_raw", "jawiki_raw", "cc100_ja_corpus", "jawiki_corpus", "tokenizer_sample",
            "wordpiece_tokenizer", "wordpiece_tokenizer_unknown_token_rate", "cc100_ja_tokens", "jawiki_tokens"]
QUICK_TRAINING = {"max_steps": 20, "runtime": {"dataloader_workers": 0}}


def _run_config(ops: list[str], overrides: dict | None = None) -> dict:
    """The demo profile's config of `ops` (exactly those: materialize() rejects others)."""
    out = {}
    for op in ops:
        config = dict(DEMO_OPS.get(op, {}).get("config", {}))
        if op in POOLED:
            config["workers"] = 1
        config.update((overrides or {}).get(op, {}))
        out[op] = {"config": config}
    return {"ops": out}


def _materialize(home: Path, instance: DagsterInstance, selection: list[str], run_config: dict):
    storage = ArtifactStorage(home=str(home))
    return materialize([*defs.assets, *defs.asset_checks], selection=selection, run_config=run_config,
                       resources={"storage": storage, "io_manager": ArtifactIOManager(storage=storage)},
                       instance=instance, raise_on_error=False)


def _evaluations(result) -> dict:
    return {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}


def _materialised(result) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def _started(result) -> set[str]:
    return {e.step_key for e in result.all_events if e.event_type == DagsterEventType.STEP_START}


def _metadata(instance: DagsterInstance, name: str) -> dict:
    event = instance.get_latest_materialization_event(AssetKey(name))
    return dict(event.asset_materialization.metadata)


# -- the measures ------------------------------------------------------------------------------


def test_scan_split_counts_lines_blank_lines_and_exact_overlap(tmp_path):
    # More train lines than one hashing chunk (65,536), with the shared lines in the second.
    train = [f"訓練文{i}です。" for i in range(70_000)] + ["共有される文。", "もう一つの共有文。"]
    validation = ["検証文。", "共有される文。", "", "共有される文。", "もう一つの共有文。", "  "]
    (tmp_path / "train.txt").write_text("".join(f"{line}\n" for line in train), encoding="utf-8")
    (tmp_path / "validation.txt").write_text("".join(f"{line}\n" for line in validation), encoding="utf-8")
    scan = scan_split(tmp_path / "train.txt", tmp_path / "validation.txt")
    assert (scan.train.lines, scan.train.blank_lines) == (70_002, 0)
    assert (scan.validation.lines, scan.validation.blank_lines, scan.validation.first_blank_line) == (6, 2, 3)
    assert (scan.overlap_lines, scan.overlap_distinct) == (3, 2)
    assert scan.examples == ("共有される文。", "もう一つの共有文。")
    assert scan.overlap_fraction == pytest.approx(0.5)
    (tmp_path / "other.txt").write_text("別の文。\n", encoding="utf-8")
    clean = scan_split(tmp_path / "train.txt", tmp_path / "other.txt")
    assert (clean.overlap_lines, clean.examples) == (0, ())
    with pytest.raises(InputError, match="missing.txt"):
        scan_split(tmp_path / "missing.txt", tmp_path / "other.txt")


def test_nonfinite_losses_names_every_bad_loss():
    good = {"eval_loss": 6.2, "train_loss": 6.4, "initial_eval_loss": 8.2, "untrained_eval_loss": 8.2,
            "history": [{"step": 20, "train_loss": 7.0}, {"step": 40, "train_loss": 6.4, "eval_loss": 6.2}]}
    assert nonfinite_losses(good) == []
    assert nonfinite_losses({**good, "train_loss": None}) == []  # no step logged: not an error
    bad = {**good, "eval_loss": float("nan"),
           "history": [{"step": 20, "train_loss": float("inf")}, {"step": 40, "eval_loss": 6.0}]}
    assert nonfinite_losses(bad) == ["eval_loss=nan", "history step 20: train_loss=inf"]
    assert nonfinite_losses({k: v for k, v in good.items() if k != "untrained_eval_loss"}) == [
        "untrained_eval_loss=None"]


def test_binomial_sigmas():
    assert binomial_sigmas(10, 100, 0.1) == 0.0
    assert binomial_sigmas(19, 100, 0.1) == pytest.approx(3.0)
    assert binomial_sigmas(1, 100, 0.1) == pytest.approx(-3.0)
    assert binomial_sigmas(0, 10, 0.0) == 0.0 and binomial_sigmas(1, 10, 0.0) == math.inf


def test_check_split_judges_counts_budget_draw_and_overlap(tmp_path):
    (tmp_path / "train.txt").write_text("".join(f"訓練文{i}。\n" for i in range(4)) + "共有文。\n", encoding="utf-8")
    (tmp_path / "validation.txt").write_text("検証文。\n共有文。\n", encoding="utf-8")
    reported_validation = {"lines_validation": 3, "details.max_validation_lines": 1, "documents_validation": 2,
                           "documents_train": 8, "details.validation_fraction": 0.1}
    checks = check_split(tmp_path / "train.txt", tmp_path / "validation.txt", {"lines_train": 5},
                         reported_validation, jawiki_validation_draw, max_overlap_fraction=0.0, max_sigmas=1.0)
    assert checks.train_lines.passed
    assert checks.train_lines.figures == {"lines": 5, "reported_lines": 5, "blank_lines": 0}
    assert checks.validation_lines.problems == (
        "2 lines on disk but 3 reported when it was built", "2 lines exceed the budget of 1",
        "2 of 10 documents drawn for validation, 1.0 expected at fraction 0.1 (+1.1 sigmas, more than 1)")
    assert checks.validation_lines.figures == {"lines": 2, "reported_lines": 3, "blank_lines": 0, "line_budget": 1,
                                               "documents_drawn": 2, "documents_expected": 1.0, "draw_sigmas": 1.05}
    assert checks.overlap.problems == (
        "1 validation lines (50.00%) also occur in train, more than max_overlap_fraction 0.00%",)
    assert checks.overlap.figures["overlap_lines"] == 1 and checks.scan.examples == ("共有文。",)
    # cc100 counts its draw from other figures: their absence is named, not a crash.
    checks = check_split(tmp_path / "train.txt", tmp_path / "validation.txt", {}, reported_validation,
                         cc100_validation_draw, max_overlap_fraction=0.5, max_sigmas=5.0)
    assert checks.train_lines.problems == ("the materialisation metadata has no lines_train to compare with",)
    assert checks.train_lines.figures["reported_lines"] == -1
    assert checks.validation_lines.problems[-1] == (
        "the materialisation metadata has no 'details.documents_over_validation_budget' to check the draw with")
    assert checks.overlap.passed


def test_cc100_overlap_limit_is_zero_when_the_corpus_was_deduplicated(tmp_path):
    # One shared line in 40 validation lines (2.5%): within what a corpus built without dedup may
    # share (5%), a bug in one built with it.
    (tmp_path / "train.txt").write_text("".join(f"訓練文{i}。\n" for i in range(40)) + "共有文。\n", encoding="utf-8")
    (tmp_path / "validation.txt").write_text("".join(f"検証文{i}。\n" for i in range(39)) + "共有文。\n",
                                             encoding="utf-8")
    config = Cc100SplitCheckConfig()
    for reported, limit in (({"dedup": False}, 0.05), ({}, 0.05), ({"dedup": True}, 0.0)):
        assert config.overlap_limit(reported) == limit
        checks = check_split(tmp_path / "train.txt", tmp_path / "validation.txt", {"lines_train": 41},
                             {"lines_validation": 40, **reported}, cc100_validation_draw,
                             max_overlap_fraction=config.overlap_limit(reported), max_sigmas=5.0)
        assert checks.overlap.passed is (limit > 0), reported
        assert checks.overlap.figures["overlap_lines"] == 1
    # JaWiki's threshold is its own (0 by default): the cc100 flag does not touch it.
    assert SplitCheckConfig(max_overlap_fraction=0.1).overlap_limit({"dedup": True}) == 0.1


def test_loss_checks_read_metrics_json_and_fail_on_nan(tmp_path):
    metrics = {"eval_loss": float("nan"), "untrained_eval_loss": 8.2, "initial_eval_loss": 8.2,
               "train_loss": 7.0, "history": [{"step": 10, "train_loss": float("inf")}]}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    results = {r.check_name: r for r in bert_stage1_cc100_loss_checks(config=StageCheckConfig(), model=tmp_path)}
    assert not results["losses_finite"].passed
    assert results["losses_finite"].description == (f"{tmp_path / 'metrics.json'}: eval_loss=nan; "
                                                    "history step 10: train_loss=inf")
    assert not results["beats_untrained_model"].passed
    (tmp_path / "metrics.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="metrics.json"):
        list(bert_stage1_cc100_loss_checks(config=StageCheckConfig(), model=tmp_path))


# -- the wiring --------------------------------------------------------------------------------


def test_every_check_is_blocking_and_runs_in_the_jobs_of_its_asset():
    graph = defs.resolve_asset_graph()
    keys = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    assert keys == {
        ("cc100_ja_train", "line_counts"), ("cc100_ja_validation", "line_counts"),
        ("cc100_ja_validation", "no_train_overlap"), ("jawiki_train", "line_counts"),
        ("jawiki_validation", "line_counts"), ("jawiki_validation", "no_train_overlap"),
        ("wordpiece_tokenizer", "unknown_token_rate"),
        ("bert_stage1_cc100", "losses_finite"), ("bert_stage1_cc100", "beats_untrained_model"),
        ("bert_stage2_jawiki", "losses_finite"), ("bert_stage2_jawiki", "beats_untrained_model"),
    }
    specs = [spec for checks_def in defs.asset_checks for spec in checks_def.check_specs]
    assert len(specs) == len(keys) and all(spec.blocking for spec in specs)

    def check_ops(job_name):
        nodes = {node.name for node in defs.resolve_job_def(job_name).nodes_in_topological_order}
        return {name for name in nodes if "check" in name or name.endswith("unknown_token_rate")}

    data = {"cc100_ja_split_checks", "jawiki_split_checks", "wordpiece_tokenizer_unknown_token_rate"}
    training = {"bert_stage1_cc100_loss_checks", "bert_stage2_jawiki_loss_checks"}
    assert check_ops("prepare_data") == data
    assert check_ops("train_models") == training
    assert check_ops("pretrain_all") == data | training


# -- real runs on the demo corpus -----------------------------------------------------------------


@pytest.fixture(scope="module")
def instance():
    with DagsterInstance.ephemeral() as instance:
        yield instance


@pytest.fixture(scope="module")
def data_run(tmp_path_factory, instance):
    """Every data asset and its checks, materialised once into a temporary store."""
    home = tmp_path_factory.mktemp("checks-home")
    result = _materialize(home, instance, DATA_ASSETS, _run_config(DATA_OPS))
    return {"home": home, "result": result}


def test_data_checks_pass_and_downstream_assets_are_built(data_run):
    result = data_run["result"]
    assert result.success
    evaluations = _evaluations(result)
    assert len(evaluations) == 7 and all(e.passed for e in evaluations.values()), {
        key: e.description for key, e in evaluations.items() if not e.passed}
    assert {"cc100_ja_tokens", "jawiki_tokens"} <= _materialised(result)
    overlap = evaluations[("jawiki_validation", "no_train_overlap")].metadata
    assert overlap["overlap_lines"].value == 0
    overlap = evaluations[("cc100_ja_validation", "no_train_overlap")].metadata
    assert overlap["overlap_lines"].value == 0 and overlap["max_overlap_fraction"].value == 0.0  # dedup: true
    counts = evaluations[("cc100_ja_validation", "line_counts")].metadata
    assert counts["lines"].value == counts["reported_lines"].value > 0
    assert counts["lines"].value <= counts["line_budget"].value == DEMO_OPS["cc100_ja_corpus"]["config"][
        "max_validation_lines"]
    unk = evaluations[("wordpiece_tokenizer", "unknown_token_rate")].metadata
    # The same [UNK] share the shard encoder counted over the whole validation split.
    assert unk["unk_rate"].value == pytest.approx(
        result.asset_materializations_for_node("jawiki_tokens")[0].metadata["validation.unk_rate"].value, abs=1e-6)
    assert 0 < unk["unk_rate"].value <= DEMO_OPS["wordpiece_tokenizer_unknown_token_rate"]["config"]["max_unk_rate"]


def test_data_assets_show_samples_tokenisation_and_their_inputs(data_run, instance):
    for split in ("cc100_ja_train", "cc100_ja_validation", "jawiki_train", "jawiki_validation"):
        sample = _metadata(instance, split)["sample"].value
        assert 1 <= sample.count("\n- ") + 1 <= 5 and sample.startswith("- "), split

    tokenizer = _metadata(instance, "wordpiece_tokenizer")
    assert tokenizer["vocab_size"].value == 3679
    table = tokenizer["tokenisation_sample"].value
    sentences = (data_run["home"] / "artifacts" / "tokenizer_sample" / "sample.txt").read_text(
        encoding="utf-8").splitlines()[:3]
    decoded = re.findall(r"^\| decoded \| (.*) \|$", table, flags=re.MULTILINE)
    assert len(decoded) == 3 and table.count("| MeCab words |") == 3 and table.count("| ids |") == 3
    for sentence, text in zip(sentences, decoded):
        # Every training character is in the vocabulary, so decoding gives the text back (NFKC,
        # with the spaces BertJapaneseTokenizer puts between words).
        assert text.replace(" ", "") == unicodedata.normalize("NFKC", sentence).replace(" ", "")

    tokens = _metadata(instance, "jawiki_tokens")
    assert tokens["tokenizer"] == MetadataValue.asset(AssetKey("wordpiece_tokenizer"))
    assert tokens["tokenizer_manifest_sha256"].value == tokenizer["manifest_sha256"].value
    assert tokens["validation_text"] == MetadataValue.asset(AssetKey("jawiki_validation"))
    assert tokens["validation_text_manifest_sha256"].value == _metadata(
        instance, "jawiki_validation")["manifest_sha256"].value
    assert _metadata(instance, "wordpiece_tokenizer")["trained_on"] == MetadataValue.asset(
        AssetKey("tokenizer_sample"))


def _shared_line_corpus(tmp_path: Path) -> Path:
    """40 documents that all hold one identical line: whole-document splits cannot keep it out of
    either side unless it is deduplicated."""
    documents = [f"文書{i}の一行目です。\n文書{i}の二行目です。\nどの文書にもある同じ行です。\n" for i in range(40)]
    raw = tmp_path / "overlap-cc100.txt"
    raw.write_text("\n".join(documents), encoding="utf-8")
    return raw


def test_overlapping_split_stops_the_tokens_and_training(tmp_path):
    # Without dedup a third of the validation lines also occur in train.
    ops = ["cc100_ja_raw", "cc100_ja_corpus", "cc100_ja_tokens", "bert_stage1_cc100"]
    overrides = {"cc100_ja_raw": {"url": _shared_line_corpus(tmp_path).as_uri()},
                 "cc100_ja_corpus": {"max_validation_lines": 60, "validation_doc_fraction": 0.3, "dedup": False},
                 "bert_stage1_cc100": QUICK_TRAINING}
    with DagsterInstance.ephemeral() as instance:
        result = _materialize(tmp_path / "home", instance,
                              ["cc100_ja_raw", "cc100_ja_train", "cc100_ja_validation", "cc100_ja_tokens",
                               "bert_stage1_cc100"], _run_config(ops, overrides))
    assert not result.success
    evaluations = _evaluations(result)
    overlap = evaluations[("cc100_ja_validation", "no_train_overlap")]
    assert not overlap.passed
    assert overlap.metadata["examples"].value == "- `どの文書にもある同じ行です。`"
    assert overlap.metadata["overlap_fraction"].value == pytest.approx(1 / 3)
    assert evaluations[("cc100_ja_validation", "line_counts")].passed  # only the overlap is wrong
    assert _materialised(result) == {"cc100_ja_raw", "cc100_ja_train", "cc100_ja_validation"}
    # Not started at all (the tokenizer they need is not in this store either, which would
    # make them fail if they were started).
    assert _started(result) == {"cc100_ja_raw", "cc100_ja_corpus", "cc100_ja_split_checks"}
    assert [e.step_key for e in result.get_step_failure_events()] == ["cc100_ja_split_checks"]


def test_deduplicated_split_shares_no_line(tmp_path):
    # The same corpus with dedup (the default): the shared line stays in its first document only.
    ops = ["cc100_ja_raw", "cc100_ja_corpus"]
    overrides = {"cc100_ja_raw": {"url": _shared_line_corpus(tmp_path).as_uri()},
                 "cc100_ja_corpus": {"max_validation_lines": 60, "validation_doc_fraction": 0.3}}
    with DagsterInstance.ephemeral() as instance:
        result = _materialize(tmp_path / "home", instance, ["cc100_ja_raw", "cc100_ja_train", "cc100_ja_validation"],
                              _run_config(ops, overrides))
        metadata = {name: value.value for name, value in _metadata(instance, "cc100_ja_validation").items()}
    assert result.success
    evaluations = _evaluations(result)
    assert all(e.passed for e in evaluations.values())
    overlap = evaluations[("cc100_ja_validation", "no_train_overlap")].metadata
    assert overlap["overlap_lines"].value == 0 and overlap["max_overlap_fraction"].value == 0.0
    assert metadata["dedup"] is True and metadata["lines_read"] == 120
    assert metadata["dropped.lines_duplicate"] == 39 and metadata["details.lines_kept"] == 81
    assert metadata["duplicate_examples"] == [{"line": "どの文書にもある同じ行です。", "occurrences": 40}]


def test_unknown_token_limit_stops_encoding(data_run, instance):
    ops = ["wordpiece_tokenizer", "wordpiece_tokenizer_unknown_token_rate", "cc100_ja_tokens", "jawiki_tokens"]
    overrides = {"wordpiece_tokenizer_unknown_token_rate": {"max_unk_rate": 0.001}}
    result = _materialize(data_run["home"], instance, ["wordpiece_tokenizer", "cc100_ja_tokens", "jawiki_tokens"],
                          _run_config(ops, overrides))
    assert not result.success
    check = _evaluations(result)[("wordpiece_tokenizer", "unknown_token_rate")]
    assert not check.passed and "above max_unk_rate 0.10%" in check.description
    assert "`" in check.metadata["top_unknown_words"].value
    assert _materialised(result) == {"wordpiece_tokenizer"}
    assert _started(result) == {"wordpiece_tokenizer", "wordpiece_tokenizer_unknown_token_rate"}


def test_training_checks_pass_then_a_failing_stage1_check_stops_stage2(data_run, instance):
    ops = ["bert_stage1_cc100", "bert_stage1_cc100_loss_checks", "bert_stage2_jawiki",
           "bert_stage2_jawiki_loss_checks"]
    selection = ["bert_stage1_cc100", "bert_stage2_jawiki"]
    quick = {"bert_stage1_cc100": QUICK_TRAINING, "bert_stage2_jawiki": QUICK_TRAINING}
    result = _materialize(data_run["home"], instance, selection, _run_config(ops, quick))
    assert result.success
    evaluations = _evaluations(result)
    assert len(evaluations) == 4 and all(e.passed for e in evaluations.values())
    improvement = evaluations[("bert_stage2_jawiki", "beats_untrained_model")].metadata["improvement_nats"].value
    assert improvement > 0

    stage2 = _metadata(instance, "bert_stage2_jawiki")
    assert stage2["trained_on"] == MetadataValue.asset(AssetKey("jawiki_tokens"))
    assert stage2["trained_on_manifest_sha256"].value == _metadata(instance, "jawiki_tokens")["manifest_sha256"].value
    assert stage2["initialised_from"] == MetadataValue.asset(AssetKey("bert_stage1_cc100"))
    assert stage2["initialised_from_manifest_sha256"].value == _metadata(
        instance, "bert_stage1_cc100")["manifest_sha256"].value
    assert stage2["tokenizer"] == MetadataValue.asset(AssetKey("wordpiece_tokenizer"))
    assert Path(stage2["path"].value).is_dir()
    curve = stage2["loss_curve"].value
    assert curve.startswith("![loss curve](data:image/png;base64,")
    assert base64.b64decode(curve[len("![loss curve](data:image/png;base64,"):-1]).startswith(b"\x89PNG")

    before = instance.get_latest_materialization_event(AssetKey("bert_stage2_jawiki")).run_id
    impossible = {**quick, "bert_stage1_cc100_loss_checks": {"min_improvement": 1000.0}}
    result = _materialize(data_run["home"], instance, selection, _run_config(ops, impossible))
    assert not result.success
    evaluations = _evaluations(result)
    assert not evaluations[("bert_stage1_cc100", "beats_untrained_model")].passed
    assert evaluations[("bert_stage1_cc100", "losses_finite")].passed
    assert _materialised(result) == {"bert_stage1_cc100"}
    assert _started(result) == {"bert_stage1_cc100", "bert_stage1_cc100_loss_checks"}
    assert instance.get_latest_materialization_event(AssetKey("bert_stage2_jawiki")).run_id == before
