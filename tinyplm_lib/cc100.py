"""Build the cc100-ja corpus: the first N non-empty lines (NFKC, stripped) split by document.

Split decision: documents (blank-line separated) are numbered in file order and picked for
validation by `in_validation(seed, "doc:<index>", fraction)`. A picked document goes to validation
only if it fits whole in the remaining `max_validation_lines` budget, else to train; so documents
are never split, the splits never overlap, and validation stops growing once the budget is full.
Worker processes normalise blocks of lines; this process routes them in file order, so the output
is byte-identical for any number of workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tinyplm_lib.cleaning import normalize_line
from tinyplm_lib.corpus import AtomicTextWriter, CorpusStats, LineReader, decode_lines, in_validation
from tinyplm_lib.encoding import WorkerPool
from tinyplm_lib.errors import ConfigError, InputError

# Raw bytes per pool task: ~3,000 lines, ~10 ms of NFKC, so a task's pickling is a small share.
BLOCK_BYTES = 1 << 20


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

    def validate(self) -> None:
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


def _normalize_block(block: tuple[int, bytes]) -> tuple[int, list[str], tuple[int, int] | None]:
    """Pool task: (first line number, the block's lines after strip+NFKC, first invalid UTF-8)."""
    first, data = block
    lines, bad = decode_lines(data)
    return first, [normalize_line(line) for line in lines], bad and (bad[0], bad[1].start)


def _blocks(reader: LineReader):
    while True:
        first = reader.lines_taken + 1
        data, count = reader.take(1 << 30, BLOCK_BYTES)
        if not count:
            return
        yield first, data


def _iter_documents(raw_path: Path, max_lines: int, stats: CorpusStats, pool: WorkerPool):
    """Yield documents as lists of normalised lines; at most one document is held at a time."""
    document: list[str] = []
    with LineReader(raw_path, chunk_bytes=BLOCK_BYTES) as reader:
        for first, lines, bad in pool.map_in_order(_normalize_block, _blocks(reader)):
            for line_no, line in enumerate(lines, start=first):
                stats.input_lines = line_no
                if not line:
                    if document:
                        yield document
                        document = []
                    continue
                document.append(line)
                stats.lines_read += 1
                if stats.lines_read >= max_lines:
                    yield document  # the last document may be cut here, as the original's budget did
                    return
            if bad is not None:
                raise InputError(raw_path, f"invalid UTF-8 at byte {bad[1]} of the line",
                                 line=first + bad[0])
    if document:
        yield document


def build_cc100_corpus(
    raw_path: Path, train_path: Path, validation_path: Path, settings: Cc100Settings, *,
    workers: int | None = None, pool: WorkerPool | None = None,
) -> CorpusStats:
    """Stream `raw_path` (cc100 `ja.txt.xz` format) into train and validation text files.

    `workers` processes normalise the text (None: every available core), or the given `pool`'s.
    Returns exact counts: lines_train + lines_validation == lines_read <= max_lines. Raises
    InputError for unreadable or empty input, ConfigError when a split would come out empty.
    """
    settings.validate()
    raw_path, train_path, validation_path = Path(raw_path), Path(train_path), Path(validation_path)
    if train_path.resolve() == validation_path.resolve():
        raise ConfigError("validation_path", "must differ from train_path")
    if pool is None:
        with WorkerPool(workers) as own:
            return _build(raw_path, train_path, validation_path, settings, own)
    return _build(raw_path, train_path, validation_path, settings, pool)


def _build(raw_path: Path, train_path: Path, validation_path: Path, settings: Cc100Settings,
           pool: WorkerPool) -> CorpusStats:
    fraction = settings.effective_doc_fraction
    stats = CorpusStats(source=str(raw_path))
    over_budget = 0
    started = time.perf_counter()
    with AtomicTextWriter(train_path) as train, AtomicTextWriter(validation_path) as validation:
        for document in _iter_documents(raw_path, settings.max_lines, stats, pool):
            doc_index = stats.documents_read
            stats.documents_read += 1
            to_validation = False
            if in_validation(settings.seed, f"doc:{doc_index}", fraction):
                room = settings.max_validation_lines - stats.lines_validation
                to_validation = len(document) <= room
                over_budget += not to_validation
            writer = validation if to_validation else train
            writer.write_lines(document)
            chars = sum(map(len, document))
            if to_validation:
                stats.documents_validation += 1
                stats.lines_validation += len(document)
                stats.chars_validation += chars
            else:
                stats.documents_train += 1
                stats.lines_train += len(document)
                stats.chars_train += chars
        # Checked inside the `with` so that a failed build leaves no output files.
        if stats.lines_read == 0:
            raise InputError(raw_path, "contains no non-empty lines; check the download")
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
    stats.seconds = time.perf_counter() - started
    stats.details = {
        "validation_doc_fraction": fraction,
        "documents_over_validation_budget": over_budget,
        "input_exhausted": stats.lines_read < settings.max_lines,
        "seed": settings.seed,
        "workers": pool.workers,
    }
    return stats
