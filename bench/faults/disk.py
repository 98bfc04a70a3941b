"""Disk-full scenarios of `python -m bench.faults`: ENOSPC / EFBIG during corpus, shards, checkpoint, publish.

The faults are real: a tmpfs resized to leave too little room (ENOSPC; mounting needs root) or a
process under a file-size limit (RLIMIT_FSIZE: EFBIG), the fallback where mount is refused. Each
write must end in a DiskFullError naming the path and the space needed (the estimate held against
what a clean run wrote), the stored version loadable and unchanged, no bytes left in scratch
folders, and a re-run with room again must give the bytes of a clean run.
"""

from __future__ import annotations

import itertools
import lzma
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.faults.children import child_result, run_child, start_child
from bench.faults.core import Run, ScenarioFailed, scenario
from bench.faults.lab import CC100_SETTINGS, JAWIKI_SETTINGS, Lab, seeded_files, tree_digest
from bench.faults.s3 import BUCKET
from tinyplm_lib.diskspace import tree_bytes
from tinyplm_lib.errors import DiskFullError
from tinyplm_lib.layout import MODEL_WEIGHTS_FILE, SENTENCES_FILE, SHARDS_META_FILE, TRAINER_DIR
from tinyplm_lib.store.artifacts import SCRATCH_DIRS, LocalArtifactStore, manifest_totals

ROOMY = 256 << 20  # the tmpfs once space has returned


class Room:
    """Where a write finds too little room: a tmpfs (ENOSPC) or, unmounted, a file-size limit (EFBIG)."""

    def __init__(self, folder: Path, mounted: bool, why: str = "") -> None:
        self.folder, self.mounted, self.why = folder, mounted, why  # why: the reason for a limit instead
        self.limit: int | None = None  # RLIMIT_FSIZE for the writer, when not mounted

    @property
    def fault(self) -> str:
        return "ENOSPC" if self.mounted else "EFBIG"

    def used(self) -> int:
        return shutil.disk_usage(self.folder).used

    def shrink(self, room: int, limit: int, pid: int | None = None) -> None:
        """Leave `room` bytes free on the tmpfs; unmounted, limit each file to `limit` bytes instead
        (the running child `pid`'s RLIMIT_FSIZE at once, else that of children started with it)."""
        if self.mounted:
            _mount(["-o", f"remount,size={self.used() + room}", str(self.folder)])
            return
        self.limit = limit
        if pid is not None:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    def grow(self) -> None:
        if self.mounted:
            _mount(["-o", f"remount,size={ROOMY}", str(self.folder)])
        self.limit = None

    def describe(self) -> str:
        return "a full tmpfs" if self.mounted else f"a {self.limit:,}-byte file-size limit ({self.why})"


def _mount(args: list[str]) -> str:
    """Run mount; its error ("" if none). A failed remount ends the scenario."""
    try:
        done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    except OSError as exc:  # no mount command
        return str(exc)
    if done.returncode and "remount" in args[1]:
        raise ScenarioFailed(f"mount {' '.join(args)} failed: {done.stderr.strip()}")
    return (done.stderr.strip() or f"mount exited {done.returncode}") if done.returncode else ""


@contextmanager
def small_room(lab: Lab, name: str) -> Iterator[Room]:
    """A tmpfs at a fresh folder (unmounted at the end), or that folder alone where mount is refused."""
    folder = lab.dir(name)
    refused = _mount(["-t", "tmpfs", "-o", f"size={ROOMY}", "tmpfs", str(folder)])
    mounted = not refused
    try:
        yield Room(folder, mounted, f"the fallback: mount refused, {refused}")
    finally:
        if mounted and subprocess.run(["umount", str(folder)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(folder)], check=False)


@contextmanager
def file_size_limit(limit: int | None) -> Iterator[None]:
    """This process's RLIMIT_FSIZE lowered to `limit` (None: unchanged) for an in-process write."""
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)


def _error_of(call: Callable[[], object]) -> dict:
    """The DiskFullError `call()` raises, as the `limited` job reports one."""
    try:
        call()
    except DiskFullError as exc:
        return {"error": type(exc).__name__, "message": str(exc), "path": exc.path, "needed": exc.needed,
                "free": exc.free, "limit": exc.limit}
    raise ScenarioFailed("expected a DiskFullError, but the write succeeded")


