"""Build the JaWiki corpus from a CirrusSearch content dump: cleaned, split, deduplicated sentences.

Three streaming passes with flat memory: (1) worker processes parse, clean, split and length-filter
blocks of dump lines while this process pairs index and document lines in file order, appending
candidate sentences to a work file with their split tags and 64-bit hashes; (2) find later
occurrences of each hash bucket by bucket on disk; (3) copy first occurrences into train/validation.
The split is per article: `in_validation(seed, "page:<page_id>", fraction)`. The output is
byte-identical for any number of workers.

Bad dump lines (malformed JSON, invalid UTF-8, a document missing a field, a line over
`max_record_bytes`, an index line without its document or the reverse) are skipped and counted
by reason in `CorpusStats.skipped`, up to `max_bad_records`; past that the build fails naming the
first bad line. Control characters in kept articles are removed by `clean_wiki_text` and the
articles counted in `control_char_records`.
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

from tinyplm_lib.corpora.cleaning import clean_wiki_text, has_control_chars, split_sentences
from tinyplm_lib.corpora.corpus import (
    AtomicTextWriter,
    BadRecords,
    CorpusStats,
    LineReader,
    decode_block,
    in_validation,
    iter_flags,
    mark_first_occurrences,
    over_size,
    sentence_hash,
)
from tinyplm_lib.errors import ConfigError, InputError
from tinyplm_lib.parallel import WorkerPool

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
    # Bad-record policy: up to this many bad dump lines are skipped and counted by reason; one
    # more fails the build (0 = strict). 100 lets a few damaged lines of a 4.6M-line dump pass
    # while a broken or wrong file still fails fast.
    max_bad_records: int = 100
    # A dump line longer than this (bytes) is a bad record. The sample's longest is 185 kB; real
    # dump lines also carry the wikitext (`source_text`) and the longest run to a few MB.
    max_record_bytes: int = 16 << 20

    def validate(self) -> None:
        if self.max_bad_records < 0:
            raise ConfigError("max_bad_records", f"must be >= 0 (0: any bad line fails), got "
                              f"{self.max_bad_records}")
        if self.max_record_bytes < 1:
            raise ConfigError("max_record_bytes", f"must be >= 1, got {self.max_record_bytes}")
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
        return ("doc", namespace, has_page_id, page_id, isinstance(text, str), None, False)
    title = record.get("title") if isinstance(record.get("title"), str) else None
    sentences = split_sentences(clean_wiki_text(text, title=title))
    kept = [s for s in sentences if min_chars <= len(s) <= max_chars]
    too_short = sum(1 for s in sentences if len(s) < min_chars)
    hashes = array("Q", map(sentence_hash, kept))
    if sys.byteorder != "little":  # the dedup step reads little-endian uint64
        hashes.byteswap()
    blob = "".join(s + "\n" for s in kept).encode()
    counts = (len(sentences), len(kept), too_short, len(sentences) - len(kept) - too_short)
    return ("doc", namespace, has_page_id, page_id, True, (counts, blob, hashes.tobytes()),
            has_control_chars(text))


def _parse_block(task: tuple[int, bytes, int, int, int, dict[int, int]]) -> tuple[int, list[tuple]]:
    """Pool task: one outcome per line of the block: blank, bad (reason, detail), index or document."""
    first, data, min_chars, max_chars, max_record_bytes, long_lines = task
    lines, invalid = decode_block(data)
    bad = {index: ("invalid_utf8", f"invalid UTF-8 at byte {start} of the line")
           for index, start in invalid}
    too_long = over_size(lines, max_record_bytes) + [(n - first, size) for n, size in long_lines.items()]
    for index, size in too_long:
        bad[index] = ("record_too_long", f"line of {size} bytes, over max_record_bytes "
                      f"({max_record_bytes})")
    outcomes: list[tuple] = []
    for index, line in enumerate(lines):
        if bad and index in bad:
            outcomes.append(("bad", *bad[index]))
            continue
        if not line.strip():
            outcomes.append(("blank",))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            outcomes.append(("bad", "malformed_json", f"malformed JSON ({exc.msg} at column {exc.colno})"))
            continue
        except (ValueError, RecursionError) as exc:
            # A number over Python's 4,300-digit limit, or "[[[[…" deeper than the parser's stack.
            outcomes.append(("bad", "malformed_json", f"malformed JSON ({str(exc)[:100]})"))
            continue
        if not isinstance(record, dict):
            outcomes.append(("bad", "not_a_json_object", "expected a JSON object"))
        elif "index" in record and len(record) == 1:
            index_entry = record["index"]
            outcomes.append(("index", index_entry.get("_id") if isinstance(index_entry, dict) else None))
        else:
            outcomes.append(_clean_document(record, min_chars, max_chars))
    return first, outcomes


def _blocks(reader: LineReader, settings: JawikiSettings) -> Iterator[tuple]:
    while True:
        first = reader.lines_taken + 1
        data, count = reader.take(1 << 30, BLOCK_BYTES)
        if not count:
            return
        yield (first, data, settings.min_chars, settings.max_chars, settings.max_record_bytes,
               reader.pop_long_lines())


def _first_pass(raw_path: Path, settings: JawikiSettings, stats: CorpusStats, records: BadRecords,
                work: Path, pool: WorkerPool) -> int:
    """Pair, count and append candidates to the work files in dump order; returns their count."""
    count = 0
    pending_index: int | None = None  # line number of an index line awaiting its document
    index_id = None
    # After a bad line with no index pending, that line was most likely an index line: the next
    # document may then come without one (else one damaged index line would cost two records).
    loose = False
    with LineReader(raw_path, chunk_bytes=BLOCK_BYTES, max_line_bytes=settings.max_record_bytes) \
            as reader, open(work / "candidates.txt", "wb") as candidates, \
            open(work / "tags.u8", "wb") as tags, open(work / "hashes.u64", "wb") as hash_file:
        for first, outcomes in pool.map_in_order(_parse_block, _blocks(reader, settings)):
            for line_no, outcome in enumerate(outcomes, start=first):
                kind = outcome[0]
                stats.input_lines = line_no
                if kind == "blank":
                    continue
                if kind == "bad":
                    records.skip(line_no, outcome[1], outcome[2])
                    # A bad line after an index line is taken as that index's document.
                    loose, pending_index = pending_index is None, None
                    continue
                if kind == "index":
                    if pending_index is not None:
                        records.skip(pending_index, "index_without_document",
                                     "index line without its document")
                    pending_index, index_id, loose = line_no, outcome[1], False
                    continue
                if pending_index is None:
                    if not loose:
                        records.skip(line_no, "document_without_index",
                                     'expected an {"index": ...} line before each document')
                        continue
                    index_id = None
                pending_index, loose = None, False
                _, namespace, has_page_id, page_id, text_ok, cleaned, controls = outcome
                if not has_page_id:
                    page_id = index_id
                if not isinstance(namespace, int):
                    records.skip(line_no, "missing_field", "document lacks an integer 'namespace'")
                    continue
                if namespace != 0:
                    stats.drop("documents_other_namespace")
                    continue
                if not text_ok:
                    records.skip(line_no, "missing_field", "document lacks a string 'text'")
                    continue
                if page_id is None:
                    records.skip(line_no, "missing_field", "document lacks 'page_id' (and index _id)")
                    continue
                stats.documents_read += 1
                stats.control_char_records += controls
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
        records.skip(pending_index, "index_without_document",
                     "index line without its document at the end")
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
    (before dedup); articles with none are counted in `dropped` instead. More than
    `max_bad_records` bad lines raise InputError naming the first; see the module docstring.
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
    records = BadRecords(raw_path, stats, settings.max_bad_records)
    started = time.perf_counter()
    parent = Path(work_dir) if work_dir is not None else train_path.parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".jawiki-work-", dir=parent))
    try:
        with AtomicTextWriter(train_path) as train, AtomicTextWriter(validation_path) as validation:
            count = _first_pass(raw_path, settings, stats, records, work, pool)
            if stats.documents_read == 0:
                raise InputError(raw_path, "contains no namespace-0 articles; check the dump file"
                                 + records.summary())
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
