"""The streaming line reader: .xz, .gz or plain files read as numbered lines or blocks of lines.

`read_lines` yields one line at a time; `LineReader` hands out whole lines in large blocks (cut by
`iter_line_blocks` into `LineBlock` pool tasks), so worker processes get work without a Python
loop over lines in the parent. Damaged input fails as an InputError naming the file and line.
"""

from __future__ import annotations

import gzip
import lzma
import queue
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np

from tinyplm_lib.errors import InputError

# Errors the stdlib decompressors raise on a cut or damaged stream. A truncated file must never
# pass as a short corpus, so each becomes an InputError.
_DECOMPRESS_ERRORS = (EOFError, lzma.LZMAError, gzip.BadGzipFile, zlib.error)


def open_binary(path: Path, raw: IO[bytes] | None = None) -> IO[bytes]:
    """`path` decompressed as its name says; read from `raw` (the open file) where given."""
    name, source = path.name.lower(), path if raw is None else raw
    if name.endswith(".xz"):
        return lzma.open(source, "rb")
    if name.endswith(".gz"):
        return gzip.open(source, "rb")
    return open(path, "rb") if raw is None else raw


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text without its newline) from a .xz, .gz or plain UTF-8 file.

    Invalid UTF-8 and truncated or corrupt compressed data raise InputError naming the file and
    the line, so a damaged download fails loudly instead of yielding a shorter corpus.
    """
    path = Path(path)
    line_no = 0
    with open_raw(path) as stream:
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


def open_raw(path: Path) -> IO[bytes]:
    """A .xz, .gz or plain file opened for binary reading; a missing or empty file is an InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty (0 bytes); re-download it")
    return open_binary(path)


def _read_chunk(stream: IO[bytes], size: int) -> tuple[bytes, BaseException | None]:
    """About `size` bytes of `stream` (b"" at the end), and the error that stopped it early.

    `read1` returns what one decompression step gave, so the bytes before a truncation are
    kept, exactly as many as line-by-line reading (`read_lines`) gets; a plain `read(size)`
    would drop the bytes of the call that fails.
    """
    pieces: list[bytes] = []
    total = 0
    try:
        while total < size:
            piece = stream.read1(size - total)
            if not piece:
                break
            pieces.append(piece)
            total += len(piece)
    except _DECOMPRESS_ERRORS as exc:
        return b"".join(pieces), exc
    return b"".join(pieces), None


