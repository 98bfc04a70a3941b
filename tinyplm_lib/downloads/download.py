"""Download a corpus file from an ``http(s)://``, ``s3://`` or ``file://`` URL, resumably and checked.

``download("https://data.statmt.org/cc-100/ja.txt.xz", Path("raw/ja.txt.xz"))``: keep ``dest`` if it
already matches, else pick the source by URL scheme, fill ``<dest>.part`` with retries, check size,
sha256 and any published checksum, and rename the part to ``dest``.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tinyplm_lib.downloads.checksums import PublishedChecksum, read_checksum_file
from tinyplm_lib.downloads.http import HttpSource
from tinyplm_lib.downloads.local import LocalSource
from tinyplm_lib.downloads.partfile import PartFile
from tinyplm_lib.downloads.s3 import S3Source, parse_s3_url
from tinyplm_lib.downloads.source import DownloadError, Fetched, Source, fetch_with_retries, redact_url
from tinyplm_lib.errors import ConfigError
from tinyplm_lib.files import sha256_file

__all__ = ["DownloadError", "DownloadResult", "download", "fetch_published_checksum", "filename_from_url",
           "redact_url", "source_for"]

_SCHEMES = ("http", "https", "file", "s3")


@dataclass(frozen=True)
class DownloadResult:
    """A file that is complete at ``path``; ``url`` has any credentials removed."""

    path: Path
    url: str
    size: int
    sha256: str
    # Bytes the final, successful response did not have to send because they were already on disk.
    resumed_from: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def filename_from_url(url: str) -> str:
    """The last path segment of ``url``, percent-decoded (``.../cc-100/ja.txt.xz`` → ``ja.txt.xz``)."""
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    # A decoded %2F or a bare ".." would let a URL choose a path outside the download folder.
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError("url", f"{redact_url(url)}: cannot derive a file name from the URL path")
    return name


def download(
    url: str,
    dest: Path,
    *,
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    max_retries: int = 5,
    backoff: float = 1.0,
    chunk_size: int = 1 << 20,
    s3_client: Any = None,
    checksum_url: str | None = None,
) -> DownloadResult:
    """Fetch ``url`` into ``dest`` unless ``dest`` already holds it; safe to re-run after a crash.

    An existing ``dest`` is kept when it matches ``expected_sha256``/``expected_size`` (or when none
    is given). ``timeout`` is per socket operation in seconds; up to ``max_retries`` further
    attempts follow connection errors, timeouts and 5xx answers, waiting ``backoff * 2**k`` seconds.

    ``s3://bucket/key`` URLs (the key taken literally, as the AWS CLI does) are read with
    ``s3_client``, a boto3 S3 client. Without one, ``boto3.client("s3")`` is built from the
    environment (credentials, ``AWS_ENDPOINT_URL_S3``, region) with ``timeout`` and botocore's own
    retries turned off, so that ``max_retries``/``backoff`` alone decide; a client passed in keeps
    its own timeouts and retry settings, which then apply within each of our attempts.

    ``checksum_url`` names a checksum file the source publishes beside the data (``sha256sum`` /
    ``md5sum`` output such as ``SHA256SUMS`` or ``md5sums.txt``, BSD-style ``SHA256 (name) = hex``
    lines, or a lone hex digest as in ``ja.txt.xz.sha256``). It is fetched anew on every call, its
    entry for the URL's file name is taken (md5, sha1, sha256 or sha512, told apart by length),
    and the file, downloaded or already there, must match it.
    """
    dest, shown = Path(dest), redact_url(url)
    expected_sha256 = _check_settings(
        expected_sha256, expected_size,
        timeout=timeout, max_retries=max_retries, backoff=backoff, chunk_size=chunk_size,
    )
    if _scheme(url) == "s3":
        parse_s3_url(url)  # a malformed s3:// URL is refused before anything is fetched
    published = None
    if checksum_url is not None:
        published = _published_checksum(url, dest, checksum_url, expected_sha256, timeout=timeout,
                                        max_retries=max_retries, backoff=backoff, s3_client=s3_client)
    kept = _kept(dest, shown, expected_sha256, expected_size, published, chunk_size)
    if kept is not None:
        return kept
    dest.parent.mkdir(parents=True, exist_ok=True)

    part = PartFile(dest, shown, chunk_size)
    source = source_for(url, s3_client=s3_client, timeout=timeout)
    fetched = fetch_with_retries(source, part, expected_size=expected_size, progress=progress,
                                 max_retries=max_retries, backoff=backoff)
    _verify(part, fetched, expected_sha256, expected_size, published)
    part.publish()
    return DownloadResult(dest, shown, fetched.size, fetched.sha256, fetched.resumed_from)


def source_for(url: str, *, s3_client: Any = None, timeout: float = 60.0) -> Source:
    """The source that reads ``url``, picked by its scheme (one of ``_SCHEMES``, checked before)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "file":
        return LocalSource(url)
    if scheme == "s3":
        return S3Source(*parse_s3_url(url), shown=redact_url(url), client=s3_client, timeout=timeout)
    return HttpSource(url, timeout=timeout)


