"""Asset locks (tinyplm_lib/store/locks.py) between real processes: a lock file locally, a lease on moto_server.

A second holder is refused with a LockHeld naming the asset, the lock and the holder (run, host, pid,
since); a holder killed by SIGKILL frees it at once; an S3 lease with no heartbeat for its ttl is taken
over, and its old holder then refuses to publish (LockLost).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import asset, materialize

from tinyplm_assets.preflight import check_run
from tinyplm_assets.resources import ArtifactIOManager, ArtifactStorage
from tinyplm_lib.layout import MANIFEST_FILE
from tinyplm_lib.store import locks
from tinyplm_lib.store.artifacts import LocalArtifactStore
from tinyplm_lib.store.locks import LockHeld, LockLost
from tinyplm_lib.store.s3 import S3ArtifactStore

from conftest import REPO_ROOT
from s3_server import ACCESS_KEY, REGION, SECRET_KEY, MotoServer

BUCKET = "tinyplm-locks-test"
KEY = "cc100_ja_train"
# A child process that takes one lock, says so, and waits for `<ready>.go`; then it reports check().
HOLDER = """
import json, pathlib, sys, time
spec = json.loads(sys.argv[1])
if spec["kind"] == "local":
    from tinyplm_lib.store.artifacts import LocalArtifactStore
    store = LocalArtifactStore(pathlib.Path(spec["root"]))
else:
    import boto3
    from tinyplm_lib.store.s3 import S3ArtifactStore
    store = S3ArtifactStore(pathlib.Path(spec["root"]), boto3.client("s3", endpoint_url=spec["endpoint"]),
                            spec["bucket"], spec["prefix"])
    store.lease_ttl_s = spec["ttl"]
lock = store.lock(spec["key"], spec["run_id"])
lock.acquire()
ready = pathlib.Path(spec["ready"])
ready.write_text("held")
while not ready.with_suffix(".go").exists():
    time.sleep(0.02)
try:
    lock.check()
    print("still held")
except Exception as exc:
    print(type(exc).__name__, exc)
"""


@pytest.fixture(scope="module")
def server():
    with MotoServer() as s3:
        s3.create_bucket(BUCKET)
        yield s3


@pytest.fixture
def s3_store(server, tmp_path, request):
    def make(cache: str = "cache") -> S3ArtifactStore:
        return S3ArtifactStore(tmp_path / cache, server.client(), BUCKET, f"t/{request.node.name}")
    return make


def holder_command(store, run_id: str, ready: Path, key: str = KEY, ttl: float = locks.LEASE_TTL_S):
    """The command and environment of a child taking `key`'s lock (its own store object, same root or bucket)."""
    spec = {"kind": "local", "root": str(store.root), "key": key, "run_id": run_id, "ready": str(ready)}
    env = dict(os.environ)
    if isinstance(store, S3ArtifactStore):
        spec.update(kind="s3", endpoint=store.endpoint, bucket=store.bucket, prefix=store.prefix, ttl=ttl)
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION=REGION)
    return [sys.executable, "-c", HOLDER, json.dumps(spec)], env


def start_holder(tmp_path: Path, store, run_id: str, **options) -> subprocess.Popen:
    """A child process holding a lock in `store` until `finish_holder` (or a signal)."""
    ready = tmp_path / f"{run_id}.ready"
    command, env = holder_command(store, run_id, ready, **options)
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the holder did not take its lock"
        time.sleep(0.02)
    return process


def finish_holder(tmp_path: Path, process: subprocess.Popen, run_id: str) -> str:
    (tmp_path / f"{run_id}.go").touch()
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    return output


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def assert_names_holder(error: LockHeld, location: str, run_id: str, pid: int) -> None:
    message = str(error)
    for text in (f"asset {KEY}", location, f"run {run_id}", f"host {socket.gethostname()}", f"pid {pid}", "since "):
        assert text in message, f"{text!r} missing from: {message}"


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_holder_refuses_a_second_then_sigkill_frees_at_once(kind, tmp_path, s3_store):
    store = LocalArtifactStore(tmp_path / "store") if kind == "local" else s3_store()
    holder = start_holder(tmp_path, store, "run-a")
    location = str(store.root / ".locks" / f"{KEY}.lock") if kind == "local" else \
        f"s3://{BUCKET}/{store.prefix}/.locks/{KEY}.json"
    lock = store.lock(KEY, "run-b")
    with pytest.raises(LockHeld) as refused:
        lock.acquire()
    assert_names_holder(refused.value, location, "run-a", holder.pid)
    kill(holder)
    started = time.monotonic()
    lock.acquire()  # no waiting for a ttl: the holder's pid on this host is gone
    assert time.monotonic() - started < 5
    try:
        other = start_holder_refused(tmp_path, store)
        assert "run run-b" in other and f"pid {os.getpid()}" in other, other
    finally:
        lock.release()
    if kind == "s3":  # a release deletes the lease
        assert not store.client.list_objects_v2(Bucket=BUCKET, Prefix=f"{store.prefix}/.locks/").get("Contents")


