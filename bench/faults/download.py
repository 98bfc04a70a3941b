"""Download scenarios of `python -m bench.faults`: kills, drops, 5xx, stalls, Range and checksum faults.

Each one serves a seeded 3 MB payload from the test suite's HTTP file server (tests/http_server.py),
injects one fault through its knobs and checks that `download` ends byte-identical or names the error.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.faults.children import kill_when, start_child
from bench.faults.core import Run, scenario
from bench.faults.lab import FAST, FileHTTPServer, Lab, sha256_bytes
from tinyplm_lib.downloads import source
from tinyplm_lib.downloads.download import DownloadError, download


@contextmanager
def recorded_backoff(waits: list[float]) -> Iterator[None]:
    """Append every backoff wait of `download` to `waits` (and still wait): patches the retry loop's sleep."""
    real_sleep = source._sleep

    def recorded(seconds: float) -> None:
        waits.append(seconds)
        real_sleep(seconds)

    source._sleep = recorded
    try:
        yield
    finally:
        source._sleep = real_sleep


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


@scenario("download")
def download_killed_then_resumed(lab: Lab, run: Run) -> None:
    """SIGKILL of a process mid-download, then a re-run: resumed with Range, byte-identical."""
    payload = lab.payload()
    with lab.served("download-killed", {"data.bin": payload}) as (server, work):
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
    with lab.served("download-dropped", {"data.bin": payload}) as (server, work):
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
    with lab.served("download-5xx", {"data.bin": payload}) as (server, work):
        server.fail_next(3, status=503)
        dest = work / "out" / "data.bin"
        with recorded_backoff(waits):
            download(server.url("data.bin"), dest, max_retries=5, **{**FAST, "backoff": 0.05})
        statuses = [r.status for r in server.requests]
        run.check(statuses == [503, 503, 503, 200], f"statuses {statuses}")
        run.check(waits == [0.05, 0.1, 0.2], f"backoff waits {waits}, expected [0.05, 0.1, 0.2]")
        run.artifact(dest.read_bytes() == payload, "the file differs after the retries")
        run.note(f"statuses {statuses}, waits {waits} s")


@scenario("download")
def download_stalled_server_times_out(lab: Lab, run: Run) -> None:
    """The server stalls past the socket timeout twice: each attempt times out and the third succeeds."""
    payload = lab.payload()
    with lab.served("download-stall", {"data.bin": payload}) as (server, work):
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
    with lab.served("download-502", {"data.bin": payload}) as (server, work):
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
    with lab.served("download-norange", {"data.bin": payload}) as (server, work):
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
    with lab.served("download-changed", {"data.bin": payload}) as (server, work):
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
    with lab.served("download-ifrange", {"data.bin": payload}) as (server, work):
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
    with lab.served("download-size", {"data.bin": payload}) as (server, work):
        dest = work / "out" / "data.bin"
        url = server.url("data.bin")
        run.raises(DownloadError, lambda: download(url, dest, expected_size=len(payload) - 1, **FAST),
                   url, f"server reports {len(payload)} bytes", f"expected_size is {len(payload) - 1}")
        run.check(not dest.exists() and _leftovers(dest) == [],
                  f"a file of the wrong size was kept: {_leftovers(dest)}")


@scenario("download")
def download_published_checksum(lab: Lab, run: Run) -> None:
    """Checksum files beside the data: an md5sums.txt entry verified; a wrong SHA256SUMS entry refused."""
    payload, other = lab.payload(), lab.payload()[::-1]
    md5sums = (f"{hashlib.md5(b'unrelated').hexdigest()}  README\n{hashlib.md5(payload).hexdigest()}  data.bin\n"
               f"{hashlib.md5(other).hexdigest()} *other.bin\n")
    files = {"data.bin": payload, "other.bin": other, "md5sums.txt": md5sums.encode(),
             "SHA256SUMS": f"{'0' * 64}  other.bin\n".encode(), "error.html": b"<html><body>Not here</body></html>\n"}
    with lab.served("download-checksum", files) as (server, work):
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
