"""HTTP(S) source: a resumed download asks ``Range: bytes=N-`` guarded by ``If-Range``.

A 206 whose start, ETag, date or total differs from the part's is refused and the part started
over (never spliced); 5xx answers, timeouts and dropped connections are retryable, other 4xx not.
Credentials in the URL travel as a Basic header that is not sent on to a redirect's host.
"""

from __future__ import annotations

import base64
import http.client
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from tinyplm_lib.downloads.partfile import PartFile, ResumePoint
from tinyplm_lib.downloads.source import (
    DownloadError,
    Fetched,
    RetryableError,
    checked_size,
    describe,
    parse_content_range,
    redact_url,
)

_USER_AGENT = "tinyplm-downloader/0.1"
# Network failures worth another attempt: URLError, timeouts and resets are all OSErrors;
# IncompleteRead and RemoteDisconnected are HTTPExceptions.
_NETWORK_ERRORS = (OSError, http.client.HTTPException)


class HttpSource:
    """One ``http://`` or ``https://`` URL, fetched with urllib."""

    def __init__(self, url: str, *, timeout: float) -> None:
        self.request_url, self.authorization = _split_credentials(url)
        self.timeout = timeout

    def scrub(self, text: str) -> str:
        return text  # messages only ever show the redacted URL

    def fetch_once(self, part: PartFile, expected_size: int | None, progress: bool) -> Fetched:
        resume = part.resume_point()
        try:
            response = urllib.request.urlopen(self._request(resume), timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                if exc.code == 416 and resume.offset:
                    return _finish_complete_part(part, resume, exc.headers.get("Content-Range"))
                if exc.code >= 500:
                    raise RetryableError(f"HTTP {exc.code} {exc.reason}") from exc
                raise DownloadError(f"{part.url_key}: HTTP {exc.code} {exc.reason}") from exc
        except _NETWORK_ERRORS as exc:
            raise RetryableError(describe(exc)) from exc

        with response:
            length = _int_header(response.headers.get("Content-Length"))
            offset, total = _body_range(response, part, resume, length)
            if expected_size is not None and total is not None and total != expected_size:
                part.discard()  # not the file we want: nothing of it is worth resuming
                raise DownloadError(f"{part.url_key}: server reports {total} bytes, expected_size is {expected_size}")
            received = part.receive(_reader(response, part), total=total, progress=progress)

        # http.client returns a short body without error when the peer closes early: count it ourselves.
        size = checked_size(part, offset, received, length, total, "the server announced")
        return Fetched(size, part.digest().hexdigest(), offset)

    def _request(self, resume: ResumePoint) -> urllib.request.Request:
        headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        if resume.offset:
            # If-Range makes the server send the whole new file (200) if it changed since the part began.
            headers["Range"] = f"bytes={resume.offset}-"
            headers["If-Range"] = resume.validator
        request = urllib.request.Request(self.request_url, headers=headers)
        if self.authorization:
            # Unredirected: a redirect to another host must not carry the credentials along.
            request.add_unredirected_header("Authorization", self.authorization)
        return request


def _body_range(response: Any, part: PartFile, resume: ResumePoint, length: int | None) -> tuple[int, int | None]:
    """(offset, total) of the body: a 206 that continues the part, or a 200 that starts it over."""
    offset = resume.offset
    if response.status == 206 and offset:
        start, total = parse_content_range(response.headers.get("Content-Range"))
        if start != offset:
            part.reset()
            raise RetryableError(f"asked for bytes from {offset}, got from {start}; starting over")
        # A server (or cache) that ignores If-Range would splice two versions of the file:
        # check the validator and total of the 206 ourselves.
        changed = _changed_since(resume.validator, resume.total, response.headers, total)
        if changed:
            part.reset()
            raise RetryableError(f"the file changed on the server since the partial download began "
                                 f"({changed}); starting over")
        return offset, total
    if response.status == 200:
        # Range ignored or the file changed (If-Range failed): the body is the whole file.
        part.start(_validator(response.headers), length)
        return 0, length
    raise DownloadError(f"{part.url_key}: unexpected HTTP {response.status} {response.reason}")


def _reader(response: Any, part: PartFile) -> Callable[[int], bytes]:
    """``response.read``, with a broken connection turned into a retryable error."""

    def read(size: int) -> bytes:
        try:
            return response.read(size)
        except _NETWORK_ERRORS as exc:
            where = f"connection lost after {part.length} bytes"
            raise RetryableError(f"{where}: {describe(exc)}") from exc

    return read


def _finish_complete_part(part: PartFile, resume: ResumePoint, content_range: str | None) -> Fetched:
    """A 416 answer to ``Range: bytes=N-``: fine when the part already holds the whole file."""
    offset, total = resume.offset, None
    if content_range and content_range.startswith("bytes */"):
        total = _int_header(content_range[len("bytes */"):])
    if total is None or total != offset or resume.total not in (None, total):
        part.reset()
        raise RetryableError(
            f"range not satisfiable: partial file has {offset} bytes, server file has {total}; starting over"
        )
    return Fetched(offset, part.digest().hexdigest(), offset)


def _changed_since(validator: str | None, known_total: int | None, headers: Any, total: int | None) -> str:
    """What shows that a 206 answer is of another version than the part's ("" if nothing does)."""
    if known_total is not None and total is not None and known_total != total:
        return f"size {known_total} -> {total} bytes"
    if validator:
        # The validator was an ETag (quoted) or a Last-Modified date: compare it with its own kind.
        name = "ETag" if validator.startswith('"') else "Last-Modified"
        now = headers.get(name)
        if now and now != validator:
            return f"{name} {validator} -> {now}"
    return ""


def _validator(headers: Any) -> str | None:
    # If-Range only accepts strong validators: a weak ETag (W/"...") would always fail.
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def _int_header(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _split_credentials(url: str) -> tuple[str, str | None]:
    """Move ``user:password@`` from the URL into a Basic Authorization header value."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, None
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return redact_url(url), f"Basic {token}"
