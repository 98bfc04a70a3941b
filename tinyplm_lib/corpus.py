"""Pieces shared by the corpus builders: streaming line reader, split rule, atomic writer, stats.

Also the disk-backed exact-duplicate finder: 64-bit sentence hashes go to bucket files on disk,
so memory stays bounded by one bucket however large the corpus is.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from tinyplm_lib.errors import InputError

# Errors the stdlib decompressors raise on a cut or damaged stream. A truncated file must never
# pass as a short corpus, so each becomes an InputError.
_DECOMPRESS_ERRORS = (EOFError, lzma.LZMAError, gzip.BadGzipFile, zlib.error)
_WRITE_BUFFER_BYTES = 1 << 20


@dataclass
class CorpusStats:
    """Exact counts of one corpus build; `to_dict()` is what the asset reports as metadata.

    "lines" are output lines: cc100 lines or JaWiki sentences. lines_read == lines_train +
    lines_validation + the line-level drops. `dropped` counts by reason; keys name their unit.
    """

    source: str = ""
    input_lines: int = 0  # physical lines read from the raw file
    documents_read: int = 0
    documents_train: int = 0
    documents_validation: int = 0
    lines_read: int = 0
    lines_train: int = 0
    lines_validation: int = 0
    chars_train: int = 0
    chars_validation: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)  # builder-specific facts
    seconds: float = 0.0

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _open_binary(path: Path) -> IO[bytes]:
    name = path.name.lower()
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text without its newline) from a .xz, .gz or plain UTF-8 file.

    Invalid UTF-8 and truncated or corrupt compressed data raise InputError naming the file and
    the line, so a damaged download fails loudly instead of yielding a shorter corpus.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty (0 bytes); re-download it")
    line_no = 0
    with _open_binary(path) as stream:
        lines = iter(stream)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except _DECOMPRESS_ERRORS as exc:
                raise InputError(
                    path,
                    f"compressed data is truncated or corrupt after line {line_no} (the last "
                    f"good line): {exc}; re-download the file",
                    line=line_no + 1,
                ) from exc
            line_no += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    path, f"invalid UTF-8 at byte {exc.start} of the line", line=line_no
                ) from exc
            yield line_no, text.rstrip("\n")


def in_validation(seed: int, key: str, fraction: float) -> bool:
    """True for about `fraction` of keys; fixed for a (seed, key) pair on every machine and run.

    blake2b rather than Python's hash(), which is salted per process.
    """
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2.0**64


class AtomicTextWriter:
    """Write LF-terminated UTF-8 lines to `<path>.tmp`; renamed to `path` on success.

    On error the temporary file is removed and so is any older file at `path`: a failed build
    leaves nothing behind that could be paired with another build's output.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self._file: IO[str] | None = None

    def __enter__(self) -> AtomicTextWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(
            self.tmp_path, "w", encoding="utf-8", newline="\n", buffering=_WRITE_BUFFER_BYTES
        )
        return self

    def write_line(self, line: str) -> None:
        assert self._file is not None, "use AtomicTextWriter as a context manager"
        self._file.write(line)
        self._file.write("\n")

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        if exc_type is None:
            os.replace(self.tmp_path, self.path)
        else:
            self.tmp_path.unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)


def sentence_hash(text: str) -> int:
    """64-bit content hash used for exact deduplication."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _mark_later_occurrences(hashes: np.ndarray, ordinals: np.ndarray, keep: np.ndarray) -> int:
    # Ordinals arrive in increasing order, so a stable sort by hash lists each hash's first
    # occurrence first; every later entry in a run of equal hashes is a duplicate.
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    later = np.zeros(len(order), dtype=bool)
    later[1:] = sorted_hashes[1:] == sorted_hashes[:-1]
    keep[ordinals[order][later]] = 0
    return int(later.sum())


def mark_first_occurrences(
    hashes_path: Path,
    count: int,
    flags_path: Path,
    max_bucket_entries: int = 2_000_000,
    chunk_entries: int = 1_000_000,
) -> tuple[int, int]:
    """Write `flags_path`: one uint8 per hash in `hashes_path` (little-endian uint64), 1 for the
    first occurrence of its value in file order, 0 for a later duplicate.

    Hashes are spread over ceil(count / max_bucket_entries) bucket files by value, so each bucket
    (16 bytes an entry, ~32 MB at the default) is deduplicated alone in memory. Returns
    (duplicates, buckets).
    """
    if count == 0:
        flags_path.write_bytes(b"")
        return 0, 0
    buckets = max(1, -(-count // max_bucket_entries))
    hashes = np.memmap(hashes_path, dtype="<u8", mode="r", shape=(count,))
    # A file-backed array: pages go to disk, so the flags do not grow the process's memory.
    keep = np.memmap(flags_path, dtype=np.uint8, mode="w+", shape=(count,))
    keep[:] = 1
    duplicates = 0
    if buckets == 1:
        duplicates = _mark_later_occurrences(
            np.asarray(hashes), np.arange(count, dtype=np.uint64), keep
        )
    else:
        bucket_paths = [flags_path.with_suffix(f".bucket{k}") for k in range(buckets)]
        files = [open(p, "wb") for p in bucket_paths]
        try:
            for start in range(0, count, chunk_entries):
                chunk = np.asarray(hashes[start : start + chunk_entries])
                ordinals = np.arange(start, start + len(chunk), dtype=np.uint64)
                bucket_of = chunk % np.uint64(buckets)
                order = np.argsort(bucket_of, kind="stable")  # keeps ordinals increasing
                bounds = np.searchsorted(bucket_of[order], np.arange(buckets + 1, dtype=np.uint64))
                for k in range(buckets):
                    sel = order[bounds[k] : bounds[k + 1]]
                    np.stack([chunk[sel], ordinals[sel]], axis=1).tofile(files[k])
        finally:
            for f in files:
                f.close()
        for bucket_path in bucket_paths:
            pairs = np.fromfile(bucket_path, dtype="<u8").reshape(-1, 2)
            if len(pairs):
                duplicates += _mark_later_occurrences(pairs[:, 0], pairs[:, 1], keep)
            bucket_path.unlink()
    keep.flush()
    del keep, hashes
    return duplicates, buckets


def iter_flags(flags_path: Path, chunk_bytes: int = 1 << 20) -> Iterator[bool]:
    """Stream the flags written by `mark_first_occurrences`, one chunk in memory at a time."""
    with open(flags_path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            for flag in chunk:
                yield flag == 1
