"""Scratch directories that know whether their writer is alive, and an atomic swap of two paths.

`claim_scratch_dir` holds an exclusive `flock` on `<name>.lock` while its process lives; the kernel
drops it when the owner dies, even by SIGKILL, so `sweep_scratch` removes exactly the leftovers of
dead runs. `exchange_paths` swaps two names in one step (Linux renameat2).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
from pathlib import Path

_LOCK_SUFFIX = ".lock"
# Directories this process may still write to, by path, with the descriptor holding their lock.
_CLAIMS: dict[str, int] = {}


def claim_scratch_dir(parent: Path, name: str, *, create: bool = True) -> Path:
    """`parent/name`, locked for this process's lifetime (or until `release_scratch_dir`).

    The lock file `<name>.lock` is created and locked before the directory exists, so a sweep
    never sees the directory unlocked while its owner is alive.
    """
    parent.mkdir(parents=True, exist_ok=True)
    path, lock = parent / name, parent / (name + _LOCK_SUFFIX)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            # A sweep may have unlinked the lock file between our open and our flock.
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        if create:
            path.mkdir()
    except BaseException:
        lock.unlink(missing_ok=True)
        os.close(fd)
        raise
    _CLAIMS[str(path)] = fd
    return path


def release_scratch_dir(path: Path) -> None:
    """Drop this process's claim on `path` (a no-op for paths it never claimed)."""
    for claimed in (Path(path), Path(path).resolve()):
        fd = _CLAIMS.pop(str(claimed), None)
        if fd is not None:
            # Unlinked while still locked, so no sweep can find it unlocked and take the directory.
            claimed.with_name(claimed.name + _LOCK_SUFFIX).unlink(missing_ok=True)
            os.close(fd)
            return


def sweep_scratch(parent: Path, *, locked: bool = True) -> list[Path]:
    """Remove the entries of `parent` no live process holds; returns the directories removed.

    With `locked` False every entry is removed (for `.trash`, which holds only garbage).
    """
    if not parent.is_dir():
        return []
    removed = []
    for entry in sorted(parent.iterdir()):
        if entry.name.endswith(_LOCK_SUFFIX) and locked:
            if not entry.with_name(entry.name[: -len(_LOCK_SUFFIX)]).exists():
                _remove_if_unlocked(entry, None)  # a lock whose directory is gone (or not made yet)
            continue
        if not locked:
            _remove_tree(entry)
            removed.append(entry)
        elif str(entry) not in _CLAIMS and _remove_if_unlocked(entry.with_name(entry.name + _LOCK_SUFFIX), entry):
            removed.append(entry)
    return removed


def _remove_if_unlocked(lock: Path, directory: Path | None) -> bool:
    """Remove `directory` and `lock` if no process holds `lock`; True if they were removed."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        if directory is None:
            return False
        # Claims create their lock first: a directory without one belongs to no live process.
        _remove_tree(directory)
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its owner is alive
        if directory is not None:
            _remove_tree(directory)
        lock.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_RENAME_EXCHANGE = 2  # from <linux/fs.h>
_AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` in one atomic step; False where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # an old kernel or a filesystem without RENAME_EXCHANGE
    raise OSError(err, os.strerror(err), str(a), None, str(b))


_RENAMEAT2: list = []


def _renameat2():
    if not _RENAMEAT2:
        function = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            function = libc.renameat2
            function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            function.restype = ctypes.c_int
        except (OSError, AttributeError):
            function = None  # not glibc >= 2.28 (macOS, musl builds without it)
        _RENAMEAT2.append(function)
    return _RENAMEAT2[0]
