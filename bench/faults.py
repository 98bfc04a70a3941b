"""Fault-injection bench: every failure the pipeline must survive, injected into real parts.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m bench.faults --json bench/results/faults.json
    .venv/bin/python -m bench.faults --list
    .venv/bin/python -m bench.faults --only download_killed_then_resumed s3_object_corrupted --json out.json

Each scenario sets up real parts on 127.0.0.1 (the test suite's HTTP file server, moto_server, a
TCP proxy that can cut connections, child processes killed with SIGKILL), injects one fault and
checks the outcome: the artifact ends byte-identical to a clean run's (sha256 of every file), or a
clear error names the file, line or setting while what was already stored still loads. `data_lost`
counts artifacts that ended wrong or missing. The exit status is 1 if any scenario failed.
tests/test_faults.py runs every scenario as a test. See bench/README.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

from bench.faults_lab import (
    CuttableProxy,
    FileHTTPServer,
    Lab,
    Run,
    ScenarioFailed,
    child_result,
    kill_when,
    run_child,
    sha256_bytes,
    start_child,
    tree_digest,
)
from tinyplm_lib.downloads import sources
from tinyplm_lib.downloads.sources import DownloadError, download
from tinyplm_lib.errors import ConfigError, InputError, StorageError
from tinyplm_lib.layout import MANIFEST_FILE
from tinyplm_lib.store.artifacts import LocalArtifactStore
from tinyplm_lib.store.scratch import release_scratch_dir

FAST = {"progress": False, "backoff": 0.0, "chunk_size": 64 * 1024}
BUCKET = "tinyplm-faults"
# Corpus settings for the slices (40k cc100 lines, 600 articles): both splits come out non-empty.
CC100_SETTINGS = {"max_lines": 1_000_000, "max_validation_lines": 2_000, "validation_doc_fraction": 0.05}
JAWIKI_SETTINGS = {"validation_fraction": 0.05}


@dataclass(frozen=True)
class Scenario:
    name: str
    category: str
    summary: str
    run: Callable[[Lab, Run], None]


SCENARIOS: dict[str, Scenario] = {}


def scenario(category: str):
    """Register a scenario function; its docstring's first line is its summary."""
    def register(func: Callable[[Lab, Run], None]) -> Callable[[Lab, Run], None]:
        summary = (func.__doc__ or "").strip().splitlines()[0]
        SCENARIOS[func.__name__] = Scenario(func.__name__, category, summary, func)
        return func
    return register


@contextmanager
def _served(lab: Lab, name: str, files: dict[str, bytes]) -> Iterator[tuple[FileHTTPServer, Path]]:
    """A real HTTP server on 127.0.0.1 serving `files`, and a scratch folder for the scenario."""
    work = lab.dir(name)
    (work / "served").mkdir()
    for file_name, data in files.items():
        (work / "served" / file_name).write_bytes(data)
    with FileHTTPServer(work / "served") as server:
        yield server, work


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.glob(dest.name + ".*")) if dest.parent.exists() else []


def _killed_download(lab: Lab, run: Run, server: FileHTTPServer, work: Path, dest: Path) -> int:
    """Start a child downloading from a paced server, SIGKILL it mid-body; the bytes it kept."""
    server.body_pause = 0.01  # 10 ms per 64 KiB: the 3 MB payload takes ~0.5 s
    process = start_child("download", work / "child.log", url=server.url("data.bin"), dest=str(dest))
    part = _part(dest)
    killed = kill_when(process, lambda: part.exists() and part.stat().st_size >= 256 * 1024, lab.rng.uniform(0, 0.2))
    server.body_pause = 0.0
    run.require(killed, "the child finished its download before the kill")
    run.check(not dest.exists(), "a killed download left the final file")
    kept = part.stat().st_size
    run.require(0 < kept < len(lab.payload()), f"the killed child kept {kept} bytes")
    return kept


# -- downloads ------------------------------------------------------------------------------------


@scenario("download")
def download_killed_then_resumed(lab: Lab, run: Run) -> None:
    """SIGKILL of a process mid-download, then a re-run: resumed with Range, byte-identical."""
    payload = lab.payload()
    with _served(lab, "download-killed", {"data.bin": payload}) as (server, work):
        dest = work / "out" / "data.bin"
        kept = _killed_download(lab, run, server, work, dest)
        server.clear_log()
        result = download(server.url("data.bin"), dest, **FAST)
        first = server.requests[0]
        run.check(first.range == f"bytes={kept}-" and first.status == 206 and first.if_range,
                  f"the re-run asked {first.range!r} (If-Range {first.if_range!r}), got {first.status}")
        run.check(result.resumed_from == kept, f"resumed_from {result.resumed_from}, expected {kept}")
        run.artifact(dest.read_bytes() == payload, "the resumed file differs from the served one")
        run.check(_leftovers(dest) == [], f"leftovers beside the file: {_leftovers(dest)}")
        run.note(f"killed after {kept:,} of {len(payload):,} bytes; the re-run fetched {first.body_bytes:,}")


