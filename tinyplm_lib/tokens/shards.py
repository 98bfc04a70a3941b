"""Token shards: a sentence-per-line corpus encoded once into flat uint16 ids plus int64 offsets.

Shard k holds input lines [k * shard_lines, (k + 1) * shard_lines): `shard-0000k.tokens.u16` is the
concatenated ids (no [CLS]/[SEP]), `shard-0000k.offsets.i64` the n + 1 sentence boundaries from 0,
and `shard-0000k.json`, written after both, marks it complete. A re-run skips every shard whose
marker still matches its input bytes, tokenizer and files. `meta.json`, written last, describes the
set; `TokenShards` memory-maps it back.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tinyplm_lib.corpora.corpus import LineReader, decode_lines
from tinyplm_lib.errors import ConfigError, InputError, StorageError
from tinyplm_lib.files import sha256_file
from tinyplm_lib.parallel import WorkerPool
from tinyplm_lib.tokens.encoding import CONFIG_FILE, VOCAB_FILE, WORDPIECE_FILE, worker_encoder

FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENS_SUFFIX = ".tokens.u16"
OFFSETS_SUFFIX = ".offsets.i64"
MARKER_SUFFIX = ".json"
_SHARD_FILE = re.compile(r"^\.?shard-(\d{5,})(\.tokens\.u16|\.offsets\.i64|\.json)(\.tmp)?$")
# Lines per pool task: 2,000 real cc100 lines are ~0.1 s of MeCab, so pickling a task and its
# result stays a small share, the 2 * workers tasks in flight hold only a few MB, and the last
# task of a file keeps the other workers idle only briefly (1,000 to 4,000 measured the same).
ENCODE_CHUNK_LINES = 2000
_READ_BYTES = 1 << 22


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _encode_chunk(task: tuple[str, int, bytes]) -> tuple:
    """Pool task: encode one block of lines; empty lines and lines that give no token are dropped.

    Returns (first line, line count, uint16 ids, int64 lengths, empty, no-token, [UNK] count, the
    first invalid UTF-8 line as (index, reason) or None).
    """
    tokenizer_dir, first, data = task
    encoder = worker_encoder(Path(tokenizer_dir))
    lines, bad = decode_lines(data)
    num_lines = len(lines)
    texts = [line for line in (line.rstrip("\r") for line in lines) if line.strip()]
    packed, lengths = encoder.encode_packed(texts)
    assert encoder.typecode == "H", "token ids do not fit uint16"
    tokens = np.frombuffer(packed, dtype=np.uint16)
    lengths = np.array(lengths, dtype=np.int64)
    with_tokens = lengths[lengths > 0]
    return (first, num_lines, tokens, with_tokens, num_lines - len(texts),
            len(texts) - len(with_tokens), int(np.count_nonzero(tokens == encoder.unk_id)),
            bad and (bad[0], bad[1].reason))


class _ShardWriter:
    """One shard being written: tokens and offsets streamed to temporary files, renamed at close."""

    def __init__(self, out_dir: Path, index: int, first_line: int) -> None:
        self.index, self.first_line = index, first_line
        self.tokens_path = out_dir / (shard_name(index) + TOKENS_SUFFIX)
        self.offsets_path = out_dir / (shard_name(index) + OFFSETS_SUFFIX)
        self.marker_path = out_dir / (shard_name(index) + MARKER_SUFFIX)
        self.marker_path.unlink(missing_ok=True)  # the old shard is incomplete from here on
        self._tokens_tmp = _tmp_path(self.tokens_path)
        self._offsets_tmp = _tmp_path(self.offsets_path)
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

    def add(self, result: tuple) -> None:
        _, num_lines, tokens, lengths, empty, no_tokens, unk, _ = result
        data = tokens.tobytes()
        self._tokens.write(data)
        self._tokens_digest.update(data)
        self._write_offsets(self.num_tokens + np.cumsum(lengths))
        self.num_lines += num_lines
        self.num_sentences += len(lengths)
        self.num_tokens += len(tokens)
        for key, value in zip(self.counts, (empty, no_tokens, unk)):
            self.counts[key] += value

    def abort(self) -> None:
        for handle, path in ((self._tokens, self._tokens_tmp), (self._offsets, self._offsets_tmp)):
            handle.close()
            path.unlink(missing_ok=True)

    def close(self, source: dict, context: dict) -> dict:
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
            "source_bytes": source["bytes"],
            "source_sha256": source["sha256"],
            **self.counts,
        }
        _write_json(self.marker_path, {**context, "shard": entry})
        return entry


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _write_json(path: Path, value: dict) -> None:
    tmp = _tmp_path(path)
    tmp.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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

    def items(self, reader: LineReader, tokenizer_dir: str) -> Iterator[tuple]:
        """In file order: ("reuse", entry), or ("encode", task) for each block of a shard to encode
        followed by ("close", its input bytes and their sha256)."""
        index = 0
        while reader.bytes_taken < self.file_bytes:
            entry = _read_marker(self.out_dir, index, self.context)
            if entry is not None and self._still_matches(reader, entry):
                self.reused.append(entry)
                yield "reuse", entry
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
                    yield "encode", (tokenizer_dir, first, data)
                yield "close", {"bytes": reader.bytes_taken - start,
                                "sha256": shard_digest.hexdigest()}
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
        if _SHARD_FILE.match(path.name) and path.name not in keep:
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
    if encoder.vocab_size > 65536:
        raise InputError(tokenizer_dir / VOCAB_FILE,
                         f"{encoder.vocab_size} tokens do not fit uint16 shards")
    if text_path.stat().st_size == 0:
        raise InputError(text_path, "no line gave any token; nothing to write")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)  # the set is incomplete from here on
    tokenizer_sha256 = {name: sha256_file(tokenizer_dir / name)
                        for name in (VOCAB_FILE, CONFIG_FILE, WORDPIECE_FILE)}
    context = {"format_version": FORMAT_VERSION, "shard_lines": shard_lines,
               "tokenizer_files_sha256": tokenizer_sha256}
    plan = _Plan(text_path, out_dir, shard_lines, context)
    if pool is None:
        with WorkerPool(workers) as own:
            shards = _write_shards(plan, str(tokenizer_dir), own)
            used_workers = own.workers
    else:
        shards = _write_shards(plan, str(tokenizer_dir), pool)
        used_workers = pool.workers
    _remove_other_files(out_dir, {s[key] for s in shards for key in ("tokens_file", "offsets_file")}
                        | {shard_name(s["index"]) + MARKER_SUFFIX for s in shards})

    num_sentences = sum(s["num_sentences"] for s in shards)
    if num_sentences == 0:
        raise InputError(text_path, "no line gave any token; nothing to write")
    num_tokens = sum(s["num_tokens"] for s in shards)
    unk_tokens = sum(s["unk_tokens"] for s in shards)
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": "uint16",
        "offsets_dtype": "int64",
        "vocab_size": encoder.vocab_size,
        "unk_id": encoder.unk_id,
        "tokenizer_files_sha256": tokenizer_sha256,
        "source": {"name": text_path.name, "bytes": plan.file_bytes,
                   "sha256": plan.source_digest.hexdigest()},
        "shard_lines": shard_lines,
        "num_lines": sum(s["num_lines"] for s in shards),
        "num_sentences": num_sentences,
        "num_tokens": num_tokens,
        "unk_tokens": unk_tokens,
        "unk_rate": round(unk_tokens / max(num_tokens, 1), 6),
        "dropped": {"empty_line": sum(s["empty_line"] for s in shards),
                    "no_tokens": sum(s["no_tokens"] for s in shards)},
        "shards": shards,
    }
    _write_json(out_dir / META_FILE, meta)
    return {**meta, "shards_encoded": len(shards) - len(plan.reused),
            "shards_reused": len(plan.reused), "workers": used_workers,
            "seconds": round(time.perf_counter() - started, 3)}


def _write_shards(plan: _Plan, tokenizer_dir: str, pool: WorkerPool) -> list[dict]:
    """Run the plan: encode on the pool, write results in file order, one shard at a time."""
    shards: list[dict] = []
    writer: _ShardWriter | None = None
    with LineReader(plan.text_path, chunk_bytes=_READ_BYTES, prefetch=False) as reader:
        # "reuse" and "close" ride through the pool as no-ops so that they come back in order.
        results = pool.map_in_order(_encode_or_pass, plan.items(reader, tokenizer_dir))
        try:
            for kind, result in results:
                if kind == "reuse":
                    shards.append(result)
                elif kind == "close":
                    assert writer is not None
                    shards.append(writer.close(result, plan.context))
                    writer = None
                else:
                    first = result[0]
                    if writer is None:
                        writer = _ShardWriter(plan.out_dir, first // plan.shard_lines, first)
                    writer.add(result)
                    if result[7] is not None:
                        line, reason = result[7]
                        raise InputError(plan.text_path, f"not UTF-8 ({reason})",
                                         line=first + line + 1)
        finally:
            if writer is not None:
                writer.abort()
    return shards


def _encode_or_pass(item: tuple) -> tuple:
    kind, payload = item
    return (kind, _encode_chunk(payload)) if kind == "encode" else item


class TokenShards:
    """Read-only view of a shard folder: memory-mapped, so opening costs no corpus-sized memory."""

    def __init__(self, shard_dir: Path) -> None:
        self.shard_dir = Path(shard_dir)
        meta_path = self.shard_dir / META_FILE
        if not meta_path.is_file():
            raise StorageError(f"{meta_path}: missing; the shards were never finished")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("format_version") != FORMAT_VERSION or self.meta.get("dtype") != "uint16":
            raise StorageError(f"{meta_path}: unsupported format {self.meta.get('format_version')!r} "
                               f"/ dtype {self.meta.get('dtype')!r}")
        self.num_sentences: int = int(self.meta["num_sentences"])
        self.num_tokens: int = int(self.meta["num_tokens"])
        self.vocab_size: int = int(self.meta["vocab_size"])
        self.unk_id: int = int(self.meta["unk_id"])
        self._tokens: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        starts = [0]
        for entry in self.meta["shards"]:
            tokens = self._map(entry["tokens_file"], np.uint16, entry["num_tokens"])
            offsets = self._map(entry["offsets_file"], np.int64, entry["num_sentences"] + 1)
            if offsets[0] != 0 or offsets[-1] != entry["num_tokens"]:
                raise StorageError(f"{self.shard_dir / entry['offsets_file']}: offsets run from "
                                   f"{offsets[0]} to {offsets[-1]}, "
                                   f"expected 0 to {entry['num_tokens']}")
            self._tokens.append(tokens)
            self._offsets.append(offsets)
            starts.append(starts[-1] + entry["num_sentences"])
        if starts[-1] != self.num_sentences or sum(len(t) for t in self._tokens) != self.num_tokens:
            raise StorageError(f"{meta_path}: shard totals disagree with num_sentences/num_tokens")
        self._starts = starts

    def _map(self, name: str, dtype, count: int) -> np.ndarray:
        path = self.shard_dir / name
        expected = count * np.dtype(dtype).itemsize
        if not path.is_file():
            raise StorageError(f"{path}: missing (listed in {META_FILE})")
        actual = path.stat().st_size
        if actual != expected:
            raise StorageError(f"{path}: {actual} bytes, expected {expected} "
                               f"({count} x {np.dtype(dtype).name}); the file is truncated "
                               "or does not belong to this meta.json")
        if count == 0:
            return np.zeros(0, dtype=dtype)  # mmap refuses empty files
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,))

    def __len__(self) -> int:
        return self.num_sentences

    @property
    def num_shards(self) -> int:
        return len(self._tokens)

    def shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, offsets) of shard k, memory-mapped."""
        return self._tokens[k], self._offsets[k]

    def lengths(self) -> np.ndarray:
        """Token count of every sentence, in order (int32)."""
        if not self._offsets:
            return np.zeros(0, dtype=np.int32)
        return np.concatenate([np.diff(offsets).astype(np.int32) for offsets in self._offsets])

    def sentence(self, i: int) -> np.ndarray:
        """uint16 ids of sentence i, counted across all shards (a view, not a copy)."""
        if not 0 <= i < self.num_sentences:
            raise IndexError(f"sentence {i} out of range [0, {self.num_sentences})")
        k = bisect.bisect_right(self._starts, i) - 1
        local = i - self._starts[k]
        offsets = self._offsets[k]
        return np.asarray(self._tokens[k][offsets[local]:offsets[local + 1]])
