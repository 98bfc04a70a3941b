"""Build the JaWiki corpus from a CirrusSearch content dump: cleaned, split, deduplicated sentences.

Three streaming passes with flat memory: (1) parse namespace-0 articles, clean, split and length
filter, appending candidate sentences to a work file and their 64-bit hashes to a hash file;
(2) find later occurrences of each hash bucket by bucket on disk; (3) copy first occurrences into
train/validation. The split is per article: `in_validation(seed, "page:<page_id>", fraction)`.
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
    in_validation,
    iter_flags,
    mark_first_occurrences,
    read_lines,
    sentence_hash,
)
from tinyplm_lib.errors import ConfigError, InputError

_TRAIN, _VALIDATION = b"T", b"V"  # split tag in front of each candidate in the work file
_HASH_FLUSH = 1 << 16


def _flush_hashes(hashes: array, hash_file) -> None:
    # The dedup step reads little-endian uint64; array("Q") writes native order.
    if sys.byteorder != "little":
        hashes.byteswap()
    hashes.tofile(hash_file)
    del hashes[:]


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


def iter_articles(raw_path: Path, stats: CorpusStats) -> Iterator[tuple[int, dict]]:
    """Yield (line number, document) for each index/document line pair of a bulk dump."""
    pending_index: int | None = None  # line number of an index line awaiting its document
    index_id = None
    for line_no, line in read_lines(raw_path):
        stats.input_lines = line_no
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(
                raw_path, f"malformed JSON ({exc.msg} at column {exc.colno})", line=line_no
            ) from exc
        if not isinstance(record, dict):
            raise InputError(raw_path, "expected a JSON object", line=line_no)
        is_index = "index" in record and len(record) == 1
        if pending_index is None:
            if not is_index:
                raise InputError(
                    raw_path, 'expected an {"index": ...} line before each document', line=line_no
                )
            pending_index = line_no
            index_id = record["index"].get("_id") if isinstance(record["index"], dict) else None
            continue
        if is_index:
            raise InputError(raw_path, "index line without its document", line=pending_index)
        if "page_id" not in record and index_id is not None:
            record["page_id"] = index_id
        pending_index = None
        yield line_no, record
    if pending_index is not None:
        raise InputError(raw_path, "index line without its document at the end", line=pending_index)


def _first_pass(
    raw_path: Path,
    settings: JawikiSettings,
    stats: CorpusStats,
    candidates_path: Path,
    hashes_path: Path,
) -> int:
    """Clean, split and filter articles into the work files; returns the candidate count."""
    count = 0
    hashes = array("Q")
    with open(candidates_path, "wb") as candidates, open(hashes_path, "wb") as hash_file:
        for line_no, record in iter_articles(raw_path, stats):
            namespace = record.get("namespace")
            if not isinstance(namespace, int):
                raise InputError(raw_path, "document lacks an integer 'namespace'", line=line_no)
            if namespace != 0:
                stats.drop("documents_other_namespace")
                continue
            text, page_id = record.get("text"), record.get("page_id")
            if not isinstance(text, str):
                raise InputError(raw_path, "document lacks a string 'text'", line=line_no)
            if page_id is None:
                raise InputError(raw_path, "document lacks 'page_id' (and index _id)", line=line_no)
            stats.documents_read += 1
            title = record.get("title") if isinstance(record.get("title"), str) else None
            sentences = split_sentences(clean_wiki_text(text, title=title))
            stats.lines_read += len(sentences)
            kept = 0
            chosen = in_validation(settings.seed, f"page:{page_id}", settings.validation_fraction)
            tag = _VALIDATION if chosen else _TRAIN
            for sentence in sentences:
                if len(sentence) < settings.min_chars:
                    stats.drop("sentences_too_short")
                elif len(sentence) > settings.max_chars:
                    stats.drop("sentences_too_long")
                else:
                    candidates.write(tag + sentence.encode() + b"\n")
                    hashes.append(sentence_hash(sentence))
                    kept += 1
            count += kept
            if not sentences:
                stats.drop("documents_empty_text")
            elif not kept:
                stats.drop("documents_no_sentence_in_length_range")
            elif tag == _VALIDATION:
                stats.documents_validation += 1
            else:
                stats.documents_train += 1
            if len(hashes) >= _HASH_FLUSH:
                _flush_hashes(hashes, hash_file)
            if stats.documents_read == settings.max_documents:
                break  # max_documents counts namespace-0 articles, not dump lines
        _flush_hashes(hashes, hash_file)
    return count


def build_jawiki_corpus(
    raw_path: Path,
    train_path: Path,
    validation_path: Path,
    settings: JawikiSettings,
    work_dir: Path | None = None,
) -> CorpusStats:
    """Stream a CirrusSearch dump into deduplicated train and validation sentence files.

    Work files (~the cleaned text plus 9 bytes a sentence) go to a temporary folder inside
    `work_dir` (default: beside `train_path`) and are removed at the end, success or not.
    documents_train/validation count articles with at least one sentence in the length range
    (before dedup); articles with none are counted in `dropped` instead.
    """
    settings.validate()
    raw_path, train_path, validation_path = Path(raw_path), Path(train_path), Path(validation_path)
    if train_path.resolve() == validation_path.resolve():
        raise ConfigError("validation_path", "must differ from train_path")
    stats = CorpusStats(source=str(raw_path))
    started = time.perf_counter()
    parent = Path(work_dir) if work_dir is not None else train_path.parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".jawiki-work-", dir=parent))
    try:
        with AtomicTextWriter(train_path) as train, AtomicTextWriter(validation_path) as validation:
            candidates_path, hashes_path = work / "candidates.txt", work / "hashes.u64"
            count = _first_pass(raw_path, settings, stats, candidates_path, hashes_path)
            if stats.documents_read == 0:
                raise InputError(raw_path, "contains no namespace-0 articles; check the dump file")
            flags_path = work / "first.u8"
            duplicates, buckets = mark_first_occurrences(hashes_path, count, flags_path)
            hashes_path.unlink()
            stats.drop("sentences_duplicate", duplicates)
            with open(candidates_path, "rb") as candidates:
                for raw, keep in zip(candidates, iter_flags(flags_path), strict=True):
                    if not keep:
                        continue
                    sentence = raw[1:-1].decode()
                    if raw[:1] == _VALIDATION:
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
    }
    return stats