def _refused(run: Run, room: Room, error: dict, path: Path, needed: tuple[float, float]) -> None:
    """The one outcome: a DiskFullError naming `path`, the fault, the space needed (within `needed`,
    bytes) and under a file-size limit that limit."""
    run.require(error.get("error") == "DiskFullError", f"expected a DiskFullError, got {error}")
    message = error["message"]
    run.check(str(path) in message, f"the error does not name {path}: {message}")
    run.check(room.fault in message, f"the error does not say {room.fault}: {message}")
    run.check(error["needed"] is not None and f"{error['needed']:,} bytes" in message,
              f"the error does not name the space needed: {message}")
    low, high = needed
    run.check(error["needed"] is not None and low <= error["needed"] <= high,
              f"needed {error['needed']} is not within [{low:.0f}, {high:.0f}], what a clean run shows")
    if room.limit is not None:
        run.check(error["limit"] == room.limit and f"{room.limit:,} bytes" in message,
                  f"the error does not name the {room.limit}-byte limit: {message}")
    run.note(f"{room.describe()}: {message}")


def _leftovers(root: Path) -> list[str]:
    """Files holding bytes in a store's scratch folders, and temporaries anywhere under `root`."""
    found = {p for name in SCRATCH_DIRS if (root / name).is_dir() for p in (root / name).rglob("*")
             if p.is_file() and p.stat().st_size}
    found |= set(root.rglob("*.tmp")) | set(root.rglob(".*work-*"))
    return sorted(str(p.relative_to(root)) for p in found)


