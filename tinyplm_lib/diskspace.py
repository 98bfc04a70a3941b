"""A full disk told plainly: ENOSPC, EDQUOT or EFBIG during a write become a `DiskFullError`.

`disk_errors(path, estimate, what)` wraps the few top-level writes (a corpus build, a shard encode, a
checkpoint, a publish's copy, an S3 download into the cache). On such an error it names `path`, the
space the whole write needs (`estimate()`, called only then; each caller says how it estimates), the
space free on that filesystem once the failed write cleaned up, and for EFBIG the file-size limit
(RLIMIT_FSIZE; Python ignores SIGXFSZ, so going past it is an OSError, not a signal).
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from tinyplm_lib.errors import DiskFullError

_NO_ROOM = {errno.ENOSPC: "no space left on device (ENOSPC)", errno.EDQUOT: "disk quota exceeded (EDQUOT)",
            errno.EFBIG: "file too large (EFBIG)"}


class SpaceNeeded(NamedTuple):
    """What a write needs in all, in bytes, and how that figure was estimated (said in the message)."""

    bytes: int
    how: str


@contextmanager
def disk_errors(path: Path, estimate: Callable[[], SpaceNeeded], what: str,
                cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Turn ENOSPC, EDQUOT and EFBIG inside the block into a DiskFullError about `path`.

    `estimate()` gives the bytes the whole write needs and how that was estimated; `what` says what was
    being written. `cleanup`, if given, runs first, so the free space counts what the failed write
    gave back (callers whose own clean-up already ran leave it out).
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in _NO_ROOM:
            raise
        if cleanup is not None:
            cleanup()
        raise _no_room_error(exc, Path(path), estimate, what) from exc


def _no_room_error(exc: OSError, path: Path, estimate: Callable[[], SpaceNeeded], what: str) -> DiskFullError:
    """The DiskFullError for `exc` (an ENOSPC, EDQUOT or EFBIG OSError) while writing `what` to `path`."""
    try:
        needed, how = estimate()
    except Exception as failed:  # noqa: BLE001 - the disk error matters more than its estimate
        needed, how = None, f"could not be estimated: {type(failed).__name__}: {failed}"
    free = free_bytes(path)
    limit = file_size_limit() if exc.errno == errno.EFBIG else None
    written = exc.filename2 or exc.filename  # a copy names (source, destination)
    at = f" (at {os.fsdecode(written)})" if written and Path(os.fsdecode(written)) != path else ""
    parts = [f"{_NO_ROOM[exc.errno]} while writing {what}{at}."]
    if limit is not None:
        parts.append(f"The file-size limit (RLIMIT_FSIZE, `ulimit -f`) is {amount(limit)} and one file "
                     "of this write needs more.")
    parts.append(f"It needs about {amount(needed)} in all ({how})" if needed is not None else
                 f"The space it needs {how}")
    parts[-1] += f"; {amount(free)} free on that filesystem." if free is not None else "."
    if limit is not None:
        parts.append("Raise the limit (`ulimit -f unlimited`) and re-run.")
    elif needed is not None and free is not None and needed > free:
        parts.append(f"Free at least {amount(needed - free)} there and re-run.")
    else:
        parts.append("Free space there and re-run.")
    return DiskFullError(path, " ".join(parts), needed, free, limit)


def amount(size: int | None) -> str:
    """`12,345,678 bytes (11.8 MiB)`: exact, and readable."""
    if size is None:
        return "an unknown number of bytes"
    scaled, unit = float(size), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if scaled < 1024 or unit == "TiB":
            break
        scaled /= 1024
    return f"{size:,} bytes" if unit == "bytes" else f"{size:,} bytes ({scaled:.1f} {unit})"


def free_bytes(path: Path) -> int | None:
    """Bytes free to this user on the filesystem of `path` (or of its nearest existing parent)."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return None


def file_size_limit() -> int | None:
    """This process's file-size limit (soft RLIMIT_FSIZE) in bytes; None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def tree_bytes(path: Path) -> int:
    """Total size of the regular files at or under `path`."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
