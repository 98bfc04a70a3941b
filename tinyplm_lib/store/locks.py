"""Asset locks: one run at a time materialises an artifact key, across processes, DAGSTER_HOMEs and machines.

An S3 publish is many requests, so two at once could mix objects or delete each other's files, and two
runs of one asset waste hours. A step locks every key it writes (sorted, all or none) in `check_run`, its
first line, and holds each until it is published; a failed step's locks are released at its end. A second
run does not wait behind a run of hours: it fails at once with `LockHeld` naming the asset, the lock and
the holder (run id, host, pid, since), and is re-run when the holder has ended.

- `LocalLock`: `<root>/.locks/<key>.lock`, a POSIX record lock (`lockf`) holding the holder as JSON. The
  kernel drops it when its process dies, even by SIGKILL; unlike `flock`, forked workers do not inherit it.
- `S3Lease`: `<prefix>/.locks/<key>.json`, created with `IfNoneMatch="*"`, rewritten every ttl/4 with
  `IfMatch` on its ETag, and taken over (`IfMatch` on the ETag read) when its holder is a dead pid on this
  host or its age by the server's clock passes its ttl. The holder re-checks it right before publishing
  (`LockLost`); only a holder frozen for a whole ttl in mid-upload could still overlap its taker.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

from tinyplm_lib.errors import StorageError

LOCKS_DIR = ".locks"
# A lease with no heartbeat for this long is free; long enough for a stalled network or a GC pause.
LEASE_TTL_S = 120.0
_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404"}
_GUARD = threading.Lock()
_HELD: dict[str, AssetLock] = {}  # lock location -> the lock this process holds there


class LockHeld(StorageError):
    """Another run (or this process, for another run) holds an asset's lock."""


class LockLost(StorageError):
    """A run's S3 lease was taken over (its heartbeat stopped for a ttl) before it published."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: a run's step process, and when it took the lock (UTC)."""

    run_id: str
    host: str
    pid: int
    since: str
    started: str = ""  # the pid's start time (/proc): a pid reused by another process is not the holder

    @classmethod
    def current(cls, run_id: str) -> Holder:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(run_id, socket.gethostname(), os.getpid(), now, _process_start(os.getpid()) or "")

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            fields = json.loads(data)
            return cls(str(fields["run_id"]), str(fields["host"]), int(fields["pid"]), str(fields["since"]),
                       str(fields.get("started", "")))
        except (ValueError, KeyError, TypeError):
            return None  # empty (a holder between taking the lock and writing itself) or foreign

    def describe(self) -> str:
        return f"run {self.run_id} (host {self.host}, pid {self.pid}, since {self.since})"

    def dead(self) -> bool:
        """True only when surely gone: a process of this host that no longer runs (or is a zombie)."""
        if self.host != socket.gethostname():
            return False
        started = _process_start(self.pid)
        return started is None or bool(self.started and started and started != self.started)


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot; "" if unknown), or None if it does not run."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:  # no /proc (macOS): signal 0 only tells whether the pid exists
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]  # state (field 3); starttime (field 22)


class AssetLock:
    """One key's lock; `acquire` raises LockHeld, `check` LockLost; subclasses say where it lives."""

    # How a dead holder's lock comes free, for the LockHeld message.
    frees = ""

    def __init__(self, key: str, location: str, run_id: str) -> None:
        self.key, self.location, self.holder = key, location, Holder.current(run_id)

    def acquire(self) -> None:
        with _GUARD:
            mine = _HELD.get(self.location)
            if mine is not None:  # this process, another run: the kernel lock would not stop it
                raise LockHeld(self.held_message(mine.holder))
            self._take()
            _HELD[self.location] = self

    def release(self) -> None:
        with _GUARD:
            if _HELD.get(self.location) is self:
                del _HELD[self.location]
                self._drop()

    def check(self) -> None:
        """Raise LockLost if this lock is no longer ours (only a lease can be lost)."""

    def held_message(self, holder: Holder | None, detail: str = "") -> str:
        who = holder.describe() if holder else "another process (it has not recorded itself yet)"
        return (f"asset {self.key} is already being materialised by {who}{detail}; lock {self.location}. "
                f"This run (run {self.holder.run_id}, pid {self.holder.pid}) stops rather than write the same "
                f"artifact at the same time: re-run it when that run has ended ({self.frees}).")

    def _take(self) -> None:
        raise NotImplementedError

    def _drop(self) -> None:
        raise NotImplementedError


