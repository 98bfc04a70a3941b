"""Concurrent-run scenarios of `python -m bench.faults`: two `dagster asset materialize` runs of one asset at once.

Each run has its own DAGSTER_HOME (so Dagster's pools cannot order them); they share one TINYPLM_HOME
(local) or one bucket (S3, each machine with its own cache). The first run's step is frozen (SIGSTOP)
while it holds the asset's lock (tinyplm_lib/store/locks.py), so the second starts while it runs: the
second must fail with a LockHeld naming the first's run id, host, pid and start; the first, resumed,
must succeed, and the stored artifact must be byte-identical to a clean run's. On S3 the frozen holder
is also SIGKILLed instead: a re-run at once on the same host must take its lease over and succeed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.faults.children import kill_group
from bench.faults.core import Run, ScenarioFailed, scenario
from bench.faults.lab import REPO_ROOT, Lab, tree_digest
from tinyplm_lib.store.artifacts import ArtifactStore, LocalArtifactStore
from tinyplm_lib.store.locks import LOCKS_DIR, Holder

# One op (cc100_ja_corpus) writing two assets: a run locks both, in sorted order, so train first.
CORPUS = ("cc100_ja_train", "cc100_ja_validation")
BUCKET = "tinyplm-concurrent"  # each S3 scenario in a prefix of its own


@scenario("concurrent_runs")
def concurrent_runs_local(lab: Lab, run: Run) -> None:
    """Two CLI runs of cc100_ja_corpus on one TINYPLM_HOME: the second fails naming the first, which succeeds."""
    from demo_instance import machine_env

    work = lab.dir("concurrent-local")
    home = work / "home"
    machines = [{**machine_env(work / name), "TINYPLM_HOME": str(home)} for name in ("clean", "first", "second")]
    lock_file = home / "artifacts" / LOCKS_DIR / f"{CORPUS[0]}.lock"

    def holder() -> Holder | None:
        return Holder.parse(lock_file.read_bytes()) if lock_file.exists() else None  # empty once released

    _race(run, work, machines, holder, str(lock_file), lambda: LocalArtifactStore(home / "artifacts"))


@scenario("concurrent_runs")
def concurrent_runs_s3(lab: Lab, run: Run) -> None:
    """Two CLI runs of cc100_ja_corpus on two machines, one bucket: the second fails naming the first's lease."""
    _race(run, *_s3_machines(lab, "concurrent-s3"))


@scenario("concurrent_runs")
def concurrent_runs_s3_holder_killed(lab: Lab, run: Run) -> None:
    """The S3 lease holder's step SIGKILLed: a re-run on this host takes its lease over at once and succeeds."""
    _race(run, *_s3_machines(lab, "concurrent-s3-killed"), kill_first=True)


def _s3_machines(lab: Lab, name: str) -> tuple:
    """(work, machines, holder, lease location, reader store) of three machines sharing one prefix."""
    from botocore.exceptions import ClientError

    from tinyplm_lib.store.s3 import S3ArtifactStore

    from demo_instance import machine_env

    work = lab.dir(name)
    server = lab.moto()
    lab.cached("bucket-concurrent", lambda: server.create_bucket(BUCKET))
    machines = [{**machine_env(work / role, server), "TINYPLM_S3_BUCKET": BUCKET, "TINYPLM_S3_PREFIX": name}
                for role in ("clean", "first", "second")]
    client = server.client()
    lease = f"{name}/{LOCKS_DIR}/{CORPUS[0]}.json"

    def holder() -> Holder | None:
        try:
            return Holder.parse(client.get_object(Bucket=BUCKET, Key=lease)["Body"].read())
        except ClientError:
            return None  # no lease: nobody holds it

    # A machine of its own reads the bucket (each load verifies every file against the manifest there).
    return work, machines, holder, f"s3://{BUCKET}/{lease}", lambda: S3ArtifactStore(work / "reader", client,
                                                                                      BUCKET, name)


