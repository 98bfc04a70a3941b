"""Writing token shards: `encode_corpus` encodes a corpus file into a shard set, resumably.

Blocks of lines go to a worker pool and come back in file order; each shard's files are written
to temporaries, renamed, then marked complete. A re-run skips every shard whose marker still
matches its input bytes, tokenizer and files; `meta.json`, written last, describes the set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tinyplm_lib.corpora.reader import LineReader, decode_lines
from tinyplm_lib.corpora.sampling import sample_input
from tinyplm_lib.diskspace import SpaceNeeded, disk_errors
from tinyplm_lib.errors import ConfigError, InputError
from tinyplm_lib.files import atomic_write_json, sha256_file, tmp_path
from tinyplm_lib.layout import SHARDS_META_FILE
from tinyplm_lib.parallel import WorkerPool, pool_or_own
from tinyplm_lib.tokens.encoding import worker_encoder
from tinyplm_lib.tokens.folder import TokenizerFolder
from tinyplm_lib.tokens.shards import (
    FORMAT_VERSION,
    MARKER_SUFFIX,
    OFFSETS_SUFFIX,
    SHARD_FILE_PATTERN,
    TOKENS_SUFFIX,
    shard_name,
)

# Lines per pool task: 2,000 real cc100 lines are ~0.1 s of MeCab, so pickling a task and its
# result stays a small share, the 2 * workers tasks in flight hold only a few MB, and the last
# task of a file keeps the other workers idle only briefly (1,000 to 4,000 measured the same).
ENCODE_CHUNK_LINES = 2000
_READ_BYTES = 1 << 22
# Text encoded to estimate a shard set's size when the disk is full (~0.2 s of MeCab here).
_SAMPLE_BYTES = 1 << 20


class EncodeTask(NamedTuple):
    """Pool task: a block of input lines to encode."""

    tokenizer_dir: str
    first_line: int  # 0-based index of the block's first line in the file
    data: bytes  # the lines' bytes, newlines included


class EncodedChunk(NamedTuple):
    """Pool result: one block encoded; empty lines and lines that give no token are dropped."""

    first_line: int
    num_lines: int  # input lines in the block, dropped ones included
    tokens: np.ndarray  # uint16 ids of the kept lines, concatenated
    lengths: np.ndarray  # int32 token count of each kept line (offsets on disk are int64)
    empty_lines: int
    no_token_lines: int
    unk_tokens: int
    invalid_line: int | None  # index in the block of the first line that is not UTF-8, if any
    invalid_reason: str | None


class ReuseShard(NamedTuple):
    """Plan step: shard `entry` of an earlier run still matches; keep its files."""

    entry: dict


class CloseShard(NamedTuple):
    """Plan step: the shard being written has all its lines; these are its input bytes."""

    source_bytes: int
    source_sha256: str


def _encode_chunk(task: EncodeTask) -> EncodedChunk:
    encoder = worker_encoder(Path(task.tokenizer_dir))
    lines, bad = decode_lines(task.data)
    num_lines = len(lines)
    texts = [line for line in (line.rstrip("\r") for line in lines) if line.strip()]
    tokens, lengths = encoder.encode_packed(texts)
    assert tokens.dtype == np.uint16, "token ids do not fit uint16"
    with_tokens = lengths[lengths > 0]
    return EncodedChunk(task.first_line, num_lines, tokens, with_tokens, num_lines - len(texts),
                        len(texts) - len(with_tokens), int(np.count_nonzero(tokens == encoder.unk_id)),
                        bad[0] if bad else None, bad[1].reason if bad else None)


def _encode_or_pass(step: EncodeTask | ReuseShard | CloseShard) -> EncodedChunk | ReuseShard | CloseShard:
    """Pool task: encode an EncodeTask; reuse and close steps ride through so they stay in order."""
    return _encode_chunk(step) if isinstance(step, EncodeTask) else step


def _write_json(path: Path, value: dict) -> None:
    # Not fsynced, like the shard files beside it: a re-run re-checks every reused shard's sha256.
    atomic_write_json(path, value, durable=False)


class _ShardWriter:
    """One shard being written: tokens and offsets streamed to temporary files, renamed at close."""

    def __init__(self, out_dir: Path, index: int, first_line: int) -> None:
        self.index, self.first_line = index, first_line
        self.tokens_path = out_dir / (shard_name(index) + TOKENS_SUFFIX)
        self.offsets_path = out_dir / (shard_name(index) + OFFSETS_SUFFIX)
        self.marker_path = out_dir / (shard_name(index) + MARKER_SUFFIX)
        self.marker_path.unlink(missing_ok=True)  # the old shard is incomplete from here on
        self._tokens_tmp = tmp_path(self.tokens_path)
        self._offsets_tmp = tmp_path(self.offsets_path)
        self._tokens = open(self._tokens_tmp, "wb")
        self._offsets = open(self._offsets_tmp, "wb")
        self._tokens_digest, self._offsets_digest = hashlib.sha256(), hashlib.sha256()
        self._write_offsets(np.zeros(1, dtype=np.int64))
        self.num_lines = self.num_sentences = self.num_tokens = 0
        self.counts = {"empty_line": 0, "no_tokens": 0, "unk_tokens": 0}

    def _write_offsets(self, offsets: np.ndarray) -> None:
        data = offsets.tobytes()
        self._offsets.write(data)
        self._offsets_digest.update(data)

    def add(self, chunk: EncodedChunk) -> None:
        data = chunk.tokens.tobytes()
        self._tokens.write(data)
        self._tokens_digest.update(data)
        self._write_offsets(self.num_tokens + np.cumsum(chunk.lengths, dtype=np.int64))
        self.num_lines += chunk.num_lines
        self.num_sentences += len(chunk.lengths)
        self.num_tokens += len(chunk.tokens)
        self.counts["empty_line"] += chunk.empty_lines
        self.counts["no_tokens"] += chunk.no_token_lines
        self.counts["unk_tokens"] += chunk.unk_tokens

    def abort(self) -> None:
        for handle, path in ((self._tokens, self._tokens_tmp), (self._offsets, self._offsets_tmp)):
            with contextlib.suppress(OSError):  # a full disk fails the flush again; the error is known
                handle.close()
            path.unlink(missing_ok=True)

    def close(self, source: CloseShard, context: dict) -> dict:
        """Rename the files into place, then write the marker; returns the shard's meta entry."""
        self._tokens.close()
        self._offsets.close()
        os.replace(self._tokens_tmp, self.tokens_path)
        os.replace(self._offsets_tmp, self.offsets_path)
        entry = {
            "index": self.index,
            "tokens_file": self.tokens_path.name,
            "offsets_file": self.offsets_path.name,
            "first_line": self.first_line + 1,  # 1-based, as editors and error messages count
            "num_lines": self.num_lines,
            "num_sentences": self.num_sentences,
            "num_tokens": self.num_tokens,
            "tokens_sha256": self._tokens_digest.hexdigest(),
            "offsets_sha256": self._offsets_digest.hexdigest(),
            "source_bytes": source.source_bytes,
            "source_sha256": source.source_sha256,
            **self.counts,
        }
        _write_json(self.marker_path, {**context, "shard": entry})
        return entry


