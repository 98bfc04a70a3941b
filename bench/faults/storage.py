"""Local storage scenarios of `python -m bench.faults`: corrupted files, killed publishes, stale scratch.

A published artifact loads as the old or the new version, never a mix or none; a corrupted one is
refused naming the file; leftovers of a SIGKILLed run are removed, a live run's are kept.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.faults.children import child_result, kill_when, run_child, start_child
from bench.faults.core import Run, scenario
from bench.faults.lab import Lab, seeded_files
from tinyplm_lib import faultpoints
from tinyplm_lib.errors import StorageError
from tinyplm_lib.layout import SENTENCES_FILE
from tinyplm_lib.store.artifacts import LocalArtifactStore
from tinyplm_lib.store.scratch import release_scratch_dir


@scenario("storage")
def local_artifact_corrupted(lab: Lab, run: Run) -> None:
    """A stored file altered or cut after publishing: the load is refused naming the file; a re-publish heals."""
    work = lab.dir("local-corrupt")
    store = LocalArtifactStore(work / "store")
    source = seeded_files(work / "v1", 3, 64 * 1024, seed=1)
    good = store.publish("thing", source).manifest
    target = store.path_for("thing") / "part-001.bin"
    data = bytearray(target.read_bytes())
    data[1000] ^= 0x01
    target.write_bytes(bytes(data))
    run.raises(StorageError, lambda: store.load("thing"), str(target), "sha256")
    target.write_bytes(bytes(data[:-10]))
    run.raises(StorageError, lambda: store.load("thing"), str(target), "size")
    store.publish("thing", source)
    run.artifact(store.load("thing").manifest == good, "the re-published artifact differs")


@scenario("storage")
def publish_killed_at_random_points(lab: Lab, run: Run) -> None:
    """SIGKILL during publish, at random points: the old version until the copy is complete, never a mix or none.

    The child's fault-point trace (tinyplm_lib/faultpoints.py) says whether the kill came before the
    complete copy was handed to `_commit`: then the old version must load; after it, the old or the new
    one (the rename that installs it is atomic), never anything else.
    """
    work = lab.dir("publish-killed")
    old_source = seeded_files(work / "v1", 4, 64 * 1024, seed=1)
    new_source = seeded_files(work / "v2", 24, 1024 * 1024, seed=2)
    reference = LocalArtifactStore(work / "reference")
    new_manifest, seconds = run_child("publish", work / "reference.log", ready=lambda: _incoming(reference.root),
                                      root=str(reference.root), key="thing", source=str(new_source))
    outcomes = []
    for attempt in range(5):
        store = LocalArtifactStore(work / f"store-{attempt}")
        old_manifest = store.publish("thing", old_source).manifest
        faults = work / f"faults-{attempt}"
        faults.mkdir()
        process = start_child("publish", work / f"kill-{attempt}.log", root=str(store.root), key="thing",
                              source=str(new_source), env={faultpoints.DIR_ENV: str(faults)})
        # Spread over the whole publish and a little past it (then the child may finish first).
        killed = kill_when(process, lambda root=store.root: _incoming(root),
                           seconds * (attempt + lab.rng.random()) / 4.5)
        if not killed:
            child_result(process, work / f"kill-{attempt}.log")
        try:
            loaded = store.load("thing").manifest
        except StorageError as exc:
            run.artifact(False, f"attempt {attempt}: neither version loads: {exc}")
            continue
        version = "old" if loaded == old_manifest else "new" if loaded == new_manifest else "mixed"
        run.artifact(version != "mixed", f"attempt {attempt}: the stored artifact matches neither version")
        complete = (faults / faultpoints.TRACE_FILE).exists()  # the child reached the publish point
        if killed and not complete:
            run.check(version == "old", f"attempt {attempt}: killed while copying, yet the {version} version loads")
        outcomes.append(f"{version} ({'copy complete' if complete else 'copying'})" if killed else "finished")
        store.remove_leftovers()
        left = [p.name for p in (store.root / ".incoming").glob("*")] if (store.root / ".incoming").exists() else []
        run.check(left == [], f"attempt {attempt}: leftovers of the killed publish stay: {left}")
        store.publish("thing", new_source)
        run.artifact(store.load("thing").manifest == new_manifest, f"attempt {attempt}: the re-publish differs")
    run.check(any(o.startswith(("old", "new")) for o in outcomes), f"no kill landed mid-publish: {outcomes}")
    run.note(f"publish takes {seconds:.2f} s; after each kill the store held: {outcomes}")


def _incoming(root: Path) -> bool:
    incoming = root / ".incoming"
    return incoming.is_dir() and any(incoming.iterdir())


@scenario("storage")
def stale_scratch_leftovers(lab: Lab, run: Run) -> None:
    """Staging dirs of a SIGKILLed run are removed by the next run, a live run's are kept, none reused."""
    work = lab.dir("stale-staging")
    store = LocalArtifactStore(work / "store")
    kept = store.publish("cc100_train", seeded_files(work / "v1", 2, 4096, seed=3)).manifest
    holders = {}
    for role in ("crashed", "live"):
        ready = work / f"{role}.ready"
        process = start_child("hold_staging", work / f"{role}.log", root=str(store.root), label="cc100_train",
                              ready=str(ready))
        deadline = time.monotonic() + 60
        while not ready.exists():
            run.require(process.poll() is None and time.monotonic() < deadline, f"the {role} writer did not start")
            time.sleep(0.01)
        holders[role] = (process, Path(ready.read_text(encoding="utf-8")))
    crashed, live = holders["crashed"], holders["live"]
    kill_when(crashed[0], lambda: True, 0)
    legacy = store.root / ".staging" / "cc100_train-0123456789ab"  # an unlocked dir, as older versions left
    legacy.mkdir()
    (legacy / SENTENCES_FILE).write_text("stale\n", encoding="utf-8")
    (store.root / ".trash" / "deadbeef").mkdir(parents=True)
    fresh = store.staging_dir("cc100_train")
    run.check(list(fresh.iterdir()) == [], "the new staging dir is not empty")
    run.check(not crashed[1].exists(), "the SIGKILLed run's staging dir is still there")
    run.check(not legacy.exists(), "an unlocked staging dir was not removed")
    run.check(not any((store.root / ".trash").iterdir()), "the trash was not emptied")
    run.check(live[1].exists() and (live[1] / SENTENCES_FILE).exists(), "a live run's staging dir was removed")
    kill_when(live[0], lambda: True, 0)
    store.remove_leftovers()
    run.check(not live[1].exists(), "the staging dir of the second run was kept after it died")
    run.check(fresh.exists(), "our own staging dir was removed")
    release_scratch_dir(fresh)
    run.artifact(store.load("cc100_train").manifest == kept, "a stored artifact was touched by the clean-up")
    run.note("dead run's and unlocked dirs removed, live run's kept until it died")
