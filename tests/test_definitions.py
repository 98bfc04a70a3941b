"""The code location loads: every asset, job, pool and tag the README promises is there."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap

from dagster import AssetKey

from tinyplm_assets.assets.models import GPU_OP_TAGS
from tinyplm_assets.definitions import defs

ASSETS = {
    "cc100_ja_raw", "jawiki_raw", "cc100_ja_train", "cc100_ja_validation", "jawiki_train",
    "jawiki_validation", "tokenizer_sample", "wordpiece_tokenizer", "cc100_ja_tokens", "jawiki_tokens",
    "bert_stage1_cc100", "bert_stage2_jawiki", "jglue_jsts_raw", "jglue_jcommonsenseqa_raw", "mlm_eval_set",
    "bert_stage1_cc100_eval", "bert_stage2_jawiki_eval", "bert_control_eval", "bert_release",
}
TRAINING = {"bert_stage1_cc100", "bert_stage2_jawiki"}
EVALUATION = {"mlm_eval_set", "bert_stage1_cc100_eval", "bert_stage2_jawiki_eval", "bert_control_eval", "bert_release"}


def _graph():
    return defs.resolve_asset_graph()


def test_every_asset_is_defined_with_a_description_owner_and_group():
    graph = _graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == ASSETS
    for name in ASSETS:
        node = graph.get(AssetKey(name))
        assert node.description, f"{name} has no description"
        assert "team:tinyplm" in node.owners, f"{name} has no owner"
        assert node.group_name in {"sources", "corpora", "tokenizer", "tokens", "training", "evaluation"}, name


def test_dependencies_follow_the_pipeline():
    graph = _graph()

    def parents(name):
        return {key.to_user_string() for key in graph.get(AssetKey(name)).parent_keys}

    assert parents("cc100_ja_train") == {"cc100_ja_raw"}
    assert parents("tokenizer_sample") == {"jawiki_train"}
    assert parents("cc100_ja_tokens") == {"cc100_ja_train", "cc100_ja_validation", "wordpiece_tokenizer"}
    assert parents("bert_stage1_cc100") == {"cc100_ja_tokens", "wordpiece_tokenizer"}
    assert parents("bert_stage2_jawiki") == {"bert_stage1_cc100", "jawiki_tokens", "wordpiece_tokenizer"}
    jglue = {"mlm_eval_set", "jglue_jsts_raw", "jglue_jcommonsenseqa_raw"}
    assert parents("mlm_eval_set") == {"cc100_ja_tokens", "jawiki_tokens", "wordpiece_tokenizer"}
    assert parents("bert_stage1_cc100_eval") == jglue | {"bert_stage1_cc100"}
    assert parents("bert_stage2_jawiki_eval") == parents("bert_control_eval") == jglue | {"bert_stage2_jawiki"}
    assert {"bert_stage1_cc100_eval", "bert_stage2_jawiki_eval", "bert_control_eval"} <= parents("bert_release")


def test_training_assets_share_the_gpu_pool_and_carry_the_gpu_request():
    graph = _graph()
    on_gpu = TRAINING | {"bert_stage1_cc100_eval", "bert_stage2_jawiki_eval", "bert_control_eval"}
    for name in on_gpu:  # fine-tuning shares the pool and the request with training
        node = graph.get(AssetKey(name))
        assert node.pools == {"gpu"}
    for name in ASSETS - on_gpu:
        assert not graph.get(AssetKey(name)).pools
    job = defs.resolve_job_def("train_models")
    k8s = json.loads(job.tags["dagster-k8s/config"])
    assert k8s["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert GPU_OP_TAGS["tinyplm/gpu"] == job.tags["tinyplm/gpu"] == "1"


def test_jobs_cover_the_graph():
    def selected(job_name):
        job = defs.resolve_job_def(job_name)
        return {key.to_user_string() for key in job.asset_layer.selected_asset_keys}

    assert selected("pretrain_all") == ASSETS
    assert selected("train_models") == TRAINING
    assert selected("evaluate_models") == EVALUATION
    assert selected("prepare_data") == ASSETS - TRAINING - EVALUATION


def test_every_asset_starts_with_the_run_preflight():
    # The preflight is explicit (tinyplm_assets/preflight.py): an asset that skipped it would
    # start its work with settings nobody checked.
    for assets_def in defs.assets:
        function = ast.parse(textwrap.dedent(inspect.getsource(assets_def.op.compute_fn.decorated_fn))).body[0]
        body = function.body[1:] if ast.get_docstring(function) else function.body
        assert ast.unparse(body[0]) == "check_run(context)", f"{assets_def.op.name} does not start with it"


def test_a_training_stage_spec_crosses_to_the_torchrun_ranks_intact(tmp_path):
    from tinyplm_assets.train_worker import StageSpec
    from tinyplm_lib.training.stage import RuntimeOptions, StageOptions

    options = StageOptions(model_config=tmp_path / "model.json", training_args=tmp_path / "args.json",
                           init_from=tmp_path / "stage1", overrides={"max_steps": 8})
    spec = StageSpec(tmp_path / "train", tmp_path / "validation", tmp_path / "tok", tmp_path / "out", options,
                     RuntimeOptions(precision="fp32", dataloader_workers=0), "checkpoints/bert_stage1_cc100",
                     storage={"home": str(tmp_path), "s3_bucket": None}, launcher_pid=4321)
    assert StageSpec.from_json(spec.to_json()) == spec
    in_process = dataclasses.replace(spec, storage=None, launcher_pid=None,
                                     options=dataclasses.replace(options, init_from=None))
    assert StageSpec.from_json(in_process.to_json()) == in_process
