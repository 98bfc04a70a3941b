"""A full disk (ENOSPC) or a file-size limit (EFBIG) while writing: a DiskFullError naming the path and the
space needed, the stored version unchanged, nothing half-written left, and a re-run with room completes.

Faults are real: a child process under RLIMIT_FSIZE, or a 1 MiB tmpfs where this user may mount one
(root); where mount is refused the tmpfs tests fall back to the file-size limit rather than skip.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import itertools
import json
import lzma
import pickle
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tinyplm_lib.diskspace import SpaceNeeded, disk_errors
from tinyplm_lib.errors import DiskFullError
from tinyplm_lib.layout import SENTENCES_FILE
from tinyplm_lib.store.artifacts import LocalArtifactStore

TESTS = Path(__file__).resolve().parent
LIMIT = 128 * 1024  # RLIMIT_FSIZE of the children: every write below needs more in one file


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (unmounted after the test), or None where mount is refused (not root)."""
    folder = tmp_path / "fs"
    folder.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                              check=False)
    except OSError:  # no mount command
        done = None
    if done is None or done.returncode:
        yield None
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _files(folder: Path, count: int, size: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"part-{i}.bin").write_bytes(hashlib.sha256(f"{seed}-{i}".encode()).digest() * (size // 32))
    return folder


def _publish(root: str, key: str, source: str) -> None:
    LocalArtifactStore(Path(root)).publish(key, Path(source))


def _corpus_step(root: str, corpus: str, raw: str, settings: dict) -> None:
    """Staging dirs -> corpus build -> publish of both splits, as the corpus assets do."""
    from tinyplm_lib.corpora.cc100 import Cc100Settings, build_cc100_corpus
    from tinyplm_lib.corpora.jawiki import JawikiSettings, build_jawiki_corpus

    store = LocalArtifactStore(Path(root))
    staged = {split: store.staging_dir(f"{corpus}_{split}") for split in ("train", "validation")}
    build, options = ((build_cc100_corpus, Cc100Settings) if corpus == "cc100" else
                      (build_jawiki_corpus, JawikiSettings))
    build(Path(raw), staged["train"] / SENTENCES_FILE, staged["validation"] / SENTENCES_FILE, options(**settings),
          workers=1)
    for split, path in staged.items():
        store.publish(f"{corpus}_{split}", path)


JOBS = {"publish": _publish, "corpus_step": _corpus_step}


def _child() -> None:
    """Entry point of the children `_in_child` starts: one job; its DiskFullError printed as JSON."""
    try:
        JOBS[sys.argv[1]](**json.loads(sys.argv[2]))
    except DiskFullError as exc:
        print(json.dumps({"message": str(exc), "path": exc.path, "needed": exc.needed, "limit": exc.limit}))
        return
    print(json.dumps({"message": None}))


def _in_child(job: str, limit: int | None, **args) -> dict:
    """`job(**args)` in a child process, under RLIMIT_FSIZE `limit` (None: none): its DiskFullError."""
    def lower_limit() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_disk_full; test_disk_full._child()"
    done = subprocess.run([sys.executable, "-c", code, job, json.dumps(args)], capture_output=True, text=True, check=False,
                          preexec_fn=lower_limit, timeout=300, cwd=TESTS.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def _assert_names(error: dict, path: Path, fault: str, needed: tuple[float, float], limit: int | None) -> None:
    message = error["message"]
    assert message is not None, "the write succeeded"
    assert str(path) in message and fault in message, message
    assert needed[0] <= error["needed"] <= needed[1] and f"{error['needed']:,} bytes" in message, message
    assert "free on that filesystem" in message, message
    if limit is not None:
        assert error["limit"] == limit and f"{limit:,} bytes" in message, message


def _scratch_bytes(root: Path) -> list[Path]:
    """Files with bytes in a store's scratch folders, and temporaries or work folders anywhere."""
    found = [p for name in (".staging", ".incoming", ".trash") for p in (root / name).rglob("*")
             if p.is_file() and p.stat().st_size]
    return found + list(root.rglob("*.tmp")) + list(root.rglob(".*work-*"))


@pytest.mark.parametrize("fault", ["ENOSPC", "EFBIG"])
def test_publish_without_room_names_path_and_size_and_keeps_the_old_version(tmp_path, small_fs, fault):
    mounted = fault == "ENOSPC" and small_fs is not None  # else the file-size limit, not a skip
    root = (small_fs if mounted else tmp_path) / "store"
    old, new = _files(tmp_path / "v1", 4, 32 * 1024, seed=1), _files(tmp_path / "v2", 8, 256 * 1024, seed=2)
    wanted = LocalArtifactStore(tmp_path / "clean").publish("thing", new).manifest
    store = LocalArtifactStore(root)
    kept = store.publish("thing", old).manifest

    error = _in_child("publish", None if mounted else LIMIT, root=str(root), key="thing", source=str(new))

    size = 8 * 256 * 1024  # a copy of `new`: exactly its bytes
    _assert_names(error, store.path_for("thing"), "ENOSPC" if mounted else "EFBIG", (size, size),
                  None if mounted else LIMIT)
    assert store.load("thing").manifest == kept
    assert _scratch_bytes(root) == []
    if mounted:
        subprocess.run(["mount", "-o", "remount,size=16m", str(small_fs)], check=True)
    assert store.publish("thing", new).manifest == wanted == store.load("thing").manifest


@pytest.mark.parametrize("dedup", [True, False])  # the limit hits the dedup spool, or the split files
def test_cc100_build_over_the_file_size_limit_keeps_the_stored_corpus(tmp_path, web_sample, dedup):
    raw = tmp_path / "cc100.txt.xz"
    with lzma.open(web_sample, "rb") as handle:
        raw.write_bytes(lzma.compress(b"".join(itertools.islice(handle, 6000)), preset=0))
    settings = {"max_lines": 100_000, "max_validation_lines": 300, "validation_doc_fraction": 0.05, "dedup": dedup}
    clean = LocalArtifactStore(tmp_path / "clean")
    _corpus_step(str(clean.root), "cc100", str(raw), settings)
    outputs = sum(clean.load(f"cc100_{split}").num_bytes for split in ("train", "validation"))
    store = LocalArtifactStore(tmp_path / "store")
    _corpus_step(str(store.root), "cc100", str(raw), {**settings, "max_lines": 2000})
    kept = {split: store.load(f"cc100_{split}").manifest for split in ("train", "validation")}
    assert outputs > 2 * LIMIT

    error = _in_child("corpus_step", LIMIT, root=str(store.root), corpus="cc100", raw=str(raw), settings=settings)

    _assert_names(error, store.root / ".staging", "EFBIG", (outputs, (4 if dedup else 1.5) * outputs), LIMIT)
    assert Path(error["path"]).name == SENTENCES_FILE
    assert {split: store.load(f"cc100_{split}").manifest for split in kept} == kept
    assert _scratch_bytes(store.root) == []
    _corpus_step(str(store.root), "cc100", str(raw), settings)  # room again: as a clean run
    for split in kept:
        assert store.load(f"cc100_{split}").manifest == clean.load(f"cc100_{split}").manifest


def test_jawiki_build_on_a_full_disk_keeps_the_stored_corpus(tmp_path, small_fs, wiki_sample):
    raw = tmp_path / "jawiki.json.gz"
    with gzip.open(wiki_sample, "rb") as handle:
        raw.write_bytes(gzip.compress(b"".join(itertools.islice(handle, 200)), mtime=0))
    settings = {"validation_fraction": 0.1}
    root = (small_fs or tmp_path) / "store"
    store = LocalArtifactStore(root)
    _corpus_step(str(root), "jawiki", str(raw), {**settings, "max_documents": 10})
    kept = {split: store.load(f"jawiki_{split}").manifest for split in ("train", "validation")}
    clean = LocalArtifactStore(tmp_path / "clean")
    _corpus_step(str(clean.root), "jawiki", str(raw), settings)
    outputs = sum(clean.load(f"jawiki_{split}").num_bytes for split in ("train", "validation"))
    assert outputs > 1 << 20  # more than the tmpfs holds

    error = _in_child("corpus_step", None if small_fs else LIMIT, root=str(root), corpus="jawiki", raw=str(raw),
                      settings=settings)

    _assert_names(error, root / ".staging", "ENOSPC" if small_fs else "EFBIG", (outputs, 4 * outputs),
                  None if small_fs else LIMIT)
    assert {split: store.load(f"jawiki_{split}").manifest for split in kept} == kept
    assert _scratch_bytes(root) == []


def test_disk_errors_leaves_other_errors_alone_and_its_error_crosses_processes(tmp_path):
    with pytest.raises(PermissionError), disk_errors(tmp_path, lambda: SpaceNeeded(1, "one byte"), "a file"):
        raise PermissionError(errno.EACCES, "denied")
    with pytest.raises(DiskFullError) as caught, \
            disk_errors(tmp_path / "out", lambda: SpaceNeeded(5 << 30, "five GiB"), "a corpus"):
        raise OSError(errno.ENOSPC, "No space left on device")
    error = caught.value
    assert str(error).startswith(f"{tmp_path / 'out'}: no space left on device (ENOSPC) while writing a corpus")
    assert "It needs about 5,368,709,120 bytes (5.0 GiB) in all (five GiB)" in str(error)
    assert error.needed == 5 << 30 and error.free is not None and error.limit is None
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.needed, copy.free) == (DiskFullError, str(error), error.needed, error.free)