def start_holder_refused(tmp_path: Path, store) -> str:
    """What a child process that tries to take `KEY`'s lock now prints (it is expected to fail)."""
    command, env = holder_command(store, "run-c", tmp_path / "run-c.ready")
    result = subprocess.run(command, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "LockHeld" in result.stderr, result.stdout + result.stderr
    return result.stderr


def test_same_process_other_run_is_refused_and_keeps_the_lock(tmp_path):
    """Two runs in one process: refused by the registry, and the first's kernel lock survives the attempt."""
    store = LocalArtifactStore(tmp_path / "store")
    first = store.lock(KEY, "run-a")
    first.acquire()
    try:
        with pytest.raises(LockHeld, match=f"run run-a .*pid {os.getpid()}"):
            store.lock(KEY, "run-b").acquire()
        assert "run run-a" in start_holder_refused(tmp_path, store)  # (closing a descriptor drops a POSIX lock)
    finally:
        first.release()
    second = store.lock(KEY, "run-b")
    second.acquire()
    second.release()


def test_hold_takes_all_or_none_in_sorted_order(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    holder = start_holder(tmp_path, store, "run-a", key="cc100_ja_validation")
    try:
        with pytest.raises(LockHeld, match="asset cc100_ja_validation .* run run-a"):
            locks.hold(store, ["cc100_ja_validation", KEY], "run-b")
        # cc100_ja_train (sorted first) was taken, then given back when the second was refused.
        other = start_holder(tmp_path, store, "run-c")  # it can take cc100_ja_train
        assert finish_holder(tmp_path, other, "run-c").strip() == "still held"
    finally:
        finish_holder(tmp_path, holder, "run-a")
    locks.hold(store, ["cc100_ja_validation", KEY], "run-b")
    assert sorted(lock.key for lock in locks._HELD.values() if lock.holder.run_id == "run-b") == [
        KEY, "cc100_ja_validation"]
    locks.release_run("run-b")
    assert not [lock for lock in locks._HELD.values() if lock.holder.run_id == "run-b"]


def test_s3_lease_without_heartbeat_is_taken_over_after_its_ttl(tmp_path, s3_store):
    store = s3_store()
    holder = start_holder(tmp_path, store, "run-a", ttl=2.0)
    holder.send_signal(signal.SIGSTOP)  # alive on this host, but its heartbeat stops
    try:
        lock = store.lock(KEY, "run-b")
        with pytest.raises(LockHeld, match="last heartbeat"):
            lock.acquire()
        time.sleep(3.5)  # the ttl, plus the server's whole-second LastModified
        lock.acquire()
        body = json.loads(store.client.get_object(Bucket=BUCKET, Key=lock.object)["Body"].read())
        assert (body["run_id"], body["pid"]) == ("run-b", os.getpid())
    finally:
        holder.send_signal(signal.SIGCONT)
    output = finish_holder(tmp_path, holder, "run-a")
    assert output.startswith("LockLost") and "run-a" in output and "run run-b" in output, output
    lock.release()


def test_publish_refused_when_the_lease_was_taken(tmp_path, s3_store):
    """A lease overwritten behind the holder's back: `publishing` refuses before uploading anything."""
    store = s3_store()
    locks.hold(store, [KEY], "run-a")
    lock = store.lock(KEY, "run-a")
    store.client.put_object(Bucket=BUCKET, Key=lock.object, Body=json.dumps(
        {"run_id": "run-x", "host": "elsewhere", "pid": 1, "since": "2026-12-05T00:00:00Z"}).encode())
    source = tmp_path / "source"
    source.mkdir()
    (source / "part.bin").write_bytes(bytes(range(256)) * 16)
    with pytest.raises(LockLost, match="run run-x"), locks.publishing(store, KEY, "run-a"):
        store.publish(KEY, source)
    assert not store.exists(KEY)
    assert not store.client.list_objects_v2(Bucket=BUCKET, Prefix=f"{store.prefix}/{KEY}/{MANIFEST_FILE}").get(
        "Contents")
    assert lock.location not in locks._HELD  # released (its delete, conditional on its own ETag, left run-x's lease alone)
    assert b"run-x" in store.client.get_object(Bucket=BUCKET, Key=lock.object)["Body"].read()


@pytest.mark.parametrize("fails", [False, True])
def test_a_step_holds_its_lock_until_published_or_failed(tmp_path, fails):
    """Through Dagster: held from `check_run` to the publish, and released when the step fails instead."""
    seen = {}

    @asset
    def tokenizer_sample(context, storage: ArtifactStorage) -> Path:  # (a string annotation of context is refused)
        check_run(context)
        seen["held"] = sorted(lock.key for lock in locks._HELD.values() if lock.holder.run_id == context.run_id)
        if fails:
            raise RuntimeError("the build failed")
        staging = storage.staging_dir("tokenizer_sample")
        (staging / "part.bin").write_bytes(bytes(range(256)))
        return staging

    storage = ArtifactStorage(home=str(tmp_path / "home"))
    result = materialize([tokenizer_sample], resources={"storage": storage, "io_manager": ArtifactIOManager(
        storage=storage)}, raise_on_error=False)
    assert result.success is not fails
    assert seen["held"] == ["tokenizer_sample"]
    assert not [lock for lock in locks._HELD.values() if lock.holder.run_id == result.run_id]
    assert (tmp_path / "home" / "artifacts" / ".locks" / "tokenizer_sample.lock").read_bytes() == b""
    assert (tmp_path / "home" / "artifacts" / "tokenizer_sample").is_dir() is not fails
