"""Checkpoints and resuming: an interrupted stage, run again, ends exactly like an uninterrupted one."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import get_scheduler

from tinyplm_lib.errors import ConfigError, StorageError
from tinyplm_lib.layout import MANIFEST_FILE
from tinyplm_lib.store.artifacts import build_manifest, write_manifest
from tinyplm_lib.training import loop, state
from tinyplm_lib.training.checkpoints import LocalCheckpointSink, read_checkpoint, restore_checkpoint, write_checkpoint
from tinyplm_lib.training.stage import StageOptions, train_stage

from test_training import ARGS, MODEL

CRASH_AT = 27
# Logging every 7 steps, evaluating every 15 and saving every 10 leaves running-loss sums and
# history entries half-way at each checkpoint. 6 x 3 accumulation gives 31 steps per epoch and a
# 1-micro-batch tail, so the resumed part crosses an epoch boundary.
SETTINGS = {"max_steps": 40, "logging_steps": 7, "eval_steps": 15, "save_steps": 10,
            "per_device_train_batch_size": 6, "gradient_accumulation_steps": 3}
WALL_CLOCK = {"tokens_per_s", "wall_time_s", "resumed_from_step"}


class SimulatedCrash(Exception):
    pass


class RecordingSink(LocalCheckpointSink):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.saved: list[int] = []

    def save(self, step: int, directory: Path) -> None:
        self.saved.append(step)
        super().save(step, directory)


def _crash_at(step_to_crash: int):
    def on_step(step: int) -> None:
        if step == step_to_crash:
            raise SimulatedCrash(step)
    return on_step


def _train(data: Path, out: Path, log=lambda message: None, **kwargs) -> dict:
    overrides = {**SETTINGS, **kwargs.pop("overrides", {})}
    options = StageOptions(model_config=MODEL, training_args=ARGS, max_seq_length=64, overrides=overrides)
    return train_stage(data / "shards" / "train", data / "shards" / "validation", data / "tok", out, options,
                       log, **kwargs)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run, with no checkpoints at all."""
    out = tmp_path_factory.mktemp("reference") / "out"
    return _train(data, out), out


@pytest.fixture(scope="module")
def crashed(data, tmp_path_factory):
    """A run that died at step 27: its sink, its output folder, and a pristine copy of the sink."""
    base = tmp_path_factory.mktemp("crashed")
    with pytest.raises(SimulatedCrash):
        _train(data, base / "out", checkpoints=LocalCheckpointSink(base / "checkpoints"),
               on_step=_crash_at(CRASH_AT))
    shutil.copytree(base / "checkpoints", base / "pristine")
    return base