def _read_marker(out_dir: Path, index: int, context: dict) -> dict | None:
    """Shard `index`'s entry if its marker matches `context` and its files their sha256."""
    path = out_dir / (shard_name(index) + MARKER_SUFFIX)
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    entry = marker.pop("shard", None) if isinstance(marker, dict) else None
    if marker != context or not isinstance(entry, dict):
        return None
    for name, digest in (("tokens_file", "tokens_sha256"), ("offsets_file", "offsets_sha256")):
        file = out_dir / str(entry.get(name))
        if not file.is_file() or sha256_file(file) != entry.get(digest):
            return None
    return entry


class _Plan:
    """Reads the corpus in file order and says, shard by shard, what to encode and what to reuse.

    Source bytes are read once, into the whole-file sha256 and the running shard's sha256. A
    shard is reused when its marker matches and its input lines hash the same (wherever they now
    start: an edit in an earlier shard does not invalidate it); a partial last shard only while
    its lines still end the file.
    """

    def __init__(self, text_path: Path, out_dir: Path, shard_lines: int, context: dict) -> None:
        self.text_path, self.out_dir = text_path, out_dir
        self.shard_lines, self.context = shard_lines, context
        self.source_digest = hashlib.sha256()
        self.file_bytes = text_path.stat().st_size
        self.reused: list[dict] = []

    def steps(self, reader: LineReader, tokenizer_dir: str) -> Iterator[EncodeTask | ReuseShard | CloseShard]:
        """In file order: a ReuseShard, or for a shard to encode its EncodeTasks then a CloseShard."""
        index = 0
        while reader.bytes_taken < self.file_bytes:
            entry = _read_marker(self.out_dir, index, self.context)
            if entry is not None and self._still_matches(reader, entry):
                self.reused.append(entry)
                yield ReuseShard(entry)
            else:
                start, shard_digest = reader.bytes_taken, hashlib.sha256()
                remaining = self.shard_lines
                while remaining:
                    first = reader.lines_taken
                    data, count = reader.take(min(remaining, ENCODE_CHUNK_LINES), _READ_BYTES)
                    if not count:
                        break
                    self.source_digest.update(data)
                    shard_digest.update(data)
                    remaining -= count
                    yield EncodeTask(tokenizer_dir, first, data)
                yield CloseShard(reader.bytes_taken - start, shard_digest.hexdigest())
            index += 1

    def _still_matches(self, reader: LineReader, entry: dict) -> bool:
        """Whether the next lines are the ones the shard was encoded from (else rewind)."""
        start, first = reader.bytes_taken, reader.lines_taken
        if entry["first_line"] - 1 != first:
            return False
        shard_digest, source_digest = hashlib.sha256(), self.source_digest.copy()
        remaining = entry["num_lines"]
        while remaining:
            data, count = reader.take(min(remaining, ENCODE_CHUNK_LINES), _READ_BYTES)
            if not count:
                break
            shard_digest.update(data)
            source_digest.update(data)
            remaining -= count
        partial = entry["num_lines"] != self.shard_lines
        if (remaining or reader.bytes_taken - start != entry["source_bytes"]
                or shard_digest.hexdigest() != entry["source_sha256"]
                or (partial and reader.bytes_taken != self.file_bytes)):
            # A partial last shard is complete only while it still ends the file.
            reader.seek(start, first)
            return False
        self.source_digest = source_digest
        return True


