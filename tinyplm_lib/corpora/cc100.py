"""Build the cc100-ja corpus: the first N non-empty lines (NFKC, stripped) split by document.

Workers normalise (and hash) blocks of lines; this process routes them in file order, so the output
is byte-identical for any number of workers. Exact repeats of a line are dropped through a
`DocumentSpool` on disk (`build_cc100_corpus`); documents go whole to one split (`_write_documents`);
bad lines are skipped under the bad-record policy.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tinyplm_lib.corpora.cleaning import has_control_chars, normalize_line
from tinyplm_lib.corpora.dedup import DocumentSpool, LineChunk, LineDocument, assemble_documents, line_hashes
from tinyplm_lib.corpora.reader import LineBlock, LineReader, iter_line_blocks
from tinyplm_lib.corpora.records import BadLine, BadRecords, CorpusStats, check_bad_record_policy, decode_checked
from tinyplm_lib.corpora.sampling import sample_input
from tinyplm_lib.corpora.split import in_validation
from tinyplm_lib.diskspace import SpaceNeeded, disk_errors
from tinyplm_lib.errors import ConfigError, InputError
from tinyplm_lib.files import AtomicTextWriter
from tinyplm_lib.parallel import WorkerPool, pool_or_own

# Raw bytes per pool task: ~3,000 lines, ~10 ms of NFKC, so a task's pickling is a small share.
BLOCK_BYTES = 1 << 20
# Hashes deduplicated in memory at once: ~40 MB while sorting, the same from 1M lines to the full
# run's 128M (128 bucket files).
DEDUP_BUCKET_ENTRIES = 1_000_000
# Dedup work bytes per line beside the text, at their peak (DocumentSpool): hash, length, characters
# and start flag (25), the first-occurrence flag and the buckets' entries while marking.
_SPOOL_BYTES_PER_LINE = 42
# The most repeated lines the stats name (details.duplicate_examples).
DUPLICATE_EXAMPLES = 5
# CONTROL_CHARS as UTF-8 bytes: C0 controls and DEL are single bytes, C1 controls are C2 80..C2 9F.
# A block without any (nearly all) skips the per-line check: `translate` deletes every byte that
# cannot start one (0.25 ms a MiB here); what is left is a control, or the C2 lead byte of "°",
# "§" ..., which a regex with that literal prefix tells apart. One regex for both took 5.4 ms a
# MiB, a fifth of the cleaning time.
_NOT_CONTROL_START = bytes(sorted(set(range(256)) - set(range(0x09)) - set(range(0x0e, 0x1c))
                                  - {0x7f, 0xc2}))
_C1_CONTROL = re.compile(rb"\xc2[\x80-\x84\x86-\x9f]")


def _may_hold_controls(data: bytes) -> bool:
    left = data.translate(None, _NOT_CONTROL_START)
    if not left:
        return False
    return bool(left.replace(b"\xc2", b"")) or _C1_CONTROL.search(data) is not None


@dataclass(frozen=True)
class Cc100Settings:
    """Settings of the cc100 corpus; the defaults are the original's numbers."""

    # First N non-empty lines after strip+NFKC (the original's CC100_MAX_SENTENCE_NUM).
    max_lines: int = 128_000_000
    # Validation budget in lines (CC100_MAX_VALIDATION_SENTENCE_NUM), sampled without replacement.
    max_validation_lines: int = 1_000_000
    # Chance that a document is picked for validation. None: 1.25 * max_validation_lines /
    # max_lines, i.e. picks ~25% over budget so the budget fills before the line limit is reached.
    validation_doc_fraction: float | None = None
    seed: int = 42
    # Bad-record policy: up to this many bad lines (invalid UTF-8, over max_record_bytes) are
    # skipped and counted by reason; one more fails the build. 100 tolerates a few damaged lines in
    # a 392M-line crawl while a systematically broken file still fails fast; 0 = strict.
    max_bad_records: int = 100
    # A line longer than this (bytes, newline excluded) is a bad record. The longest line of the
    # real sample in ../shared/corpora is 11,752 bytes; 1 MiB is no paragraph of prose.
    max_record_bytes: int = 1 << 20
    # Drop every later exact repeat of a line (after NFKC and strip) within the max_lines prefix.
    # Crawls repeat boilerplate (navigation, cookie and comment notices) across sites, which wastes
    # training tokens and puts validation lines in train. False: the original's corpus exactly.
    dedup: bool = True

    def validate(self) -> None:
        check_bad_record_policy(self.max_bad_records, self.max_record_bytes)
        if self.max_lines < 2:
            raise ConfigError("max_lines", f"must be at least 2, got {self.max_lines}")
        if not 1 <= self.max_validation_lines < self.max_lines:
            raise ConfigError(
                "max_validation_lines",
                f"must be between 1 and max_lines - 1 ({self.max_lines - 1}), "
                f"got {self.max_validation_lines}",
            )
        fraction = self.validation_doc_fraction
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise ConfigError(
                "validation_doc_fraction", f"must be in (0, 1] or None, got {fraction}"
            )

    @property
    def effective_doc_fraction(self) -> float:
        if self.validation_doc_fraction is not None:
            return self.validation_doc_fraction
        return min(1.0, 1.25 * self.max_validation_lines / self.max_lines)


