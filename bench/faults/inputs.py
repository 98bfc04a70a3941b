"""Bad-input scenarios of `python -m bench.faults`: truncated archives, bad lines, impossible settings.

A damaged input ends in an InputError naming the file and line (or a bad line skipped and counted),
never a short corpus; a store's earlier good version still loads; settings fail before any work.
"""

from __future__ import annotations

import gzip
import lzma
from dataclasses import fields
from pathlib import Path

from bench.faults.children import run_child
from bench.faults.core import Run, scenario
from bench.faults.lab import CC100_SETTINGS, FAST, JAWIKI_SETTINGS, Lab
from tinyplm_lib.downloads.download import download
from tinyplm_lib.errors import ConfigError, InputError
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


def _has_setting(corpus: str, name: str) -> bool:
    from tinyplm_lib.corpora.cc100 import Cc100Settings
    from tinyplm_lib.corpora.jawiki import JawikiSettings

    return name in {f.name for f in fields(Cc100Settings if corpus == "cc100" else JawikiSettings)}


def _bad_line(lab: Lab, run: Run, corpus: str, raw: Path, bad: bytes, at_line: int) -> None:
    """Insert `bad` as line `at_line`: skipped and counted, or InputError naming file and line."""
    work = lab.dir(f"bad-line-{corpus}")
    damaged = work / raw.name
    opener, level = (lzma.open, {"preset": 0}) if raw.suffix == ".xz" else (gzip.open, {"compresslevel": 1})
    with opener(raw, "rb") as read, opener(damaged, "wb", **level) as write:
        for line_no, line in enumerate(read, start=1):
            if line_no == at_line:
                write.write(bad)
            write.write(line)
    try:
        stats = _build(corpus, damaged, work / "out")
    except InputError as exc:
        run.check(str(damaged) in str(exc) and exc.line == at_line, f"the error does not name line {at_line}: {exc}")
        run.check(not any((work / "out").glob("*")) if (work / "out").exists() else True,
                  "the failed build left files behind")
        run.note(f"InputError: {str(exc)[:200]}")
        return
    skipped = getattr(stats, "skipped", None) or {}
    examples = getattr(stats, "skipped_examples", None) or []
    run.check(sum(skipped.values()) == 1, f"the bad line was neither refused nor counted: skipped={skipped}")
    run.check(any(e.get("line") == at_line for e in examples), f"the count does not name line {at_line}: {examples}")
    text = (work / "out" / "train.txt").read_text(encoding="utf-8") + \
        (work / "out" / "validation.txt").read_text(encoding="utf-8")
    run.check("\ufffd" not in text, "replacement characters reached the corpus")
    run.note(f"skipped and counted: {skipped}, at line {at_line}")
    if _has_setting(corpus, "max_bad_records"):
        # With no tolerance, the same line is an error that names it.
        strict = work / "strict"
        run.raises(InputError, lambda: _build(corpus, damaged, strict, max_bad_records=0), str(damaged),
                   f"line {at_line}")
        run.check(not any(strict.glob("*")) if strict.exists() else True, "the strict build left files behind")


@scenario("input")
def bad_utf8_line_in_cc100(lab: Lab, run: Run) -> None:
    """An invalid UTF-8 line in a cc100 file: skipped and counted, or an error naming file and line."""
    _bad_line(lab, run, "cc100", lab.cc100_slice(), b"broken \xff\xfe bytes\n", 1234)


@scenario("input")
def bad_json_line_in_jawiki(lab: Lab, run: Run) -> None:
    """A malformed JSON line in a JaWiki dump: skipped and counted, or an error naming file and line."""
    _bad_line(lab, run, "jawiki", lab.jawiki_slice(), b'{"namespace": 0, "text": "cut off\n', 301)


@scenario("input")
def impossible_settings_fail_before_work(lab: Lab, run: Run) -> None:
    """Impossible settings: ConfigError naming the setting before any request, file or folder."""
    from tinyplm_lib.corpora.cc100 import Cc100Settings, build_cc100_corpus
    from tinyplm_lib.corpora.jawiki import JawikiSettings
    from tinyplm_lib.tokens.shard_writer import encode_corpus

    work = lab.dir("config-errors")
    out = work / "never"
    error = run.raises(ConfigError, lambda: build_cc100_corpus(
        lab.cc100_slice(), out / "train.txt", out / "validation.txt",
        Cc100Settings(max_lines=100, max_validation_lines=100)), "max_validation_lines")
    run.check(error.setting == "max_validation_lines", f"setting {error.setting!r}")
    error = run.raises(ConfigError, lambda: JawikiSettings(validation_fraction=1.5).validate(), "validation_fraction")
    run.check(error.setting == "validation_fraction", f"setting {error.setting!r}")
    error = run.raises(ConfigError, lambda: encode_corpus(work / "x.txt", work / "tok", out / "shards",
                                                          shard_lines=0), "shard_lines")
    with lab.served("config-errors-http", {"data.bin": b"x"}) as (server, _):
        run.raises(ConfigError, lambda: download(server.url("data.bin"), out / "data.bin", max_retries=-1, **FAST),
                   "max_retries")
        run.check(server.requests == [], f"{len(server.requests)} requests were made before the check")
    run.check(not out.exists(), "output folders were created before the settings were checked")
