"""Build the JaWiki corpus from a CirrusSearch content dump: cleaned, split, deduplicated sentences.

Three streaming passes in flat memory: (1) workers parse blocks of dump lines (`jawiki_parse`) and
`_FirstPass` pairs and appends them to work files; (2) `mark_first_occurrences` finds duplicates
on disk; (3) first occurrences go to train/validation. Byte-identical for any number of workers.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tinyplm_lib.corpora.dedup import iter_flags, mark_first_occurrences
from tinyplm_lib.corpora.jawiki_parse import DocumentLine, IndexLine, Outcome, ParseTask, Sentences, parse_block
from tinyplm_lib.corpora.reader import LineBlock, LineReader, iter_line_blocks
from tinyplm_lib.corpora.records import BadLine, BadRecords, CorpusStats, check_bad_record_policy
from tinyplm_lib.corpora.sampling import sample_input
from tinyplm_lib.corpora.split import in_validation
from tinyplm_lib.diskspace import SpaceNeeded, disk_errors
from tinyplm_lib.errors import ConfigError, InputError
from tinyplm_lib.files import AtomicTextWriter
from tinyplm_lib.parallel import WorkerPool, pool_or_own

_TRAIN, _VALIDATION = b"T", b"V"  # split tag of each candidate, in the tags work file
# Work files of one build, in its temporary folder: the candidate sentences one a line, a split
# tag byte and a 64-bit hash for each, and pass 2's flag byte for each (1: first occurrence).
_CANDIDATES_FILE, _TAGS_FILE, _HASHES_FILE, _FLAGS_FILE = (
    "candidates.txt", "tags.u8", "hashes.u64", "first.u8")
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
        check_bad_record_policy(self.max_bad_records, self.max_record_bytes)
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


class _FirstPass:
    """Pass 1 in this process: pairs index and document lines in dump order, applies the
    bad-record policy to them, counts, and appends each article's candidates to the work files.

    The split is per article: `in_validation(seed, "page:<page_id>", validation_fraction)`. Bad
    dump lines (malformed JSON, invalid UTF-8, a document missing a field, a line over
    `max_record_bytes`, an index line without its document or the reverse) are skipped and
    counted by reason in `CorpusStats.skipped`, up to `max_bad_records`.
    """

    def __init__(self, settings: JawikiSettings, stats: CorpusStats, records: BadRecords,
                 candidates: BinaryIO, tags: BinaryIO, hashes: BinaryIO) -> None:
        self.settings, self.stats, self.records = settings, stats, records
        self.candidates, self.tags, self.hashes = candidates, tags, hashes
        self.count = 0  # candidate sentences appended
        self.pending_index: int | None = None  # line number of an index line awaiting its document
        self.index_id: object = None
        # After a bad line with no index pending, that line was most likely an index line: the next
        # document may then come without one (else one damaged index line would cost two records).
        self.loose = False

    def take(self, line_no: int, outcome: Outcome) -> bool:
        """Route one line's outcome; True once `max_documents` articles have been read."""
        self.stats.input_lines = line_no
        if outcome is None:  # a blank line
            return False
        if isinstance(outcome, BadLine):
            self.records.skip(line_no, outcome.reason, outcome.detail)
            # A bad line after an index line is taken as that index's document.
            self.loose, self.pending_index = self.pending_index is None, None
        elif isinstance(outcome, IndexLine):
            if self.pending_index is not None:
                self.records.skip(self.pending_index, "index_without_document",
                                  "index line without its document")
            self.pending_index, self.index_id, self.loose = line_no, outcome.doc_id, False
        elif self._paired(line_no):
            page_id = outcome.page_id if outcome.has_page_id else self.index_id
            if self._admitted(line_no, outcome, page_id):
                self._append(outcome.sentences, outcome.control_chars, page_id)
                # max_documents counts namespace-0 articles, not dump lines.
                return self.stats.documents_read == self.settings.max_documents
        return False

    def _paired(self, line_no: int) -> bool:
        """Whether a document line has its index line before it (or may go without one)."""
        if self.pending_index is None:
            if not self.loose:
                self.records.skip(line_no, "document_without_index",
                                  'expected an {"index": ...} line before each document')
                return False
            self.index_id = None
        self.pending_index, self.loose = None, False
        return True

    def _admitted(self, line_no: int, document: DocumentLine, page_id: object) -> bool:
        """Whether a paired document is a namespace-0 article with every field it needs."""
        if not isinstance(document.namespace, int):
            self.records.skip(line_no, "missing_field", "document lacks an integer 'namespace'")
            return False
        if document.namespace != 0:
            self.stats.drop("documents_other_namespace")
            return False
        if not document.has_text:
            self.records.skip(line_no, "missing_field", "document lacks a string 'text'")
            return False
        if page_id is None:
            self.records.skip(line_no, "missing_field", "document lacks 'page_id' (and index _id)")
            return False
        return True

    def _append(self, sentences: Sentences, control_chars: bool, page_id: object) -> None:
        stats = self.stats
        stats.documents_read += 1
        stats.control_char_records += control_chars
        stats.lines_read += sentences.found
        if sentences.too_short:
            stats.drop("sentences_too_short", sentences.too_short)
        if sentences.too_long:
            stats.drop("sentences_too_long", sentences.too_long)
        chosen = in_validation(self.settings.seed, f"page:{page_id}",
                               self.settings.validation_fraction)
        tag = _VALIDATION if chosen else _TRAIN
        self.candidates.write(sentences.blob)
        self.tags.write(tag * sentences.kept)
        self.hashes.write(sentences.hashes)
        self.count += sentences.kept
        if not sentences.found:
            stats.drop("documents_empty_text")
        elif not sentences.kept:
            stats.drop("documents_no_sentence_in_length_range")
        elif tag == _VALIDATION:
            stats.documents_validation += 1
        else:
            stats.documents_train += 1

    def finish(self) -> None:
        """At the end of the dump: an index line still waiting never got its document."""
        if self.pending_index is not None:
            self.records.skip(self.pending_index, "index_without_document",
                              "index line without its document at the end")


