"""Build the JaWiki corpus from a CirrusSearch content dump: cleaned, split, deduplicated sentences.

Three streaming passes with flat memory: (1) worker processes parse, clean, split and length-filter
blocks of dump lines while this process pairs index and document lines in file order, appending
candidate sentences to a work file with their split tags and 64-bit hashes; (2) find later
occurrences of each hash bucket by bucket on disk; (3) copy first occurrences into train/validation.
The split is per article: `in_validation(seed, "page:<page_id>", fraction)`. The output is
byte-identical for any number of workers.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tinyplm_lib.cleaning import clean_wiki_text, split_sentences
from tinyplm_lib.corpus import (
    AtomicTextWriter,
    CorpusStats,
    LineReader,
    decode_lines,
    in_validation,
    iter_flags,
    mark_first_occurrences,
    sentence_hash,
)
from tinyplm_lib.encoding import WorkerPool
from tinyplm_lib.errors import ConfigError, InputError

_TRAIN, _VALIDATION = b"T", b"V"  # split tag of each candidate, in the tags work file
# Raw bytes per pool task: ~50 articles, ~40 ms of cleaning and splitting.
BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class JawikiSettings:
    """Settings of the JaWiki corpus; the defaults reproduce the original's corpus size."""

    # First N namespace-0 articles (None: all). The original's JAWIKI_MAX_DOCUMENTS counted
    # dump lines (two per article, any namespace); this counts articles.
    max_documents: int | None = None
    # Share of articles in validation: ~1.2M of 39.6M sentences on the full dump.
    validation_fraction: float = 0.03
    seed: int = 42
    min_chars: int = 10  # sentence length limits, in characters after cleaning
    max_chars: int = 1000

    def validate(self) -> None:
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError("max_documents", f"must be None or >= 1, got {self.max_documents}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(
                "validation_fraction", f"must be in (0, 1), got {self.validation_fraction}"
            )
        if self.min_chars < 1:
            raise ConfigError("min_chars", f"must be >= 1, got {self.min_chars}")
        if self.max_chars < self.min_chars:
            raise ConfigError(
                "max_chars", f"must be >= min_chars ({self.min_chars}), got {self.max_chars}"
            )


def _clean_document(record: dict, min_chars: int, max_chars: int):
    """What pass 1 needs of one document line, computed in a worker (the pairing is not known yet)."""
    namespace = record.get("namespace")
    text = record.get("text")
    has_page_id = "page_id" in record
    page_id = record.get("page_id")
    if not isinstance(namespace, int) or namespace != 0 or not isinstance(text, str):
        return ("doc", namespace, has_page_id, page_id, isinstance(text, str), None)
    title = record.get("title") if isinstance(record.get("title"), str) else None
    sentences = split_sentences(clean_wiki_text(text, title=title))
    kept = [s for s in sentences if min_chars <= len(s) <= max_chars]
    too_short = sum(1 for s in sentences if len(s) < min_chars)
    hashes = array("Q", map(sentence_hash, kept))
    if sys.byteorder != "little":  # the dedup step reads little-endian uint64
        hashes.byteswap()
    blob = "".join(s + "\n" for s in kept).encode()
    counts = (len(sentences), len(kept), too_short, len(sentences) - len(kept) - too_short)
    return ("doc", namespace, has_page_id, page_id, True, (counts, blob, hashes.tobytes()))


