"""Bad-input scenarios of `python -m bench.faults`: truncated archives and bad lines.

Each asserts the one documented outcome (README, "Bad input"): a truncated archive is an InputError
naming the file and line, never a short corpus, and the store's earlier good version still loads; a
bad line is skipped and counted with its line number under the default `max_bad_records`, and is an
InputError naming file and line with `max_bad_records=0`. (Impossible settings are configuration
checks, not faults: tests/test_config_errors.py and tests/test_corpus.py cover them.)
"""

from __future__ import annotations

import gzip
import lzma
from pathlib import Path

from bench.faults.children import run_child
from bench.faults.core import Run, scenario
from bench.faults.lab import CC100_SETTINGS, JAWIKI_SETTINGS, Lab
from tinyplm_lib.errors import InputError
from tinyplm_lib.store.artifacts import LocalArtifactStore
from tinyplm_lib.store.scratch import release_scratch_dir


def _corpus_into_store(lab: Lab, work: Path, corpus: str, raw: Path) -> tuple[LocalArtifactStore, dict]:
    """A store holding the corpus built from an intact `raw` (the previous, good version)."""
    store = LocalArtifactStore(work / "store")
    result, _ = run_child("corpus_step", work / "good.log", root=str(store.root), corpus=corpus, raw=str(raw),
                          settings=CC100_SETTINGS if corpus == "cc100" else JAWIKI_SETTINGS)
    return store, result["manifests"]


def _build(corpus: str, raw: Path, out: Path, **extra):
    from tinyplm_lib.corpora.cc100 import Cc100Settings, build_cc100_corpus
    from tinyplm_lib.corpora.jawiki import JawikiSettings, build_jawiki_corpus

    if corpus == "cc100":
        settings = Cc100Settings(**{**CC100_SETTINGS, **extra})
        return build_cc100_corpus(raw, out / "train.txt", out / "validation.txt", settings, workers=1)
    settings = JawikiSettings(**{**JAWIKI_SETTINGS, **extra})
    return build_jawiki_corpus(raw, out / "train.txt", out / "validation.txt", settings, workers=1)


def _truncated_input(lab: Lab, run: Run, corpus: str, raw: Path) -> None:
    work = lab.dir(f"truncated-{corpus}")
    store, good = _corpus_into_store(lab, work, corpus, raw)
    cut = work / raw.name
    data = raw.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    staging = store.staging_dir(f"{corpus}_train")
    error = run.raises(InputError, lambda: _build(corpus, cut, staging), str(cut), "truncated or corrupt", "line")
    run.check(getattr(error, "line", None) is not None and error.line > 1, f"no line number: {error}")
    left = sorted(p.name for p in staging.iterdir())
    run.check(left == [], f"the failed build left files behind: {left}")
    release_scratch_dir(staging)  # as the failed step's process ending would
    for split, manifest in good.items():
        key = f"{corpus}_{split}"
        run.artifact(store.load(key).manifest == manifest, f"the stored {key} changed")
    run.note(f"cut at {len(cut.read_bytes()):,} of {len(data):,} bytes; the good version still loads")


@scenario("input")
def truncated_xz_is_an_error(lab: Lab, run: Run) -> None:
    """A cc100 .xz cut at 60%: InputError naming the file and line, never a short corpus."""
    _truncated_input(lab, run, "cc100", lab.cc100_slice())


@scenario("input")
def truncated_gz_is_an_error(lab: Lab, run: Run) -> None:
    """A JaWiki .gz cut at 60%: InputError naming the file and line, never a short corpus."""
    _truncated_input(lab, run, "jawiki", lab.jawiki_slice())


def _with_line(raw: Path, damaged: Path, bad: bytes, at_line: int) -> None:
    """A copy of `raw` (.xz or .gz) with `bad` inserted so that it becomes line `at_line`."""
    opener, level = (lzma.open, {"preset": 0}) if raw.suffix == ".xz" else (gzip.open, {"compresslevel": 1})
    with opener(raw, "rb") as read, opener(damaged, "wb", **level) as write:
        for line_no, line in enumerate(read, start=1):
            if line_no == at_line:
                write.write(bad)
            write.write(line)


def _bad_line(lab: Lab, run: Run, corpus: str, raw: Path, bad: bytes, at_line: int, reason: str) -> None:
    """`bad` as line `at_line`: skipped and counted under `reason` by default, an InputError when strict."""
    work = lab.dir(f"bad-line-{corpus}")
    damaged = work / raw.name
    _with_line(raw, damaged, bad, at_line)
    # Default tolerance (max_bad_records=100): skipped, counted with its line, the corpus otherwise
    # byte for byte the one built from the intact file. An InputError here fails the scenario.
    stats = _build(corpus, damaged, work / "out")
    run.check(stats.skipped == {reason: 1}, f"expected one {reason!r} skipped, got skipped={stats.skipped}")
    seen = [(e.get("line"), e.get("reason")) for e in stats.skipped_examples]
    run.check(seen == [(at_line, reason)], f"the count does not name line {at_line}: {stats.skipped_examples}")
    _build(corpus, raw, work / "intact")
    for split in ("train.txt", "validation.txt"):
        same = (work / "out" / split).read_bytes() == (work / "intact" / split).read_bytes()
        run.check(same, f"{split} differs from the build of the file without the bad line")
    run.note(f"skipped and counted: {stats.skipped} at line {at_line}; the corpus equals the intact build")
    # No tolerance (max_bad_records=0): the same line is an InputError naming the file and the line.
    strict = work / "strict"
    error = run.raises(InputError, lambda: _build(corpus, damaged, strict, max_bad_records=0), str(damaged),
                       f"line {at_line}", reason, "max_bad_records is 0")
    run.check(getattr(error, "line", None) == at_line, f"the error's line is {getattr(error, 'line', None)}")
    left = sorted(p.name for p in strict.iterdir()) if strict.exists() else []
    run.check(left == [], f"the strict build left files behind: {left}")


@scenario("input")
def bad_utf8_line_in_cc100(lab: Lab, run: Run) -> None:
    """An invalid UTF-8 line in a cc100 file: skipped and counted; with max_bad_records=0 an error naming it."""
    _bad_line(lab, run, "cc100", lab.cc100_slice(), b"broken \xff\xfe bytes\n", 1234, "invalid_utf8")


@scenario("input")
def bad_json_line_in_jawiki(lab: Lab, run: Run) -> None:
    """A malformed JSON line in a JaWiki dump: skipped and counted; with max_bad_records=0 an error naming it."""
    _bad_line(lab, run, "jawiki", lab.jawiki_slice(), b'{"namespace": 0, "text": "cut off\n', 301, "malformed_json")
