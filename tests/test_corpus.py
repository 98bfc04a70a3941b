"""Corpus builders on the real samples: counts, whole-document splits, dedup, loud failures."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import lzma
import unicodedata
from pathlib import Path

import numpy as np
import pytest

import tinyplm_lib.corpora.jawiki as jawiki_module
from tinyplm_lib.corpora.cc100 import Cc100Settings, build_cc100_corpus
from tinyplm_lib.corpora.cleaning import clean_wiki_text, split_sentences
from tinyplm_lib.corpora.dedup import iter_flags, mark_first_occurrences
from tinyplm_lib.corpora.jawiki import JawikiSettings, build_jawiki_corpus
from tinyplm_lib.corpora.reader import LineReader, decode_lines, read_lines
from tinyplm_lib.corpora.split import in_validation
from tinyplm_lib.errors import ConfigError, InputError
from tinyplm_lib.files import AtomicTextWriter
from tinyplm_lib.files import tmp_path as atomic_tmp_path

CC100_LINES, CC100_VALIDATION = 20_000, 1_000
# The original's corpus (no dedup): every raw document comes out whole. Dedup: test_cc100_dedup.py.
CC100_SETTINGS = Cc100Settings(max_lines=CC100_LINES, max_validation_lines=CC100_VALIDATION, dedup=False)


def _lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and "\r" not in text
    return text.split("\n")[:-1]


def _outputs(tmp: Path, stem: str) -> tuple[Path, Path]:
    return tmp / f"{stem}.train.txt", tmp / f"{stem}.validation.txt"


def _assert_nothing_written(*paths: Path) -> None:
    for path in paths:
        assert not path.exists(), path
        assert not atomic_tmp_path(path).exists(), path
        assert not list(path.parent.glob(".*-work-*")), "a builder's work folder is left"


def _wiki_records(path: Path) -> list[tuple[dict, dict]]:
    """(index, document) pairs of a small dump, read independently of the library."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    return [(json.loads(lines[i]), json.loads(lines[i + 1])) for i in range(0, len(lines), 2)]


def _sentences(document: dict) -> list[str]:
    return split_sentences(clean_wiki_text(document["text"], document.get("title")))