def _parse_block(task: tuple[int, bytes, int, int]) -> tuple[int, list[tuple]]:
    """Pool task: one outcome per line of the block: blank, error, index or document."""
    first, data, min_chars, max_chars = task
    lines, bad = decode_lines(data)
    outcomes: list[tuple] = []
    for line in lines:
        if not line.strip():
            outcomes.append(("blank",))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            outcomes.append(("error", f"malformed JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(record, dict):
            outcomes.append(("error", "expected a JSON object"))
        elif "index" in record and len(record) == 1:
            index = record["index"]
            outcomes.append(("index", index.get("_id") if isinstance(index, dict) else None))
        else:
            outcomes.append(_clean_document(record, min_chars, max_chars))
    if bad is not None:
        outcomes.append(("error", f"invalid UTF-8 at byte {bad[1].start} of the line"))
    return first, outcomes


def _blocks(reader: LineReader, settings: JawikiSettings) -> Iterator[tuple[int, bytes, int, int]]:
    while True:
        first = reader.lines_taken + 1
        data, count = reader.take(1 << 30, BLOCK_BYTES)
        if not count:
            return
        yield first, data, settings.min_chars, settings.max_chars


def _first_pass(raw_path: Path, settings: JawikiSettings, stats: CorpusStats, work: Path,
                pool: WorkerPool) -> int:
    """Pair, count and append candidates to the work files in dump order; returns their count."""
    count = 0
    pending_index: int | None = None  # line number of an index line awaiting its document
    index_id = None
    with LineReader(raw_path, chunk_bytes=BLOCK_BYTES) as reader, \
            open(work / "candidates.txt", "wb") as candidates, \
            open(work / "tags.u8", "wb") as tags, open(work / "hashes.u64", "wb") as hash_file:
        for first, outcomes in pool.map_in_order(_parse_block, _blocks(reader, settings)):
            for line_no, outcome in enumerate(outcomes, start=first):
                kind = outcome[0]
                stats.input_lines = line_no
                if kind == "blank":
                    continue
                if kind == "error":
                    raise InputError(raw_path, outcome[1], line=line_no)
                if pending_index is None:
                    if kind != "index":
                        raise InputError(raw_path, 'expected an {"index": ...} line before each '
                                         "document", line=line_no)
                    pending_index, index_id = line_no, outcome[1]
                    continue
                if kind == "index":
                    raise InputError(raw_path, "index line without its document", line=pending_index)
                pending_index = None
                _, namespace, has_page_id, page_id, text_ok, cleaned = outcome
                if not has_page_id:
                    page_id = index_id
                if not isinstance(namespace, int):
                    raise InputError(raw_path, "document lacks an integer 'namespace'", line=line_no)
                if namespace != 0:
                    stats.drop("documents_other_namespace")
                    continue
                if not text_ok:
                    raise InputError(raw_path, "document lacks a string 'text'", line=line_no)
                if page_id is None:
                    raise InputError(raw_path, "document lacks 'page_id' (and index _id)", line=line_no)
                stats.documents_read += 1
                (sentences, kept, too_short, too_long), blob, hashes = cleaned
                stats.lines_read += sentences
                if too_short:
                    stats.drop("sentences_too_short", too_short)
                if too_long:
                    stats.drop("sentences_too_long", too_long)
                chosen = in_validation(settings.seed, f"page:{page_id}", settings.validation_fraction)
                tag = _VALIDATION if chosen else _TRAIN
                candidates.write(blob)
                tags.write(tag * kept)
                hash_file.write(hashes)
                count += kept
                if not sentences:
                    stats.drop("documents_empty_text")
                elif not kept:
                    stats.drop("documents_no_sentence_in_length_range")
                elif tag == _VALIDATION:
                    stats.documents_validation += 1
                else:
                    stats.documents_train += 1
                if stats.documents_read == settings.max_documents:
                    return count  # max_documents counts namespace-0 articles, not dump lines
    if pending_index is not None:
        raise InputError(raw_path, "index line without its document at the end", line=pending_index)
    return count


def _iter_bytes(path: Path, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of a file one at a time (as 1-byte `bytes`), one chunk in memory."""
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            yield from (chunk[i:i + 1] for i in range(len(chunk)))


def build_jawiki_corpus(
    raw_path: Path,
    train_path: Path,
    validation_path: Path,
    settings: JawikiSettings,
    work_dir: Path | None = None,
    *,
    workers: int | None = None,
    pool: WorkerPool | None = None,
) -> CorpusStats:
    """Stream a CirrusSearch dump into deduplicated train and validation sentence files.

    `workers` processes parse and clean articles (None: every available core), or the given
    `pool`'s. Work files (~the cleaned text plus 9 bytes a sentence) go to a temporary folder
    inside `work_dir` (default: beside `train_path`) and are removed at the end, success or not.
    documents_train/validation count articles with at least one sentence in the length range
    (before dedup); articles with none are counted in `dropped` instead.
    """
    settings.validate()
    raw_path, train_path, validation_path = Path(raw_path), Path(train_path), Path(validation_path)
    if train_path.resolve() == validation_path.resolve():
        raise ConfigError("validation_path", "must differ from train_path")
    if pool is None:
        with WorkerPool(workers) as own:
            return _build(raw_path, train_path, validation_path, settings, work_dir, own)
    return _build(raw_path, train_path, validation_path, settings, work_dir, pool)


def _build(raw_path: Path, train_path: Path, validation_path: Path, settings: JawikiSettings,
           work_dir: Path | None, pool: WorkerPool) -> CorpusStats:
    stats = CorpusStats(source=str(raw_path))
    started = time.perf_counter()
    parent = Path(work_dir) if work_dir is not None else train_path.parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".jawiki-work-", dir=parent))
    try:
        with AtomicTextWriter(train_path) as train, AtomicTextWriter(validation_path) as validation:
            count = _first_pass(raw_path, settings, stats, work, pool)
            if stats.documents_read == 0:
                raise InputError(raw_path, "contains no namespace-0 articles; check the dump file")
            hashes_path, flags_path = work / "hashes.u64", work / "first.u8"
            duplicates, buckets = mark_first_occurrences(hashes_path, count, flags_path)
            hashes_path.unlink()
            stats.drop("sentences_duplicate", duplicates)
            with open(work / "candidates.txt", "rb") as candidates:
                rows = zip(candidates, iter_flags(flags_path), _iter_bytes(work / "tags.u8"),
                           strict=True)
                for raw, keep, tag in rows:
                    if not keep:
                        continue
                    sentence = raw[:-1].decode()
                    if tag == _VALIDATION:
                        validation.write_line(sentence)
                        stats.lines_validation += 1
                        stats.chars_validation += len(sentence)
                    else:
                        train.write_line(sentence)
                        stats.lines_train += 1
                        stats.chars_train += len(sentence)
            if stats.lines_train + stats.lines_validation == 0:
                raise InputError(
                    raw_path, "no sentence survived cleaning; check min_chars/max_chars"
                )
            if stats.lines_validation == 0 or stats.lines_train == 0:
                empty = "validation" if stats.lines_validation == 0 else "train"
                raise ConfigError(
                    "validation_fraction",
                    f"the {empty} split is empty ({stats.documents_read} articles read): "
                    f"{'raise' if empty == 'validation' else 'lower'} validation_fraction "
                    "or raise max_documents",
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stats.seconds = time.perf_counter() - started
    stats.details = {
        "candidate_sentences": count,
        "dedup_buckets": buckets,
        "seed": settings.seed,
        "validation_fraction": settings.validation_fraction,
        "workers": pool.workers,
    }
    return stats