def _blocks(folder: Path) -> int:
    """Bytes the files under `folder` take on disk (whole blocks)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _clean_after(run: Run, room: Room, root: Path, used: int, allowed: int = 0) -> None:
    """Nothing half-written under `root`; on a tmpfs, no more taken than before but `allowed` bytes."""
    left = _leftovers(root)
    run.check(not left, f"the failed write left {left}")
    if room.mounted:
        extra = room.used() - used - allowed
        run.check(extra == 0, f"the tmpfs holds {extra:+,} bytes more than before the write")


def _corpus_full(lab: Lab, run: Run, room: Room, corpus: str, raw: Path, settings: dict, previous: dict) -> None:
    work = lab.dir(f"disk-{corpus}-work")
    args = {"inner": "corpus_step", "corpus": corpus, "raw": str(raw)}
    clean = start_child("limited", work / "clean.log", root=str(work / "clean"), settings=settings, **args)
    root = room.folder / "store"
    run_child("limited", work / "previous.log", root=str(root), settings=previous, **args)
    reference = child_result(clean, work / "clean.log")["result"]["manifests"]
    store = LocalArtifactStore(root)
    kept = {split: tree_digest(store.load(f"{corpus}_{split}").path) for split in reference}
    outputs = sum(manifest_totals(manifest)[1] for manifest in reference.values())
    # Room for the splits but not the work files beside them; a limit under the train split's size.
    room.shrink(room=outputs, limit=outputs // 4)
    used = room.used()
    error, _ = run_child("limited", work / "full.log", root=str(root), settings=settings, fsize=room.limit, **args)
    _refused(run, room, error, root / ".staging", (outputs, 4 * outputs))
    run.check(Path(error["path"]).name == SENTENCES_FILE, f"the error names {error['path']}, not a split file")
    for split, digest in kept.items():
        run.artifact(tree_digest(store.load(f"{corpus}_{split}").path) == digest,
                     f"the stored {corpus}_{split} changed after the failed build")
    _clean_after(run, room, root, used)
    room.grow()
    rerun, _ = run_child("limited", work / "rerun.log", root=str(root), settings=settings, **args)
    for split, manifest in reference.items():
        run.artifact(rerun.get("result", {}).get("manifests", {}).get(split) == manifest
                     and store.load(f"{corpus}_{split}").manifest == manifest,
                     f"the re-run's {corpus}_{split} differs from a clean run's ({rerun.get('message', '')})")
    run.note(f"clean outputs {outputs:,} bytes; re-run byte-identical")


@scenario("disk_full")
def cc100_corpus_disk_full(lab: Lab, run: Run) -> None:
    """Disk full during the cc100 corpus step: DiskFullError naming the split and the space; old version kept."""
    with small_room(lab, "disk-cc100") as room:
        _corpus_full(lab, run, room, "cc100", lab.cc100_slice(), CC100_SETTINGS,
                     {**CC100_SETTINGS, "max_lines": 20_000, "max_validation_lines": 1_000})


@scenario("disk_full")
def jawiki_corpus_file_size_limit(lab: Lab, run: Run) -> None:
    """The JaWiki step under a file-size limit (EFBIG): DiskFullError naming the limit; old version kept."""
    room = Room(lab.dir("disk-jawiki"), mounted=False, why="in a child process, RLIMIT_FSIZE")
    _corpus_full(lab, run, room, "jawiki", lab.jawiki_slice(),
                 JAWIKI_SETTINGS, {**JAWIKI_SETTINGS, "max_documents": 300})


@scenario("disk_full")
def token_shards_disk_full(lab: Lab, run: Run) -> None:
    """Disk full while encoding shards: DiskFullError naming the folder and the set's size; the re-run completes."""
    data = lab.demo_data()
    with small_room(lab, "disk-shards") as room:
        work = lab.dir("disk-shards-work")
        text = work / SENTENCES_FILE
        with lzma.open(lab.cc100_slice(), "rb") as handle:
            text.write_bytes(b"".join(itertools.islice(handle, 10_000)))
        args = {"inner": "shards", "text": str(text), "tokenizer": str(data / "tok"), "shard_lines": 2000}
        clean = start_child("limited", work / "clean.log", out=str(work / "clean"), **args)
        store = LocalArtifactStore(room.folder / "store")  # the stored version a full disk must not touch
        kept = store.publish("tokens_train", data / "shards" / "train").manifest
        reference = child_result(clean, work / "clean.log")["result"]
        total = tree_bytes(work / "clean")
        per_shard = total // reference["shards_encoded"]
        out = room.folder / "shards"
        room.shrink(room=5 * per_shard // 2, limit=per_shard // 2)  # two shards fit, the third does not
        used = room.used()
        error, _ = run_child("limited", work / "full.log", out=str(out), fsize=room.limit, **args)
        _refused(run, room, error, out, (0.67 * total, 1.5 * total))
        done = sorted(p.name for p in out.glob("shard-*.json"))
        stray = sorted(p.name for p in out.glob(".*"))
        run.check(not stray and not (out / SHARDS_META_FILE).exists(), f"half-written files stay: {stray}")
        run.artifact(store.load("tokens_train").manifest == kept, "the stored shards changed after the failed encode")
        _clean_after(run, room, out, used, allowed=_blocks(out))  # the finished shards, kept for the re-run
        room.grow()
        resumed, _ = run_child("limited", work / "rerun.log", out=str(out), **args)
        result = resumed.get("result", {})
        run.check(result.get("shards_reused") == len(done), f"re-run reused {result.get('shards_reused')}, "
                  f"{len(done)} shards were finished")
        run.artifact(tree_digest(out) == tree_digest(work / "clean"), "the re-run's shards differ from a clean run's")
        run.note(f"{len(done)} of {reference['shards_encoded']} shards finished before the fault, reused; "
                 f"set {total:,} bytes; identical")


STEPS, SAVE_STEPS = 9, 4  # checkpoints at steps 4 and 8
PACE = 0.5  # seconds a step of the run that meets the full disk: time to shrink the room after step 4


@scenario("disk_full")
def checkpoint_disk_full(lab: Lab, run: Run) -> None:
    """Disk full saving a checkpoint: DiskFullError naming it and its size; the one before stays and resumes."""
    from tinyplm_lib.training.checkpoints import LocalCheckpointSink, read_checkpoint

    data = lab.demo_data()
    with small_room(lab, "disk-checkpoint") as room:
        work = lab.dir("disk-checkpoint-work")
        args = {"inner": "train", "data": str(data), "steps": STEPS, "save_steps": SAVE_STEPS}
        clean = start_child("limited", work / "clean.log", out=str(work / "clean"),
                            checkpoints=str(work / "clean-ckpt"), pace=0.0, **args)
        sink, out = LocalCheckpointSink(room.folder / "ckpt"), room.folder / "out"
        paths = {"out": str(out), "checkpoints": str(sink.store.root)}
        process = start_child("limited", work / "full.log", pace=PACE, **paths, **args)
        # Once step 4 is saved, the room shrinks (or the child's file-size limit drops, prlimit) under
        # the run: its next save, 4 paced steps later, finds half a checkpoint free.
        run.require(_wait_for(process, lambda: SAVE_STEPS in sink.steps()), "the run ended before step 4's save")
        saved = sink.store.load(sink.steps()[SAVE_STEPS]).path
        kept, size = tree_digest(saved), tree_bytes(saved)
        weights = (saved / MODEL_WEIGHTS_FILE).stat().st_size
        room.shrink(room=size // 2, limit=3 * weights // 2, pid=process.pid)  # the weights fit, Adam's moments not
        used, logs = room.used(), _blocks(out)
        error = child_result(process, work / "full.log")
        reference = child_result(clean, work / "clean.log")["result"]
        _refused(run, room, error, out / TRAINER_DIR / f"checkpoint-{2 * SAVE_STEPS:08d}", (0.95 * size, 1.05 * size))
        run.check(sorted(sink.steps()) == [SAVE_STEPS], f"checkpoints after the fault: {sorted(sink.steps())}")
        run.artifact(tree_digest(saved) == kept and read_checkpoint(saved)["state"]["global_step"] == SAVE_STEPS,
                     "the step-4 checkpoint changed or does not load after the fault")
        scratch = sorted(p.name for p in (out / TRAINER_DIR).glob("checkpoint-*"))
        run.check(not scratch, f"the partial checkpoint stays: {scratch}")
        _clean_after(run, room, sink.store.root, used, allowed=_blocks(out) - logs)  # the stage's logs grew
        room.grow()
        resumed, _ = run_child("limited", work / "rerun.log", pace=0.0, **paths, **args)
        result = resumed.get("result", {})
        run.check(result.get("resumed_from_step") == SAVE_STEPS, f"re-run: {resumed}")
        same = (out / MODEL_WEIGHTS_FILE).read_bytes() == (work / "clean" / MODEL_WEIGHTS_FILE).read_bytes()
        run.artifact(same and result.get("global_step") == reference["global_step"] == STEPS,
                     "the resumed model differs from the uninterrupted run's")
        run.note(f"checkpoint {size:,} bytes; resumed from step {SAVE_STEPS} to {STEPS}, identical weights")


def _wait_for(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> bool:
    """True once `ready()`; False if the child exits first or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


@scenario("disk_full")
def publish_disk_full(lab: Lab, run: Run) -> None:
    """Disk full while publishing a copy: DiskFullError naming the key's path and the copy's size; old version kept."""
    with small_room(lab, "disk-publish") as room:
        work = lab.dir("disk-publish-work")
        old, new = seeded_files(work / "v1", 4, 64 * 1024, seed=1), seeded_files(work / "v2", 8, 256 * 1024, seed=2)
        wanted = LocalArtifactStore(work / "clean").publish("thing", new).manifest
        store = LocalArtifactStore(room.folder / "store")
        kept = store.publish("thing", old).manifest
        room.shrink(room=(256 + 64) * 1024, limit=128 * 1024)
        used = room.used()
        with file_size_limit(room.limit):
            error = _error_of(lambda: store.publish("thing", new))
        _refused(run, room, error, store.path_for("thing"), (8 * 256 * 1024, 8 * 256 * 1024))
        run.artifact(store.load("thing").manifest == kept, "the stored version changed after the failed publish")
        _clean_after(run, room, store.root, used)
        room.grow()
        run.artifact(store.publish("thing", new).manifest == wanted and store.load("thing").manifest == wanted,
                     "the publish after space returned differs from a clean one")


@scenario("disk_full")
def s3_cache_disk_full(lab: Lab, run: Run) -> None:
    """Disk full downloading an S3 artifact into the cache: DiskFullError naming the cache and size; cache intact."""
    from tinyplm_lib.store.s3 import S3ArtifactStore

    server = lab.moto()
    lab.cached("bucket", lambda: server.create_bucket(BUCKET) or BUCKET)
    with small_room(lab, "disk-s3") as room:
        work = lab.dir("disk-s3-work")
        reader = S3ArtifactStore(room.folder / "cache", server.client(), BUCKET, "disk")
        writer = S3ArtifactStore(work / "writer", server.client(), BUCKET, "disk")
        reader.publish("thing", seeded_files(work / "v1", 4, 64 * 1024, seed=3))
        cached = tree_digest(reader.path_for("thing"))
        wanted = writer.publish("thing", seeded_files(work / "v2", 8, 256 * 1024, seed=4)).manifest
        room.shrink(room=(256 + 64) * 1024, limit=128 * 1024)
        used = room.used()
        with file_size_limit(room.limit):
            error = _error_of(lambda: reader.load("thing"))
        _refused(run, room, error, reader.path_for("thing"), (8 * 256 * 1024, 8 * 256 * 1024))
        run.artifact(tree_digest(reader.path_for("thing")) == cached, "the cached copy changed after the failed load")
        _clean_after(run, room, reader.root, used)
        room.grow()
        loaded = reader.load("thing")
        run.artifact(loaded.manifest == wanted and tree_digest(loaded.path) == tree_digest(work / "writer" / "thing"),
                     "the load after space returned differs from the bucket's artifact")