@scenario("download")
def download_connection_dropped(lab: Lab, run: Run) -> None:
    """The server drops the connection mid-body three times: each retry resumes where the last stopped."""
    payload = lab.payload()
    with _served(lab, "download-dropped", {"data.bin": payload}) as (server, work):
        cut = 700_001
        server.drop_next(3, after_bytes=cut)
        dest = work / "out" / "data.bin"
        result = download(server.url("data.bin"), dest, max_retries=5, **FAST)
        expected = [None] + [f"bytes={cut * k}-" for k in (1, 2, 3)]
        run.check(server.range_requests() == expected, f"requests {server.range_requests()}, expected {expected}")
        run.check(result.resumed_from == 3 * cut, f"resumed_from {result.resumed_from}")
        run.artifact(dest.read_bytes() == payload, "the file assembled from four responses differs")
        run.note(f"4 requests, ranges {expected[1:]}")


@scenario("download")
def download_5xx_burst_then_success(lab: Lab, run: Run) -> None:
    """Three 503 answers, then success: bounded retries with exponential backoff (waits measured)."""
    payload = lab.payload()
    waits: list[float] = []
    real_sleep = sources._sleep

    def recorded(seconds: float) -> None:
        waits.append(seconds)
        real_sleep(seconds)

    with _served(lab, "download-5xx", {"data.bin": payload}) as (server, work):
        server.fail_next(3, status=503)
        dest = work / "out" / "data.bin"
        sources._sleep = recorded
        try:
            download(server.url("data.bin"), dest, max_retries=5, **{**FAST, "backoff": 0.05})
        finally:
            sources._sleep = real_sleep
        statuses = [r.status for r in server.requests]
        run.check(statuses == [503, 503, 503, 200], f"statuses {statuses}")
        run.check(waits == [0.05, 0.1, 0.2], f"backoff waits {waits}, expected [0.05, 0.1, 0.2]")
        run.artifact(dest.read_bytes() == payload, "the file differs after the retries")
        run.note(f"statuses {statuses}, waits {waits} s")


@scenario("download")
def download_stalled_server_times_out(lab: Lab, run: Run) -> None:
    """The server stalls past the socket timeout twice: each attempt times out and the third succeeds."""
    payload = lab.payload()
    with _served(lab, "download-stall", {"data.bin": payload}) as (server, work):
        server.stall_next(2, seconds=1.5)
        dest = work / "out" / "data.bin"
        started = time.perf_counter()
        download(server.url("data.bin"), dest, timeout=0.4, max_retries=4, **FAST)
        seconds = time.perf_counter() - started
        # Three requests unless the machine is so loaded that a healthy answer took over 0.4 s too.
        run.check(len(server.requests) >= 3, f"{len(server.requests)} requests, expected 3")
        run.check(seconds < 1.5, f"{seconds:.2f} s: a stalled request was waited out instead of timed out")
        run.artifact(dest.read_bytes() == payload, "the file differs after the timeouts")
        run.note(f"{len(server.requests)} requests in {seconds:.2f} s with timeout 0.4 s (server stalls 1.5 s)")


@scenario("download")
def download_persistent_5xx_gives_up(lab: Lab, run: Run) -> None:
    """A server that only answers 502: a clear error after max_retries + 1 attempts; the old file is kept."""
    payload = lab.payload()
    with _served(lab, "download-502", {"data.bin": payload}) as (server, work):
        server.fail_next(1000, status=502)
        dest = work / "out" / "data.bin"
        dest.parent.mkdir(parents=True)
        old = b"an older version of the file\n"
        dest.write_bytes(old)
        url = server.url("data.bin")
        run.raises(DownloadError, lambda: download(url, dest, expected_sha256=sha256_bytes(payload), max_retries=3,
                                                   **{**FAST, "backoff": 0.01}),
                   url, "giving up after 4 attempt(s)", "HTTP 502")
        run.check(len(server.requests) == 4, f"{len(server.requests)} requests, expected 4")
        run.artifact(dest.read_bytes() == old, "the file that was there before the failed download changed")
        run.check(not _part(dest).exists() or _part(dest).stat().st_size == 0, "error pages were kept as data")


