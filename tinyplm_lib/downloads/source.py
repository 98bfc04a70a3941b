"""The source interface: one attempt to fill a part file from a URL, and the retry loop around it.

HTTP(S), S3 and local files implement :class:`Source`; :func:`fetch_with_retries` repeats an attempt
that raised :class:`RetryableError`, with exponential backoff. Also here: the checks and parsing
that more than one source needs (Content-Range, body size, error descriptions, URL redaction).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
from typing import NamedTuple, Protocol

from tinyplm_lib.downloads.partfile import PartFile
from tinyplm_lib.errors import TinyPLMError

# Backoff doubles per attempt; the cap keeps a large max_retries from sleeping for hours.
_MAX_BACKOFF_S = 60.0
# Module-level so tests can check the backoff schedule without actually waiting.
_sleep = time.sleep


class DownloadError(TinyPLMError):
    """A download that failed. The message names the URL (credentials removed) and the cause."""


class RetryableError(Exception):
    """One attempt failed in a way that another attempt (after backoff) may fix."""


class Fetched(NamedTuple):
    """What an attempt left in the part file: its size, its sha256 and the bytes it did not have to fetch."""

    size: int
    sha256: str
    resumed_from: int


class Source(Protocol):
    """Where a download's bytes come from: one URL, read into a :class:`PartFile`."""

    def fetch_once(self, part: PartFile, expected_size: int | None, progress: bool) -> Fetched:
        """One attempt: resume or restart ``part`` and read the rest; RetryableError if worth repeating."""
        ...

    def scrub(self, text: str) -> str:
        """``text`` with any secret this source knows of blanked out."""
        ...


def fetch_with_retries(
    source: Source, part: PartFile, *, expected_size: int | None, progress: bool, max_retries: int, backoff: float,
) -> Fetched:
    """``source.fetch_once`` until it stops raising RetryableError, at most ``max_retries + 1`` times."""
    last_error: Exception | None = None
    for attempt in range(max_retries + 1):
        if attempt:
            _sleep(min(backoff * 2 ** (attempt - 1), _MAX_BACKOFF_S))
        try:
            return source.fetch_once(part, expected_size, progress)
        except RetryableError as exc:
            last_error = exc
    kept = f" ({part.size()} bytes kept in {part.path} for the next run)" if part.size() else ""
    raise DownloadError(source.scrub(
        f"{part.url_key}: giving up after {max_retries + 1} attempt(s); last error: {last_error}{kept}"
    ))


def redact_url(url: str) -> str:
    """``url`` without the ``user:password@`` part, safe to print or store."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def parse_content_range(value: str | None) -> tuple[int, int | None]:
    """(start, total) from ``bytes START-END/TOTAL`` (TOTAL may be ``*``)."""
    try:
        unit, spec = (value or "").split(" ", 1)
        span, total = spec.split("/", 1)
        start = int(span.split("-", 1)[0])
        if unit != "bytes":
            raise ValueError(unit)
        return start, None if total == "*" else int(total)
    except ValueError as exc:
        raise RetryableError(f"bad Content-Range {value!r} in a 206 response") from exc


def checked_size(part: PartFile, offset: int, received: int, length: int | None, total: int | None,
                 announced: str) -> int:
    """The part's size after a body was read; a short or overlong body is retryable."""
    if length is not None and received != length:
        raise RetryableError(f"connection closed after {offset + received} of {offset + length} bytes")
    size = offset + received
    if total is not None and size != total:
        if size > total:
            part.reset()
        raise RetryableError(f"got {size} bytes but {announced} {total}")
    return size


def describe(exc: BaseException) -> str:
    """``Type: message`` of a network error, for a message that says what went wrong."""
    if isinstance(exc, urllib.error.URLError):
        return f"{type(exc).__name__}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
