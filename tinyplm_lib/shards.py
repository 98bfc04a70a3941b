"""Token shards: a sentence-per-line corpus encoded once into flat uint16 ids plus int64 offsets.

Shard k holds input lines [k * shard_lines, (k + 1) * shard_lines): `shard-0000k.tokens.u16` is the
concatenated ids (no [CLS]/[SEP]), `shard-0000k.offsets.i64` the n + 1 sentence boundaries from 0.
`meta.json`, written last, describes the set; `TokenShards` memory-maps it back.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tinyplm_lib.encoding import CONFIG_FILE, VOCAB_FILE, WORDPIECE_FILE, FastEncoder, map_in_order
from tinyplm_lib.errors import ConfigError, InputError, StorageError
from tinyplm_lib.storage import sha256_file

FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENS_SUFFIX = ".tokens.u16"
OFFSETS_SUFFIX = ".offsets.i64"
# Lines per pool task: 2,000 real lines take ~0.13 s to encode (15k lines/s per process), so
# pickling a task and its result stays a small share, and in-flight tasks hold only a few MB.
ENCODE_CHUNK_LINES = 2000


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


_worker_encoder: FastEncoder | None = None


def _init_encode_worker(tokenizer_dir: str) -> None:
    global _worker_encoder
    _worker_encoder = FastEncoder.from_dir(Path(tokenizer_dir))


def _encode_chunk(chunk: tuple[int, list[str]]) -> dict:
    """Encode one chunk; empty lines and lines that give no token are dropped and counted."""
    first, lines = chunk
    encoder = _worker_encoder
    assert encoder is not None
    texts = [line for line in lines if line.strip()]
    encoded = [ids for ids in encoder.encode_batch(texts) if ids]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    total = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=total)
    assert total == 0 or int(ids.max()) < 65536, "token id does not fit uint16"
    return {
        "first": first,
        "num_lines": len(lines),
        "tokens": ids.astype(np.uint16),
        "lengths": lengths,
        "empty_line": len(lines) - len(texts),
        "no_tokens": len(texts) - len(encoded),
        "unk_tokens": int(np.count_nonzero(ids == encoder.unk_id)),
    }


def _read_chunks(text_path: Path, shard_lines: int, source: dict) -> Iterator[tuple[int, list[str]]]:
    """(first line index, lines) chunks that never straddle a shard boundary."""
    digest = hashlib.sha256()
    chunk: list[str] = []
    first = 0
    with open(text_path, "rb") as handle:
        for index, raw in enumerate(handle):
            digest.update(raw)
            source["bytes"] += len(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(text_path, f"not UTF-8 ({exc.reason})", line=index + 1) from None
            if not chunk:
                first = index
            chunk.append(text.rstrip("\r\n"))
            if len(chunk) == ENCODE_CHUNK_LINES or (index + 1) % shard_lines == 0:
                yield first, chunk
                chunk = []
    if chunk:
        yield first, chunk
    source["sha256"] = digest.hexdigest()


class _ShardWriter:
    """One shard being written: tokens streamed to a temporary file, offsets kept until close."""

    def __init__(self, out_dir: Path, index: int, first_line: int) -> None:
        self.index, self.first_line = index, first_line
        self.tokens_path = out_dir / (shard_name(index) + TOKENS_SUFFIX)
        self.offsets_path = out_dir / (shard_name(index) + OFFSETS_SUFFIX)
        self._tokens_tmp = self.tokens_path.with_name(f".{self.tokens_path.name}.tmp")
        self._tokens = open(self._tokens_tmp, "wb")
        self._digest = hashlib.sha256()
        self._lengths: list[np.ndarray] = []
        self.num_lines = 0

    def add(self, result: dict) -> None:
        data = result["tokens"].tobytes()
        self._tokens.write(data)
        self._digest.update(data)
        self._lengths.append(result["lengths"])
        self.num_lines += result["num_lines"]

    def abort(self) -> None:
        self._tokens.close()
        self._tokens_tmp.unlink(missing_ok=True)

    def close(self) -> dict:
        self._tokens.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        offsets_tmp = self.offsets_path.with_name(f".{self.offsets_path.name}.tmp")
        offsets_bytes = offsets.tobytes()
        offsets_tmp.write_bytes(offsets_bytes)
        os.replace(self._tokens_tmp, self.tokens_path)
        os.replace(offsets_tmp, self.offsets_path)
        return {
            "index": self.index,
            "tokens_file": self.tokens_path.name,
            "offsets_file": self.offsets_path.name,
            "first_line": self.first_line + 1,  # 1-based, as editors and error messages count
            "num_lines": self.num_lines,
            "num_sentences": len(lengths),
            "num_tokens": int(offsets[-1]),
            "tokens_sha256": self._digest.hexdigest(),
            "offsets_sha256": hashlib.sha256(offsets_bytes).hexdigest(),
        }


def _clear_previous(out_dir: Path) -> None:
    """Remove meta.json first (the set is then incomplete), then shard files of an earlier run."""
    (out_dir / META_FILE).unlink(missing_ok=True)
    for path in out_dir.iterdir():
        name = path.name.lstrip(".")
        if name.startswith("shard-") and (TOKENS_SUFFIX in name or OFFSETS_SUFFIX in name):
            path.unlink()


def encode_corpus(text_path: Path, tokenizer_dir: Path, out_dir: Path, *, workers: int = 1,
                  shard_lines: int = 1_000_000) -> dict:
    """Encode every non-empty line of `text_path` with FastEncoder into token shards in `out_dir`.

    Shards follow input line ranges and results are written in input order, so the files are
    byte-identical for any `workers`. Earlier shard files in `out_dir` are replaced. Returns the
    content of meta.json.
    """
    text_path, tokenizer_dir, out_dir = Path(text_path), Path(tokenizer_dir), Path(out_dir)
    if workers < 1:
        raise ConfigError("workers", f"must be >= 1, got {workers}")
    if shard_lines < 1:
        raise ConfigError("shard_lines", f"must be >= 1, got {shard_lines}")
    if not text_path.is_file():
        raise InputError(text_path, "corpus file not found")
    encoder = FastEncoder.from_dir(tokenizer_dir)
    if encoder.vocab_size > 65536:
        raise InputError(tokenizer_dir / VOCAB_FILE,
                         f"{encoder.vocab_size} tokens do not fit uint16 shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir)

    source = {"name": text_path.name, "bytes": 0, "sha256": None}
    shards: list[dict] = []
    totals = {"empty_line": 0, "no_tokens": 0, "unk_tokens": 0}
    writer: _ShardWriter | None = None
    chunks = _read_chunks(text_path, shard_lines, source)
    results = map_in_order(_encode_chunk, chunks, workers=workers, initializer=_init_encode_worker,
                           initargs=(str(tokenizer_dir),))
    try:
        for result in results:
            index = result["first"] // shard_lines
            if writer is None or writer.index != index:
                if writer is not None:
                    shards.append(writer.close())
                writer = _ShardWriter(out_dir, index, result["first"])
            writer.add(result)
            for key in totals:
                totals[key] += result[key]
        if writer is not None:
            shards.append(writer.close())
            writer = None
    finally:
        if writer is not None:
            writer.abort()

    num_sentences = sum(s["num_sentences"] for s in shards)
    if num_sentences == 0:
        raise InputError(text_path, "no line gave any token; nothing to write")
    num_tokens = sum(s["num_tokens"] for s in shards)
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": "uint16",
        "offsets_dtype": "int64",
        "vocab_size": encoder.vocab_size,
        "unk_id": encoder.unk_id,
        "tokenizer_files_sha256": {name: sha256_file(tokenizer_dir / name)
                                   for name in (VOCAB_FILE, CONFIG_FILE, WORDPIECE_FILE)},
        "source": source,
        "shard_lines": shard_lines,
        "num_lines": sum(s["num_lines"] for s in shards),
        "num_sentences": num_sentences,
        "num_tokens": num_tokens,
        "unk_tokens": totals["unk_tokens"],
        "unk_rate": round(totals["unk_tokens"] / max(num_tokens, 1), 6),
        "dropped": {"empty_line": totals["empty_line"], "no_tokens": totals["no_tokens"]},
        "shards": shards,
    }
    tmp = out_dir / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / META_FILE)
    return meta


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
