"""Two torchrun agents as two nodes on loopback: a c10d rendezvous launched from a Dagster step.

`bert_stage1_cc100` is materialised with `distributed: {nodes: 2, processes_per_node: 1}`: the step
starts both agents on this machine (gloo, one worker each), each in its own Pipes session. With
dropout off and fp32 the two nodes with a per-device batch of 4 must train like one process with a
batch of 8. SIGKILLing node 1's agent once a checkpoint is stored must fail the step with an error
naming node 1 and leave no process behind; materialising again resumes from that checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from test_distributed import no_dropout  # noqa: F401 - a fixture: the demo model without dropout
from test_distributed_asset import materialise_stage, publish_inputs

from tinyplm_lib.layout import MANIFEST_FILE
from tinyplm_lib.training.stage import RuntimeOptions, StageOptions, train_stage

from test_training import ARGS

pytestmark = pytest.mark.slow

TWO_NODES = {"nodes": 2, "processes_per_node": 1}


def _stage(model: Path, args: Path) -> dict:
    return {"model_config_path": str(model), "training_args_path": str(args), "max_seq_length": 64,
            "per_device_train_batch_size": 4, "runtime": {"dataloader_workers": 0, "precision": "fp32"},
            "distributed": TWO_NODES}


def _training_args(tmp_path: Path, **values) -> Path:
    """The demo stage-1 arguments with `values` set (save_steps is no run-config setting)."""
    path = tmp_path / "training-args.json"
    path.write_text(json.dumps({**json.loads(ARGS.read_text()), **values}))
    return path


def _agents() -> list[psutil.Process]:
    """The torchrun agents this test process started (through the in-process Dagster step)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "torch.distributed.run" in process.cmdline():
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_two_loopback_nodes_match_one_process_with_twice_the_batch(data, no_dropout, tmp_path):  # noqa: F811
    args = _training_args(tmp_path, max_steps=12, logging_steps=3)
    single = train_stage(data / "shards" / "train", data / "shards" / "validation", data / "tok", tmp_path / "single",
                         StageOptions(model_config=no_dropout, training_args=args, max_seq_length=64,
                                      overrides={"per_device_train_batch_size": 8}),
                         runtime=RuntimeOptions(precision="fp32", dataloader_workers=0))

    home = tmp_path / "home"
    result, logs = materialise_stage(publish_inputs(data, home), _stage(no_dropout, args))
    assert result.success
    (materialization,) = result.asset_materializations_for_node("bert_stage1_cc100")
    assert materialization.metadata["processes"].value == 2
    two = json.loads((home / "artifacts" / "bert_stage1_cc100" / "metrics.json").read_text())
    assert two["processes"] == 2 and single["processes"] == 1
    assert two["global_step"] == single["global_step"] == 12
    assert two["tokens_seen"] == single["tokens_seen"]
    assert two["initial_eval_loss"] == pytest.approx(single["initial_eval_loss"], rel=1e-6)
    for ours, theirs in zip(two["history"], single["history"], strict=True):
        assert ours["step"] == theirs["step"]
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=2e-4)
    assert two["eval_loss"] == pytest.approx(single["eval_loss"], rel=2e-4)

    commands = [line for line in logs if "torch.distributed.run" in line]
    assert len(commands) == 2 and all("--nnodes=2" in line and "--rdzv-backend=c10d" in line for line in commands)
    assert len({line.split("--rdzv-id=")[1].split()[0] for line in commands}) == 1, "one rendezvous id"
    assert any(line.startswith("global rank 0 ran on node ") for line in logs)
    assert any("x 2 processes" in line for line in logs), "rank 0's log lines come back through its node's Pipes"
    assert not _agents()


def _kill_node_1_once_checkpointed(checkpoints: Path, killed: list[psutil.Process],
                                   everyone: list[psutil.Process]) -> None:
    """SIGKILL node 1's agent (it does not host the rendezvous store) once a checkpoint is complete.

    `everyone`: both agents and their workers then (the workers run in sessions of their own and
    would not show as this process's children once orphaned).
    """
    deadline = time.monotonic() + 120
    while not list(checkpoints.rglob(MANIFEST_FILE)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for agent in _agents():
        tree = [agent, *agent.children(recursive=True)]
        everyone.extend(tree)
        if "--rdzv-conf=is_host=0" in agent.cmdline():
            killed.extend(tree)
            os.kill(agent.pid, signal.SIGKILL)


def test_killing_a_node_fails_the_step_and_a_rerun_resumes_from_the_checkpoint(data, no_dropout,  # noqa: F811
                                                                               tmp_path):
    home = tmp_path / "home"
    storage = publish_inputs(data, home)
    # ~30 ms a step here: the 55 steps after the first checkpoint leave the kill time to land.
    stage = _stage(no_dropout, _training_args(tmp_path, max_steps=60, logging_steps=5, save_steps=5))
    killed: list[psutil.Process] = []
    everyone: list[psutil.Process] = []
    killer = threading.Thread(target=_kill_node_1_once_checkpointed,
                              args=(home / "artifacts" / "checkpoints", killed, everyone), daemon=True)
    killer.start()
    result, logs = materialise_stage(storage, stage, raise_on_error=False)
    killer.join()

    assert len(killed) == 2 and len(everyone) == 4, "each node: its agent and its worker"
    assert not result.success, "the stage finished before node 1 was killed"
    (failure,) = result.get_step_failure_events()
    message = failure.step_failure_data.error.message
    assert "node 1 of 2 failed: its torchrun agent exited with code -9 (SIGKILL)" in message, message
    _gone, alive = psutil.wait_procs(everyone, timeout=10)
    assert not alive, f"outlived the failed step: {alive}"
    assert not (home / "artifacts" / "bert_stage1_cc100").exists()

    result, logs = materialise_stage(storage, stage)
    assert result.success
    (materialization,) = result.asset_materializations_for_node("bert_stage1_cc100")
    metadata = {key: value.value for key, value in materialization.metadata.items()}
    assert metadata["global_step"] == 60 and metadata["processes"] == 2
    assert metadata["resumed_from_step"] in range(5, 60, 5)
    assert any("resumed from" in line for line in logs)
