"""Configuration errors are caught before any expensive work, with a message naming the setting.

Five layers: Dagster's own run-config validation (unknown keys, wrong types), the run preflight
(`tinyplm_assets/preflight.py`: every asset's values and the tokenizer/model vocab agreement, when
the run's first step starts), the corpus builders (a validation budget the corpus cannot leave
room for), the library's own arguments (shard encoder, downloads: before any file, folder or
request) and the training stage's own start (`tinyplm_lib/training/arguments.py`, against the real
tokenizer, before a model is built or data read). A few seconds; nothing is trained.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import pytest
import yaml

from tinyplm_lib.corpora.cc100 import Cc100Settings, build_cc100_corpus
from tinyplm_lib.downloads.download import download
from tinyplm_lib.errors import ConfigError
from tinyplm_lib.tokens.shard_writer import encode_corpus
from tinyplm_lib.training import prepare
from tinyplm_lib.training.stage import StageOptions, train_stage

from conftest import REPO_ROOT
from http_server import FileHTTPServer

DEMO = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())
FULL = yaml.safe_load((REPO_ROOT / "configs" / "full.yaml").read_text())
MODEL = REPO_ROOT / "configs" / "model" / "bert-demo.json"
ARGS = REPO_ROOT / "configs" / "train" / "demo-stage1.json"


def _job(name: str):
    from tinyplm_assets.definitions import defs

    return defs.resolve_job_def(name)


def _assets(job_name: str) -> set[str]:
    return {key.to_user_string() for key in _job(job_name).asset_layer.selected_asset_keys}


def _with(profile: dict, op: str, **values) -> dict:
    """A copy of `profile` with `values` set in `op`'s config."""
    config = json.loads(json.dumps(profile))
    section = config["ops"].setdefault(op, {}).setdefault("config", {})
    section.update(values)
    return config


# --- Dagster: unknown keys and wrong types never start a run


@pytest.mark.parametrize(
    "run_config, named",
    [
        (_with(DEMO, "cc100_ja_corpus", max_line=5), "max_line"),  # a typo of max_lines
        (_with(DEMO, "bert_stage1_cc100", runtime={"precison": "bf16"}), "precison"),
        ({"ops": {"cc100_corpus": {"config": {"max_lines": 5}}}}, "cc100_corpus"),  # no such asset
        (_with(DEMO, "wordpiece_tokenizer", vocab_size="many"), "vocab_size"),
    ],
)
def test_unknown_keys_and_wrong_types_are_rejected_by_dagster(run_config, named):
    from dagster import validate_run_config
    from dagster._core.errors import DagsterInvalidConfigError

    with pytest.raises(DagsterInvalidConfigError) as info:
        validate_run_config(_job("pretrain_all"), run_config)
    assert named in str(info.value)


@pytest.mark.parametrize("profile", [DEMO, FULL], ids=["demo", "full"])
def test_the_profiles_pass_both_checks(profile):
    from dagster import validate_run_config

    from tinyplm_assets.preflight import check_run_config

    validate_run_config(_job("pretrain_all"), profile)
    check_run_config(profile, _assets("pretrain_all"))


# --- the run preflight: impossible values, named by their run-config path