def _first_pass(raw_path: Path, settings: JawikiSettings, stats: CorpusStats, records: BadRecords,
                work: Path, pool: WorkerPool) -> int:
    """Parse the dump on the pool and route it through `_FirstPass`; returns the candidates' count."""
    max_bytes = settings.max_record_bytes
    with LineReader(raw_path, chunk_bytes=BLOCK_BYTES, max_line_bytes=max_bytes) as reader, \
            open(work / _CANDIDATES_FILE, "wb") as candidates, \
            open(work / _TAGS_FILE, "wb") as tags, open(work / _HASHES_FILE, "wb") as hashes:
        state = _FirstPass(settings, stats, records, candidates, tags, hashes)
        tasks = (ParseTask(block, settings.min_chars, settings.max_chars, max_bytes)
                 for block in iter_line_blocks(reader, BLOCK_BYTES))
        for parsed in pool.map_in_order(parse_block, tasks):
            for line_no, outcome in enumerate(parsed.outcomes, start=parsed.first_line):
                if state.take(line_no, outcome):
                    return state.count
    state.finish()
    return state.count


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
    `max_bad_records` bad lines raise InputError naming the first (see `_FirstPass`). Control
    characters in kept articles are removed by `clean_wiki_text`, the articles counted in
    `control_char_records`.
    """
    settings.validate()
    raw_path, train_path, validation_path = Path(raw_path), Path(train_path), Path(validation_path)
    if train_path.resolve() == validation_path.resolve():
        raise ConfigError("validation_path", "must differ from train_path")
    what = f"the JaWiki corpus (this split, {validation_path} and the work files in {work_dir or train_path.parent})"
    with pool_or_own(pool, workers) as chosen, \
            disk_errors(train_path, lambda: _space_needed(raw_path, settings), what):
        return _build(raw_path, train_path, validation_path, settings, work_dir, chosen)


def _space_needed(raw_path: Path, settings: JawikiSettings) -> SpaceNeeded:
    """Disk a build uses at its peak, for a DiskFullError: the work files (the candidate sentences
    plus 10 bytes each: tag, hash, flag) and the two splits (at most the candidates again). The
    dump's first 4 MiB are parsed as the build does and scaled to its size, or to max_documents."""
    sample = sample_input(raw_path)
    parsed = parse_block(ParseTask(LineBlock(1, sample.data, {}), settings.min_chars, settings.max_chars,
                                   settings.max_record_bytes))
    kept = [o.sentences for o in parsed.outcomes
            if isinstance(o, DocumentLine) and o.namespace == 0 and o.sentences is not None]
    scale = sample.total_bytes / max(len(sample.data), 1)
    if settings.max_documents is not None:
        scale = min(scale, settings.max_documents / max(len(kept), 1))
    text, count = sum(len(s.blob) for s in kept), sum(s.kept for s in kept)
    return SpaceNeeded(round(scale * (2 * text + 10 * count)),
                       f"twice the {text:,} bytes of {count:,} sentences in {len(kept):,} articles of the "
                       f"dump's first {len(sample.data):,} bytes plus 10 bytes a sentence, scaled by {scale:.1f} "
                       "to the whole dump (or max_documents)")


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
            duplicates, buckets = mark_first_occurrences(work / _HASHES_FILE, count,
                                                         work / _FLAGS_FILE)
            (work / _HASHES_FILE).unlink()
            stats.drop("sentences_duplicate", duplicates)
            _write_first_occurrences(work, stats, train, validation)
            _check_splits(raw_path, stats)
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


def _write_first_occurrences(work: Path, stats: CorpusStats, train: AtomicTextWriter,
                             validation: AtomicTextWriter) -> None:
    """Pass 3: each candidate flagged as a first occurrence, to the split its tag names."""
    with open(work / _CANDIDATES_FILE, "rb") as candidates:
        rows = zip(candidates, iter_flags(work / _FLAGS_FILE), _iter_bytes(work / _TAGS_FILE),
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


def _check_splits(raw_path: Path, stats: CorpusStats) -> None:
    """Fail a build where no sentence survived, or one split came out empty."""
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
