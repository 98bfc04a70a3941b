"""A training asset configured for 2 processes runs under torchrun, launched through Dagster Pipes.

The upstream artifacts (demo JaWiki token shards and tokenizer, built with the library) are
published into a local store under the keys the assets use; then `bert_stage1_cc100` alone is
materialised with `distributed.processes_per_node: 2`. Rank 0's log lines must reach the run's event log,
its metrics must come back as the materialisation's metadata, and the stored folder must be a
model `AutoModelForMaskedLM` loads.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tinyplm_lib.store.artifacts import LocalArtifactStore, artifact_key

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def publish_inputs(data: Path, home: Path):
    """The stage's upstream artifacts (conftest's `data`) in a local store under `home`; its storage resource."""
    from tinyplm_assets.resources import ArtifactStorage

    store = LocalArtifactStore(home / "artifacts")
    store.publish(artifact_key(["cc100_ja_tokens"]), data / "shards", move=False)
    store.publish(artifact_key(["wordpiece_tokenizer"]), data / "tok", move=False)
    return ArtifactStorage(home=str(home))


def materialise_stage(storage, stage: dict, *, raise_on_error: bool = True):
    """`bert_stage1_cc100` alone with `stage` as its config: (the result, the run's log lines)."""
    from dagster import AssetSelection, DagsterInstance, load_assets_from_modules, materialize

    from tinyplm_assets.assets import corpora, models, sources, tokenizer, tokens
    from tinyplm_assets.resources import ArtifactIOManager

    with DagsterInstance.ephemeral() as instance:
        result = materialize(
            load_assets_from_modules([sources, corpora, tokenizer, tokens, models]),
            selection=AssetSelection.assets("bert_stage1_cc100"),
            resources={"storage": storage, "io_manager": ArtifactIOManager(storage=storage)},
            run_config={"ops": {"bert_stage1_cc100": {"config": stage}}},
            instance=instance, raise_on_error=raise_on_error,
        )
        return result, [entry.user_message for entry in instance.all_logs(result.run_id)]


def test_stage1_with_two_processes_reports_rank0_metadata_through_pipes(data, tmp_path):
    from transformers import AutoModelForMaskedLM

    home = tmp_path / "home"
    stage = {"model_config_path": str(REPO_ROOT / "configs/model/bert-demo.json"),
             "training_args_path": str(REPO_ROOT / "configs/train/demo-stage1.json"),
             "max_seq_length": 64, "max_steps": 8, "per_device_train_batch_size": 4,
             "runtime": {"dataloader_workers": 0, "precision": "fp32"},
             "distributed": {"processes_per_node": 2}}
    result, logs = materialise_stage(publish_inputs(data, home), stage)
    assert result.success

    (materialization,) = result.asset_materializations_for_node("bert_stage1_cc100")
    metadata = {key: value.value for key, value in materialization.metadata.items()}
    assert metadata["processes"] == 2
    assert metadata["global_step"] == 8
    assert metadata["device"] == "cpu"
    assert metadata["eval_loss"] < metadata["initial_eval_loss"]
    assert "loss_curve" in metadata
    assert any("torch.distributed.run" in line and "--nproc-per-node=2" in line for line in logs)
    assert any("x 2 processes" in line for line in logs), "rank 0's log lines come back through Pipes"

    stored = home / "artifacts" / "bert_stage1_cc100"
    model = AutoModelForMaskedLM.from_pretrained(str(stored))
    assert model.config.vocab_size == len((data / "tok" / "vocab.txt").read_text(encoding="utf-8").splitlines())
    assert not list((home / "artifacts" / "checkpoints").rglob("step-*")), "checkpoints cleared after publishing"