def _assert_same_result(resumed: dict, resumed_dir: Path, reference) -> None:
    expected, expected_dir = reference
    assert resumed["global_step"] == expected["global_step"] == 40
    exact = expected["device"] == "cpu"  # GPU kernels may add in another order between runs
    assert resumed["eval_loss"] == (expected["eval_loss"] if exact else pytest.approx(expected["eval_loss"], abs=1e-6))
    strip = lambda m: {k: v for k, v in m.items() if k not in WALL_CLOCK and k != "history"}  # noqa: E731
    history = lambda m: [{k: v for k, v in h.items() if k != "elapsed_s"} for h in m["history"]]  # noqa: E731
    if exact:
        assert strip(resumed) == strip(expected)
        assert history(resumed) == history(expected)
    ours, theirs = load_file(str(resumed_dir / "model.safetensors")), load_file(str(expected_dir / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor) if exact else torch.allclose(ours[name], tensor, atol=1e-5), name


def test_crash_left_the_two_newest_checkpoints(crashed):
    sink = LocalCheckpointSink(crashed / "pristine")
    assert sorted(sink.steps()) == [10, 20]
    state = read_checkpoint(sink.latest())["state"]
    assert (state["global_step"], state["epoch"], state["next_micro_index"]) == (20, 0, 60)
    assert state["running_count"] == 18  # 6 steps of 3 micro-batches since the log at step 14


def test_rerun_resumes_and_matches_the_uninterrupted_run(data, reference, crashed):
    sink = RecordingSink(crashed / "checkpoints")
    messages: list[str] = []
    steps: list[int] = []
    resumed = _train(data, crashed / "out", log=messages.append, checkpoints=sink, on_step=steps.append)
    assert resumed["resumed_from_step"] == 20 and reference[0]["resumed_from_step"] == 0
    assert steps == list(range(21, 41))  # steps 21–27 of the dead run are redone, nothing else
    assert sink.saved == [30], "never at the last step: the output folder is the final model"
    assert any("resumed from" in m and "step-00000020" in m for m in messages)
    _assert_same_result(resumed, crashed / "out", reference)
    assert sink.latest() is None and sink.steps() == {}, "cleared after success"
    assert not (crashed / "out" / "trainer").exists()


def test_resume_on_another_machine_reads_no_pickle(data, reference, crashed, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint must never be unpickled")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)
    shutil.copytree(crashed / "pristine", tmp_path / "bucket-copy")
    resumed = _train(data, tmp_path / "fresh-out", checkpoints=LocalCheckpointSink(tmp_path / "bucket-copy"))
    assert resumed["resumed_from_step"] == 20
    _assert_same_result(resumed, tmp_path / "fresh-out", reference)


def test_changed_learning_rate_ignores_the_checkpoint(data, crashed, tmp_path):
    shutil.copytree(crashed / "pristine", tmp_path / "checkpoints")
    sink = LocalCheckpointSink(tmp_path / "checkpoints")
    messages: list[str] = []
    steps: list[int] = []
    with pytest.raises(SimulatedCrash):  # the first step tells fresh from resumed; no need to go on
        _train(data, tmp_path / "out", log=messages.append, checkpoints=sink, overrides={"learning_rate": 2e-3},
               on_step=lambda s: (steps.append(s), _crash_at(s)(s)))
    assert steps == [1]
    assert any("not resuming" in m and "learning_rate: 0.001 -> 0.002" in m for m in messages), messages
    assert sink.latest() is None, "the stale checkpoints are gone, so later saves are the newest"


def test_damaged_checkpoint_is_refused_naming_the_file(data, crashed, tmp_path):
    shutil.copytree(crashed / "pristine", tmp_path / "checkpoints")
    damaged = tmp_path / "checkpoints" / "step-00000020" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    sink = LocalCheckpointSink(tmp_path / "checkpoints")
    with pytest.raises(StorageError, match=r"step-00000020/model\.safetensors: size 1000 differs") as caught:
        _train(data, tmp_path / "out", checkpoints=sink)
    assert "delete" in str(caught.value)
    # The documented way out: delete the damaged one, and the run goes on from the one before.
    shutil.rmtree(damaged.parent)
    steps: list[int] = []
    with pytest.raises(SimulatedCrash):
        _train(data, tmp_path / "out", checkpoints=sink, on_step=lambda s: (steps.append(s), _crash_at(11)(s)))
    assert steps == [11]


def test_checkpoint_files_are_json_and_safetensors_only(crashed):
    files = [p for p in (crashed / "pristine").rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"model.safetensors", "trainer.safetensors", "trainer.json", "state.json",
                                       MANIFEST_FILE}
    for path in files:
        raw = path.read_bytes()
        assert path.suffix in {".json", ".safetensors"}, path
        assert not raw.startswith(b"PK"), f"{path} is a torch.save zip"
        if path.suffix == ".json":
            assert not raw.startswith(b"\x80"), f"{path} is a pickle"
            json.loads(raw)
        else:
            # A safetensors file opens with an 8-byte little-endian header length, whose low byte
            # may happen to be 0x80; what proves it is no pickle is the JSON header that follows.
            size = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8:8 + size])
            assert all(entry["dtype"] in {"F32", "U8", "I64"} for k, entry in header.items() if k != "__metadata__")


def test_state_round_trips_including_tied_weights_and_rng(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.out = torch.nn.Linear(3, 5)
            self.out.weight = self.embed.weight  # as BERT ties its decoder to the word embeddings

    def objects(seed):
        torch.manual_seed(seed)
        model = Tied()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)
        return model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False)

    model, optimizer, scheduler, scaler = objects(0)
    for _ in range(3):
        model.out(model.embed(torch.tensor([1, 2]))).sum().backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    write_checkpoint(tmp_path / "ck", model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                     state={"global_step": 3})
    expected_draw = torch.rand(4)
    other = objects(1)
    restore_checkpoint(read_checkpoint(tmp_path / "ck"), model=other[0], optimizer=other[1], scheduler=other[2],
                       scaler=other[3])
    assert torch.equal(torch.rand(4), expected_draw), "torch RNG restored"
    assert other[0].out.weight is other[0].embed.weight, "still tied"
    for name, tensor in model.state_dict().items():
        assert torch.equal(other[0].state_dict()[name], tensor), name
    assert other[1].state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]  # betas stay a tuple
    assert other[2].state_dict() == scheduler.state_dict()
    for index, moments in optimizer.state_dict()["state"].items():
        for key, value in moments.items():
            assert torch.equal(other[1].state_dict()["state"][index][key], value)
    # A file altered after writing is named.
    tensors = tmp_path / "ck" / "trainer.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-1] + b"\x01")
    with pytest.raises(StorageError, match=r"trainer\.safetensors: sha256 differs"):
        read_checkpoint(tmp_path / "ck")


