"""File primitives every stage uses: sha256 of a file, atomic writes with fsync, directory fsync.

An atomic write goes to `.<name>.tmp` beside the target, is fsynced, renamed over the target and
the directory is fsynced, so a crash leaves the old file or the new one, never a torn one. This is
the one implementation; stages call it rather than writing their own temp-then-rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tinyplm_lib.errors import InputError

HASH_CHUNK_BYTES = 1 << 20
# Corpus files are written line by line: a 1 MiB buffer keeps that to few write calls.
_WRITE_BUFFER_BYTES = 1 << 20


def sha256_file(path: Path, chunk_bytes: int = HASH_CHUNK_BYTES) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (memory stays flat for multi-GB files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def tmp_path(path: Path) -> Path:
    """The temporary name an atomic write of `path` uses: `.<name>.tmp` in the same folder."""
    return path.with_name(f".{path.name}.tmp")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Persist a rename or a new entry in `path` (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` all at once: a temporary file, fsync, rename, directory fsync.

    `durable=False` skips both fsyncs, for files whose loss on power failure is harmless (the
    rename still makes the write all-or-nothing for other processes).
    """
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def replace_dir(build: Path, out_dir: Path, *, is_ours: Callable[[Path], bool], what: str) -> None:
    """Move a finished `build` folder to `out_dir`, replacing an earlier one only if `is_ours(out_dir)`.

    An empty folder may be replaced too; anything else raises InputError naming `what` it should be.
    The old folder is renamed aside before the new one moves in, then removed.
    """
    if not out_dir.exists():
        os.replace(build, out_dir)
        return
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and not is_ours(out_dir)):
        raise InputError(out_dir, f"exists and is not {what}; refusing to replace it")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    os.replace(build, out_dir)
    shutil.rmtree(old)


def atomic_write_text(path: Path, text: str, *, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def json_text(value: Any, *, indent: int | None = 1, sort_keys: bool = False, ensure_ascii: bool = True,
              default=None) -> str:
    """The house JSON format: `json.dumps` with the given options and a final newline."""
    return json.dumps(value, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii,
                      default=default) + "\n"


def atomic_write_json(path: Path, value: Any, *, durable: bool = True, **options) -> None:
    """`json_text(value, **options)` written atomically (options: indent, sort_keys, ensure_ascii, default)."""
    atomic_write_text(path, json_text(value, **options), durable=durable)


class AtomicTextWriter:
    """Write LF-terminated UTF-8 lines to `.<name>.tmp`; renamed to `path` on success.

    On error the temporary file is removed and so is any older file at `path`: a failed build
    leaves nothing behind that could be paired with another build's output. The file is binary
    underneath, so workers that already hold UTF-8 lines hand them over with `write_encoded`.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp_path = tmp_path(self.path)
        self._file: IO[bytes] | None = None

    def __enter__(self) -> AtomicTextWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp_path, "wb", buffering=_WRITE_BUFFER_BYTES)
        return self

    def write_line(self, line: str) -> None:
        self.write_encoded((line + "\n").encode("utf-8"))

    def write_lines(self, lines: list[str]) -> None:
        """Each of `lines` followed by a newline, in one write."""
        if lines:
            self.write_encoded(("\n".join(lines) + "\n").encode("utf-8"))

    def write_encoded(self, data: bytes | memoryview) -> None:
        """UTF-8 bytes of whole lines, each ending in b"\\n", written as they are."""
        assert self._file is not None, "use AtomicTextWriter as a context manager"
        self._file.write(data)

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._file is not None
        file, self._file = self._file, None
        if exc_type is None:
            try:
                file.close()  # flushes the last buffer: where a full disk often shows
                os.replace(self.tmp_path, self.path)
                return
            except BaseException:
                self._remove()
                raise
        with contextlib.suppress(OSError):  # a full disk fails the flush again; the error is known
            file.close()
        self._remove()

    def _remove(self) -> None:
        self.tmp_path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