class LocalLock(AssetLock):
    """`<directory>/<key>.lock`, locked with `lockf` while its holder lives."""

    frees = "a lock whose holder died is free at once"

    def __init__(self, directory: Path, key: str, run_id: str) -> None:
        self.path = Path(directory) / f"{key}.lock"
        super().__init__(key, str(self.path), run_id)
        self._fd: int | None = None

    def _take(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                raise LockHeld(self.held_message(_read_holder(fd))) from None
            finally:
                os.close(fd)  # not a lock we hold (closing any descriptor of one drops a POSIX lock)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(self.holder)).encode(), 0)
        self._fd = fd

    def _drop(self) -> None:
        os.ftruncate(self._fd, 0)  # the file stays (unlinking a lock file races with a new taker)
        os.close(self._fd)


def _read_holder(fd: int) -> Holder | None:
    """The holder recorded in a lock file; waits briefly for one that has locked but not yet written."""
    for _ in range(20):
        holder = Holder.parse(os.pread(fd, 4096, 0))
        if holder is not None:
            return holder
        time.sleep(0.01)
    return None


class S3Lease(AssetLock):
    """A lease object in the bucket, kept alive by a heartbeat thread while held."""

    def __init__(self, store, key: str, run_id: str, ttl_s: float = LEASE_TTL_S) -> None:
        self.store, self.ttl_s = store, ttl_s
        self.object = store.object_key(LOCKS_DIR, f"{key}.json")
        super().__init__(key, f"s3://{store.bucket}/{self.object}", run_id)
        self.frees = (f"a lease whose holder died is taken over at once on its host, elsewhere after "
                      f"{ttl_s:g} s without a heartbeat")
        self.etag = ""
        self._mutex = threading.Lock()  # a heartbeat's write and a check's read never overlap
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _take(self) -> None:
        holder, detail = None, ""
        for _ in range(3):  # the lease may change between a read and a write
            etag = self._put(IfNoneMatch="*")
            if etag is None:
                current = self._read()
                if current is None:
                    continue  # released meanwhile
                holder, ttl_s, age, seen = current
                detail = f", last heartbeat {age:.0f} s ago"
                if age <= ttl_s and (holder is None or not holder.dead()):
                    break
                etag = self._put(IfMatch=seen)  # a dead or silent holder: taken over
            if etag:
                self.etag = etag
                self._thread = threading.Thread(target=self._beat, name=f"lease {self.key}", daemon=True)
                self._thread.start()
                return
        raise LockHeld(self.held_message(holder, detail))

    def _drop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._request("delete", lambda: self.store.client.delete_object(
                Bucket=self.store.bucket, Key=self.object, IfMatch=self.etag))
        except StorageError:
            pass  # unreachable now: the lease frees itself when its ttl passes (a dead pid's at once here)

    def check(self) -> None:
        with self._mutex:
            current = self._read()
        if current is None or current[3] != self.etag:
            now = current[0].describe() if current and current[0] else "nobody"
            raise LockLost(f"asset {self.key}: run {self.holder.run_id} (pid {self.holder.pid}) no longer holds "
                           f"its lease {self.location}: it was taken over after {self.ttl_s:g} s without a "
                           f"heartbeat, and is held now by {now}. This run stops before publishing, so two runs' "
                           "files are never mixed; re-run it.")

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            with self._mutex:
                try:
                    etag = self._put(IfMatch=self.etag)
                except StorageError:
                    continue  # network trouble: try again at the next beat (a taker waits a whole ttl)
                if etag is None:
                    return  # taken over: `check` refuses this run's publish
                self.etag = etag

    def _put(self, **condition) -> str | None:
        """Write our lease if `condition` holds: its new ETag, or None if the condition failed."""
        body = json.dumps({**asdict(self.holder), "asset": self.key, "ttl_s": self.ttl_s,
                           "heartbeat": time.time(), "token": uuid.uuid4().hex}).encode()
        return self._request("write", lambda: self.store.client.put_object(
            Bucket=self.store.bucket, Key=self.object, Body=body, ContentType="application/json",
            **condition)["ETag"])

    def _read(self) -> tuple[Holder | None, float, float, str] | None:
        """(holder, its ttl, age by the server's clock, ETag) of the lease in the bucket; None if none."""
        response = self._request("read", lambda: self.store.client.get_object(Bucket=self.store.bucket,
                                                                               Key=self.object))
        if response is None:
            return None
        data = response["Body"].read()
        holder = Holder.parse(data)
        try:
            ttl_s = float(json.loads(data).get("ttl_s", LEASE_TTL_S))
        except (ValueError, AttributeError, TypeError):
            ttl_s = LEASE_TTL_S
        date = response["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date) if date else datetime.now(UTC)
        return holder, ttl_s, (now - response["LastModified"]).total_seconds(), response["ETag"]

    def _request(self, action: str, call):
        """`call()`, None if a condition failed or the lease is missing; StorageError on any other failure."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") in _CONFLICT or str(exc.response.get("ResponseMetadata", {}).get(
                    "HTTPStatusCode")) in _CONFLICT:
                return None
            reason = f"{error.get('Code')}: {error.get('Message')}"
        except BotoCoreError as exc:
            reason = f"{type(exc).__name__}: {exc}"
        raise StorageError(f"S3 {action} of the lock {self.location} failed at {self.store.endpoint}: {reason}")


def hold(store, keys: Iterable[str], run_id: str) -> None:
    """Take the locks of `keys` for `run_id`, in sorted order, all or none; those the run holds are kept."""
    taken = []
    try:
        for key in sorted(set(keys)):
            lock = store.lock(key, run_id)
            if _mine(lock, run_id) is None:
                lock.acquire()
                taken.append(lock)
    except BaseException:
        for lock in reversed(taken):
            lock.release()
        raise


@contextmanager
def publishing(store, key: str, run_id: str) -> Iterator[None]:
    """Hold `key`'s lock around a publish: the one the run took at its start (checked), else a new one."""
    lock = store.lock(key, run_id)
    held = _mine(lock, run_id)
    try:
        if held is not None:
            lock = held
            lock.check()
        else:
            lock.acquire()
        yield
    finally:
        lock.release()  # a no-op for a lock that `acquire` refused


def release_run(run_id: str) -> None:
    """Release every lock this process holds for `run_id` (a step's end, failed or not)."""
    with _GUARD:
        mine = [lock for lock in _HELD.values() if lock.holder.run_id == run_id]
    for lock in mine:
        lock.release()


def _mine(lock: AssetLock, run_id: str) -> AssetLock | None:
    with _GUARD:
        held = _HELD.get(lock.location)
    return held if held is not None and held.holder.run_id == run_id else None