def _write_dump(path: Path, records: list[tuple[dict, dict]]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for index, document in records:
            f.write(json.dumps(index, ensure_ascii=False) + "\n")
            f.write(json.dumps(document, ensure_ascii=False) + "\n")
    return path


def test_read_lines_formats_numbering_and_bad_utf8(tmp_path):
    data = "一行目\n\n三行目\r\n最後"
    paths = [tmp_path / "a.txt", tmp_path / "a.txt.gz", tmp_path / "a.txt.xz"]
    paths[0].write_bytes(data.encode())
    paths[1].write_bytes(gzip.compress(data.encode()))
    paths[2].write_bytes(lzma.compress(data.encode()))
    for path in paths:
        assert list(read_lines(path)) == [(1, "一行目"), (2, ""), (3, "三行目\r"), (4, "最後")]
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok\nok\n" + b"\xff\xfe broken\nok\n")
    with pytest.raises(InputError) as info:
        list(read_lines(path))
    assert info.value.line == 3
    assert "bad.txt, line 3" in str(info.value)


def _take_all(reader: LineReader, max_lines: int, max_bytes: int | None) -> list[tuple[bytes, int]]:
    blocks = []
    while True:
        data, count = reader.take(max_lines, max_bytes)
        if not count:
            return blocks
        blocks.append((data, count))


@pytest.mark.parametrize("suffix", ["", ".gz", ".xz"])
@pytest.mark.parametrize("chunk_bytes", [5, 1 << 20])
@pytest.mark.parametrize("prefetch", [True, False])
def test_line_reader_hands_out_whole_lines(tmp_path, suffix, chunk_bytes, prefetch):
    data = "一行目\n\n三行目\r\nlong " + "x" * 40 + "\n\n最後"
    compress = {"": bytes, ".gz": gzip.compress, ".xz": lzma.compress}[suffix]
    path = tmp_path / f"a.txt{suffix}"
    path.write_bytes(compress(data.encode()))
    expected = [line.encode() for line in data.split("\n")]
    with LineReader(path, chunk_bytes=chunk_bytes, prefetch=prefetch) as reader:
        blocks = _take_all(reader, 2, None)
        assert (reader.lines_taken, reader.bytes_taken) == (6, len(data.encode()))
    assert [count for _, count in blocks] == [2, 2, 2]
    assert b"".join(data for data, _ in blocks) == data.encode()
    assert [data.split(b"\n")[0] for data, _ in blocks] == expected[0::2]
    with LineReader(path, chunk_bytes=chunk_bytes, prefetch=prefetch) as reader:
        # A byte budget stops at the first line end at or past it, never inside a line.
        blocks = _take_all(reader, 100, 12)
    assert [len(data) for data, _ in blocks] == [22, 46, 7]
    assert [count for _, count in blocks] == [3, 1, 2]
    assert decode_lines(b"".join(data for data, _ in blocks)) == (data.split("\n"), None)


def test_line_reader_seeks_in_plain_files_and_reports_bad_input(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"aa\nbb\ncc\n")
    with LineReader(path, prefetch=False) as reader:
        assert reader.take(2) == (b"aa\nbb\n", 2)
        reader.seek(3, 1)
        assert reader.take(5) == (b"bb\ncc\n", 2)
        assert reader.take(5) == (b"", 0)
    lines, (index, error) = decode_lines(b"ok\nok\n" + b"\xff\xfe\nok\n")
    assert (lines, index, error.start) == (["ok", "ok"], 2, 0)
    with pytest.raises(InputError, match="empty"):
        (tmp_path / "empty.txt").write_bytes(b"")
        LineReader(tmp_path / "empty.txt")
    with pytest.raises(InputError, match="not found"):
        LineReader(tmp_path / "missing.txt")


def test_in_validation_is_deterministic_and_calibrated():
    keys = [f"doc:{i}" for i in range(20_000)]
    picked = [in_validation(7, k, 0.1) for k in keys]
    assert picked == [in_validation(7, k, 0.1) for k in keys]
    assert 1_800 < sum(picked) < 2_200
    assert picked != [in_validation(8, k, 0.1) for k in keys]
    assert all(in_validation(7, k, 1.0) for k in keys[:100])


def test_atomic_writer_renames_on_success_and_cleans_on_error(tmp_path):
    path = tmp_path / "out.txt"
    with AtomicTextWriter(path) as writer:
        writer.write_line("a")
        assert writer.tmp_path.exists() and not path.exists()
    assert path.read_bytes() == b"a\n"
    with pytest.raises(RuntimeError), AtomicTextWriter(path) as writer:
        writer.write_line("b")
        raise RuntimeError("boom")
    _assert_nothing_written(path)


@pytest.mark.parametrize("max_bucket_entries", [1_000_000, 37])
def test_mark_first_occurrences_matches_reference(tmp_path, max_bucket_entries):
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 50, size=1_000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    hashes.astype("<u8").tofile(tmp_path / "h.u64")
    duplicates, buckets = mark_first_occurrences(
        tmp_path / "h.u64", len(hashes), tmp_path / "f.u8", max_bucket_entries, chunk_entries=100
    )
    expected = np.zeros(len(hashes), dtype=bool)
    expected[np.unique(hashes, return_index=True)[1]] = True  # first index of each value
    assert list(iter_flags(tmp_path / "f.u8", chunk_bytes=64)) == expected.tolist()
    assert duplicates == (~expected).sum() == 1_000 - 50
    assert buckets == (1 if max_bucket_entries > 1_000 else 28)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.u8", "h.u64"]  # buckets removed


# --- cc100


@pytest.fixture(scope="module")
def cc100_build(web_sample, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cc100")
    train, validation = _outputs(tmp, "a")
    stats = build_cc100_corpus(web_sample, train, validation, CC100_SETTINGS)
    return tmp, train, validation, stats


def _raw_documents(web_sample: Path, max_lines: int) -> list[list[str]]:
    """Documents of the first `max_lines` non-empty normalised lines, read without the library."""
    documents, count = [[]], 0
    with lzma.open(web_sample, "rt", encoding="utf-8") as f:
        for line in (unicodedata.normalize("NFKC", raw).strip() for raw in f):
            if line:
                documents[-1].append(line)
                count += 1
            elif documents[-1]:
                documents.append([])
            if count == max_lines:
                break
    return [document for document in documents if document]


def test_cc100_exact_counts_normalized_lines(cc100_build):
    _, train, validation, stats = cc100_build
    train_lines, validation_lines = _lines(train), _lines(validation)
    assert stats.lines_read == CC100_LINES
    assert stats.lines_train + stats.lines_validation == CC100_LINES
    assert (len(train_lines), len(validation_lines)) == (stats.lines_train, stats.lines_validation)
    assert 0.9 * CC100_VALIDATION <= stats.lines_validation <= CC100_VALIDATION
    assert stats.chars_train == sum(map(len, train_lines))
    assert stats.chars_validation == sum(map(len, validation_lines))
    assert stats.documents_train + stats.documents_validation == stats.documents_read
    for line in train_lines + validation_lines:
        assert line and line == unicodedata.normalize("NFKC", line).strip()


def test_cc100_documents_whole_and_in_order(cc100_build, web_sample):
    _, train, validation, stats = cc100_build
    train_lines, validation_lines = _lines(train), _lines(validation)
    documents = _raw_documents(web_sample, CC100_LINES)
    assert len(documents) == stats.documents_read
    # Each document must appear whole, in file order, in exactly one split: every output line
    # is consumed once, so no document is split and no line is in both files.
    t = v = in_validation_docs = 0
    for document in documents:
        if train_lines[t : t + len(document)] == document:
            t += len(document)
        elif validation_lines[v : v + len(document)] == document:
            v += len(document)
            in_validation_docs += 1
        else:
            pytest.fail("a document is split between train and validation or altered")
    assert (t, v) == (len(train_lines), len(validation_lines))
    assert in_validation_docs == stats.documents_validation > 0


def test_cc100_deterministic_and_seeded(cc100_build, web_sample):
    tmp, train, validation, _ = cc100_build
    again, seeded = _outputs(tmp, "again"), _outputs(tmp, "seed7")
    build_cc100_corpus(web_sample, *again, CC100_SETTINGS)
    assert again[0].read_bytes() == train.read_bytes()
    assert again[1].read_bytes() == validation.read_bytes()
    build_cc100_corpus(web_sample, *seeded, dataclasses.replace(CC100_SETTINGS, seed=7))
    assert seeded[1].read_bytes() != validation.read_bytes()


# --- JaWiki


@pytest.fixture(scope="module")
def wiki_build(wiki_sample, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jawiki")
    train, validation = _outputs(tmp, "a")
    stats = build_jawiki_corpus(wiki_sample, train, validation, JawikiSettings(), work_dir=tmp)
    return tmp, train, validation, stats


def test_jawiki_counts_lengths_and_dedup(wiki_build):
    tmp, train, validation, stats = wiki_build
    train_lines, validation_lines = _lines(train), _lines(validation)
    assert stats.documents_read == 995
    assert (len(train_lines), len(validation_lines)) == (stats.lines_train, stats.lines_validation)
    assert stats.lines_validation > 0 and stats.documents_validation > 0
    assert all(10 <= len(s) <= 1000 for s in train_lines + validation_lines)
    assert len(set(train_lines)) == len(train_lines)
    assert len(set(validation_lines)) == len(validation_lines)
    assert not set(train_lines) & set(validation_lines)
    drops = stats.dropped
    assert drops["sentences_duplicate"] > 0 and drops["sentences_too_short"] > 0
    assert stats.lines_read == (
        stats.lines_train + stats.lines_validation + drops["sentences_duplicate"]
        + drops["sentences_too_short"] + drops.get("sentences_too_long", 0)
    )
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".jawiki-work")] == []


def test_jawiki_split_by_article_and_first_occurrence_kept(wiki_build, wiki_sample):
    _, train, validation, _ = wiki_build
    expected = {"train": [], "validation": []}
    seen: set[str] = set()
    for _, document in _wiki_records(wiki_sample):
        split = "validation" if in_validation(42, f"page:{document['page_id']}", 0.03) else "train"
        for sentence in _sentences(document):
            if 10 <= len(sentence) <= 1000 and sentence not in seen:
                seen.add(sentence)
                expected[split].append(sentence)
    assert _lines(train) == expected["train"]
    assert _lines(validation) == expected["validation"]


def test_jawiki_deterministic_and_bucket_independent(wiki_build, wiki_sample, monkeypatch):
    tmp, train, validation, _ = wiki_build
    again = _outputs(tmp, "again")
    # Force the multi-bucket dedup path (~11 buckets here): same bytes as the one-bucket run.
    small_buckets = functools.partial(mark_first_occurrences, max_bucket_entries=10_000)
    monkeypatch.setattr(jawiki_module, "mark_first_occurrences", small_buckets)
    stats = build_jawiki_corpus(wiki_sample, *again, JawikiSettings())
    assert stats.details["dedup_buckets"] > 1
    assert again[0].read_bytes() == train.read_bytes()
    assert again[1].read_bytes() == validation.read_bytes()


def test_jawiki_max_documents_counts_articles(wiki_sample, tmp_path):
    settings = JawikiSettings(max_documents=50, validation_fraction=0.2)
    stats = build_jawiki_corpus(wiki_sample, *_outputs(tmp_path, "x"), settings)
    assert (stats.documents_read, stats.input_lines) == (50, 100)
    first_50 = _wiki_records(wiki_sample)[:50]
    assert stats.lines_read == sum(len(_sentences(document)) for _, document in first_50)


def test_jawiki_only_namespace_zero(wiki_sample, tmp_path):
    records = _wiki_records(wiki_sample)[:40]
    for _, document in records[1::2]:
        document["namespace"] = 1
    raw = _write_dump(tmp_path / "mixed.json.gz", records)
    settings = JawikiSettings(validation_fraction=0.3)
    stats = build_jawiki_corpus(raw, *_outputs(tmp_path, "x"), settings)
    assert stats.documents_read == 20
    assert stats.dropped["documents_other_namespace"] == 20
    output = set(_lines(tmp_path / "x.train.txt") + _lines(tmp_path / "x.validation.txt"))
    kept = {s for _, d in records[0::2] for s in _sentences(d)}
    assert output and output <= kept


def test_jawiki_length_limits(tmp_path):
    # Project-written text: per article one sentence each of 9, 10, 1000 and 1001 characters.
    records = []
    for k in range(20):
        char = chr(0x4E00 + k)
        text = " ".join(char * (n - 1) + "。" for n in (9, 10, 1000, 1001))
        records.append(({"index": {"_id": str(k)}}, {"namespace": 0, "page_id": k, "text": text}))
    raw = _write_dump(tmp_path / "lengths.json.gz", records)
    train, validation = _outputs(tmp_path, "x")
    stats = build_jawiki_corpus(raw, train, validation, JawikiSettings(validation_fraction=0.5))
    assert {len(s) for s in _lines(train) + _lines(validation)} == {10, 1000}
    assert stats.dropped["sentences_too_short"] == stats.dropped["sentences_too_long"] == 20


def _broken_dump(wiki_sample: Path, tmp_path: Path, how: str) -> Path:
    """The first 4 articles of the real dump with one defect (line numbers are 1-based)."""
    with gzip.open(wiki_sample, "rt", encoding="utf-8") as f:
        lines = [next(f).rstrip("\n") for _ in range(8)]
    if how == "malformed":
        lines[3] = lines[3][: len(lines[3]) // 2]
    elif how in ("text", "namespace"):
        lines[3] = json.dumps({k: v for k, v in json.loads(lines[3]).items() if k != how})
    else:  # delete lines: "del 5:8" -> lines[5:8]
        start, stop = map(int, how.split()[1].split(":"))
        del lines[start:stop]
    raw = tmp_path / "broken.json.gz"
    raw.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return raw


@pytest.mark.parametrize(
    "how, line, message",
    [
        ("malformed", 4, "malformed JSON"),
        ("text", 4, "'text'"),
        ("namespace", 4, "'namespace'"),
        ("del 5:8", 5, "without its document"),  # the file ends after an index line
        ("del 3:4", 3, "without its document"),  # two index lines in a row
        ("del 2:3", 3, "expected an"),  # a document without its index line
    ],
)
def test_jawiki_bad_lines_name_file_and_line(wiki_sample, tmp_path, how, line, message):
    raw = _broken_dump(wiki_sample, tmp_path, how)
    out = _outputs(tmp_path, "x")
    with pytest.raises(InputError, match=message) as info:
        # Strict: with max_bad_records=0 the first bad line fails (skipping: test_bad_records.py).
        build_jawiki_corpus(raw, *out, JawikiSettings(validation_fraction=0.5, max_bad_records=0))
    assert info.value.line == line
    assert f"broken.json.gz, line {line}" in str(info.value)
    _assert_nothing_written(*out)
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".jawiki-work")] == []


