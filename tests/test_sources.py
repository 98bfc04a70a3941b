"""Tests for tinyplm_lib.downloads over HTTP and file://: real downloads from a local HTTP server with
injected faults, plus the checksum-file parser.

Payloads are a few MB of seeded random bytes; one test fetches the real shared cc100-format sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from tinyplm_lib.downloads import checksums, source
from tinyplm_lib.downloads import http as http_source
from tinyplm_lib.downloads.download import DownloadError, DownloadResult, download, filename_from_url, redact_url
from tinyplm_lib.errors import ConfigError

from http_server import FileHTTPServer  # tests/ is on sys.path (pytest's default rootdir-less import mode)

WEB_SAMPLE_SHA256 = "103d5c9e8f5411779cbbf6758683fb4f0b17a31b29808cd88b41599b8fba322c"  # SOURCES.md
SIZE = 3 * 1024 * 1024 + 12345  # a few MB, not a multiple of the chunk size
FAST = {"progress": False, "backoff": 0.0, "chunk_size": 256 * 1024}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def payload() -> bytes:
    return random.Random(1234).randbytes(SIZE)


@pytest.fixture
def server(tmp_path: Path, payload: bytes):
    root = tmp_path / "served"
    root.mkdir()
    (root / "data.bin").write_bytes(payload)
    with FileHTTPServer(root) as srv:
        yield srv


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "out" / "data.bin"


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.glob(dest.name + ".*")) if dest.parent.exists() else []


# -- pure functions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("https://data.statmt.org/cc-100/ja.txt.xz", "ja.txt.xz"),
        ("https://host/dumps/jawiki-20240701-cirrussearch-content.json.gz?x=1#frag",
         "jawiki-20240701-cirrussearch-content.json.gz"),
        ("http://host/a%20b.txt", "a b.txt"),
        ("file:///tmp/corpus/ja.txt", "ja.txt"),
    ],
)
def test_filename_from_url(url: str, name: str) -> None:
    assert filename_from_url(url) == name


@pytest.mark.parametrize("url", ["https://host/", "https://host", "https://host/x/..", "https://host/a%2F..%2Fb"])
def test_filename_from_url_rejects_paths_without_a_safe_name(url: str) -> None:
    with pytest.raises(ConfigError, match="file name"):
        filename_from_url(url)


def test_redact_url_strips_credentials() -> None:
    assert redact_url("https://alice:s3cret@example.org:8443/a.txt") == "https://example.org:8443/a.txt"
    assert redact_url("https://example.org/a.txt") == "https://example.org/a.txt"


@pytest.mark.parametrize(
    ("url", "match"),
    [("ftp://host/ja.txt.xz", "unsupported scheme 'ftp'"), ("gopher://host/x", "unsupported scheme 'gopher'")],
)
def test_unsupported_scheme_is_a_config_error(url: str, match: str, dest: Path) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        download(url, dest, progress=False)
    assert info.value.setting == "url" and url in str(info.value)
    assert not dest.exists()


def test_bad_expected_sha256_is_a_config_error(server: FileHTTPServer, dest: Path) -> None:
    with pytest.raises(ConfigError, match="expected_sha256"):
        download(server.url("data.bin"), dest, expected_sha256="abc", **FAST)
    assert server.requests == []


# -- the test server itself ---------------------------------------------------------------------


def test_http_server_answers_ranges(server: FileHTTPServer, payload: bytes) -> None:
    import urllib.error
    import urllib.request

    def get(headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        request = urllib.request.Request(server.url("data.bin"), headers=headers)
        try:
            with urllib.request.urlopen(request) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)

    status, body, headers = get({"Range": "bytes=10-19"})
    assert (status, body, headers["Content-Range"]) == (206, payload[10:20], f"bytes 10-19/{SIZE}")
    assert get({"Range": "bytes=-5"})[1] == payload[-5:]
    assert get({"Range": f"bytes={SIZE}-"})[0] == 416
    assert get({"Range": "bytes=0-9", "If-Range": headers["ETag"]})[0] == 206
    assert get({"Range": "bytes=0-9", "If-Range": headers["Last-Modified"]})[0] == 206
    assert get({"Range": "bytes=0-9", "If-Range": '"other"'})[:2] == (200, payload)
    server.change_content("data.bin", b"new")
    assert get({"Range": "bytes=0-9", "If-Range": headers["ETag"]})[:2] == (200, b"new")
    assert len(server.requests) == 7


# -- plain downloads -----------------------------------------------------------------------------


def test_plain_download(server: FileHTTPServer, dest: Path, payload: bytes) -> None:
    result = download(server.url("data.bin"), dest, expected_sha256=_sha(payload), expected_size=SIZE, **FAST)
    assert dest.read_bytes() == payload
    assert result == DownloadResult(dest, server.url("data.bin"), SIZE, _sha(payload), resumed_from=0)
    assert result.to_dict() == {
        "path": str(dest), "url": server.url("data.bin"), "size": SIZE, "sha256": _sha(payload), "resumed_from": 0,
    }
    json.dumps(result.to_dict())  # usable as metadata as is
    assert [r.range for r in server.requests] == [None]
    assert _leftovers(dest) == []  # no .part or sidecar left behind


def test_file_url(tmp_path: Path, payload: bytes, dest: Path) -> None:
    source = tmp_path / "local source.bin"
    source.write_bytes(payload)
    result = download(source.as_uri(), dest, **FAST)
    assert result.sha256 == _sha(payload) and result.size == SIZE and result.resumed_from == 0
    assert dest.read_bytes() == payload
    assert _leftovers(dest) == []


def test_missing_local_file(tmp_path: Path, dest: Path) -> None:
    with pytest.raises(DownloadError, match="cannot read"):
        download((tmp_path / "absent.bin").as_uri(), dest, **FAST)


def test_real_corpus_over_http(web_sample: Path, tmp_path: Path) -> None:
    with FileHTTPServer(web_sample.parent) as srv:
        url = srv.url(web_sample.name)
        dest = tmp_path / filename_from_url(url)
        result = download(url, dest, expected_sha256=WEB_SAMPLE_SHA256, **FAST)
    assert result.sha256 == WEB_SAMPLE_SHA256
    assert result.size == web_sample.stat().st_size == 11_716_880


# -- resume --------------------------------------------------------------------------------------


def test_resume_after_dropped_connection(server: FileHTTPServer, dest: Path, payload: bytes) -> None:
    cut = 1_000_003
    server.drop_next(1, after_bytes=cut)
    result = download(server.url("data.bin"), dest, max_retries=2, **FAST)
    assert result.sha256 == _sha(payload) and dest.read_bytes() == payload
    assert result.resumed_from == cut
    first, second = server.requests
    assert first.range is None and first.body_bytes == cut
    assert second.range == f"bytes={cut}-" and second.status == 206
    assert second.if_range == first.response_headers["ETag"]


def test_preexisting_part_is_resumed(server: FileHTTPServer, dest: Path, payload: bytes) -> None:
    cut = 2 * 1024 * 1024 + 7
    server.drop_next(1, after_bytes=cut)
    with pytest.raises(DownloadError, match="giving up after 1 attempt") as info:
        download(server.url("data.bin"), dest, max_retries=0, **FAST)
    assert f"connection closed after {cut} of {SIZE} bytes" in str(info.value)
    assert not dest.exists()
    assert dest.with_name("data.bin.part").stat().st_size == cut
    assert json.loads(dest.with_name("data.bin.part.json").read_text())["total"] == SIZE

    result = download(server.url("data.bin"), dest, expected_sha256=_sha(payload), **FAST)
    assert result.resumed_from == cut and result.sha256 == _sha(payload)
    assert server.requests[-1].range == f"bytes={cut}-" and server.requests[-1].status == 206
    assert server.requests[-1].body_bytes == SIZE - cut
    assert _leftovers(dest) == []


def test_complete_part_answered_416_is_published(server: FileHTTPServer, dest: Path, payload: bytes) -> None:
    # A crash between the last byte and the rename leaves a complete .part behind.
    cut = 500_000
    server.drop_next(1, after_bytes=cut)
    with pytest.raises(DownloadError):
        download(server.url("data.bin"), dest, max_retries=0, **FAST)
    with open(dest.with_name("data.bin.part"), "ab") as fh:
        fh.write(payload[cut:])

    result = download(server.url("data.bin"), dest, **FAST)
    assert server.requests[-1].status == 416 and server.requests[-1].range == f"bytes={SIZE}-"
    assert result.resumed_from == SIZE and result.sha256 == _sha(payload)
    assert dest.read_bytes() == payload


def test_server_ignoring_range_restarts_from_zero(server: FileHTTPServer, dest: Path, payload: bytes) -> None:
    server.ignore_range = True
    server.drop_next(1, after_bytes=1_500_000)
    result = download(server.url("data.bin"), dest, max_retries=2, **FAST)
    assert [r.status for r in server.requests] == [200, 200]
    assert server.requests[1].range == "bytes=1500000-"  # the client did ask to resume
    assert result.resumed_from == 0 and result.size == SIZE  # ...and truncated instead of appending
    assert dest.read_bytes() == payload


def test_server_sending_another_range_restarts(server: FileHTTPServer, dest: Path, payload: bytes) -> None:
    server.range_start_shift = 100
    server.drop_next(1, after_bytes=700_000)
    result = download(server.url("data.bin"), dest, max_retries=3, **FAST)
    assert server.range_requests() == [None, "bytes=700000-", None]
    assert result.resumed_from == 0 and dest.read_bytes() == payload


def test_file_changed_between_attempts(server: FileHTTPServer, dest: Path, payload: bytes) -> None:
    new = random.Random(99).randbytes(SIZE - 1000)
    server.drop_next(1, after_bytes=1_200_000)
    server.change_content("data.bin", new, after_requests=1)
    result = download(server.url("data.bin"), dest, max_retries=2, **FAST)
    first, second = server.requests
    assert second.range == "bytes=1200000-" and second.if_range == first.response_headers["ETag"]
    assert second.response_headers["ETag"] != first.response_headers["ETag"]
    assert second.status == 200  # If-Range no longer matched: the whole new file came back
    assert result.sha256 == _sha(new) and result.size == len(new) and result.resumed_from == 0
    assert dest.read_bytes() == new


def test_part_without_sidecar_is_not_trusted(server: FileHTTPServer, dest: Path, payload: bytes) -> None:
    dest.parent.mkdir(parents=True)
    dest.with_name("data.bin.part").write_bytes(b"x" * 4096)  # of unknown origin: no validator
    result = download(server.url("data.bin"), dest, **FAST)
    assert server.range_requests() == [None]
    assert result.resumed_from == 0 and dest.read_bytes() == payload


# -- retries and errors --------------------------------------------------------------------------


def test_503_twice_then_success(server: FileHTTPServer, dest: Path, payload: bytes, monkeypatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(source, "_sleep", waits.append)
    server.fail_next(2, status=503)
    result = download(server.url("data.bin"), dest, max_retries=5, **{**FAST, "backoff": 0.5})
    assert [r.status for r in server.requests] == [503, 503, 200]
    assert waits == [0.5, 1.0]  # exponential backoff
    assert result.sha256 == _sha(payload)


def test_404_fails_at_once(server: FileHTTPServer, dest: Path) -> None:
    url = server.url("missing.bin")
    with pytest.raises(DownloadError, match="404") as info:
        download(url, dest, max_retries=5, **FAST)
    assert url in str(info.value)
    assert len(server.requests) == 1  # no retry on a client error
    assert not dest.exists()


def test_retries_exhausted(server: FileHTTPServer, dest: Path) -> None:
    server.fail_next(10, status=502)
    url = server.url("data.bin")
    with pytest.raises(DownloadError, match="giving up after 3 attempt") as info:
        download(url, dest, max_retries=2, **FAST)
    assert url in str(info.value) and "HTTP 502" in str(info.value)
    assert len(server.requests) == 3
    assert not dest.exists()


def test_connection_refused_is_retried_then_reported(tmp_path: Path, dest: Path) -> None:
    with FileHTTPServer(tmp_path) as srv:
        url = srv.url("data.bin")
    # The server is stopped: nothing listens on that port any more.
    with pytest.raises(DownloadError, match="giving up after 2 attempt") as info:
        download(url, dest, max_retries=1, **FAST)
    assert url in str(info.value)


def test_timeout_is_retried(server: FileHTTPServer, dest: Path, payload: bytes) -> None:
    server.stall_next(1, seconds=1.5)
    result = download(server.url("data.bin"), dest, timeout=0.3, max_retries=1, **FAST)
    assert len(server.requests) == 2 and result.sha256 == _sha(payload)


def test_credentials_are_sent_but_never_shown(server: FileHTTPServer, dest: Path) -> None:
    url = server.url("missing.bin", userinfo="alice:s3cret")
    with pytest.raises(DownloadError, match="404") as info:
        download(url, dest, **FAST)
    assert "s3cret" not in str(info.value) and "alice" not in str(info.value)
    assert server.url("missing.bin") in str(info.value)
    assert server.requests[0].headers["authorization"].startswith("Basic ")


def test_credentials_not_written_to_sidecar(server: FileHTTPServer, dest: Path) -> None:
    server.drop_next(1, after_bytes=10_000)
    with pytest.raises(DownloadError):
        download(server.url("data.bin", userinfo="alice:s3cret"), dest, max_retries=0, **FAST)
    assert "s3cret" not in dest.with_name("data.bin.part.json").read_text()


# -- expectations and existing files ------------------------------------------------------------


def test_sha256_mismatch_is_not_published(server: FileHTTPServer, dest: Path, payload: bytes) -> None:
    wrong = "0" * 64
    with pytest.raises(DownloadError) as info:
        download(server.url("data.bin"), dest, expected_sha256=wrong, **FAST)
    assert wrong in str(info.value) and _sha(payload) in str(info.value)
    assert not dest.exists()
    assert _leftovers(dest) == []  # wrong bytes are not kept for a "resume"


def test_size_mismatch_fails_before_the_body(server: FileHTTPServer, dest: Path) -> None:
    with pytest.raises(DownloadError, match=f"{SIZE} bytes, expected_size is 1000"):
        download(server.url("data.bin"), dest, expected_size=1000, **FAST)
    assert not dest.exists()


def test_existing_dest_is_not_downloaded_again(server: FileHTTPServer, dest: Path, payload: bytes) -> None:
    download(server.url("data.bin"), dest, **FAST)
    server.clear_log()
    mtime = dest.stat().st_mtime_ns
    for expected in (None, _sha(payload)):
        result = download(server.url("data.bin"), dest, expected_sha256=expected, **FAST)
        assert result.sha256 == _sha(payload) and result.size == SIZE and result.resumed_from == 0
    assert server.requests == []
    assert dest.stat().st_mtime_ns == mtime


def test_existing_dest_with_wrong_content_is_replaced(server: FileHTTPServer, dest: Path, payload: bytes) -> None:
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"stale")
    result = download(server.url("data.bin"), dest, expected_sha256=_sha(payload), **FAST)
    assert len(server.requests) == 1 and result.sha256 == _sha(payload)
    assert dest.read_bytes() == payload


def test_progress_bar_goes_to_stderr(server: FileHTTPServer, dest: Path, capsys) -> None:
    download(server.url("data.bin"), dest, **{**FAST, "progress": True})
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "data.bin" in captured.err


def test_dest_folder_is_created(server: FileHTTPServer, tmp_path: Path) -> None:
    dest = tmp_path / "a" / "b" / "c.bin"
    download(server.url("data.bin"), dest, **FAST)
    assert dest.is_file() and os.path.getsize(dest) == SIZE


# -- a server that splices versions, and published checksums --------------------------------------


def test_206_of_another_version_is_refused(server: FileHTTPServer, dest: Path, payload: bytes) -> None:
    # A cache that ignores If-Range answers 206 with bytes of the new file: appending them would splice.
    new = payload[::-1]  # same size, so only the ETag and date tell the versions apart
    server.ignore_if_range = True
    server.drop_next(1, after_bytes=1_000_000)
    server.change_content("data.bin", new, after_requests=1)
    result = download(server.url("data.bin"), dest, max_retries=3, **FAST)
    assert [r.status for r in server.requests] == [200, 206, 200]
    assert result.resumed_from == 0 and dest.read_bytes() == new


def test_changed_since_compares_validator_and_total() -> None:
    headers = {"ETag": '"b"', "Last-Modified": "Tue, 01 Jul 2025 00:00:00 GMT"}
    assert http_source._changed_since('"a"', 10, headers, 10) == 'ETag "a" -> "b"'
    assert http_source._changed_since('"b"', 10, headers, 11) == "size 10 -> 11 bytes"
    assert http_source._changed_since("Mon, 30 Jun 2025 00:00:00 GMT", None, headers, 10).startswith("Last-Modified")
    assert http_source._changed_since('"b"', 10, headers, 10) == ""
    assert http_source._changed_since('"a"', None, {}, None) == ""  # nothing to compare: the range is trusted


@pytest.mark.parametrize(("text", "expected"), [
    ("d41d8cd98f00b204e9800998ecf8427e  README\n" + "a" * 32 + "  data.bin\n", ("md5", "a" * 32)),
    ("B" * 40 + " *dumps/data.bin\n", ("sha1", "b" * 40)),
    ("# sums\n\nSHA256 (data.bin) = " + "C" * 64 + "\n", ("sha256", "c" * 64)),
    ("e" * 128 + "\n", ("sha512", "e" * 128)),  # a lone digest, as in data.bin.sha512
])
def test_checksum_file_formats(text: str, expected: tuple[str, str]) -> None:
    assert checksums.parse_checksum_file(text, "data.bin", "sums.txt") == expected


@pytest.mark.parametrize(("text", "match"), [
    ("<html><body>404</body></html>\n", r"sums\.txt, line 1: not a checksum line"),
    ("a" * 32 + "  other.bin\n", "lists no checksum for 'data.bin'"),
    ("a" * 32 + "  data.bin\n" + "b" * 32 + "  data.bin\n", "conflicting"),
    ("a" * 31 + "  data.bin\n", "line 1"),
    ("SHA256 (data.bin) = " + "a" * 32 + "\n", "line 1"),
])
def test_bad_checksum_files_are_refused_naming_the_line(text: str, match: str) -> None:
    with pytest.raises(DownloadError, match=match):
        checksums.parse_checksum_file(text, "data.bin", "sums.txt")


def test_published_checksum_is_verified_and_fetched_every_time(tmp_path: Path, payload: bytes) -> None:
    root = tmp_path / "served"
    root.mkdir()
    (root / "data.bin").write_bytes(payload)
    (root / "MD5SUMS").write_text(f"{hashlib.md5(payload).hexdigest()}  data.bin\n")
    dest = tmp_path / "out" / "data.bin"
    with FileHTTPServer(root) as srv:
        download(srv.url("data.bin"), dest, checksum_url=srv.url("MD5SUMS"), **FAST)
        assert dest.read_bytes() == payload and _leftovers(dest) == []
        # The source now publishes another checksum: the file on disk no longer passes, so it is
        # fetched again and refused; nothing wrong is published and nothing is kept.
        (root / "MD5SUMS").write_text(f"{'0' * 32}  data.bin\n")
        dest.unlink()
        with pytest.raises(DownloadError, match=f"md5 {hashlib.md5(payload).hexdigest()}, published 0{{32}}"):
            download(srv.url("data.bin"), dest, checksum_url=srv.url("MD5SUMS"), **FAST)
        assert not dest.exists() and _leftovers(dest) == []
        (root / "SHA256SUMS").write_text(f"{_sha(payload)}  data.bin\n")
        with pytest.raises(ConfigError, match="expected_sha256"):
            download(srv.url("data.bin"), dest, checksum_url=srv.url("SHA256SUMS"), expected_sha256="1" * 64, **FAST)
        assert [r.path for r in srv.requests].count("/MD5SUMS") == 2
