"""A training asset configured for 2 processes runs under torchrun, launched through Dagster Pipes.

The upstream artifacts (demo JaWiki token shards and tokenizer, built with the library) are
published into a local store under the keys the assets use; then `bert_stage1_cc100` alone is
materialised with `distributed.processes: 2`. Rank 0's log lines must reach the run's event log,
its metrics must come back as the materialisation's metadata, and the stored folder must be a
model `AutoModelForMaskedLM` loads.
"""

from __future__ import annotations

import pytest

from tinyplm_lib.store.artifacts import LocalArtifactStore, artifact_key

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_stage1_with_two_processes_reports_rank0_metadata_through_pipes(data, tmp_path):
    from dagster import AssetSelection, DagsterInstance, load_assets_from_modules, materialize
    from transformers import AutoModelForMaskedLM

    from tinyplm_assets.assets import corpora, models, sources, tokenizer, tokens
    from tinyplm_assets.resources import ArtifactIOManager, ArtifactStorage

    home = tmp_path / "home"
    store = LocalArtifactStore(home / "artifacts")
    store.publish(artifact_key(["cc100_ja_tokens"]), data / "shards", move=False)
    store.publish(artifact_key(["wordpiece_tokenizer"]), data / "tok", move=False)
    storage = ArtifactStorage(home=str(home))
    stage = {"model_config_path": str(REPO_ROOT / "configs/model/bert-demo.json"),
             "training_args_path": str(REPO_ROOT / "configs/train/demo-stage1.json"),
             "max_seq_length": 64, "max_steps": 8, "per_device_train_batch_size": 4,
             "runtime": {"dataloader_workers": 0, "precision": "fp32"},
             "distributed": {"processes": 2}}
    with DagsterInstance.ephemeral() as instance:
        result = materialize(
            load_assets_from_modules([sources, corpora, tokenizer, tokens, models]),
            selection=AssetSelection.assets("bert_stage1_cc100"),
            resources={"storage": storage, "io_manager": ArtifactIOManager(storage=storage)},
            run_config={"ops": {"bert_stage1_cc100": {"config": stage}}},
            instance=instance,
        )
        assert result.success
        logs = [entry.user_message for entry in instance.all_logs(result.run_id)]

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