def _remove_other_files(out_dir: Path, keep: set[str]) -> None:
    """Delete shard files, markers and temporaries of earlier runs that the new set does not list."""
    for path in out_dir.iterdir():
        if SHARD_FILE_PATTERN.match(path.name) and path.name not in keep:
            path.unlink()


def encode_corpus(text_path: Path, tokenizer_dir: Path, out_dir: Path, *, workers: int | None = None,
                  shard_lines: int = 1_000_000, pool: WorkerPool | None = None) -> dict:
    """Encode every non-empty line of `text_path` with FastEncoder into token shards in `out_dir`.

    `workers` processes encode (None: every available core), or the given `pool`'s. Shards follow
    input line ranges and results are written in input order, so the files are byte-identical for
    any `workers`. Shards of an earlier run that still match their input lines and tokenizer are
    kept without encoding; other shard files in `out_dir` are replaced. Returns the content of
    meta.json plus this run's `shards_encoded`, `shards_reused`, `workers` and `seconds`.
    """
    started = time.perf_counter()
    text_path, tokenizer_dir, out_dir = Path(text_path), Path(tokenizer_dir), Path(out_dir)
    if workers is not None and workers < 1:
        raise ConfigError("workers", f"must be >= 1 (or None for every core), got {workers}")
    if shard_lines < 1:
        raise ConfigError("shard_lines", f"must be >= 1, got {shard_lines}")
    if not text_path.is_file():
        raise InputError(text_path, "corpus file not found")
    encoder = worker_encoder(tokenizer_dir)  # loaded once per process, as in the workers
    folder = TokenizerFolder(tokenizer_dir)
    if encoder.vocab_size > 65536:
        raise InputError(folder.vocab_path, f"{encoder.vocab_size} tokens do not fit uint16 shards")
    if text_path.stat().st_size == 0:
        raise InputError(text_path, "no line gave any token; nothing to write")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SHARDS_META_FILE).unlink(missing_ok=True)  # the set is incomplete from here on
    context = {"format_version": FORMAT_VERSION, "shard_lines": shard_lines,
               "tokenizer_files_sha256": folder.file_hashes()}
    plan = _Plan(text_path, out_dir, shard_lines, context)
    with disk_errors(out_dir, lambda: _space_needed(text_path, tokenizer_dir), f"the token shards of {text_path}"):
        with pool_or_own(pool, workers) as encode_pool:
            shards = _write_shards(plan, str(tokenizer_dir), encode_pool)
        _remove_other_files(out_dir, {s[key] for s in shards for key in ("tokens_file", "offsets_file")}
                            | {shard_name(s["index"]) + MARKER_SUFFIX for s in shards})
        if sum(s["num_sentences"] for s in shards) == 0:
            raise InputError(text_path, "no line gave any token; nothing to write")
        meta = _meta(plan, shards, encoder.vocab_size, encoder.unk_id)
        _write_json(out_dir / SHARDS_META_FILE, meta)
    return {**meta, "shards_encoded": len(shards) - len(plan.reused),
            "shards_reused": len(plan.reused), "workers": encode_pool.workers,
            "seconds": round(time.perf_counter() - started, 3)}


