"""cc100 exact-line dedup: every later repeat dropped, exact counts, and without it the original's bytes.

The input is real text (the first lines of ../shared/corpora's cc100-format sample, read at test
time) regrouped into short documents with boilerplate lines written into them, in several
spellings that NFKC and strip make equal, some documents nothing but boilerplate. The expected
files are derived here from the raw text (normalise, deduplicate, route by the documented rule),
not by the library. About 5 s.
"""

from __future__ import annotations

import dataclasses
import itertools
import lzma
import random
import unicodedata
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

import tinyplm_lib.corpora.cc100 as cc100_module
import tinyplm_lib.corpora.dedup as dedup_module
from tinyplm_lib.corpora.cc100 import Cc100Settings, build_cc100_corpus
from tinyplm_lib.corpora.dedup import find_first_occurrences, iter_flags
from tinyplm_lib.corpora.split import in_validation
from tinyplm_lib.parallel import WorkerPool

# Written for this test: lines a crawl repeats on every page, each with spellings that normalise to it.
BOILERPLATE = {
    "ログインしてコメントを書く": ["ログインしてコメントを書く", "　ログインしてコメントを書く  ", "ﾛｸﾞｲﾝしてｺﾒﾝﾄを書く"],
    "このサイトはクッキーを使用しています。": ["このサイトはクッキーを使用しています。"],
    "ホーム > ニュース > 記事一覧": ["ホーム > ニュース > 記事一覧", "ホーム ＞ ニュース ＞ 記事一覧"],
    "Copyright (C) 2020 All Rights Reserved.": ["Copyright (C) 2020 All Rights Reserved.",
                                                "Ｃｏｐｙｒｉｇｈｔ (C) ２０２０ All Rights Reserved."],
}
SETTINGS = Cc100Settings(max_lines=10**6, max_validation_lines=150, validation_doc_fraction=0.3, seed=42)


def _real_lines(web_sample: Path, count: int) -> list[str]:
    """The first `count` non-empty raw lines of the shared sample, as they are (not normalised)."""
    with lzma.open(web_sample, "rt", encoding="utf-8") as handle:
        lines = (line.rstrip("\n") for line in handle)
        return list(itertools.islice((line for line in lines if line.strip()), count))


def _fixture_text(real: list[str]) -> str:
    """120 documents of 2-6 real lines, boilerplate around most, every tenth only boilerplate."""
    rng = random.Random(7)

    def spell() -> str:
        return rng.choice(BOILERPLATE[rng.choice(list(BOILERPLATE))])

    lines, documents = iter(real), []
    for d in range(120):
        if d % 10 == 9:
            document = [spell() for _ in range(rng.randint(1, 3))]
        else:
            document = [next(lines) for _ in range(rng.randint(2, 6))]
            if rng.random() < 0.6:
                document.insert(0, spell())
            if rng.random() < 0.6:
                document.append(spell())
            if d % 7 == 0:
                document.append(document[-2])  # a repeat inside its own document
        documents.append("\n".join(document) + "\n")
    # Documents end at blank lines: empty, whitespace only, or several.
    return "".join(doc + rng.choice(["\n", "\n", "　\n", "\n\n"]) for doc in documents)


class Expected(NamedTuple):
    train: bytes
    validation: bytes
    lines_read: int
    duplicates: int
    documents_before: int
    documents_all_duplicate: int
    examples: list[dict]


def _expected(text: str, settings: Cc100Settings) -> Expected:
    """The corpus the builder must write, derived from the raw text alone."""
    documents, current, count = [], [], 0
    for raw in text.split("\n"):
        line = unicodedata.normalize("NFKC", raw).strip()
        if line:
            current.append(line)
            count += 1
        elif current:
            documents.append(current)
            current = []
        if count == settings.max_lines:
            break
    documents += [current] if current else []
    lines = [line for document in documents for line in document]
    if settings.dedup:
        seen: set[str] = set()
        documents = [[line for line in doc if not (line in seen or seen.add(line))] for doc in documents]
    train, validation = [], []
    # Documents keep their number in the file; one dedup emptied goes to neither split.
    for index, document in enumerate(documents):
        room = settings.max_validation_lines - len(validation)
        drawn = in_validation(settings.seed, f"doc:{index}", settings.validation_doc_fraction)
        (validation if drawn and len(document) <= room else train).extend(document)
    counts = Counter(lines)
    first = {line: lines.index(line) for line in counts}
    repeated = sorted((line for line in counts if counts[line] > 1), key=lambda line: (-counts[line], first[line]))
    return Expected("".join(f"{line}\n" for line in train).encode(), "".join(f"{line}\n" for line in validation).encode(),
                    len(lines), len(lines) - len(counts) if settings.dedup else 0, len(documents),
                    sum(not doc for doc in documents), [{"line": line, "occurrences": counts[line]} for line in repeated[:5]])


@pytest.fixture(scope="module")
def fixture(web_sample, tmp_path_factory) -> tuple[Path, str]:
    text = _fixture_text(_real_lines(web_sample, 600))
    raw = tmp_path_factory.mktemp("dedup") / "web.txt.xz"
    raw.write_bytes(lzma.compress(text.encode()))
    return raw, text