class _NormalizeTask(NamedTuple):
    """Pool task: a block of raw lines, the limit its lines are checked against, whether to hash."""

    block: LineBlock
    max_record_bytes: int
    hash_lines: bool


class _NormalizedBlock(NamedTuple):
    """Pool result: a block's lines normalised, the kept ones already UTF-8 encoded.

    The routing process handles documents, not lines: it finds blank lines and line ends in these
    arrays and writes byte ranges of `text` as they are (a Python loop per line there, and str
    lines pickled both ways, cost more than the NFKC itself).
    """

    first_line: int
    text: bytes  # the kept lines (NFKC, stripped, non-empty), each ending in b"\n"
    line_ends: np.ndarray  # int64: end offset in `text` of each kept line, newline included
    chars: np.ndarray  # int32 per input line: characters kept, 0 for a blank or bad line
    bad: dict[int, BadLine]  # the bad lines, by index in the block
    control_lines: list[int]  # indices of the lines that held control characters
    hashes: np.ndarray | None  # uint64 `line_hashes` of the kept lines, when asked for


def _normalize_block(task: _NormalizeTask) -> _NormalizedBlock:
    """Pool task: decode a block, find its bad lines and normalise the others."""
    lines, bad = decode_checked(task.block, task.max_record_bytes)
    for index in bad:
        lines[index] = ""
    nfkc = unicodedata.normalize
    # normalize_line without its control-character test, for the lines known to need none.
    out = [nfkc("NFKC", line).strip() for line in lines]
    controls: list[int] = []
    if _may_hold_controls(task.block.data):
        controls = [i for i, line in enumerate(lines) if i not in bad and has_control_chars(line)]
        for i in controls:
            out[i] = normalize_line(lines[i])
    kept = [line for line in out if line]
    # No kept line holds a "\n": the block was split on them and NFKC never makes one (checked on
    # every code point), so the newlines found here are exactly the line ends.
    text = ("\n".join(kept) + "\n").encode("utf-8") if kept else b""
    line_ends = np.flatnonzero(np.frombuffer(text, dtype=np.uint8) == 10) + 1
    chars = np.fromiter(map(len, out), dtype=np.int32, count=len(out))
    hashes = line_hashes(text) if task.hash_lines else None
    return _NormalizedBlock(task.block.first_line, text, line_ends, chars, bad, controls, hashes)


class _Part(NamedTuple):
    """A block's share of the corpus: its kept lines within the line budget, and its blank lines."""

    text: bytes  # the kept lines, each ending in b"\n" (lines past the budget may follow)
    line_ends: np.ndarray  # int64: 0, then the end offset in `text` of each kept line
    chars: np.ndarray  # characters of each kept line
    breaks: list[int]  # per blank line, the kept lines before it: a document ends there
    hashes: np.ndarray | None  # uint64 per kept line, when deduplicating


