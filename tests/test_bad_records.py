"""The bad-record policy of both corpus builders: skipped and counted by reason, or an error.

Real text from ../shared/corpora with defects written into it: each bad line must be skipped and
counted under its reason, everything else must come out byte for byte as a build of the same
file without the bad lines, on 1 worker and on a pool of 2 alike; one bad line more than
`max_bad_records` fails the build naming the file and the first bad line. About 10 s.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import lzma
import tracemalloc
from pathlib import Path

import pytest

import tinyplm_lib.corpora.cc100 as cc100_module
import tinyplm_lib.corpora.jawiki as jawiki_module
from tinyplm_lib.corpora.cc100 import Cc100Settings, build_cc100_corpus
from tinyplm_lib.corpora.cleaning import has_control_chars
from tinyplm_lib.corpora.jawiki import JawikiSettings, build_jawiki_corpus
from tinyplm_lib.corpora.reader import LineReader
from tinyplm_lib.errors import InputError
from tinyplm_lib.parallel import WorkerPool

# Limits small enough that a test line can pass them; the shared samples' longest lines are
# 11,752 bytes (cc100 format) and 185 kB (JaWiki), under both.
CC100 = Cc100Settings(max_lines=10**9, max_validation_lines=150, validation_doc_fraction=0.2,
                      max_record_bytes=20_000)
JAWIKI = JawikiSettings(validation_fraction=0.3, max_record_bytes=200_000)


def _outputs(root: Path) -> tuple[Path, Path]:
    return root / "train.txt", root / "validation.txt"


def _stats_without_timing(stats) -> dict:
    data = stats.to_dict()
    data.pop("seconds")
    data["details"].pop("workers")
    data.pop("source")
    return data


def _both_ways(build, raw: Path, settings, root: Path, patch: pytest.MonkeyPatch) -> dict:
    """Build on 1 worker and on a pool of 2 with small blocks; both must agree byte for byte."""
    # 64 KiB blocks: the bad lines land in different pool tasks, several in flight at once.
    patch.setattr(cc100_module, "BLOCK_BYTES", 1 << 16)
    patch.setattr(jawiki_module, "BLOCK_BYTES", 1 << 16)
    one = build(raw, *_outputs(root / "one"), settings, workers=1)
    with WorkerPool(2) as pool:
        two = build(raw, *_outputs(root / "two"), settings, pool=pool)
    for a, b in zip(_outputs(root / "one"), _outputs(root / "two")):
        assert a.read_bytes() == b.read_bytes()
    assert _stats_without_timing(one) == _stats_without_timing(two)
    return {"stats": one, "train": (root / "one" / "train.txt").read_bytes(),
            "validation": (root / "one" / "validation.txt").read_bytes()}


# --- cc100


@pytest.fixture(scope="module")
def web_lines(web_sample) -> list[bytes]:
    """The first 3,000 lines of the real sample (documents separated by blank lines)."""
    with lzma.open(web_sample, "rb") as f:
        return [next(f) for _ in range(3000)]


def _write_xz(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(lzma.compress(b"".join(lines), preset=0))
    return path


def _damaged_web(lines: list[bytes]) -> tuple[list[bytes], dict[int, str], list[bytes]]:
    """(damaged lines, {line number: reason} of the bad ones, the same lines without them)."""
    damaged = list(lines)
    bad: dict[int, str] = {}
    # Inside documents (not next to a blank line), so dropping them must not split a document.
    for index, line, reason in [
        (100, b"\xff\xfe broken bytes\n", "invalid_utf8"),
        (700, "真ん中".encode() + b"\xc3\x28" + "の行\n".encode(), "invalid_utf8"),
        (1500, "長".encode() * 10_000 + b"\n", "record_too_long"),  # 30,000 bytes: in one block
        (2100, b"x" * 300_000 + b"\n", "record_too_long"),  # spans 64 KiB blocks: the reader cuts it
    ]:
        assert damaged[index].strip() and damaged[index - 1].strip() and damaged[index + 1].strip()
        damaged.insert(index, line)
        bad = {n + (n > index): r for n, r in bad.items()}  # later inserts shift earlier numbers
        bad[index + 1] = reason
    clean = [line for number, line in enumerate(damaged, 1) if number not in bad]
    return damaged, bad, clean


def test_cc100_bad_lines_are_skipped_counted_and_the_rest_kept(web_lines, tmp_path, monkeypatch):
    damaged, bad, clean = _damaged_web(web_lines)
    # Control characters inside a kept line: removed, the line kept, counted.
    line = damaged[50].decode().rstrip("\n")
    damaged[50] = (line[:5] + "\x00\x1b" + line[5:] + "\x7f\n").encode()
    got = _both_ways(build_cc100_corpus, _write_xz(tmp_path / "damaged.txt.xz", damaged), CC100,
                     tmp_path, monkeypatch)
    clean[50] = damaged[50]
    expected = build_cc100_corpus(_write_xz(tmp_path / "clean.txt.xz", clean),
                                  *_outputs(tmp_path / "clean"), dataclasses.replace(CC100, max_bad_records=0))
    stats = got["stats"]
    assert stats.skipped == {"invalid_utf8": 2, "record_too_long": 2}
    assert [(e["line"], e["reason"]) for e in stats.skipped_examples] == sorted(bad.items())
    assert stats.skipped_examples[0]["detail"] == "invalid UTF-8 at byte 0 of the line"
    assert stats.skipped_examples[3]["detail"] == "line of 300000 bytes, over max_record_bytes (20000)"
    assert stats.control_char_records == 1 and expected.control_char_records == 1
    assert stats.input_lines == len(damaged) and stats.lines_read == expected.lines_read
    # Everything but the bad lines, byte for byte, documents whole: the same as the clean file.
    assert got["train"] == (tmp_path / "clean" / "train.txt").read_bytes()
    assert got["validation"] == (tmp_path / "clean" / "validation.txt").read_bytes()
    assert "\x00" not in got["train"].decode() + got["validation"].decode()


def test_cc100_more_bad_lines_than_allowed_fail_naming_the_first(web_lines, tmp_path):
    damaged, bad, _ = _damaged_web(web_lines)
    raw = _write_xz(tmp_path / "damaged.txt.xz", damaged)
    out = _outputs(tmp_path / "out")
    with pytest.raises(InputError) as info:
        build_cc100_corpus(raw, *out, dataclasses.replace(CC100, max_bad_records=3), workers=1)
    first = min(bad)
    message = str(info.value)
    assert info.value.line == first and f"damaged.txt.xz, line {first}: invalid UTF-8" in message
    assert "4 bad records, more than max_bad_records (3)" in message
    assert f"the last at line {max(bad)}" in message
    assert "{'invalid_utf8': 2, 'record_too_long': 2}" in message
    assert not any(p.exists() for p in out)
    # Strict: the first bad line alone fails.
    with pytest.raises(InputError, match="max_bad_records is 0") as info:
        build_cc100_corpus(raw, *out, dataclasses.replace(CC100, max_bad_records=0), workers=1)
    assert info.value.line == first


def test_cc100_input_of_only_bad_lines_is_empty_input(tmp_path):
    raw = _write_xz(tmp_path / "bad.txt.xz", [b"\xff\n", b"\n", b"\xfe\xfe\n"])
    with pytest.raises(InputError, match=r"no non-empty lines.*2 bad records skipped.*invalid_utf8"):
        build_cc100_corpus(raw, *_outputs(tmp_path), CC100, workers=1)


# --- JaWiki


@pytest.fixture(scope="module")
def wiki_lines(wiki_sample) -> list[str]:
    """The first 40 articles of the real dump: 80 lines, index then document."""
    with gzip.open(wiki_sample, "rt", encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(80)]


def _article(lines: list[str], k: int) -> tuple[str, str]:
    return lines[2 * k - 2], lines[2 * k - 1]  # article k (1-based): index line, document line


def _document(lines: list[str], k: int, **changes) -> str:
    document = json.loads(_article(lines, k)[1])
    document.update(changes)
    return json.dumps({k: v for k, v in document.items() if v is not None}, ensure_ascii=False)


def _write_gz(path: Path, lines: list[str | bytes]) -> Path:
    data = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data, compresslevel=1))
    return path


def _damaged_dump(lines: list[str]) -> tuple[list[str | bytes], list[tuple[int, str]], list[str]]:
    """(damaged dump lines, [(line number, reason)] expected, a clean dump of the kept articles)."""
    damaged: list[str | bytes] = []
    clean: list[str] = []
    for k in range(1, 41):
        index, document = _article(lines, k)
        if k == 3:
            damaged += [index, document[: len(document) // 2]]  # cut in half
        elif k == 5:
            damaged += [index, document.encode()[:200] + b"\xff" + document.encode()[200:]]
        elif k == 7:
            damaged += [index, _document(lines, k, text=None)]  # no text
        elif k == 9:
            damaged += [index, "[1, 2]"]
        elif k == 11:
            damaged += [document]  # its index line is missing
        elif k == 13:
            damaged += [index]  # its document is missing
        elif k == 15:
            # A broken index line: its document still counts (it carries its page_id).
            damaged += ['{"index": {"_id": ', document]
            clean += [index, document]
        elif k == 17:
            damaged += [index, _document(lines, k, text="長い。" * 100_000)]  # 900 kB
        elif k == 19:
            text = json.loads(document)["text"]
            with_controls = _document(lines, k, text=text[:10] + "\x00\x01" + text[10:])
            damaged += [index, "", with_controls]  # a blank line between is no defect
            clean += [index, with_controls]
        else:
            damaged += [index, document]
            clean += [index, document]
    damaged += ['{"index": {"_id": "9999"}}']  # the dump ends after an index line
    assert len(damaged) == 80
    # Articles 1-10 fill lines 1-20 (3: 5-6, 5: 9-10 ...); 11 is line 21 alone, 12 is 22-23, 13
    # is line 24 alone, 15 is 27-28, 17 is 31-32, 19 is 35-37 with the blank line.
    expected = [(6, "malformed_json"), (10, "invalid_utf8"), (14, "missing_field"),
                (18, "not_a_json_object"), (21, "document_without_index"),
                (24, "index_without_document"), (27, "malformed_json"), (32, "record_too_long"),
                (80, "index_without_document")]
    return damaged, expected, clean


def test_jawiki_bad_lines_are_skipped_counted_and_the_rest_kept(wiki_lines, tmp_path, monkeypatch):
    damaged, expected, clean = _damaged_dump(wiki_lines)
    raw = _write_gz(tmp_path / "damaged.json.gz", damaged)
    got = _both_ways(build_jawiki_corpus, raw, JAWIKI, tmp_path, monkeypatch)
    reference = build_jawiki_corpus(_write_gz(tmp_path / "clean.json.gz", clean),
                                    *_outputs(tmp_path / "clean"), dataclasses.replace(JAWIKI, max_bad_records=0))
    stats = got["stats"]
    counts: dict[str, int] = {}
    for _, reason in expected:
        counts[reason] = counts.get(reason, 0) + 1
    assert stats.skipped == counts and stats.skipped_total == len(expected) == 9
    assert [(e["line"], e["reason"]) for e in stats.skipped_examples] == expected[:5]
    assert stats.skipped_examples[2]["detail"] == "document lacks a string 'text'"
    # 40 articles, 7 lost to their defects; the one behind a broken index line is kept.
    assert stats.documents_read == reference.documents_read == 33
    assert got["train"] == (tmp_path / "clean" / "train.txt").read_bytes()
    assert got["validation"] == (tmp_path / "clean" / "validation.txt").read_bytes()
    texts = [json.loads(line)["text"] for line in clean[1::2]]
    assert stats.control_char_records == sum(map(has_control_chars, texts)) >= 1
    assert "\x00" not in got["train"].decode() + got["validation"].decode()


def test_jawiki_more_bad_lines_than_allowed_fail_naming_the_first(wiki_lines, tmp_path):
    damaged, expected, _ = _damaged_dump(wiki_lines)
    raw = _write_gz(tmp_path / "damaged.json.gz", damaged)
    out = _outputs(tmp_path / "out")
    settings = dataclasses.replace(JAWIKI, max_bad_records=4)
    with pytest.raises(InputError) as info:
        build_jawiki_corpus(raw, *out, settings, workers=1)
    first_line, _ = expected[0]
    assert info.value.line == first_line
    assert f"damaged.json.gz, line {first_line}: malformed JSON" in str(info.value)
    assert f"5 bad records, more than max_bad_records (4) allows; the last at line {expected[4][0]}" \
        in str(info.value)
    assert not any(p.exists() for p in out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".jawiki-work")]


def test_jawiki_dump_of_only_bad_lines_is_empty_input(tmp_path):
    raw = _write_gz(tmp_path / "bad.json.gz", ["{", "not json", '{"index": {}}'])
    with pytest.raises(InputError, match=r"no namespace-0 articles.*3 bad records skipped"):
        build_jawiki_corpus(raw, *_outputs(tmp_path), JAWIKI, workers=1)


# --- the reader's cap on line length


def test_line_reader_never_holds_an_overlong_line(tmp_path):
    payload = b"first\n" + b"y" * (40 << 20) + b"\nlast line\n" + b"z" * (3 << 20)  # no final newline
    raw = tmp_path / "long.txt.gz"
    raw.write_bytes(gzip.compress(payload, compresslevel=1))
    del payload
    tracemalloc.start()
    with LineReader(raw, chunk_bytes=1 << 16, max_line_bytes=1000) as reader:
        blocks = []
        while True:
            data, count = reader.take(2)
            if not count:
                break
            blocks.append((data, reader.pop_long_lines()))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # The cut lines come out as empty lines, numbered, with their true length.
    assert blocks == [(b"first\n\n", {2: 40 << 20}), (b"last line\n\n", {4: 3 << 20})]
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB: the 40 MiB line was held"


# --- through Dagster: the counts are the corpus assets' metadata


def test_corpus_asset_reports_skipped_records(web_lines, tmp_path):
    from dagster import AssetSelection, load_assets_from_modules, materialize

    from tinyplm_assets.assets import corpora, models, sources, tokenizer, tokens
    from tinyplm_assets.resources import ArtifactIOManager, ArtifactStorage
    from tinyplm_lib.store.artifacts import LocalArtifactStore, artifact_key

    damaged, bad, _ = _damaged_web(web_lines)
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    _write_xz(raw_dir / "ja.txt.xz", damaged)
    home = tmp_path / "home"
    LocalArtifactStore(home / "artifacts").publish(artifact_key(["cc100_ja_raw"]), raw_dir, move=False)
    storage = ArtifactStorage(home=str(home))
    config = {"max_lines": 10**9, "max_validation_lines": 150, "validation_doc_fraction": 0.2,
              "max_record_bytes": 20_000, "workers": 1}
    result = materialize(
        load_assets_from_modules([sources, corpora, tokenizer, tokens, models]),
        selection=AssetSelection.assets("cc100_ja_train", "cc100_ja_validation"),
        resources={"storage": storage, "io_manager": ArtifactIOManager(storage=storage)},
        run_config={"ops": {"cc100_ja_corpus": {"config": config}}},
    )
    assert result.success
    for materialization in result.asset_materializations_for_node("cc100_ja_corpus"):
        metadata = {key: value.value for key, value in materialization.metadata.items()}
        assert metadata["skipped_total"] == 4
        assert metadata["skipped_records"] == {"invalid_utf8": 2, "record_too_long": 2}
        assert [e["line"] for e in metadata["skipped_examples"]] == sorted(bad)
    # One bad line over the limit fails the step with the file and line in the error.
    config["max_bad_records"] = 1
    result = materialize(
        load_assets_from_modules([sources, corpora, tokenizer, tokens, models]),
        selection=AssetSelection.assets("cc100_ja_train", "cc100_ja_validation"),
        resources={"storage": storage, "io_manager": ArtifactIOManager(storage=storage)},
        run_config={"ops": {"cc100_ja_corpus": {"config": config}}}, raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    error = failure.step_failure_data.error.cause  # the InputError behind Dagster's wrapper
    assert error.cls_name == "InputError"
    assert f"ja.txt.xz, line {min(bad)}: invalid UTF-8" in error.message
