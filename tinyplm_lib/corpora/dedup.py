"""Exact deduplication at any corpus size: 64-bit line hashes marked first or later, on disk.

Hashes go to bucket files by value, so memory stays bounded by one bucket whatever the corpus;
`mark_first_occurrences` writes one flag byte per sentence and `iter_flags` streams them back.
`DocumentSpool` runs the three passes for documents of lines (cc100): spool, mark, read back.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple, Self

import numpy as np


def sentence_hash(text: str) -> int:
    """64-bit content hash used for exact deduplication."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def line_hashes(text: bytes) -> np.ndarray:
    """The `sentence_hash` of each line of `text` (UTF-8 lines, each ending in b"\\n"), as uint64."""
    blake2b = hashlib.blake2b
    digests = b"".join([blake2b(line, digest_size=8).digest() for line in text.split(b"\n")[:-1]])
    return np.frombuffer(digests, dtype="<u8")


class Repeat(NamedTuple):
    """A value that occurs more than once among the hashes: how often, and its first ordinal."""

    occurrences: int
    first: int


class FirstOccurrences(NamedTuple):
    """What `find_first_occurrences` found."""

    duplicates: int  # entries that repeat an earlier one
    buckets: int
    most_repeated: list[Repeat]  # the most repeated values, most first (ties: the earlier first)


def _read_hashes(source, count: int, path: Path) -> np.ndarray:
    # Plain reads, not a memmap: mapped pages would count in the process's RSS up to the file's size.
    hashes = np.frombuffer(source.read(8 * count), dtype="<u8")
    if len(hashes) != count:
        raise ValueError(f"{path}: expected {count} more hashes, found {len(hashes)}")
    return hashes


def _mark_later_occurrences(hashes: np.ndarray, ordinals: np.ndarray, keep: np.ndarray,
                            top: int) -> tuple[int, list[Repeat]]:
    # Ordinals arrive in increasing order, so a stable sort by hash lists each hash's first
    # occurrence first; every later entry in a run of equal hashes is a duplicate.
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    later = np.zeros(len(order), dtype=bool)
    later[1:] = sorted_hashes[1:] == sorted_hashes[:-1]
    sorted_ordinals = ordinals[order]
    keep[sorted_ordinals[later]] = 0
    repeats: list[Repeat] = []
    if top and later.any():
        runs = np.flatnonzero(~later)  # each value's first entry
        counts = np.diff(np.append(runs, len(later)))
        repeated = np.flatnonzero(counts > 1)
        firsts, counts = sorted_ordinals[runs[repeated]], counts[repeated]
        best = np.lexsort((firsts, -counts))[:top]
        repeats = [Repeat(int(counts[i]), int(firsts[i])) for i in best]
    return int(later.sum()), repeats


def _spread_into_buckets(hashes_path: Path, count: int, bucket_paths: list[Path], chunk_entries: int) -> None:
    """Append (hash, ordinal) pairs to bucket file `hash % buckets`, ordinals increasing in each."""
    buckets = len(bucket_paths)
    with ExitStack() as stack:
        files = [stack.enter_context(open(p, "wb")) for p in bucket_paths]
        source = stack.enter_context(open(hashes_path, "rb"))
        for start in range(0, count, chunk_entries):
            chunk = _read_hashes(source, min(chunk_entries, count - start), hashes_path)
            ordinals = np.arange(start, start + len(chunk), dtype=np.uint64)
            bucket_of = chunk % np.uint64(buckets)
            order = np.argsort(bucket_of, kind="stable")  # keeps ordinals increasing
            bounds = np.searchsorted(bucket_of[order], np.arange(buckets + 1, dtype=np.uint64))
            for k in range(buckets):
                sel = order[bounds[k] : bounds[k + 1]]
                np.stack([chunk[sel], ordinals[sel]], axis=1).tofile(files[k])