# --- damaged input and bad settings, both builders

CC100_SMALL = Cc100Settings(max_lines=10**9, max_validation_lines=10)


def _build(raw: Path, out: tuple[Path, Path], settings: Cc100Settings | JawikiSettings):
    builder = build_cc100_corpus if isinstance(settings, Cc100Settings) else build_jawiki_corpus
    return builder(raw, *out, settings)


@pytest.mark.parametrize(
    "sample, name, settings",
    [("web_sample", "cut.txt.xz", CC100_SMALL), ("wiki_sample", "cut.json.gz", JawikiSettings())],
)
def test_truncated_input_is_an_error(sample, name, settings, request, tmp_path):
    source = request.getfixturevalue(sample).read_bytes()
    raw = tmp_path / name
    raw.write_bytes(source[: len(source) // 3])
    good = 0
    with pytest.raises(InputError, match="truncated"):
        for good, _ in read_lines(raw):
            pass
    out = _outputs(tmp_path, "x")
    with pytest.raises(InputError, match="truncated") as info:
        _build(raw, out, settings)
    # The message names the file and the last good line; nothing short is left behind.
    assert good > 1 and info.value.line == good + 1 and f"after line {good} " in str(info.value)
    assert str(raw) in str(info.value)
    _assert_nothing_written(*out)


@pytest.mark.parametrize(
    "name, content, settings, message",
    [
        ("empty.txt.xz", b"", CC100_SMALL, "empty"),
        ("blank.txt.xz", lzma.compress(b"\n \n\t\n"), CC100_SMALL, "no non-empty lines"),
        # mtime=0: the bytes are part of the test id, which both xdist workers must collect alike.
        ("empty.json.gz", gzip.compress(b"", mtime=0), JawikiSettings(), "no namespace-0 articles"),
    ],
)
def test_empty_input_is_an_error(tmp_path, name, content, settings, message):
    raw = tmp_path / name
    raw.write_bytes(content)
    out = _outputs(tmp_path, "x")
    with pytest.raises(InputError, match=message):
        _build(raw, out, settings)
    _assert_nothing_written(*out)


@pytest.mark.parametrize(
    "settings, field",
    [
        (Cc100Settings(max_lines=100, max_validation_lines=100), "max_validation_lines"),
        (Cc100Settings(max_validation_lines=0), "max_validation_lines"),
        (Cc100Settings(max_lines=1), "max_lines"),
        (Cc100Settings(validation_doc_fraction=0.0), "validation_doc_fraction"),
        (Cc100Settings(validation_doc_fraction=1.5), "validation_doc_fraction"),
        (JawikiSettings(max_documents=0), "max_documents"),
        (JawikiSettings(validation_fraction=0.0), "validation_fraction"),
        (JawikiSettings(validation_fraction=1.0), "validation_fraction"),
        (JawikiSettings(min_chars=0), "min_chars"),
        (JawikiSettings(min_chars=20, max_chars=10), "max_chars"),
    ],
)
def test_settings_out_of_range(settings, field, web_sample, tmp_path):
    out = _outputs(tmp_path, "x")
    with pytest.raises(ConfigError) as info:
        _build(web_sample, out, settings)  # checked before the input is opened
    assert info.value.setting == field and field in str(info.value)
    _assert_nothing_written(*out)


@pytest.mark.parametrize(
    "sample, settings, message",
    [
        ("web_sample", Cc100Settings(max_lines=2_000, max_validation_lines=5), "max_validation"),
        ("wiki_sample", JawikiSettings(max_documents=3, validation_fraction=1e-9), "raise valid"),
    ],
)
def test_empty_validation_split_is_an_error(sample, settings, message, request, tmp_path):
    out = _outputs(tmp_path, "x")
    out[1].write_text("stale\n")  # an older output must not survive a failed build
    with pytest.raises(ConfigError, match=message):
        _build(request.getfixturevalue(sample), out, settings)
    _assert_nothing_written(*out)