def _build(raw: Path, out: Path, settings: Cc100Settings, pool: WorkerPool | None = None):
    stats = build_cc100_corpus(raw, out / "train.txt", out / "validation.txt", settings,
                               workers=None if pool else 1, pool=pool)
    assert not list(out.glob(".dedup-work-*")), "the spool's work folder is removed"
    return stats, (out / "train.txt").read_bytes(), (out / "validation.txt").read_bytes()


@pytest.mark.parametrize("max_lines", [10**6, 301])  # all of it; or cut mid-document, counted before dedup
def test_dedup_keeps_first_occurrences_and_splits_share_no_line(fixture, tmp_path, max_lines):
    raw, text = fixture
    settings = dataclasses.replace(SETTINGS, max_lines=max_lines)
    expected = _expected(text, settings)
    stats, train, validation = _build(raw, tmp_path, settings)
    assert (train, validation) == (expected.train, expected.validation)
    train_lines, validation_lines = train.decode().splitlines(), validation.decode().splitlines()
    assert not set(train_lines) & set(validation_lines)
    assert len(set(train_lines + validation_lines)) == len(train_lines) + len(validation_lines)
    # The exact counts, as the asset reports them.
    assert stats.lines_read == expected.lines_read
    assert stats.details["input_exhausted"] == (max_lines == 10**6)  # else lines_read == max_lines
    assert stats.dropped == {"lines_duplicate": expected.duplicates,
                             "documents_all_duplicate": expected.documents_all_duplicate}
    assert stats.lines_train + stats.lines_validation + expected.duplicates == stats.lines_read
    assert stats.details["lines_kept"] == len(train_lines) + len(validation_lines)
    assert stats.details["duplicate_share"] == expected.duplicates / expected.lines_read
    assert stats.details["documents_before_dedup"] == expected.documents_before
    assert stats.documents_read == expected.documents_before - expected.documents_all_duplicate
    assert stats.details["duplicate_examples"] == expected.examples
    assert stats.chars_train == len(train.decode()) - len(train_lines)
    if max_lines == 10**6:  # the fixture does what it is for
        assert expected.duplicates > 60 and expected.documents_all_duplicate >= 6
        assert expected.examples[0]["line"] in BOILERPLATE


def test_without_dedup_the_original_corpus_byte_for_byte(fixture, tmp_path):
    raw, text = fixture
    settings = dataclasses.replace(SETTINGS, dedup=False)
    expected = _expected(text, settings)
    stats, train, validation = _build(raw, tmp_path, settings)
    assert (train, validation) == (expected.train, expected.validation)
    assert stats.dropped == {} and stats.details["dedup"] is False
    assert stats.lines_train + stats.lines_validation == stats.lines_read == expected.lines_read
    # What dedup is for: whole-document splits still put boilerplate in both.
    shared = set(train.decode().splitlines()) & set(validation.decode().splitlines())
    assert shared & set(BOILERPLATE)


def test_byte_identical_across_workers_blocks_buckets_and_reruns(fixture, tmp_path, monkeypatch):
    raw, _ = fixture
    reference = _build(raw, tmp_path / "ref", SETTINGS)
    # Many pool tasks, spool chunks and dedup buckets: the same bytes and counts.
    monkeypatch.setattr(cc100_module, "BLOCK_BYTES", 1 << 12)
    monkeypatch.setattr(cc100_module, "DEDUP_BUCKET_ENTRIES", 50)
    monkeypatch.setattr(dedup_module, "READ_LINES", 64)
    monkeypatch.setattr(dedup_module, "READ_BYTES", 1 << 11)
    with WorkerPool(2) as pool:
        two = _build(raw, tmp_path / "two", SETTINGS, pool=pool)
    one = _build(raw, tmp_path / "one", SETTINGS)
    for got in (one, two):
        assert got[1:] == reference[1:]
        assert got[0].dropped == reference[0].dropped
        details = {k: v for k, v in got[0].details.items() if k not in ("workers", "dedup_buckets")}
        assert details == {k: v for k, v in reference[0].details.items() if k not in ("workers", "dedup_buckets")}
    assert two[0].details["workers"] == 2 and two[0].details["dedup_buckets"] > 10


@pytest.mark.parametrize("max_bucket_entries", [1_000_000, 37])
def test_most_repeated_values_match_a_reference(tmp_path, max_bucket_entries):
    rng = np.random.default_rng(3)
    values = rng.zipf(1.5, size=2_000).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    values.astype("<u8").tofile(tmp_path / "h.u64")
    found = find_first_occurrences(tmp_path / "h.u64", len(values), tmp_path / "f.u8", max_bucket_entries,
                                   chunk_entries=100, top=6)
    unique, first, counts = np.unique(values, return_index=True, return_counts=True)
    order = sorted((i for i in range(len(unique)) if counts[i] > 1), key=lambda i: (-counts[i], first[i]))[:6]
    assert [(r.occurrences, r.first) for r in found.most_repeated] == [(int(counts[i]), int(first[i])) for i in order]
    assert found.duplicates == len(values) - len(unique)
    expected = np.zeros(len(values), dtype=bool)
    expected[first] = True
    assert list(iter_flags(tmp_path / "f.u8")) == expected.tolist()