def find_first_occurrences(
    hashes_path: Path,
    count: int,
    flags_path: Path,
    max_bucket_entries: int = 2_000_000,
    chunk_entries: int = 1_000_000,
    top: int = 0,
) -> FirstOccurrences:
    """Write `flags_path`: one uint8 per hash in `hashes_path` (little-endian uint64), 1 for the
    first occurrence of its value in file order, 0 for a later duplicate; and find the `top` most
    repeated values.

    Hashes are spread over ceil(count / max_bucket_entries) bucket files by value, so each bucket
    (16 bytes an entry, ~32 MB at the default) is deduplicated alone in memory.
    """
    if count == 0:
        flags_path.write_bytes(b"")
        return FirstOccurrences(0, 0, [])
    buckets = max(1, -(-count // max_bucket_entries))
    # A file-backed array: its pages go to disk, one byte an entry.
    keep = np.memmap(flags_path, dtype=np.uint8, mode="w+", shape=(count,))
    keep[:] = 1
    duplicates, repeats = 0, []
    if buckets == 1:
        with open(hashes_path, "rb") as source:
            hashes = _read_hashes(source, count, hashes_path)
        duplicates, repeats = _mark_later_occurrences(hashes, np.arange(count, dtype=np.uint64), keep, top)
    else:
        bucket_paths = [flags_path.with_suffix(f".bucket{k}") for k in range(buckets)]
        _spread_into_buckets(hashes_path, count, bucket_paths, chunk_entries)
        for bucket_path in bucket_paths:
            pairs = np.fromfile(bucket_path, dtype="<u8").reshape(-1, 2)
            if len(pairs):
                found, more = _mark_later_occurrences(pairs[:, 0], pairs[:, 1], keep, top)
                duplicates += found
                # Each bucket's own top holds every overall top value that falls in it.
                repeats = sorted(repeats + more, key=lambda r: (-r.occurrences, r.first))[:top]
            bucket_path.unlink()
    keep.flush()
    del keep
    return FirstOccurrences(duplicates, buckets, repeats)


def mark_first_occurrences(
    hashes_path: Path,
    count: int,
    flags_path: Path,
    max_bucket_entries: int = 2_000_000,
    chunk_entries: int = 1_000_000,
) -> tuple[int, int]:
    """`find_first_occurrences` without the repeats: returns (duplicates, buckets)."""
    found = find_first_occurrences(hashes_path, count, flags_path, max_bucket_entries, chunk_entries)
    return found.duplicates, found.buckets


def iter_flags(flags_path: Path, chunk_bytes: int = 1 << 20) -> Iterator[bool]:
    """Stream the flags written by `mark_first_occurrences`, one chunk in memory at a time."""
    with open(flags_path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            for flag in chunk:
                yield flag == 1


# ---------------------------------------------------------------------------------------------
# Documents of lines: spooled, marked, read back without the repeats.

# Pass 3 reads at most this many lines and about this many bytes at a time (~10 MB of cc100
# text): its copies that leave the repeats out stay small beside the process.
READ_LINES, READ_BYTES = 1 << 16, 8 << 20
# Spool work files: the lines (UTF-8, newline-terminated) and, per line, its hash, its length in
# bytes, its characters and a flag for the first line of a document; then pass 2's flags.
_TEXT, _HASHES, _LENGTHS, _CHARS, _STARTS = "lines.txt", "hashes.u64", "lengths.i64", "chars.i64", "starts.u8"
_FLAGS = "first.u8"


class LineDocument(NamedTuple):
    """A document of lines (`assemble_documents`): its kept lines, and their counts."""

    index: int  # its number among the documents in the stream (0 first), emptied ones counted
    pieces: list[bytes]  # byte ranges of UTF-8 lines, each line ending in b"\n"
    lines: int
    chars: int


class RepeatedLine(NamedTuple):
    text: str
    occurrences: int  # in the spool, the first one included


class SpoolDedup(NamedTuple):
    """What `DocumentSpool.deduplicate` found."""

    duplicates: int  # lines that repeat an earlier line: left out by `documents`
    buckets: int
    most_repeated: list[RepeatedLine]  # most first (ties: the earlier first)


class LineChunk(NamedTuple):
    """A run of lines in file order, and which of them are kept and which begin a document."""

    text: bytes  # the lines, each ending in b"\n"
    keep: np.ndarray  # bool per line: a first occurrence
    starts: np.ndarray  # uint8 per line: 1 where a document begins
    lengths: np.ndarray
    chars: np.ndarray


class DocumentSpool:
    """Documents of lines spooled to disk, then read back with every later repeat of a line left out.

    Pass 1 `append`s lines in file order; `deduplicate` marks first occurrences in buckets on disk
    (pass 2); `documents` reads the documents back, in order, without the repeats (pass 3). Memory
    is one appended block, one bucket and one read chunk, whatever the corpus. The work files (the
    text plus 26 bytes a line, and 16 more while marking) sit in a temporary folder inside `parent`,
    removed on leaving the `with`.
    """

    def __init__(self, parent: Path, max_bucket_entries: int = 2_000_000) -> None:
        parent = Path(parent)
        parent.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=".dedup-work-", dir=parent))
        self.max_bucket_entries = max_bucket_entries
        self.line_count = self.document_count = 0  # appended
        self._files = ExitStack()  # pass 1's files, open until `deduplicate`
        self._out = {name: self._files.enter_context((self.work / name).open("wb"))
                     for name in (_TEXT, _HASHES, _LENGTHS, _CHARS, _STARTS)}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self._files.close()  # may fail flushing on a full disk: the work files go all the same
        finally:
            shutil.rmtree(self.work, ignore_errors=True)

    def append(self, text: bytes, lengths: np.ndarray, hashes: np.ndarray, chars: np.ndarray,
               starts: np.ndarray) -> None:
        """Lines in file order: `text` holds them, each ending in b"\\n"; per line, `lengths` its
        bytes (newline included), `hashes` its `line_hashes`, `chars` its characters (newline
        excluded) and `starts` 1 if a document begins there (so the first line appended must)."""
        if self.line_count == 0 and len(starts) and not starts[0]:
            raise ValueError("the first line appended to a DocumentSpool must begin a document")
        out = self._out
        out[_TEXT].write(text)
        out[_HASHES].write(np.asarray(hashes, dtype="<u8").tobytes())
        out[_LENGTHS].write(np.asarray(lengths, dtype="<i8").tobytes())
        out[_CHARS].write(np.asarray(chars, dtype="<i8").tobytes())
        out[_STARTS].write(np.asarray(starts, dtype=np.uint8).tobytes())
        self.line_count += len(lengths)
        self.document_count += int(np.count_nonzero(starts))

    def deduplicate(self, top: int = 5) -> SpoolDedup:
        """Pass 2, once every line is appended: mark each line's first occurrence."""
        self._files.close()
        found = find_first_occurrences(self.work / _HASHES, self.line_count, self.work / _FLAGS,
                                       self.max_bucket_entries, top=top)
        (self.work / _HASHES).unlink()
        texts = self._lines_at(sorted({r.first for r in found.most_repeated}))
        return SpoolDedup(found.duplicates, found.buckets,
                          [RepeatedLine(texts[r.first], r.occurrences) for r in found.most_repeated])

    def _lines_at(self, ordinals: list[int]) -> dict[int, str]:
        """The text of the lines at these ordinals (sorted, distinct), read in one pass."""
        found: dict[int, str] = {}
        wanted = iter(ordinals)
        ordinal = next(wanted, None)
        first = 0  # ordinal of the chunk's first line
        starts = np.zeros(1, dtype=np.int64)  # byte offsets of the chunk's lines, then its end
        with open(self.work / _LENGTHS, "rb") as lengths_file, open(self.work / _TEXT, "rb") as text:
            while ordinal is not None:
                lengths = np.frombuffer(lengths_file.read(8 * READ_LINES), dtype="<i8")
                if not len(lengths):
                    raise ValueError(f"{self.work}: no line {ordinal} among its {self.line_count}")
                starts = starts[-1] + np.concatenate([[0], np.cumsum(lengths)])
                while ordinal is not None and ordinal < first + len(lengths):
                    text.seek(int(starts[ordinal - first]))
                    found[ordinal] = text.read(int(lengths[ordinal - first]) - 1).decode()
                    ordinal = next(wanted, None)
                first += len(lengths)
        return found

    def _chunks(self) -> Iterator[LineChunk]:
        with ExitStack() as stack:
            files = {name: stack.enter_context(open(self.work / name, "rb"))
                     for name in (_TEXT, _FLAGS, _STARTS, _LENGTHS, _CHARS)}
            while True:
                lengths = np.frombuffer(files[_LENGTHS].read(8 * READ_LINES), dtype="<i8")
                if not len(lengths):
                    return
                n = len(lengths)
                keep = np.frombuffer(files[_FLAGS].read(n), dtype=np.uint8).astype(bool)
                starts = np.frombuffer(files[_STARTS].read(n), dtype=np.uint8)
                chars = np.frombuffer(files[_CHARS].read(8 * n), dtype="<i8")
                ends = np.cumsum(lengths)
                start = 0
                while start < n:  # at least one line, else at most READ_BYTES
                    base = int(ends[start - 1]) if start else 0
                    stop = max(start + 1, int(np.searchsorted(ends, base + READ_BYTES, side="right")))
                    yield LineChunk(files[_TEXT].read(int(ends[stop - 1]) - base), keep[start:stop],
                                 starts[start:stop], lengths[start:stop], chars[start:stop])
                    start = stop

    def documents(self) -> Iterator[LineDocument]:
        """Pass 3: the documents in order, each with only its first-occurrence lines; a document
        with none left is left out (`document_count` minus those yielded)."""
        return assemble_documents(self._chunks())


def assemble_documents(chunks: Iterable[LineChunk]) -> Iterator[LineDocument]:
    """The documents of a stream of line chunks, in order, each with only its kept lines; a document
    with none kept is left out (its number stays used). The stream's first line begins a document."""
    pieces: list[bytes] = []
    lines = chars = 0
    index = -1  # the stream's first line begins document 0
    for chunk in chunks:
        keep = chunk.keep
        text = chunk.text
        if not keep.all():
            text = np.frombuffer(text, dtype=np.uint8)[np.repeat(keep, chunk.lengths)].tobytes()
        ends = np.concatenate([[0], np.cumsum(chunk.lengths[keep])]).tolist()
        char_sums = np.concatenate([[0], np.cumsum(chunk.chars[keep], dtype=np.int64)]).tolist()
        # Where each document begins, counted in the chunk's kept lines.
        kept_before = np.concatenate([[0], np.cumsum(keep)])
        begins = kept_before[np.flatnonzero(chunk.starts)].tolist()
        done = 0
        for i, edge in enumerate(begins + [len(ends) - 1]):
            if edge > done:
                pieces.append(text[ends[done]:ends[edge]])
                lines += edge - done
                chars += char_sums[edge] - char_sums[done]
                done = edge
            if i < len(begins):
                if lines:
                    yield LineDocument(index, pieces, lines, chars)
                    pieces, lines, chars = [], 0, 0
                index += 1
    if lines:
        yield LineDocument(index, pieces, lines, chars)