def fetch_published_checksum(checksum_url: str, name: str, scratch: Path, *, timeout: float,
                             max_retries: int, backoff: float, s3_client: Any = None) -> tuple[str, str]:
    """Download ``checksum_url`` (with the same retries) to ``scratch`` and return its entry for ``name``."""
    # Fetched anew every time: a kept copy would vouch for an older version of the data.
    scratch.unlink(missing_ok=True)
    result = download(checksum_url, scratch, progress=False, timeout=timeout, max_retries=max_retries,
                      backoff=backoff, s3_client=s3_client)
    try:
        return read_checksum_file(scratch, name, result.url)
    finally:
        scratch.unlink(missing_ok=True)


def _check_settings(expected_sha256: str | None, expected_size: int | None, **numbers: float) -> str | None:
    """The normalised expected_sha256; ConfigError for any value out of range."""
    if expected_sha256 is not None:
        expected_sha256 = expected_sha256.strip().lower()
        if len(expected_sha256) != 64 or any(c not in "0123456789abcdef" for c in expected_sha256):
            raise ConfigError("expected_sha256", f"{expected_sha256!r} is not a 64-digit hex sha256")
    lowest = {"expected_size": 0, "max_retries": 0, "backoff": 0, "timeout": 1e-9, "chunk_size": 1}
    for name, value in {"expected_size": expected_size, **numbers}.items():
        if value is not None and value < lowest[name]:
            raise ConfigError(name, f"must be {'> 0' if lowest[name] else '>= 0'}, got {value}")
    return expected_sha256


def _scheme(url: str) -> str:
    """The URL's scheme, lower-cased; ConfigError for one no source reads."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigError(
            "url", f"{redact_url(url)}: unsupported scheme {scheme!r}; use http://, https://, file:// or s3://"
        )
    return scheme


def _published_checksum(url: str, dest: Path, checksum_url: str, expected_sha256: str | None,
                        **retries: Any) -> PublishedChecksum:
    """The checksum published for ``url``'s file; ConfigError if it contradicts ``expected_sha256``."""
    algorithm, value = fetch_published_checksum(
        checksum_url, filename_from_url(url), dest.with_name(dest.name + ".checksum"), **retries,
    )
    if algorithm == "sha256" and expected_sha256 not in (None, value):
        raise ConfigError("expected_sha256", f"{expected_sha256} differs from the sha256 {value} "
                          f"published in {redact_url(checksum_url)}")
    return PublishedChecksum(algorithm, value, redact_url(checksum_url))


def _kept(dest: Path, shown: str, expected_sha256: str | None, expected_size: int | None,
          published: PublishedChecksum | None, chunk_size: int) -> DownloadResult | None:
    """``dest`` as the result when it is already there and matches every expectation, else None."""
    # A wrong size rules the file out without reading it (hashing cc100 means reading 15 GB).
    if not dest.is_file() or expected_size not in (None, dest.stat().st_size):
        return None
    size, digest = dest.stat().st_size, sha256_file(dest, chunk_size)
    if expected_sha256 not in (None, digest) or (published and published.mismatch(dest, digest, chunk_size)):
        return None
    return DownloadResult(dest, shown, size, digest, resumed_from=0)


def _verify(part: PartFile, fetched: Fetched, expected_sha256: str | None, expected_size: int | None,
            published: PublishedChecksum | None) -> None:
    """DownloadError (and the part discarded) when the fetched bytes are not the file expected."""
    problems = []
    if expected_size is not None and fetched.size != expected_size:
        problems.append(f"size {fetched.size} bytes, expected {expected_size}")
    if expected_sha256 is not None and fetched.sha256 != expected_sha256:
        problems.append(f"sha256 {fetched.sha256}, expected {expected_sha256}")
    if not problems and published is not None:
        problems.append(published.mismatch(part.path, fetched.sha256, part.chunk_size))
    problems = [problem for problem in problems if problem]
    if problems:
        # The complete-but-wrong bytes would only be "resumed" into the same wrong file next time.
        part.discard()
        raise DownloadError(f"{part.url_key}: downloaded file does not match: {'; '.join(problems)}")