@pytest.mark.parametrize(
    "op, values, setting",
    [
        ("cc100_ja_corpus", {"max_lines": 1}, "max_lines"),
        ("cc100_ja_corpus", {"max_lines": 100, "max_validation_lines": 100}, "max_validation_lines"),
        ("cc100_ja_corpus", {"validation_doc_fraction": 1.5}, "validation_doc_fraction"),
        ("cc100_ja_corpus", {"max_bad_records": -1}, "max_bad_records"),
        ("cc100_ja_corpus", {"max_record_bytes": 0}, "max_record_bytes"),
        ("cc100_ja_corpus", {"workers": -2}, "workers"),
        ("jawiki_corpus", {"validation_fraction": 1.0}, "validation_fraction"),
        ("jawiki_corpus", {"min_chars": 0}, "min_chars"),
        ("jawiki_corpus", {"min_chars": 20, "max_chars": 10}, "max_chars"),
        ("jawiki_corpus", {"max_documents": 0}, "max_documents"),
        ("tokenizer_sample", {"sample_size": 0}, "sample_size"),
        ("wordpiece_tokenizer", {"vocab_size": 15}, "vocab_size"),  # 5 specials + 10 unused
        ("wordpiece_tokenizer", {"vocab_size": 70_000}, "vocab_size"),  # ids are uint16
        ("wordpiece_tokenizer", {"limit_alphabet": 0}, "limit_alphabet"),
        ("cc100_ja_tokens", {"shard_lines": 0}, "shard_lines"),
        ("bert_stage1_cc100", {"max_seq_length": 4}, "max_seq_length"),
        ("bert_stage1_cc100", {"max_seq_length": 256}, "max_seq_length"),  # bert-demo.json: 128
        ("bert_stage1_cc100", {"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ("bert_stage1_cc100", {"max_steps": 0, "training_args_path": "configs/model/bert-demo.json"},
         "training_args"),  # a BertConfig is no TrainingArguments file
        ("bert_stage1_cc100", {"max_eval_sequences": 0}, "max_eval_sequences"),
        ("bert_stage1_cc100", {"model_config_path": "configs/model/nowhere.json"}, "model_config_path"),
        ("bert_stage2_jawiki", {"runtime": {"precision": "fp8"}}, "runtime.precision"),
        ("bert_stage2_jawiki", {"distributed": {"processes_per_node": -1}}, "distributed.processes_per_node"),
        ("bert_stage1_cc100", {"distributed": {"nodes": 0}}, "distributed.nodes"),
        ("bert_stage1_cc100", {"distributed": {"launcher": "slurm"}}, "distributed.launcher"),
        ("bert_stage1_cc100", {"distributed": {"nodes": 2, "rdzv_endpoint": "head-0"}}, "distributed.rdzv_endpoint"),
        ("bert_stage1_cc100", {"distributed": {"rdzv_id": "run-7"}}, "distributed.rdzv_id"),  # one node: static
        ("bert_stage1_cc100", {"distributed": {"nodes": 2, "launcher": "kubernetes", "processes_per_node": 1}},
         "distributed.rdzv_endpoint"),  # pods need a reachable host
        ("bert_stage1_cc100", {"distributed": {"nodes": 2, "launcher": "kubernetes", "rdzv_endpoint": "h:29400"}},
         "distributed.processes_per_node"),
        ("bert_stage1_cc100", {"distributed": {"nodes": 2, "launcher": "kubernetes", "rdzv_endpoint": "h:29400",
                                               "processes_per_node": 1}}, "distributed.kubernetes.image"),
    ],
)
def test_impossible_values_are_named_by_their_run_config_path(op, values, setting):
    from tinyplm_assets.preflight import check_run_config

    with pytest.raises(ConfigError) as info:
        check_run_config(_with(DEMO, op, **values), _assets("pretrain_all"))
    assert info.value.setting == f"ops.{op}.config.{setting}"
    assert f"ops.{op}.config.{setting}" in str(info.value)


def test_tokenizer_and_model_vocab_sizes_must_agree_when_the_run_trains_both():
    from tinyplm_assets.preflight import check_run_config

    custom = {"model_config_path": "configs/model/bert-tiny-custom.json"}  # vocab_size 32768
    mismatch = _with(_with(DEMO, "bert_stage1_cc100", **custom), "wordpiece_tokenizer", vocab_size=8000)
    with pytest.raises(ConfigError, match="sets vocab_size 32768 but the tokenizer is trained with "
                                          "vocab_size 8000") as info:
        check_run_config(mismatch, _assets("pretrain_all"))
    assert info.value.setting == "vocab_size"
    # prepare_data trains no model: its run is not failed for a training setting it does not use.
    check_run_config(mismatch, _assets("prepare_data"))
    # Equal settings pass; so does a model config without vocab_size (bert-demo.json).
    check_run_config(_with(mismatch, "wordpiece_tokenizer", vocab_size=32768), _assets("pretrain_all"))
    check_run_config(_with(DEMO, "wordpiece_tokenizer", vocab_size=8000), _assets("pretrain_all"))


def test_a_bad_training_setting_fails_the_first_step_of_a_run_before_any_download(tmp_path):
    from dagster import AssetSelection, DagsterEventType, load_assets_from_modules, materialize

    from tinyplm_assets.assets import corpora, evaluation, models, sources, tokenizer, tokens
    from tinyplm_assets.resources import ArtifactIOManager, ArtifactStorage

    storage = ArtifactStorage(home=str(tmp_path / "home"))
    run_config = _with(DEMO, "bert_stage2_jawiki", max_seq_length=4096)
    # Only the assets run here, not the asset checks the profile also configures.
    run_config["ops"] = {op: section for op, section in run_config["ops"].items() if not op.endswith("_rate")}
    result = materialize(
        load_assets_from_modules([sources, corpora, tokenizer, tokens, models, evaluation]),
        selection=AssetSelection.all(),
        resources={"storage": storage, "io_manager": ArtifactIOManager(storage=storage)},
        run_config=run_config,
        raise_on_error=False,
    )
    assert not result.success
    # Every asset's first line is the preflight: the root steps (the downloads) start and fail
    # at once; nothing downstream starts and nothing is downloaded or stored.
    started = {e.step_key for e in result.all_events if e.event_type == DagsterEventType.STEP_START}
    assert started and started <= {"cc100_ja_raw", "jawiki_raw", "jglue_jsts_raw", "jglue_jcommonsenseqa_raw"}
    failures = result.get_step_failure_events()
    assert {e.step_key for e in failures} == started
    for failure in failures:
        message = failure.event_specific_data.error.to_string()
        assert "ConfigError" in message
        assert "ops.bert_stage2_jawiki.config.max_seq_length" in message and "4096" in message
    assert not result.get_asset_materialization_events()
    assert not any(path.is_file() for path in (tmp_path / "home").rglob("*"))


# --- the corpus builder: a validation budget larger than the corpus


def test_validation_budget_not_below_the_corpus_is_named(tmp_path):
    # 60 non-empty lines in 6 documents; the budget of 60, which also sets the draw when no
    # validation_doc_fraction is given, could take every one of them.
    text = "\n\n".join("\n".join(f"文書{d}の{n}行目です。" for n in range(10)) for d in range(6)) + "\n"
    raw = tmp_path / "small.txt.xz"
    raw.write_bytes(lzma.compress(text.encode()))
    out = tmp_path / "train.txt", tmp_path / "validation.txt"
    settings = Cc100Settings(max_lines=1000, max_validation_lines=60)
    with pytest.raises(ConfigError, match="60 is not below the 60 non-empty lines") as info:
        build_cc100_corpus(raw, *out, settings, workers=1)
    assert info.value.setting == "max_validation_lines" and "small.txt.xz" in str(info.value)
    assert not any(path.exists() for path in out)
    build_cc100_corpus(raw, *out, Cc100Settings(max_lines=1000, max_validation_lines=20,
                                                validation_doc_fraction=0.5), workers=1)
    assert all(path.exists() for path in out)
    # An explicit fraction sets the draw; the budget is then only a cap (bench.preprocess's case).
    build_cc100_corpus(raw, *out, Cc100Settings(max_lines=1000, max_validation_lines=60,
                                                validation_doc_fraction=0.5), workers=1)
    assert all(path.exists() for path in out)


# --- library arguments: checked before any file is read, folder made or request sent


@pytest.mark.parametrize("workers, shard_lines, setting", [(1, 0, "shard_lines"), (0, 1000, "workers")])
def test_encoder_arguments_are_checked_before_any_file(tmp_path, workers, shard_lines, setting):
    out = tmp_path / "shards"
    # Neither the corpus nor the tokenizer exists: reading either first would be an InputError.
    with pytest.raises(ConfigError) as info:
        encode_corpus(tmp_path / "no-corpus.txt", tmp_path / "no-tokenizer", out, workers=workers,
                      shard_lines=shard_lines)
    assert info.value.setting == setting and setting in str(info.value)
    assert not out.exists()


@pytest.mark.parametrize("setting, value", [("max_retries", -1), ("timeout", 0), ("backoff", -0.5),
                                            ("chunk_size", 0), ("expected_size", -1)])
def test_download_arguments_are_checked_before_any_request(tmp_path, setting, value):
    served = tmp_path / "served"
    served.mkdir()
    (served / "data.bin").write_bytes(b"x")
    dest = tmp_path / "out" / "data.bin"
    with FileHTTPServer(served) as server:
        with pytest.raises(ConfigError) as info:
            download(server.url("data.bin"), dest, progress=False, **{setting: value})
        assert server.requests == [], f"{len(server.requests)} requests before the check"
    assert info.value.setting == setting and str(value) in str(info.value)
    assert not dest.parent.exists()


# --- the training stage's start: against the real tokenizer, before any model or data


def _tokenizer(root: Path, tokens: int, requested: int | None) -> Path:
    """A tokenizer folder as train_tokenizer leaves it, as far as these checks read it."""
    root.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + [f"t{i}" for i in range(tokens - len(specials))]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    if requested is not None:
        (root / "tinyplm_tokenizer.json").write_text(json.dumps({"requested_vocab_size": requested}))
    return root


def _model_json(path: Path, **changes) -> Path:
    config = {**json.loads(MODEL.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return path


class ModelBuilt(Exception):
    pass


@pytest.fixture
def no_model(monkeypatch):
    """Building a model raises ModelBuilt: a check that passes reaches it, one that fails must not."""
    def build_model(*args, **kwargs):
        raise ModelBuilt()
    monkeypatch.setattr(prepare, "build_model", build_model)


def _stage(tmp_path: Path, tokenizer_dir: Path, model_config: Path, **options) -> None:
    # The train and validation folders do not exist: a check that needs them would fail there.
    train_stage(tmp_path / "no-train", tmp_path / "no-validation", tokenizer_dir, tmp_path / "out",
                StageOptions(model_config=model_config, training_args=ARGS, **options))


@pytest.mark.parametrize(
    "tokens, requested, model_vocab, message",
    [
        (1900, 2000, 4096, "sets vocab_size 4096 but the tokenizer is trained with vocab_size 2000"),
        (2188, 2000, 2000, "holds 2188 tokens, more than its vocab_size 2000"),  # alphabet overflow
        (1900, None, 2000, "sets vocab_size 2000 but the tokenizer is trained with vocab_size 1900"),
    ],
)
def test_vocab_mismatch_stops_a_stage_before_any_model_is_built(tmp_path, no_model, tokens, requested,
                                                               model_vocab, message):
    tokenizer_dir = _tokenizer(tmp_path / "tok", tokens, requested)
    with pytest.raises(ConfigError, match=message) as info:
        _stage(tmp_path, tokenizer_dir, _model_json(tmp_path / "model.json", vocab_size=model_vocab))
    assert info.value.setting == "vocab_size"


@pytest.mark.parametrize("model_vocab", [None, 2000], ids=["follows the tokenizer", "equal settings"])
def test_agreeing_vocab_sizes_reach_the_model(tmp_path, no_model, model_vocab):
    tokenizer_dir = _tokenizer(tmp_path / "tok", 1900, 2000)  # a small corpus gave fewer than asked
    with pytest.raises(ModelBuilt):
        _stage(tmp_path, tokenizer_dir, _model_json(tmp_path / "model.json", vocab_size=model_vocab))


def test_sequence_length_is_checked_against_the_stage1_model_too(tmp_path, no_model):
    tokenizer_dir = _tokenizer(tmp_path / "tok", 1900, 2000)
    with pytest.raises(ConfigError, match=r"256 must lie in \[8, 128\]") as info:
        _stage(tmp_path, tokenizer_dir, MODEL, max_seq_length=256)
    assert info.value.setting == "max_seq_length"
    # Stage 2 trains the stage-1 model: its position table counts, not the JSON's.
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    (stage1 / "config.json").write_text(json.dumps({"vocab_size": 1900, "max_position_embeddings": 64}))
    with pytest.raises(ConfigError, match=r"100 must lie in \[8, 64\]"):
        _stage(tmp_path, tokenizer_dir, MODEL, max_seq_length=100, init_from=stage1)
    (stage1 / "config.json").write_text(json.dumps({"vocab_size": 1800, "max_position_embeddings": 128}))
    with pytest.raises(ConfigError, match="has vocab_size 1800 but the tokenizer") as info:
        _stage(tmp_path, tokenizer_dir, MODEL, max_seq_length=100, init_from=stage1)
    assert info.value.setting == "init_from"
    with pytest.raises(ConfigError, match="max_eval_sequences"):
        _stage(tmp_path, tokenizer_dir, MODEL, max_eval_sequences=0)