def _iter_parts(raw_path: Path, settings: Cc100Settings, stats: CorpusStats, records: BadRecords,
                pool: WorkerPool) -> Iterator[_Part]:
    """Yield each block's kept lines in file order, normalised on the pool.

    A bad line is skipped (under the bad-record policy) and ends no document; the `max_lines`-th
    kept line ends the input, mid-document.
    """
    max_lines, max_bytes = settings.max_lines, settings.max_record_bytes
    # Lines over the limit are cut by the reader too, so one without a newline is never held whole.
    with LineReader(raw_path, chunk_bytes=BLOCK_BYTES, max_line_bytes=max_bytes) as reader:
        tasks = (_NormalizeTask(block, max_bytes, settings.dedup)
                 for block in iter_line_blocks(reader, BLOCK_BYTES))
        for block in pool.map_in_order(_normalize_block, tasks):
            first, chars = block.first_line, block.chars
            kept = np.flatnonzero(chars)  # block indices of the kept lines
            end = len(chars)  # block lines used: all, unless the line budget runs out here
            room = max_lines - stats.lines_read
            if len(kept) >= room:
                end = int(kept[room - 1]) + 1
                kept = kept[:room]
            for index in sorted(i for i in block.bad if i < end):
                records.skip(first + index, *block.bad[index])
            blanks = [i for i in np.flatnonzero(chars[:end] == 0).tolist() if i not in block.bad]
            yield _Part(block.text, np.concatenate([[0], block.line_ends[:len(kept)]]), chars[kept],
                        np.searchsorted(kept, blanks).tolist(),
                        None if block.hashes is None else block.hashes[:len(kept)])
            stats.lines_read += len(kept)
            stats.input_lines = first + end - 1
            stats.control_char_records += sum(i < end for i in block.control_lines)
            if end < len(chars) or stats.lines_read >= max_lines:
                break  # the last document may be cut here, as the original's budget did


def _with_starts(parts: Iterator[_Part]) -> Iterator[tuple[_Part, np.ndarray]]:
    """Each part with a uint8 per kept line, 1 where a document begins (after blank lines, and the first)."""
    begins = True  # whether the next kept line begins a document: the first does
    for part in parts:
        lines = len(part.line_ends) - 1
        starts = np.zeros(lines + 1, dtype=np.uint8)
        starts[part.breaks] = 1
        starts[0] |= begins
        begins = bool(starts[lines])
        yield part, starts[:lines]


def _iter_documents(parts: Iterator[_Part]) -> Iterator[LineDocument]:
    """Yield documents in file order, at most one held at a time; a blank line ends a document."""
    return assemble_documents(
        LineChunk(part.text[:part.line_ends[-1]], np.ones(len(starts), dtype=bool), starts,
                  np.diff(part.line_ends), part.chars) for part, starts in _with_starts(parts))


def _spool_parts(parts: Iterator[_Part], spool: DocumentSpool) -> None:
    """Dedup pass 1: every kept line to the spool, flagged where a document begins."""
    for part, starts in _with_starts(parts):
        spool.append(part.text[:part.line_ends[-1]], np.diff(part.line_ends), part.hashes, part.chars, starts)


