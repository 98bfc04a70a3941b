"""A training process killed with SIGKILL midway resumes from its checkpoint when run again.

The stage runs in a child process (paced by a short sleep per step so the kill lands midway);
the test kills it once a checkpoint is on disk, runs the stage again, and compares the result
with an uninterrupted run: same global step, same final evaluation loss.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyplm_lib.training.checkpoints import LocalCheckpointSink

from test_training import ARGS, MODEL

pytestmark = pytest.mark.slow

CHILD = """
import json, sys, time
from pathlib import Path
from tinyplm_lib.training.checkpoints import LocalCheckpointSink
from tinyplm_lib.training.stage import RuntimeOptions, StageOptions, train_stage
data, out, sink, pace = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
options = StageOptions(model_config=Path(sys.argv[5]), training_args=Path(sys.argv[6]), max_seq_length=64,
                       overrides={"max_steps": 60, "save_steps": 10, "logging_steps": 5})
metrics = train_stage(data / "shards" / "train", data / "shards" / "validation", data / "tok", out, options,
                      print, checkpoints=LocalCheckpointSink(sink), on_step=lambda step: time.sleep(pace),
                      runtime=RuntimeOptions(dataloader_workers=1))
print("METRICS " + json.dumps({k: metrics[k] for k in ("global_step", "eval_loss", "resumed_from_step")}))
"""


def _start(data: Path, out: Path, sink: Path, pace: float) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", CHILD, str(data), str(out), str(sink), str(pace),
                             str(MODEL), str(ARGS)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)


def _metrics(process: subprocess.Popen) -> dict:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    line = next(line for line in output.splitlines() if line.startswith("METRICS "))
    return json.loads(line[len("METRICS "):])


def test_sigkill_midway_then_rerun_finishes_like_an_uninterrupted_run(data, tmp_path):
    reference = _metrics(_start(data, tmp_path / "ref-out", tmp_path / "ref-ckpt", 0.0))
    assert reference["global_step"] == 60 and reference["resumed_from_step"] == 0

    sink = LocalCheckpointSink(tmp_path / "ckpt")
    victim = _start(data, tmp_path / "out", tmp_path / "ckpt", 0.15)
    deadline = time.monotonic() + 300
    while not sink.steps() or max(sink.steps()) < 20:
        assert victim.poll() is None, "the stage ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # the trainer and its DataLoader worker, no clean-up
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "out" / "model.safetensors").exists(), "killed before its output was written"
    saved = max(sink.steps())
    assert 20 <= saved < 60

    resumed = _metrics(_start(data, tmp_path / "out", tmp_path / "ckpt", 0.0))
    assert resumed["resumed_from_step"] == saved
    assert resumed["global_step"] == reference["global_step"] == 60
    assert resumed["eval_loss"] == pytest.approx(reference["eval_loss"], abs=1e-9)
    assert sink.steps() == {}, "checkpoints are cleared once the stage has finished"
