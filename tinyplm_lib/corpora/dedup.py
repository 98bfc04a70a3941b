"""Exact deduplication at any corpus size: 64-bit sentence hashes marked first or later, on disk.

Hashes go to bucket files by value, so memory stays bounded by one bucket whatever the corpus;
`mark_first_occurrences` writes one flag byte per sentence and `iter_flags` streams them back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np


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


def _spread_into_buckets(hashes: np.ndarray, bucket_paths: list[Path], chunk_entries: int) -> None:
    """Append (hash, ordinal) pairs to bucket file `hash % buckets`, ordinals increasing in each."""
    buckets = len(bucket_paths)
    files = [open(p, "wb") for p in bucket_paths]
    try:
        for start in range(0, len(hashes), chunk_entries):
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
        _spread_into_buckets(hashes, bucket_paths, chunk_entries)
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