class _Prefetcher:
    """`_read_chunk` of a stream run ahead by a thread, at most `depth` chunks.

    The stdlib xz and gzip decompressors release the GIL, so decompression (xz: 47 MB of text in
    0.51 s on one core here) overlaps the parent's own work instead of adding to it.
    """

    def __init__(self, stream: IO[bytes], chunk_bytes: int, depth: int = 4) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(stream, chunk_bytes), daemon=True)
        self._thread.start()

    def _run(self, stream: IO[bytes], chunk_bytes: int) -> None:
        while not self._stop.is_set():
            try:
                item = _read_chunk(stream, chunk_bytes)
            except BaseException as exc:  # an unexpected error still reaches the reader
                item = (b"", exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not item[0] or item[1] is not None:
                return

    def read(self) -> tuple[bytes, BaseException | None]:
        return self._queue.get()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class LineReader:
    """Whole lines of a .xz, .gz or plain file, handed out as blocks of bytes.

    `take(max_lines, max_bytes)` returns the next lines (never part of one): at most `max_lines`,
    and no more once `max_bytes` is reached; a last line without a newline counts as a line.
    Truncated or corrupt compressed data raises InputError once the complete lines before it are
    taken, naming the last good line as `read_lines` does. Use as a context manager.

    With `max_line_bytes`, a line longer than that (newline excluded) is never held whole: it is
    handed out as an empty line, and `pop_long_lines()` tells its number and length (bytes_taken
    then counts it as 1 byte).
    """

    def __init__(self, path: Path, chunk_bytes: int = 1 << 20, prefetch: bool = True,
                 max_line_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.max_line_bytes = max_line_bytes
        self.long_lines: dict[int, int] = {}
        self._stream = open_raw(self.path)
        self._prefetcher = _Prefetcher(self._stream, chunk_bytes) if prefetch else None
        self._chunk_bytes = chunk_bytes
        self._reset()
        self.lines_taken = 0
        self.bytes_taken = 0

    def _reset(self) -> None:
        self._buf = b""
        self._off = 0  # start of the untaken bytes in _buf
        self._newlines = np.zeros(0, dtype=np.int64)  # positions of untaken b"\n" in _buf
        self._next = 0  # index into _newlines of the first untaken newline
        self._eof = False
        self._error: InputError | None = None

    def __enter__(self) -> LineReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._stream.close()

    def _read(self) -> tuple[bytes, BaseException | None]:
        if self._prefetcher is not None:
            chunk, error = self._prefetcher.read()
        else:
            chunk, error = _read_chunk(self._stream, self._chunk_bytes)
        if error is not None and not isinstance(error, _DECOMPRESS_ERRORS):
            raise error
        return chunk, error

    def _stop_at(self, error: BaseException) -> None:
        # The complete lines stay available; the part line after them is lost, as in read_lines.
        complete = self.lines_taken + len(self._newlines)
        self._error = InputError(
            self.path,
            f"compressed data is truncated or corrupt after line {complete} (the last good "
            f"line): {error}; re-download the file",
            line=complete + 1,
        )
        self._buf = self._buf[: int(self._newlines[-1]) + 1] if len(self._newlines) else b""
        self._eof = True

    def _refill(self) -> None:
        """Append one more chunk, or mark the end (of the data, or at a decompression error)."""
        chunk, error = self._read()
        rest = self._buf[self._off:]
        found = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + len(rest)
        self._newlines = np.concatenate([self._newlines[self._next:] - self._off, found])
        self._buf = rest + chunk
        self._off = self._next = 0
        if error is not None:
            self._stop_at(error)
        elif not chunk:
            self._eof = True
            last_end = int(self._newlines[-1]) + 1 if len(self._newlines) else 0
            if last_end < len(self._buf):  # a last line without a newline ends at the end
                self._newlines = np.append(self._newlines, len(self._buf) - 1)
        elif self.max_line_bytes is not None:
            self._cut_long_lines()

    def _cut_long_lines(self) -> None:
        """Replace an unfinished line longer than `max_line_bytes` by an empty line, read past it.

        So memory stays bounded whatever the input (a file without newlines is never held
        whole). The cut line's number and length go to `long_lines`.
        """
        while True:
            tail = int(self._newlines[-1]) + 1 if len(self._newlines) else 0
            length = len(self._buf) - tail
            if length <= self.max_line_bytes:
                return
            line_no = self.lines_taken + len(self._newlines) + 1  # _refill has reset _off to 0
            self._buf = self._buf[:tail]
            while True:
                chunk, error = self._read()
                if error is not None:
                    self._stop_at(error)  # truncated inside the long line: it is lost anyway
                    return
                if not chunk:  # the long line was the last one, without a newline
                    self.long_lines[line_no] = length
                    self._buf += b"\n"
                    self._newlines = np.append(self._newlines, len(self._buf) - 1)
                    self._eof = True
                    return
                end = chunk.find(b"\n")
                if end >= 0:
                    break
                length += len(chunk)
            self.long_lines[line_no] = length + end
            rest = chunk[end + 1:]
            base = len(self._buf)
            found = np.flatnonzero(np.frombuffer(rest, dtype=np.uint8) == 10) + base + 1
            self._newlines = np.concatenate([self._newlines, np.array([base], dtype=np.int64), found])
            self._buf = self._buf + b"\n" + rest

    def pop_long_lines(self) -> dict[int, int]:
        """{line number: length in bytes} of the lines cut so far among those taken."""
        if not self.long_lines:
            return {}
        taken = {n: size for n, size in self.long_lines.items() if n <= self.lines_taken}
        for n in taken:
            del self.long_lines[n]
        return taken

    def take(self, max_lines: int, max_bytes: int | None = None) -> tuple[bytes, int]:
        """(bytes of the next whole lines, their count); (b"", 0) at the end."""
        while True:
            available = len(self._newlines) - self._next
            if available >= max_lines:
                count = max_lines
                break
            if max_bytes is not None and available and \
                    self._newlines[-1] + 1 - self._off >= max_bytes:
                stop = self._off + max_bytes - 1  # the first line end at or past the byte budget
                count = int(np.searchsorted(self._newlines[self._next:], stop)) + 1
                break
            if self._eof:
                if available == 0 and self._error is not None:
                    raise self._error
                count = available
                break
            self._refill()
        if count == 0:
            return b"", 0
        end = int(self._newlines[self._next + count - 1]) + 1
        data = self._buf[self._off:end]
        self._off = end
        self._next += count
        self.lines_taken += count
        self.bytes_taken += len(data)
        return data, count

    def seek(self, byte: int, line: int) -> None:
        """Continue from `byte`, the start of line `line` (0-based); plain files without prefetch."""
        if self._prefetcher is not None:
            raise ValueError("seek needs a reader made with prefetch=False")
        self._stream.seek(byte)
        self._reset()
        self.bytes_taken, self.lines_taken = byte, line


def decode_lines(data: bytes) -> tuple[list[str], tuple[int, UnicodeDecodeError] | None]:
    """The lines of a block from `LineReader.take` (newlines removed), and the first bad one.

    On invalid UTF-8 the lines before the bad one come back with (its index, the error), so a
    caller can raise only if it gets that far.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        lines: list[str] = []
        for index, raw in enumerate(data.split(b"\n")):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                return lines, (index, exc)
        raise AssertionError("unreachable: the block decoded line by line") from None
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return lines, None


def decode_block(data: bytes) -> tuple[list[str | None], list[tuple[int, int]]]:
    """The lines of a block from `LineReader.take` (newlines removed), None for invalid UTF-8.

    Also (index, byte offset of the first bad byte) for each such line. Bytes are never replaced:
    a line that is not UTF-8 is left to the caller's bad-record policy whole.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        lines: list[str | None] = []
        bad: list[tuple[int, int]] = []
        raw_lines = data.split(b"\n")
        if data.endswith(b"\n"):
            raw_lines.pop()
        for index, raw in enumerate(raw_lines):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                lines.append(None)
                bad.append((index, exc.start))
        return lines, bad
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return lines, []


def over_size(lines: list[str | None], max_bytes: int) -> list[tuple[int, int]]:
    """(index, UTF-8 length) of each line longer than `max_bytes` bytes; None lines are left out.

    A UTF-8 character takes at most 4 bytes, so only lines of more than max_bytes / 4
    characters are encoded to be measured: on real text, none.
    """
    limit = max_bytes // 4
    try:
        longest = max(map(len, lines), default=0)  # in C: the common case, every line decoded
    except TypeError:
        longest = max((len(line) for line in lines if line is not None), default=0)
    if longest <= limit:
        return []
    found = []
    for index, line in enumerate(lines):
        if line is not None and len(line) > limit and (size := len(line.encode("utf-8"))) > max_bytes:
            found.append((index, size))
    return found


class LineBlock(NamedTuple):
    """Whole lines from `LineReader.take`, as a pool task carries them to a worker."""

    first_line: int  # 1-based number of the block's first line in the file
    data: bytes
    # {line number: length in bytes} of the lines over the reader's max_line_bytes, handed out
    # empty (`LineReader.pop_long_lines`).
    long_lines: dict[int, int]


def iter_line_blocks(reader: LineReader, block_bytes: int) -> Iterator[LineBlock]:
    """The rest of `reader` as blocks of about `block_bytes` bytes of whole lines."""
    while True:
        first_line = reader.lines_taken + 1
        data, count = reader.take(1 << 30, block_bytes)
        if not count:
            return
        yield LineBlock(first_line, data, reader.pop_long_lines())
