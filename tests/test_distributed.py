"""Two-process data-parallel training on CPU (gloo) keeps the single-process contract.

`torchrun` starts 2 real processes on 127.0.0.1. With dropout off and fp32, 2 processes with a
per-device batch of 4 must compute the same updates as 1 process with a batch of 8: same global
step, same losses (to float rounding), one model folder written by rank 0. The Dagster path
(torchrun launched from the asset through Dagster Pipes) is in test_distributed_asset.py, two
nodes (a c10d rendezvous) in test_multinode.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tinyplm_lib.errors import ConfigError
from tinyplm_lib.training.distributed import loopback_env, torchrun_command
from tinyplm_lib.training.stage import RuntimeOptions, StageOptions, train_stage

from test_training import ARGS, MODEL

pytestmark = pytest.mark.slow

WORKER = """
import json, sys, time
from pathlib import Path
from tinyplm_lib.training import distributed
from tinyplm_lib.training.checkpoints import LocalCheckpointSink
from tinyplm_lib.training.stage import RuntimeOptions, StageOptions, train_stage
data, out, model, args, batch = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
steps, pace = int(sys.argv[6]), float(sys.argv[7])
world = distributed.from_env()
distributed.exit_with_parent()  # torchrun's agent: killing it must take the workers down too
options = StageOptions(model_config=model, training_args=args, max_seq_length=64,
                       overrides={"max_steps": steps, "logging_steps": 3, "per_device_train_batch_size": batch,
                                  "save_steps": 5})
metrics = train_stage(data / "shards" / "train", data / "shards" / "validation", data / "tok", out, options,
                      print, runtime=RuntimeOptions(precision="fp32", dataloader_workers=0), world=world,
                      checkpoints=LocalCheckpointSink(out.parent / "ckpt"), on_step=lambda step: time.sleep(pace))
(out.parent / f"rank{world.rank}.json").write_text(json.dumps(metrics))
distributed.shutdown()
"""


@pytest.fixture(scope="module")
def no_dropout(tmp_path_factory) -> Path:
    """The demo model without dropout, so processes differ only by float rounding."""
    config = json.loads(MODEL.read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    path = tmp_path_factory.mktemp("model") / "bert-demo-no-dropout.json"
    path.write_text(json.dumps(config))
    return path


ENV = dict(os.environ, **loopback_env("127.0.0.1"), PYTHONUNBUFFERED="1")


def _command(tmp_path: Path, data: Path, out: Path, model: Path, *, steps: int, pace: float = 0.0) -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return torchrun_command(2, [str(script), str(data), str(out), str(model), str(ARGS), "4", str(steps), str(pace)])


def test_a_node_of_several_joins_a_c10d_rendezvous_and_binds_loopback_on_a_loopback_endpoint():
    node = torchrun_command(2, ["-m", "worker"], nodes=3, rdzv_endpoint="127.0.0.1:29400", rdzv_id="run-1",
                            rdzv_host=False, python="python")
    assert node == ["python", "-m", "torch.distributed.run", "--nnodes=3", "--nproc-per-node=2",
                    "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:29400", "--rdzv-id=run-1",
                    "--rdzv-conf=is_host=0", "--local-addr=127.0.0.1", "-m", "worker"]
    pod = torchrun_command(1, ["-m", "worker"], nodes=2, rdzv_endpoint="head-0.tinyplm:29400", rdzv_id="run-1")
    assert not any(arg.startswith(("--master", "--local-addr", "--rdzv-conf")) for arg in pod)
    with pytest.raises(ConfigError, match="distributed.rdzv_endpoint"):
        torchrun_command(1, ["w"], nodes=2, rdzv_endpoint="head-0", rdzv_id="run-1")
    with pytest.raises(ConfigError, match="distributed.rdzv_id"):
        torchrun_command(1, ["w"], nodes=2, rdzv_endpoint="head-0:29400")


def _options(model: Path, batch: int) -> StageOptions:
    return StageOptions(model_config=model, training_args=ARGS, max_seq_length=64,
                        overrides={"max_steps": 12, "logging_steps": 3, "per_device_train_batch_size": batch})


def test_two_gloo_processes_match_one_process_with_twice_the_batch(data, no_dropout, tmp_path):
    single = train_stage(data / "shards" / "train", data / "shards" / "validation", data / "tok",
                         tmp_path / "single", _options(no_dropout, 8), runtime=RuntimeOptions(
                             precision="fp32", dataloader_workers=0))

    out = tmp_path / "ddp" / "model"
    done = subprocess.run(_command(tmp_path, data, out, no_dropout, steps=12), capture_output=True, text=True,
                          env=ENV, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rank0 = json.loads((tmp_path / "ddp" / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "ddp" / "rank1.json").read_text())
    assert rank1 == {}, "only rank 0 reports metrics"
    assert rank0["processes"] == 2 and single["processes"] == 1
    assert rank0["global_step"] == single["global_step"] == 12
    assert rank0["tokens_seen"] == single["tokens_seen"]
    assert rank0["initial_eval_loss"] == pytest.approx(single["initial_eval_loss"], rel=1e-6)
    for ours, theirs in zip(rank0["history"], single["history"], strict=True):
        assert ours["step"] == theirs["step"]
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=2e-4)
    assert rank0["eval_loss"] == pytest.approx(single["eval_loss"], rel=2e-4)
    assert rank0["eval_loss"] < rank0["initial_eval_loss"]
    # One standard model folder, written by rank 0; checkpoints cleared once it was written.
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()
    assert not list((tmp_path / "ddp" / "ckpt").glob("step-*"))
    assert "device cpu (fp32) x 2 processes" in done.stdout


def test_two_processes_killed_midway_resume_from_the_checkpoint(data, no_dropout, tmp_path):
    """SIGKILL torchrun's agent once a checkpoint exists: its workers (in sessions of their own)
    must exit too, and the re-run resumes from the checkpoint."""
    out = tmp_path / "ddp" / "model"
    victim = subprocess.Popen(_command(tmp_path, data, out, no_dropout, steps=20, pace=0.3), env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "ddp" / "ckpt").glob("step-*")):
        assert victim.poll() is None, victim.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    workers = psutil.Process(victim.pid).children(recursive=True)
    assert len(workers) == 2
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    _gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers outlived torchrun: {alive}"
    assert not (out / "metrics.json").exists()

    done = subprocess.run(_command(tmp_path, data, out, no_dropout, steps=20), capture_output=True, text=True,
                          env=ENV, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "rank0.json").read_text())
    assert metrics["global_step"] == 20 and metrics["processes"] == 2
    assert metrics["resumed_from_step"] in (5, 10, 15), done.stdout[-3000:]
    assert "resumed from" in done.stdout