def _space_needed(text_path: Path, tokenizer_dir: Path) -> SpaceNeeded:
    """The shard set's size, for a DiskFullError: 2 bytes a token and 8 an offset (one a sentence),
    measured by encoding the text's first 1 MiB of lines and scaled to the whole file. Shards
    finished before the disk filled are kept and count towards it."""
    data, size = sample_input(text_path, _SAMPLE_BYTES)
    chunk = _encode_chunk(EncodeTask(str(tokenizer_dir), 0, data))
    sample = 2 * len(chunk.tokens) + 8 * len(chunk.lengths)
    return SpaceNeeded(round(sample * size / max(len(data), 1)),
                       f"2 bytes a token and 8 a sentence: {len(chunk.tokens):,} tokens in {len(chunk.lengths):,} "
                       f"sentences from the first {len(data):,} bytes of the text, scaled to its {size:,}")


def _meta(plan: _Plan, shards: list[dict], vocab_size: int, unk_id: int) -> dict:
    """meta.json: the format, the tokenizer, the source file, totals and every shard's entry."""
    num_tokens = sum(s["num_tokens"] for s in shards)
    unk_tokens = sum(s["unk_tokens"] for s in shards)
    return {
        "format_version": FORMAT_VERSION,
        "dtype": "uint16",
        "offsets_dtype": "int64",
        "vocab_size": vocab_size,
        "unk_id": unk_id,
        "tokenizer_files_sha256": plan.context["tokenizer_files_sha256"],
        "source": {"name": plan.text_path.name, "bytes": plan.file_bytes,
                   "sha256": plan.source_digest.hexdigest()},
        "shard_lines": plan.shard_lines,
        "num_lines": sum(s["num_lines"] for s in shards),
        "num_sentences": sum(s["num_sentences"] for s in shards),
        "num_tokens": num_tokens,
        "unk_tokens": unk_tokens,
        "unk_rate": round(unk_tokens / max(num_tokens, 1), 6),
        "dropped": {"empty_line": sum(s["empty_line"] for s in shards),
                    "no_tokens": sum(s["no_tokens"] for s in shards)},
        "shards": shards,
    }


def _write_shards(plan: _Plan, tokenizer_dir: str, pool: WorkerPool) -> list[dict]:
    """Run the plan: encode on the pool, write results in file order, one shard at a time."""
    shards: list[dict] = []
    writer: _ShardWriter | None = None
    with LineReader(plan.text_path, chunk_bytes=_READ_BYTES, prefetch=False) as reader:
        results = pool.map_in_order(_encode_or_pass, plan.steps(reader, tokenizer_dir))
        try:
            for step in results:
                if isinstance(step, ReuseShard):
                    shards.append(step.entry)
                elif isinstance(step, CloseShard):
                    assert writer is not None
                    shards.append(writer.close(step, plan.context))
                    writer = None
                else:
                    if writer is None:
                        writer = _ShardWriter(plan.out_dir, step.first_line // plan.shard_lines,
                                              step.first_line)
                    writer.add(step)
                    if step.invalid_line is not None:
                        raise InputError(plan.text_path, f"not UTF-8 ({step.invalid_reason})",
                                         line=step.first_line + step.invalid_line + 1)
        finally:
            if writer is not None:
                writer.abort()
    return shards
