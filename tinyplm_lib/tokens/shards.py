"""Token shards: a sentence-per-line corpus encoded once into flat uint16 ids plus int64 offsets.

Shard k holds lines [k * shard_lines, (k + 1) * shard_lines): `.tokens.u16` the ids (no [CLS]/[SEP]),
`.offsets.i64` the n + 1 sentence boundaries, `.json` its completion marker; `meta.json` describes
the set. Here: the format and `TokenShards` (memory-mapped reader); `shard_writer` writes shards.
"""

from __future__ import annotations

import bisect
import json
import re
from pathlib import Path

import numpy as np

from tinyplm_lib.errors import StorageError
from tinyplm_lib.layout import SHARDS_META_FILE

FORMAT_VERSION = 1
TOKENS_SUFFIX = ".tokens.u16"
OFFSETS_SUFFIX = ".offsets.i64"
MARKER_SUFFIX = ".json"
# Every file a shard set may hold besides meta.json, with the temporaries of an unfinished write.
SHARD_FILE_PATTERN = re.compile(r"^\.?shard-(\d{5,})(\.tokens\.u16|\.offsets\.i64|\.json)(\.tmp)?$")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


class TokenShards:
    """Read-only view of a shard folder: memory-mapped, so opening costs no corpus-sized memory."""

    def __init__(self, shard_dir: Path) -> None:
        self.shard_dir = Path(shard_dir)
        meta_path = self.shard_dir / SHARDS_META_FILE
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
            raise StorageError(f"{path}: missing (listed in {SHARDS_META_FILE})")
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