@scenario("download")
def download_range_ignored(lab: Lab, run: Run) -> None:
    """A server that ignores Range (200 instead of 206) after a drop: the download restarts, never appends."""
    payload = lab.payload()
    with _served(lab, "download-norange", {"data.bin": payload}) as (server, work):
        server.ignore_range = True
        server.drop_next(1, after_bytes=1_500_000)
        dest = work / "out" / "data.bin"
        result = download(server.url("data.bin"), dest, max_retries=2, **FAST)
        statuses = [r.status for r in server.requests]
        run.check(statuses == [200, 200] and server.requests[1].range == "bytes=1500000-",
                  f"statuses {statuses}, ranges {server.range_requests()}")
        run.check(result.resumed_from == 0, f"resumed_from {result.resumed_from}")
        run.artifact(dest.read_bytes() == payload, "the file differs (appended to a partial one?)")
        run.note("the 200 answer to a Range request truncated the part and started over")


@scenario("download")
def download_file_changed_between_runs(lab: Lab, run: Run) -> None:
    """Killed mid-download, then the file changes on the server: the re-run gets the whole new file."""
    payload = lab.payload()
    new = bytes(reversed(payload[: len(payload) - 1000]))
    with _served(lab, "download-changed", {"data.bin": payload}) as (server, work):
        dest = work / "out" / "data.bin"
        kept = _killed_download(lab, run, server, work, dest)
        server.change_content("data.bin", new)
        server.clear_log()
        result = download(server.url("data.bin"), dest, **FAST)
        first = server.requests[0]
        run.check(first.range == f"bytes={kept}-" and first.if_range and first.status == 200,
                  f"re-run asked {first.range!r} with If-Range {first.if_range!r}, got {first.status}")
        run.check(result.resumed_from == 0, f"resumed_from {result.resumed_from}")
        data = dest.read_bytes()
        run.check(data != payload[:kept] + new[kept:], "the file was spliced from two versions")
        run.artifact(data == new, "the file is not the new version")
        run.note(f"{kept:,} bytes of the old version discarded (If-Range did not match: 200)")


@scenario("download")
def download_changed_behind_broken_cache(lab: Lab, run: Run) -> None:
    """The file changes and the server ignores If-Range (206 of the new version): detected, restarted."""
    payload = lab.payload()
    new = bytes(reversed(payload))  # same size: only the ETag and date tell the versions apart
    with _served(lab, "download-ifrange", {"data.bin": payload}) as (server, work):
        server.ignore_if_range = True
        server.drop_next(1, after_bytes=1_200_000)
        server.change_content("data.bin", new, after_requests=1)
        dest = work / "out" / "data.bin"
        result = download(server.url("data.bin"), dest, max_retries=3, **FAST)
        statuses = [r.status for r in server.requests]
        run.check(statuses == [200, 206, 200], f"statuses {statuses}, expected [200, 206, 200]")
        run.check(result.resumed_from == 0, f"resumed_from {result.resumed_from}")
        data = dest.read_bytes()
        run.check(data != payload[:1_200_000] + new[1_200_000:], "the file was spliced from two versions")
        run.artifact(data == new, "the file is not the new version")
        run.note("the 206 carried another ETag than the part's: refused and restarted from zero")


@scenario("download")
def download_size_mismatch(lab: Lab, run: Run) -> None:
    """The server's file has another size than expected_size: an error before the body, nothing published."""
    payload = lab.payload()
    with _served(lab, "download-size", {"data.bin": payload}) as (server, work):
        dest = work / "out" / "data.bin"
        url = server.url("data.bin")
        run.raises(DownloadError, lambda: download(url, dest, expected_size=len(payload) - 1, **FAST),
                   url, f"server reports {len(payload)} bytes", f"expected_size is {len(payload) - 1}")
        run.check(not dest.exists() and _leftovers(dest) == [], f"a file of the wrong size was kept: {_leftovers(dest)}")