def _fake_checkpoint(directory: Path, step: int) -> Path:
    directory.mkdir(parents=True)
    (directory / "state.json").write_text(json.dumps({"global_step": step}))
    write_manifest(directory, build_manifest(directory))
    return directory


def test_local_sink_keeps_the_newest_complete_checkpoints(tmp_path):
    sink = LocalCheckpointSink(tmp_path / "root", keep=2)
    assert sink.latest() is None
    for step in (10, 20, 30):
        source = _fake_checkpoint(tmp_path / f"scratch-{step}", step)
        sink.save(step, source)
        assert not source.exists(), "moved, not copied, on one filesystem"
    assert sorted(sink.steps()) == [20, 30]
    assert sink.latest() == tmp_path / "root" / "step-00000030"
    # Debris of a save that died half-way is never taken for a checkpoint.
    (tmp_path / "root" / "step-00000040").mkdir()
    (tmp_path / "root" / ".incoming-step-00000050-abcd").mkdir()
    assert sink.latest() == tmp_path / "root" / "step-00000030"
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    with pytest.raises(StorageError, match="write_checkpoint"):
        sink.save(50, incomplete)
    sink.save(30, _fake_checkpoint(tmp_path / "again-30", 30))  # the same step saved twice replaces it
    assert sorted(sink.steps()) == [20, 30]
    sink.clear()
    assert sink.steps() == {} and sink.latest() is None
    with pytest.raises(ConfigError, match="keep"):
        LocalCheckpointSink(tmp_path, keep=0)


def _reads_training_arguments(node: ast.AST) -> bool:
    """`args.x` or `<anything>.args.x`: a TrainingArguments field read."""
    value = getattr(node, "value", None)
    return isinstance(node, ast.Attribute) and (
        (isinstance(value, ast.Name) and value.id == "args")
        or (isinstance(value, ast.Attribute) and value.attr == "args"))


def test_fingerprint_lists_every_setting_the_loop_reads():
    # A field the stage reads but the fingerprint omits would let a changed setting resume silently.
    # Every module of the training package counts: the phases read the arguments in several.
    read = set()
    for path in sorted(Path(state.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        read |= {node.attr for node in ast.walk(tree) if _reads_training_arguments(node)}
    harmless = {"save_strategy", "save_steps", "get_warmup_steps", "to_json_string"}
    assert read - harmless <= set(state._RESULT_FIELDS), read - harmless - set(state._RESULT_FIELDS)
    assert {"learning_rate", "max_grad_norm", "logging_steps", "per_device_eval_batch_size"} <= read


def test_save_interval_accepts_a_fraction_of_the_run():
    assert loop._interval(10, 40) == 10
    assert loop._interval(0.25, 40) == 10
    assert loop._interval(0.1, 300) == 30  # 0.1 * 300 is 30.000000000000004 in floating point
    assert loop._interval(0.001, 40) == 1
    assert loop._interval(0, 40) == 0 and loop._interval(None, 40) == 0


def test_checkpoints_in_an_s3_bucket_resume_on_another_machine(data, reference, tmp_path):
    """A stage killed on one machine resumes on another from what the bucket holds."""
    from tinyplm_lib.store.s3 import S3ArtifactStore
    from tinyplm_lib.training.checkpoints import StoreCheckpointSink

    from s3_server import MotoServer

    with MotoServer() as server:
        server.create_bucket("ckpt")

        def sink(machine: str) -> StoreCheckpointSink:
            store = S3ArtifactStore(tmp_path / machine / "cache", server.client(), "ckpt", "tinyplm")
            return StoreCheckpointSink(store, "checkpoints/bert_stage1_cc100")

        with pytest.raises(SimulatedCrash):
            _train(data, tmp_path / "cpu-box" / "out", checkpoints=sink("cpu-box"), on_step=_crash_at(24))
        keys = [o["Key"] for o in server.client().list_objects_v2(Bucket="ckpt")["Contents"]]
        assert {k.split("/")[3] for k in keys} == {"step-00000010", "step-00000020"}
        resumed = _train(data, tmp_path / "gpu-box" / "out", checkpoints=sink("gpu-box"))
        assert resumed["resumed_from_step"] == 20 and resumed["global_step"] == 40
        _assert_same_result(resumed, tmp_path / "gpu-box" / "out", reference)
        assert "Contents" not in server.client().list_objects_v2(Bucket="ckpt"), "cleared after success"