def build_cc100_corpus(
    raw_path: Path, train_path: Path, validation_path: Path, settings: Cc100Settings,
    work_dir: Path | None = None, *, workers: int | None = None, pool: WorkerPool | None = None,
) -> CorpusStats:
    """Stream `raw_path` (cc100 `ja.txt.xz` format) into train and validation text files.

    `workers` processes normalise the text (None: every available core), or the given `pool`'s.
    Returns exact counts: lines_train + lines_validation + dropped["lines_duplicate"] == lines_read
    <= max_lines. Raises InputError for unreadable or empty input or more than `max_bad_records`
    bad lines, and ConfigError when a split would come out empty or the whole input is not larger
    than the validation budget.

    With `settings.dedup` (the default) every later exact repeat of a line among the first
    `max_lines` non-empty lines (as written: NFKC, stripped) is dropped and its first occurrence
    kept, wherever the two are; `max_lines` still counts the lines before dedup. Blank lines still
    end documents, so a document keeps its other lines and its number in the file, the key of its
    validation draw (dedup changes which documents are drawn only by what it removes). A document
    left with no line is dropped: counted in dropped["documents_all_duplicate"], not in
    documents_read. The splits then share no line. Work files (the normalised text plus ~42 bytes
    a line) go to a temporary folder inside `work_dir` (default: beside `train_path`), removed at
    the end, success or not. Without dedup the output is the original's, byte for byte.

    Bad input lines (invalid UTF-8, longer than `max_record_bytes`) are skipped and counted by
    reason in `CorpusStats.skipped`; the document they were in continues without them. Bytes are
    never replaced: a line that is not UTF-8 is not text this corpus can vouch for. Control
    characters are removed from lines that are kept (`normalize_line`), counted in
    `control_char_records`.
    """
    settings.validate()
    raw_path, train_path, validation_path = Path(raw_path), Path(train_path), Path(validation_path)
    if train_path.resolve() == validation_path.resolve():
        raise ConfigError("validation_path", "must differ from train_path")
    work = Path(work_dir) if work_dir is not None else train_path.parent
    what = f"the cc100 corpus (this split, {validation_path} and the dedup work files in {work})"
    with pool_or_own(pool, workers) as chosen, \
            disk_errors(train_path, lambda: _space_needed(raw_path, settings), what):
        return _build(raw_path, train_path, validation_path, settings, work, chosen)


def _space_needed(raw_path: Path, settings: Cc100Settings) -> SpaceNeeded:
    """Disk a build uses at its peak, for a DiskFullError: both splits (the input's non-empty lines,
    at most `max_lines`) and, with dedup, the spool (the same text plus 42 bytes a line). Lines and
    their length are counted in the input's first 4 MiB and scaled to its size (`sample_input`)."""
    sample = sample_input(raw_path)
    lines = [line for line in sample.data.split(b"\n") if line.strip()]
    per_line = (sum(map(len, lines)) + len(lines)) / max(len(lines), 1)
    count = min(settings.max_lines, round(len(lines) * sample.total_bytes / max(len(sample.data), 1)))
    text = round(count * per_line)
    counted = (f"{count:,} lines of ~{per_line:.0f} bytes, counted in the input's first {len(sample.data):,} "
               f"bytes and scaled to its ~{sample.total_bytes:,} (at most max_lines)")
    if not settings.dedup:
        return SpaceNeeded(text, f"the two splits: {counted}")
    return SpaceNeeded(2 * text + _SPOOL_BYTES_PER_LINE * count,
                       f"the two splits and the dedup spool, each {counted}, plus the spool's "
                       f"{_SPOOL_BYTES_PER_LINE} bytes a line")