@scenario("download")
def download_published_checksum(lab: Lab, run: Run) -> None:
    """Checksum files beside the data: an md5sums.txt entry verified; a wrong SHA256SUMS entry refused."""
    payload, other = lab.payload(), lab.payload()[::-1]
    md5sums = (f"{hashlib.md5(b'unrelated').hexdigest()}  README\n{hashlib.md5(payload).hexdigest()}  data.bin\n"
               f"{hashlib.md5(other).hexdigest()} *other.bin\n")
    files = {"data.bin": payload, "other.bin": other, "md5sums.txt": md5sums.encode(),
             "SHA256SUMS": f"{'0' * 64}  other.bin\n".encode(), "error.html": b"<html><body>Not here</body></html>\n"}
    with _served(lab, "download-checksum", files) as (server, work):
        good = work / "out" / "data.bin"
        download(server.url("data.bin"), good, checksum_url=server.url("md5sums.txt"), **FAST)
        run.artifact(good.read_bytes() == payload, "the verified file differs")
        bad = work / "out" / "other.bin"
        run.raises(DownloadError, lambda: download(server.url("other.bin"), bad,
                                                   checksum_url=server.url("SHA256SUMS"), **FAST),
                   server.url("other.bin"), "published " + "0" * 64, server.url("SHA256SUMS"))
        run.check(not bad.exists() and _leftovers(bad) == [], f"refused bytes were kept: {_leftovers(bad)}")
        run.raises(DownloadError, lambda: download(server.url("other.bin"), bad,
                                                   checksum_url=server.url("error.html"), **FAST),
                   server.url("error.html"), "line 1", "not a checksum line")
        run.check(not bad.exists(), "a file without a usable checksum was published")


# -- bad input ------------------------------------------------------------------------------------


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
    if raw.suffix == ".xz":
        read, write = lzma.open(raw, "rb"), lzma.open(damaged, "wb", preset=0)
    else:
        read, write = gzip.open(raw, "rb"), gzip.open(damaged, "wb", compresslevel=1)
    with read, write:
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
    from tinyplm_lib.tokens.shards import encode_corpus

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
    with _served(lab, "config-errors-http", {"data.bin": b"x"}) as (server, _):
        run.raises(ConfigError, lambda: download(server.url("data.bin"), out / "data.bin", max_retries=-1, **FAST),
                   "max_retries")
        run.check(server.requests == [], f"{len(server.requests)} requests were made before the check")
    run.check(not out.exists(), "output folders were created before the settings were checked")


# -- storage ----------------------------------------------------------------------------------------


