"""Local artifact store: atomic publish, manifest written last, verification on load."""

from __future__ import annotations

import json

import pytest

from tinyplm_lib.errors import StorageError
from tinyplm_lib.files import sha256_file
from tinyplm_lib.layout import MANIFEST_FILE
from tinyplm_lib.store.artifacts import LocalArtifactStore, artifact_key


def _staged(store: LocalArtifactStore, files: dict[str, bytes]):
    staging = store.staging_dir("t")
    for name, data in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(data)
    return staging


def test_artifact_key_from_asset_key_and_partition():
    assert artifact_key(["bert_stage1_cc100"]) == "bert_stage1_cc100"
    assert artifact_key(["tokens", "cc100"], "2024") == "tokens/cc100/partition=2024"
    for bad in (["..", "x"], ["a/b"], [".hidden"], [""]):
        with pytest.raises(StorageError):
            artifact_key(bad)


def test_publish_writes_manifest_and_load_verifies(tmp_path):
    store = LocalArtifactStore(tmp_path)
    staging = _staged(store, {"a.txt": b"hello", "sub/b.bin": b"\x00" * 1000})
    stored = store.publish("thing", staging)
    assert not staging.exists(), "staging inside the store is moved, not copied"
    manifest = json.loads((stored.path / MANIFEST_FILE).read_text())
    assert [f["path"] for f in manifest["files"]] == ["a.txt", "sub/b.bin"]
    assert manifest["files"][0]["sha256"] == sha256_file(stored.path / "a.txt")
    assert stored.num_bytes == 1005
    assert store.load("thing").path == tmp_path.resolve() / "thing"


def test_republish_replaces_old_version_whole(tmp_path):
    store = LocalArtifactStore(tmp_path)
    store.publish("thing", _staged(store, {"old.txt": b"1"}))
    store.publish("thing", _staged(store, {"new.txt": b"2"}))
    loaded = store.load("thing").path
    assert sorted(p.name for p in loaded.iterdir()) == [MANIFEST_FILE, "new.txt"]


def test_external_source_is_copied_not_moved(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.txt").write_text("x")
    store.publish("thing", outside)
    assert (outside / "x.txt").exists()
    assert (store.load("thing").path / "x.txt").read_text() == "x"


def test_missing_manifest_means_no_artifact(tmp_path):
    store = LocalArtifactStore(tmp_path)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "data.txt").write_text("partial")
    assert not store.exists("half")
    with pytest.raises(StorageError, match="never completely written"):
        store.load("half")
    with pytest.raises(StorageError, match="not found"):
        store.load("absent")


def test_corruption_and_truncation_are_detected(tmp_path):
    store = LocalArtifactStore(tmp_path)
    stored = store.publish("thing", _staged(store, {"a.txt": b"hello world"}))
    (stored.path / "a.txt").write_bytes(b"hello WORLD")
    with pytest.raises(StorageError, match="sha256"):
        store.load("thing")
    (stored.path / "a.txt").write_bytes(b"hello")
    with pytest.raises(StorageError, match="size"):
        store.load("thing")
    (stored.path / "a.txt").unlink()
    with pytest.raises(StorageError, match="missing"):
        store.load("thing")


def test_leftovers_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    store = LocalArtifactStore(tmp_path)
    stored = store.publish("thing", _staged(store, {"a.txt": b"kept"})).manifest
    mine = _staged(store, {"half.txt": b"ours, still being written"})
    dead = tmp_path / ".staging" / "t-000000000000"  # no lock file: no live owner
    dead.mkdir()
    (dead / "sentences.txt").write_text("half-written by a crashed run")
    (tmp_path / ".incoming" / "abc").mkdir(parents=True)
    (tmp_path / ".trash" / "old").mkdir(parents=True)
    # Another live process holds a staging dir: its lock says so.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from tinyplm_lib.store.artifacts import LocalArtifactStore; "
        "print(LocalArtifactStore(Path(sys.argv[1])).staging_dir('other'), flush=True); time.sleep(60)"),
        str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        theirs = Path(holder.stdout.readline().strip())
        fresh = store.staging_dir("t")
        assert list(fresh.iterdir()) == []
        assert not dead.exists() and not (tmp_path / ".incoming" / "abc").exists()
        assert not any((tmp_path / ".trash").iterdir())
        assert (mine / "half.txt").exists() and theirs.is_dir()
    finally:
        holder.kill()
        holder.wait()
    assert [p for p in store.remove_leftovers() if p.name.startswith("other-")] == [theirs]
    assert not theirs.exists() and mine.exists()
    assert store.load("thing").manifest == stored


def test_publish_swaps_in_the_new_version_and_releases_its_staging_dir(tmp_path):
    from tinyplm_lib.store import scratch

    store = LocalArtifactStore(tmp_path)
    store.publish("thing", _staged(store, {"v.txt": b"1"}))
    staging = _staged(store, {"v.txt": b"2"})
    assert str(staging) in scratch._CLAIMS
    store.publish("thing", staging)
    assert str(staging) not in scratch._CLAIMS and not staging.with_name(staging.name + ".lock").exists()
    assert (store.load("thing").path / "v.txt").read_bytes() == b"2"
    assert sorted(p.name for p in (tmp_path / ".incoming").iterdir()) == []
    assert not (tmp_path / ".trash").exists(), "swapped in place, nothing moved to the trash"