def _build(raw_path: Path, train_path: Path, validation_path: Path, settings: Cc100Settings,
           work_dir: Path, pool: WorkerPool) -> CorpusStats:
    stats = CorpusStats(source=str(raw_path))
    records = BadRecords(raw_path, stats, settings.max_bad_records)
    started = time.perf_counter()
    parts = _iter_parts(raw_path, settings, stats, records, pool)
    dedup: dict[str, object] = {}
    with AtomicTextWriter(train_path) as train, AtomicTextWriter(validation_path) as validation:
        if settings.dedup:
            with DocumentSpool(work_dir, DEDUP_BUCKET_ENTRIES) as spool:
                _spool_parts(parts, spool)
                found = spool.deduplicate(DUPLICATE_EXAMPLES)
                over_budget = _write_documents(spool.documents(), settings, stats, train, validation)
            stats.drop("lines_duplicate", found.duplicates)
            stats.drop("documents_all_duplicate", spool.document_count - stats.documents_read)
            dedup = {"lines_kept": stats.lines_train + stats.lines_validation,
                     "duplicate_share": found.duplicates / max(stats.lines_read, 1),
                     "documents_before_dedup": spool.document_count, "dedup_buckets": found.buckets,
                     # Long lines cut: these are for a reader to recognise the boilerplate.
                     "duplicate_examples": [{"line": r.text[:200], "occurrences": r.occurrences}
                                            for r in found.most_repeated]}
        else:
            over_budget = _write_documents(_iter_documents(parts), settings, stats, train, validation)
        # Checked inside the `with` so that a failed build leaves no output files.
        _check_counts(raw_path, settings, stats, records)
    stats.seconds = time.perf_counter() - started
    stats.details = {
        "validation_doc_fraction": settings.effective_doc_fraction,
        "documents_over_validation_budget": over_budget,
        "input_exhausted": stats.lines_read < settings.max_lines,
        # The limits it ran under, so a check can hold the counts against them.
        "max_lines": settings.max_lines,
        "max_validation_lines": settings.max_validation_lines,
        "seed": settings.seed,
        "workers": pool.workers,
        "dedup": settings.dedup,
        **dedup,
    }
    return stats


def _write_documents(documents: Iterator[LineDocument], settings: Cc100Settings, stats: CorpusStats,
                     train: AtomicTextWriter, validation: AtomicTextWriter) -> int:
    """Write each document whole to its split; returns how many picked ones the budget turned away.

    Documents (blank-line separated) are numbered in file order and picked for validation by
    `in_validation(seed, "doc:<index>", fraction)`. A picked document goes to validation only if it
    fits whole in the remaining `max_validation_lines` budget, else to train; so documents are never
    split, the splits never overlap, and validation stops growing once the budget is full. (A
    document dedup emptied keeps its number unused: the pick does not depend on the text, so the
    documents that are left are still picked with `fraction` each.)
    """
    fraction = settings.effective_doc_fraction
    over_budget = 0
    for document in documents:
        stats.documents_read += 1
        to_validation = False
        if in_validation(settings.seed, f"doc:{document.index}", fraction):
            room = settings.max_validation_lines - stats.lines_validation
            to_validation = document.lines <= room
            over_budget += not to_validation
        writer = validation if to_validation else train
        for piece in document.pieces:
            writer.write_encoded(piece)
        if to_validation:
            stats.documents_validation += 1
            stats.lines_validation += document.lines
            stats.chars_validation += document.chars
        else:
            stats.documents_train += 1
            stats.lines_train += document.lines
            stats.chars_train += document.chars
    return over_budget


def _check_counts(raw_path: Path, settings: Cc100Settings, stats: CorpusStats,
                  records: BadRecords) -> None:
    """Fail a build whose input or splits came out empty, or whose budget could take it all."""
    if stats.lines_read == 0:
        raise InputError(raw_path, "contains no non-empty lines; check the download"
                         + records.summary())
    kept = stats.lines_train + stats.lines_validation
    if settings.validation_doc_fraction is None and stats.lines_read < settings.max_lines and \
            kept <= settings.max_validation_lines:
        # Known only once the input ran out: the budget could take the whole corpus. (With an
        # explicit validation_doc_fraction the draw is set by it and the budget is only a cap.)
        raise ConfigError(
            "max_validation_lines",
            f"{settings.max_validation_lines} is not below the {kept} non-empty lines {raw_path} "
            f"holds{' once deduplicated' if settings.dedup else ''}: lower it (and max_lines) to "
            "leave lines for training",
        )
    if stats.lines_validation == 0:
        raise ConfigError(
            "max_validation_lines",
            f"no document fit in the validation split ({stats.documents_read} documents, "
            f"{stats.lines_read} lines read): raise max_validation_lines or "
            "validation_doc_fraction, or give more input (max_lines)",
        )
    if stats.lines_train == 0:
        raise ConfigError(
            "validation_doc_fraction",
            "every document went to validation: lower validation_doc_fraction or "
            "max_validation_lines, or give more input (max_lines)",
        )