def _files(folder: Path, count: int, size: int, seed: int, stem: str = "part") -> Path:
    """`count` files of `size` seeded bytes: an artifact's worth of data to publish."""
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"{stem}-{i:03d}.bin").write_bytes(hashlib.sha256(f"{seed}-{i}".encode()).digest() * (size // 32))
    return folder


@scenario("storage")
def local_artifact_corrupted(lab: Lab, run: Run) -> None:
    """A stored file altered or cut after publishing: the load is refused naming the file; a re-publish heals."""
    work = lab.dir("local-corrupt")
    store = LocalArtifactStore(work / "store")
    source = _files(work / "v1", 3, 64 * 1024, seed=1)
    good = store.publish("thing", source).manifest
    target = store.path_for("thing") / "part-001.bin"
    data = bytearray(target.read_bytes())
    data[1000] ^= 0x01
    target.write_bytes(bytes(data))
    run.raises(StorageError, lambda: store.load("thing"), str(target), "sha256")
    target.write_bytes(bytes(data[:-10]))
    run.raises(StorageError, lambda: store.load("thing"), str(target), "size")
    store.publish("thing", source)
    run.artifact(store.load("thing").manifest == good, "the re-published artifact differs")


@scenario("storage")
def publish_killed_at_random_points(lab: Lab, run: Run) -> None:
    """SIGKILL during publish, at random points: the old or the new version loads, never a mix or none."""
    work = lab.dir("publish-killed")
    old_source = _files(work / "v1", 4, 64 * 1024, seed=1)
    new_source = _files(work / "v2", 24, 1024 * 1024, seed=2)
    reference = LocalArtifactStore(work / "reference")
    new_manifest, seconds = run_child("publish", work / "reference.log", ready=lambda: _incoming(reference.root),
                                      root=str(reference.root), key="thing", source=str(new_source))
    outcomes = []
    for attempt in range(5):
        store = LocalArtifactStore(work / f"store-{attempt}")
        old_manifest = store.publish("thing", old_source).manifest
        process = start_child("publish", work / f"kill-{attempt}.log", root=str(store.root), key="thing",
                              source=str(new_source))
        # Spread over the whole publish and a little past it (then the child may finish first).
        killed = kill_when(process, lambda: _incoming(store.root), seconds * (attempt + lab.rng.random()) / 4.5)
        if not killed:
            child_result(process, work / f"kill-{attempt}.log")
        try:
            loaded = store.load("thing").manifest
        except StorageError as exc:
            run.artifact(False, f"attempt {attempt}: neither version loads: {exc}")
            continue
        version = "old" if loaded == old_manifest else "new" if loaded == new_manifest else "mixed"
        run.artifact(version != "mixed", f"attempt {attempt}: the stored artifact matches neither version")
        outcomes.append(version if killed else "finished")
        store.remove_leftovers()
        left = [p.name for p in (store.root / ".incoming").glob("*")] if (store.root / ".incoming").exists() else []
        run.check(left == [], f"attempt {attempt}: leftovers of the killed publish stay: {left}")
        store.publish("thing", new_source)
        run.artifact(store.load("thing").manifest == new_manifest, f"attempt {attempt}: the re-publish differs")
    run.check(any(o in ("old", "new") for o in outcomes), f"no kill landed mid-publish: {outcomes}")
    run.note(f"publish takes {seconds:.2f} s; after each kill the store held: {outcomes}")


def _incoming(root: Path) -> bool:
    incoming = root / ".incoming"
    return incoming.is_dir() and any(incoming.iterdir())


@scenario("storage")
def stale_scratch_leftovers(lab: Lab, run: Run) -> None:
    """Staging dirs of a SIGKILLed run are removed by the next run, a live run's are kept, none reused."""
    work = lab.dir("stale-staging")
    store = LocalArtifactStore(work / "store")
    kept = store.publish("cc100_train", _files(work / "v1", 2, 4096, seed=3)).manifest
    holders = {}
    for role in ("crashed", "live"):
        ready = work / f"{role}.ready"
        process = start_child("hold_staging", work / f"{role}.log", root=str(store.root), label="cc100_train",
                              ready=str(ready))
        deadline = time.monotonic() + 60
        while not ready.exists():
            run.require(process.poll() is None and time.monotonic() < deadline, f"the {role} writer did not start")
            time.sleep(0.01)
        holders[role] = (process, Path(ready.read_text(encoding="utf-8")))
    crashed, live = holders["crashed"], holders["live"]
    kill_when(crashed[0], lambda: True, 0)
    legacy = store.root / ".staging" / "cc100_train-0123456789ab"  # an unlocked dir, as older versions left
    legacy.mkdir()
    (legacy / "sentences.txt").write_text("stale\n", encoding="utf-8")
    (store.root / ".trash" / "deadbeef").mkdir(parents=True)
    fresh = store.staging_dir("cc100_train")
    run.check(list(fresh.iterdir()) == [], "the new staging dir is not empty")
    run.check(not crashed[1].exists(), "the SIGKILLed run's staging dir is still there")
    run.check(not legacy.exists(), "an unlocked staging dir was not removed")
    run.check(not any((store.root / ".trash").iterdir()), "the trash was not emptied")
    run.check(live[1].exists() and (live[1] / "sentences.txt").exists(), "a live run's staging dir was removed")
    kill_when(live[0], lambda: True, 0)
    store.remove_leftovers()
    run.check(not live[1].exists(), "the staging dir of the second run was kept after it died")
    run.check(fresh.exists(), "our own staging dir was removed")
    release_scratch_dir(fresh)
    run.artifact(store.load("cc100_train").manifest == kept, "a stored artifact was touched by the clean-up")
    run.note("dead run's and unlocked dirs removed, live run's kept until it died")


def _s3_store(lab: Lab, cache: Path, client=None, prefix: str = "faults"):
    from tinyplm_lib.store.s3 import S3ArtifactStore

    server = lab.moto()
    lab._cached("bucket", lambda: server.create_bucket(BUCKET) or BUCKET)
    return S3ArtifactStore(cache, client or server.client(), BUCKET, prefix)


@scenario("s3")
def s3_object_corrupted(lab: Lab, run: Run) -> None:
    """An object overwritten in the bucket: the load is refused naming the s3:// object; nothing installed."""
    work = lab.dir("s3-corrupt")
    writer = _s3_store(lab, work / "writer", prefix="corrupt")
    source = _files(work / "v1", 3, 64 * 1024, seed=4)
    good = writer.publish("thing", source).manifest
    key = writer.object_key("thing", "part-002.bin")
    data = bytearray(writer.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[77] ^= 0x80
    writer.client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    reader = _s3_store(lab, work / "reader", prefix="corrupt")
    run.raises(StorageError, lambda: reader.load("thing"), f"s3://{BUCKET}/{key}", "does not match")
    run.check(not reader.path_for("thing").exists(), "the corrupted copy was installed in the cache")
    writer.publish("thing", source)
    run.artifact(reader.load("thing").manifest == good, "the re-published artifact differs")


@scenario("s3")
def s3_publish_killed(lab: Lab, run: Run) -> None:
    """SIGKILL mid-upload to S3: no manifest, so the artifact is refused by name; a re-run republishes."""
    work = lab.dir("s3-killed")
    server = lab.moto()
    writer = _s3_store(lab, work / "writer", prefix="killed")
    old_manifest = writer.publish("thing", _files(work / "v1", 2, 4096, seed=5, stem="old")).manifest
    new_source = _files(work / "v2", 40, 128 * 1024, seed=6, stem="new")
    args = {"endpoint": server.endpoint, "bucket": BUCKET, "key": "thing", "source": str(new_source)}
    new_manifest, seconds = run_child("s3_publish", work / "reference.log", ready=_uploading(writer, "ref"),
                                      env=server.env(), cache=str(work / "reference"), prefix="ref", **args)
    for attempt in range(3):
        process = start_child("s3_publish", work / f"child-{attempt}.log", env=server.env(),
                              cache=str(work / "child"), prefix="killed", **args)
        delay = lab.rng.uniform(0, 0.6) * seconds if attempt == 0 else 0.0
        if kill_when(process, _uploading(writer, "killed"), delay):
            break
        child_result(process, work / f"child-{attempt}.log")
        writer.publish("thing", work / "v1")  # the old version again, for another try
    else:
        raise ScenarioFailed("every upload finished before the kill")
    reader = _s3_store(lab, work / "reader", prefix="killed")
    try:
        loaded = reader.load("thing").manifest
    except StorageError as exc:
        run.check(f"s3://{BUCKET}/killed/thing" in str(exc) and MANIFEST_FILE in str(exc),
                  f"the refusal does not name the artifact and its manifest: {exc}")
        run.check(not reader.path_for("thing").exists(), "a half-uploaded artifact reached the reader's cache")
        outcome = "refused by name"
    else:
        run.artifact(loaded in (old_manifest, new_manifest), "the loaded artifact matches neither version")
        outcome = "old version" if loaded == old_manifest else "new version"
    writer.publish("thing", new_source)
    run.artifact(reader.load("thing").manifest == new_manifest, "the re-published artifact differs")
    run.note(f"40 uploads take {seconds:.2f} s; killed mid-way: {outcome}; then republished identically")


def _uploading(store, prefix: str) -> Callable[[], bool]:
    """True once the first object of the new version is in the bucket (polled at most every 20 ms)."""
    key = f"{prefix}/thing/new-000.bin"
    last = [0.0]

    def ready() -> bool:
        if time.monotonic() - last[0] < 0.02:
            return False
        last[0] = time.monotonic()
        try:
            store.client.head_object(Bucket=BUCKET, Key=key)
            return True
        except Exception:  # noqa: BLE001 - 404 until the upload reaches it
            return False
    return ready


@scenario("s3")
def s3_connections_cut_mid_upload(lab: Lab, run: Run) -> None:
    """The S3 endpoint's connections are cut mid-upload: StorageError naming the object; a retry heals."""
    import boto3
    from botocore.config import Config

    work = lab.dir("s3-cut")
    server = lab.moto()
    proxy = CuttableProxy(server.port)
    try:
        config = Config(retries={"total_max_attempts": 2}, connect_timeout=2, read_timeout=5)
        client = boto3.client("s3", endpoint_url=proxy.endpoint, config=config, **_credentials(server))
        store = _s3_store(lab, work / "cache", client=client, prefix="cut")
        store.publish("thing", _files(work / "v1", 2, 4096, seed=7))
        source = _files(work / "v2", 6, 64 * 1024, seed=8)
        uploads = []
        upload_file = client.upload_file

        def cutting_upload(*args, **kwargs):
            uploads.append(args[2])
            if len(uploads) == 3:
                proxy.cut()  # the network goes away under the third upload
            return upload_file(*args, **kwargs)

        client.upload_file = cutting_upload
        run.raises(StorageError, lambda: store.publish("thing", source), f"s3://{BUCKET}/cut/thing", proxy.endpoint)
        proxy.restore()
        reader = _s3_store(lab, work / "reader", prefix="cut")
        run.raises(StorageError, lambda: reader.load("thing"), MANIFEST_FILE)
        client.upload_file = upload_file
        manifest = store.publish("thing", source).manifest
        run.artifact(reader.load("thing").manifest == manifest, "the re-published artifact differs")
        left = list((store.root / ".incoming").glob("*"))
        run.check(left == [], f"the failed publish left {left}")
    finally:
        proxy.close()


def _credentials(server) -> dict:
    env = server.env()
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
            "region_name": env["AWS_DEFAULT_REGION"]}


# -- steps killed and re-run ------------------------------------------------------------------


def _has_output(root: Path) -> Callable[[], bool]:
    """True once the step wrote a byte into a staging dir (a corpus .tmp, JaWiki work files)."""
    staging = root / ".staging"
    return lambda: staging.is_dir() and any(p.is_file() and p.stat().st_size > 0 for p in staging.rglob("*")
                                            if not p.name.endswith(".lock"))


def _corpus_step_killed(lab: Lab, run: Run, corpus: str, raw: Path) -> None:
    work = lab.dir(f"step-killed-{corpus}")
    settings = CC100_SETTINGS if corpus == "cc100" else JAWIKI_SETTINGS
    args = {"corpus": corpus, "raw": str(raw), "settings": settings}
    reference, seconds = run_child("corpus_step", work / "reference.log", ready=_has_output(work / "reference"),
                                   root=str(work / "reference"), **args)
    root = work / "store"
    landed = None
    for attempt in range(3):
        process = start_child("corpus_step", work / f"kill-{attempt}.log", root=str(root), **args)
        delay = lab.rng.uniform(0, 0.8 * seconds) if attempt == 0 else 0.0
        if kill_when(process, _has_output(root), delay):
            landed = delay
            break
        child_result(process, work / f"kill-{attempt}.log")
    run.require(landed is not None, "every run finished before the kill")
    stale = [p for p in (root / ".staging").iterdir() if p.is_dir()]
    rerun, _ = run_child("corpus_step", work / "rerun.log", root=str(root), **args)
    store = LocalArtifactStore(root)
    for split, manifest in reference["manifests"].items():
        key = f"{corpus}_{split}"
        run.artifact(rerun["manifests"][split] == manifest, f"the re-run's {key} differs from the clean run's")
        run.artifact(store.load(key).manifest == manifest, f"the stored {key} differs from the clean run's")
    gone = [p.name for p in stale if p.exists()]
    run.check(not gone, f"staging dirs of the killed run were kept: {gone}")
    run.note(f"step takes {seconds:.2f} s after its first write; killed {landed:.2f} s in, leaving "
             f"{len(stale)} staging dirs; re-run byte-identical ({reference['lines_train']:,} train lines)")


@scenario("step")
def cc100_step_killed_then_rerun(lab: Lab, run: Run) -> None:
    """SIGKILL during the cc100 corpus step, then a re-run: byte-identical artifacts, leftovers removed."""
    _corpus_step_killed(lab, run, "cc100", lab.cc100_slice())


@scenario("step")
def jawiki_step_killed_then_rerun(lab: Lab, run: Run) -> None:
    """SIGKILL during the JaWiki corpus step, then a re-run: byte-identical artifacts, leftovers removed."""
    _corpus_step_killed(lab, run, "jawiki", lab.jawiki_slice())


@scenario("step")
def token_shards_killed_then_resumed(lab: Lab, run: Run) -> None:
    """SIGKILL during shard encoding, then a re-run in the same folder: finished shards reused, identical files."""
    work = lab.dir("shards-killed")
    text = work / "sentences.txt"
    with lzma.open(lab.cc100_slice(), "rb") as handle:
        text.write_bytes(handle.read())
    args = {"text": str(text), "tokenizer": str(lab.demo_data() / "tok"), "shard_lines": 2000}
    out = work / "out"
    # The clean run goes alongside the one to be killed (20 shards of ~0.1 s each here).
    clean = start_child("shards", work / "reference.log", out=str(work / "reference"), **args)
    process = start_child("shards", work / "killed.log", out=str(out), **args)
    landed = kill_when(process, lambda: len(list(out.glob("shard-*.json"))) >= 2, lab.rng.uniform(0, 0.2))
    if not landed:  # finished first: kill the next run as soon as two shards are done
        child_result(process, work / "killed.log")
        shutil.rmtree(out)
        process = start_child("shards", work / "killed.log", out=str(out), **args)
        landed = kill_when(process, lambda: len(list(out.glob("shard-*.json"))) >= 2, 0.0)
    reference = child_result(clean, work / "reference.log")
    run.require(landed, "encoding finished before the kill")
    done = len(list(out.glob("shard-*.json")))
    stray = sorted(p.name for p in out.glob(".*.tmp"))
    resumed, _ = run_child("shards", work / "resumed.log", out=str(out), **args)
    run.check(resumed["shards_reused"] >= 2, f"only {resumed['shards_reused']} shards reused")
    run.check(resumed["shards_reused"] + resumed["shards_encoded"] == reference["shards_encoded"],
              f"shard counts {resumed} against {reference}")
    run.artifact(tree_digest(out) == tree_digest(work / "reference"), "the resumed shards differ from a clean run's")
    run.note(f"killed with {done} of {reference['shards_encoded']} shards done and {len(stray)} temporaries; "
             f"re-run reused {resumed['shards_reused']}, encoded {resumed['shards_encoded']}; files identical")


STEPS = 16  # of the demo model on demo shards, checkpointed every 4


@scenario("step")
def training_killed_then_resumed(lab: Lab, run: Run) -> None:
    """SIGKILL of a training stage after a checkpoint: the re-run resumes and ends at the same step and weights."""
    from tinyplm_lib.training.checkpoints import LocalCheckpointSink

    data = lab.demo_data()
    work = lab.dir("training-killed")
    args = {"data": str(data), "steps": STEPS, "save_steps": 4}
    # The uninterrupted run goes alongside the one to be killed, which is paced (sleeps per step).
    clean = start_child("train", work / "reference.log", out=str(work / "reference"),
                        checkpoints=str(work / "reference-ckpt"), pace=0.0, **args)
    sink = LocalCheckpointSink(work / "ckpt")
    process = start_child("train", work / "killed.log", out=str(work / "out"), checkpoints=str(sink.store.root),
                          pace=0.2, **args)
    killed = kill_when(process, lambda: max(sink.steps(), default=0) >= 8, lab.rng.uniform(0, 0.3), timeout=300)
    reference = child_result(clean, work / "reference.log")
    run.require(killed, "the stage finished before the kill")
    saved = max(sink.steps())
    run.check(not (work / "out" / "model.safetensors").exists(), "the killed stage wrote its final model")
    resumed, _ = run_child("train", work / "resumed.log", out=str(work / "out"), checkpoints=str(sink.store.root),
                           pace=0.0, **args)
    run.check(resumed["resumed_from_step"] == saved, f"resumed from {resumed['resumed_from_step']}, saved {saved}")
    run.artifact(resumed["global_step"] == reference["global_step"] == STEPS,
                 f"final step {resumed['global_step']} against {reference['global_step']}")
    run.check(abs(resumed["eval_loss"] - reference["eval_loss"]) < 1e-6,
              f"eval loss {resumed['eval_loss']} against {reference['eval_loss']}")
    same = (work / "out" / "model.safetensors").read_bytes() == (work / "reference" / "model.safetensors").read_bytes()
    run.artifact(same, "the resumed model's weights differ from the uninterrupted run's")
    run.note(f"killed after checkpoint {saved}; resumed to step {resumed['global_step']}, "
             f"eval loss {resumed['eval_loss']:.6f} = {reference['eval_loss']:.6f}, identical weights")


# -- running ----------------------------------------------------------------------------------


def run_scenario(lab: Lab, item: Scenario) -> dict:
    """Run one scenario; never raises. passed: no failed check and no data lost."""
    run = Run()
    started = time.perf_counter()
    try:
        item.run(lab, run)
    except ScenarioFailed as exc:
        run.failures.append(str(exc))
    except Exception as exc:  # noqa: BLE001 - an unexpected error is a failed scenario, reported
        tail = "".join(traceback.format_exception(exc)[-3:])
        run.failures.append(f"unexpected {type(exc).__name__}: {exc} | {tail}")
    return {
        "name": item.name,
        "category": item.category,
        "summary": item.summary,
        "passed": not run.failures and run.data_lost == 0,
        "data_lost": run.data_lost,
        "seconds": round(time.perf_counter() - started, 3),
        "detail": " | ".join(run.failures + run.notes),
    }


def run_all(names: list[str] | None = None, workdir: Path | None = None, log=print) -> dict:
    """Run the named scenarios (all by default) and return the report."""
    chosen = [SCENARIOS[name] for name in names] if names else list(SCENARIOS.values())
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="tinyplm-faults-", dir=workdir))
    lab = Lab(root)
    results = []
    try:
        for item in chosen:
            result = run_scenario(lab, item)
            results.append(result)
            log(f"{'PASS' if result['passed'] else 'FAIL'} {item.name} ({result['seconds']:.1f} s): "
                f"{result['detail'][:300]}")
    finally:
        lab.close()
        shutil.rmtree(root, ignore_errors=True)
    passed = sum(r["passed"] for r in results)
    return {
        "scenarios": len(results),
        "passed": passed,
        "failed": len(results) - passed,
        "data_lost": sum(r["data_lost"] for r in results),
        "seconds": round(time.perf_counter() - started, 2),
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)),
        # Timings on a shared machine depend on what else runs: the 1/5/15-minute load averages.
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these scenarios")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    if args.list:
        for item in SCENARIOS.values():
            print(f"{item.name:42s} {item.category:9s} {item.summary}")
        return 0
    unknown = sorted(set(args.only or []) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; see --list")
    report = run_all(args.only)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{report['passed']}/{report['scenarios']} scenarios passed, data_lost {report['data_lost']}, "
          f"{report['seconds']} s")
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