def _race(run: Run, work: Path, machines: list[dict], holder: Callable[[], Holder | None], location: str,
          store: Callable[[], ArtifactStore], kill_first: bool = False) -> None:
    """A clean run on machines[0]; machines[1]'s run frozen holding the lock while machines[2]'s runs.

    Then the first is resumed (it must succeed), or with `kill_first` SIGKILLed and machines[2] re-runs
    at once (it must succeed: a dead holder's lock blocks nobody).
    """
    code, output = _finish(_materialise(machines[0], ",".join(("cc100_ja_raw", *CORPUS)), work / "clean.log"))
    run.require(code == 0, f"the clean run failed: {output[-2000:]}")
    clean = _digests(store())
    first = _materialise(machines[1], ",".join(CORPUS), work / "first.log")
    try:
        held = _freeze_holder(first, holder)
        try:
            started = time.monotonic()
            code, output = _finish(_materialise(machines[2], ",".join(CORPUS), work / "second.log"))
            seconds = time.monotonic() - started
        finally:
            os.kill(held.pid, signal.SIGKILL if kill_first else signal.SIGCONT)
        first_code, first_output = _finish(first)
    except BaseException:
        kill_group(first[0])
        raise
    run.require(code != 0, f"the second run succeeded while the first held the lock: {output[-2000:]}")
    message = next((line.strip() for line in output.splitlines() if "LockHeld: " in line), "")
    for expected in (f"asset {CORPUS[0]} is already being materialised by {held.describe()}", f"lock {location}."):
        run.check(expected in message, f"the second run's error does not say {expected!r}: {output[-2000:]}")
    run.note(f"second run failed after {seconds:.1f} s (CLI start included): {message[:400]}")
    if kill_first:
        run.check(first_code != 0, "the first run succeeded although its step was killed")
        code, output = _finish(_materialise(machines[2], ",".join(CORPUS), work / "rerun.log"))
        run.check(code == 0, f"the re-run after the holder was killed failed: {output[-2000:]}")
        run.note("the first run's step SIGKILLed; the re-run at once took its lease over and succeeded")
    else:
        run.check(first_code == 0, f"the first run failed after it was resumed: {first_output[-2000:]}")
        run.note("the first, resumed, succeeded")
    run.artifact(_digests(store()) == clean, "the stored corpus differs from the clean run's")
    run.check(holder() is None, "a lock was left behind after the runs ended")
    run.note("both splits byte-identical to the clean run's")


def _materialise(env: dict, select: str, log: Path) -> tuple[subprocess.Popen, Path]:
    """`dagster asset materialize --select SELECT -c configs/demo.yaml` in its own session, output to `log`."""
    from demo_instance import DAGSTER

    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen([DAGSTER, "asset", "materialize", "-m", "tinyplm_assets.definitions",
                                    "--select", select, "-c", "configs/demo.yaml"], cwd=REPO_ROOT, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return process, log


def _finish(started: tuple[subprocess.Popen, Path], timeout: float = 600) -> tuple[int, str]:
    """Wait for a run: (exit status, its output)."""
    process, log = started
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        raise ScenarioFailed(f"{log.name}: the run did not end in {timeout} s") from None
    return process.returncode, log.read_text(encoding="utf-8", errors="replace")


def _freeze_holder(started: tuple[subprocess.Popen, Path], holder: Callable[[], Holder | None]) -> Holder:
    """SIGSTOP the run's step once it holds the lock (polled every 5 ms); the holder it recorded."""
    process, log = started
    deadline = time.monotonic() + 300
    while (held := holder()) is None:
        if process.poll() is not None or time.monotonic() > deadline:
            raise ScenarioFailed(f"the first run was never seen holding the lock: "
                                 f"{log.read_text(encoding='utf-8', errors='replace')[-2000:]}")
        time.sleep(0.005)
    os.kill(held.pid, signal.SIGSTOP)
    if holder() != held:  # it published and released between the read and the stop
        os.kill(held.pid, signal.SIGCONT)
        raise ScenarioFailed("the first run's step released its lock before it could be frozen")
    return held


def _digests(store: ArtifactStore) -> dict[str, dict[str, str]]:
    """{key: {file: sha256}} of both splits, each loaded (and verified against its manifest) first."""
    return {key: tree_digest(store.load(key).path) for key in CORPUS}
