"""Download corpus files from ``http://``, ``https://``, ``file://`` and ``s3://`` URLs, resumably.

Bytes stream to ``<dest>.part`` and are hashed on the way; an interrupted download resumes with an
HTTP ``Range`` request guarded by ``If-Range`` (S3: ``Range`` plus ``IfMatch`` on the recorded
ETag), and the finished file is fsynced and renamed to ``dest``. A 206 whose ETag, date or size
differs from the part's is refused (never spliced); the size and any published checksum are
checked before the rename.
``download("https://data.statmt.org/cc-100/ja.txt.xz", Path("raw/ja.txt.xz"))``
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from tinyplm_lib.errors import ConfigError, TinyPLMError

_USER_AGENT = "tinyplm-downloader/0.1"
# Backoff doubles per attempt; the cap keeps a large max_retries from sleeping for hours.
_MAX_BACKOFF_S = 60.0
# Module-level so tests can check the backoff schedule without actually waiting.
_sleep = time.sleep
# Network failures worth another attempt: URLError, timeouts and resets are all OSErrors;
# IncompleteRead and RemoteDisconnected are HTTPExceptions.
_NETWORK_ERRORS = (OSError, http.client.HTTPException)


class DownloadError(TinyPLMError):
    """A download that failed. The message names the URL (credentials removed) and the cause."""


class _RetryableError(Exception):
    """One attempt failed in a way that another attempt (after backoff) may fix."""


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


def redact_url(url: str) -> str:
    """``url`` without the ``user:password@`` part, safe to print or store."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


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
    dest = Path(dest)
    shown = redact_url(url)
    expected_sha256 = _check_settings(
        expected_sha256, expected_size,
        timeout=timeout, max_retries=max_retries, backoff=backoff, chunk_size=chunk_size,
    )
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file", "s3"):
        raise ConfigError(
            "url", f"{shown}: unsupported scheme {scheme!r}; use http://, https://, file:// or s3://"
        )
    s3_location = _parse_s3_url(url) if scheme == "s3" else None
    published = None  # (algorithm, hex digest, where it came from)
    if checksum_url is not None:
        algorithm, value = fetch_published_checksum(
            checksum_url, filename_from_url(url), dest.with_name(dest.name + ".checksum"),
            timeout=timeout, max_retries=max_retries, backoff=backoff, s3_client=s3_client,
        )
        published = (algorithm, value, redact_url(checksum_url))
        if algorithm == "sha256" and expected_sha256 not in (None, value):
            raise ConfigError("expected_sha256", f"{expected_sha256} differs from the sha256 {value} "
                              f"published in {redact_url(checksum_url)}")

    # A wrong size rules the file out without reading it (hashing cc100 means reading 15 GB).
    if dest.is_file() and expected_size in (None, dest.stat().st_size):
        size, digest = dest.stat().st_size, _hash_file(dest, chunk_size).hexdigest()
        if expected_sha256 in (None, digest) and not _published_mismatch(dest, published, chunk_size, digest):
            return DownloadResult(dest, shown, size, digest, resumed_from=0)
    dest.parent.mkdir(parents=True, exist_ok=True)

    part = _PartFile(dest, shown, chunk_size)
    if scheme == "file":
        size, digest = _copy_local(url, part, progress=progress)
        resumed_from = 0
    elif s3_location is not None:
        source = _S3Source(*s3_location, shown=shown, client=s3_client, timeout=timeout)
        size, digest, resumed_from = _retry(
            lambda: source.fetch_once(part, expected_size, progress), part,
            max_retries=max_retries, backoff=backoff, scrub=source.scrub,
        )
    else:
        size, digest, resumed_from = _fetch_with_retries(
            url, part, expected_size=expected_size, progress=progress, timeout=timeout,
            max_retries=max_retries, backoff=backoff,
        )

    problems = []
    if expected_size is not None and size != expected_size:
        problems.append(f"size {size} bytes, expected {expected_size}")
    if expected_sha256 is not None and digest != expected_sha256:
        problems.append(f"sha256 {digest}, expected {expected_sha256}")
    if not problems and published is not None:
        problems.append(_published_mismatch(part.path, published, chunk_size, digest))
    problems = [problem for problem in problems if problem]
    if problems:
        # The complete-but-wrong bytes would only be "resumed" into the same wrong file next time.
        part.discard()
        raise DownloadError(f"{shown}: downloaded file does not match: {'; '.join(problems)}")
    part.publish()
    return DownloadResult(dest, shown, size, digest, resumed_from)


# Hex digest length -> algorithm, for checksum files that do not name theirs.
_DIGEST_LENGTHS = {32: "md5", 40: "sha1", 64: "sha256", 128: "sha512"}
_BSD_CHECKSUM = re.compile(r"^(MD5|SHA1|SHA256|SHA512) ?\((.+)\) ?= ?([0-9A-Fa-f]+)$")
# A checksum file is a few lines per published file; anything far larger is not one.
_MAX_CHECKSUM_FILE_BYTES = 4 << 20


def parse_checksum_file(text: str, name: str, source: str) -> tuple[str, str]:
    """(algorithm, lower-case hex digest) of ``name`` in a checksum file's ``text``.

    Accepts ``<hex>  <name>`` / ``<hex> *<name>`` lines (coreutils), ``SHA256 (<name>) = <hex>``
    (BSD) and a file holding one bare digest. Raises DownloadError naming ``source`` and the line
    for anything else (an HTML error page served as the checksum file, for one).
    """
    entries: list[tuple[str | None, str, str]] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        bsd = _BSD_CHECKSUM.match(line)
        if bsd:
            file_name, digest, algorithm = bsd.group(2), bsd.group(3).lower(), bsd.group(1).lower()
        else:
            digest, _, file_name = line.partition(" ")
            digest, file_name = digest.lower(), file_name.strip().lstrip("*") or None
            algorithm = _DIGEST_LENGTHS.get(len(digest), "")
        if not algorithm or len(digest) != hashlib.new(algorithm).digest_size * 2 \
                or any(c not in "0123456789abcdef" for c in digest):
            raise DownloadError(f"{source}, line {line_no}: not a checksum line: {line[:80]!r}")
        entries.append((file_name, algorithm, digest))
    named = [e for e in entries if e[0] is not None and e[0].replace("\\", "/").rsplit("/", 1)[-1] == name]
    if not named and len(entries) == 1 and entries[0][0] is None:
        named = entries  # a lone digest, as in ``ja.txt.xz.sha256``
    if not named:
        raise DownloadError(f"{source}: lists no checksum for {name!r} ({len(entries)} entries)")
    if len({e[1:] for e in named}) > 1:
        raise DownloadError(f"{source}: lists conflicting checksums for {name!r}")
    return named[0][1], named[0][2]


def fetch_published_checksum(checksum_url: str, name: str, scratch: Path, *, timeout: float,
                             max_retries: int, backoff: float, s3_client: Any = None) -> tuple[str, str]:
    """Download ``checksum_url`` (with the same retries) and return its entry for ``name``."""
    # Fetched anew every time: a kept copy would vouch for an older version of the data.
    scratch.unlink(missing_ok=True)
    result = download(checksum_url, scratch, progress=False, timeout=timeout, max_retries=max_retries,
                      backoff=backoff, s3_client=s3_client)
    try:
        if result.size > _MAX_CHECKSUM_FILE_BYTES:
            raise DownloadError(f"{result.url}: {result.size} bytes is too large for a checksum file")
        try:
            text = scratch.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DownloadError(f"{result.url}: not a text checksum file ({exc})") from exc
        return parse_checksum_file(text, name, result.url)
    finally:
        scratch.unlink(missing_ok=True)


def _published_mismatch(path: Path, published: tuple[str, str, str] | None, chunk_size: int,
                        sha256: str) -> str:
    """Empty when ``path`` (whose ``sha256`` is known) matches the published (algorithm, digest,
    source), else what differs. Other algorithms cost one more read of the file."""
    if published is None:
        return ""
    algorithm, expected, source = published
    if algorithm == "sha256":
        actual = sha256
    else:
        digest = hashlib.new(algorithm)
        with open(path, "rb") as fh:
            while chunk := fh.read(chunk_size):
                digest.update(chunk)
        actual = digest.hexdigest()
    return "" if actual == expected else f"{algorithm} {actual}, published {expected} in {source}"


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


def _hash_file(path: Path, chunk_size: int) -> Any:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest


def _progress_bar(name: str, total: int | None, initial: int, enabled: bool) -> tqdm:
    return tqdm(
        total=total, initial=initial, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
        file=sys.stderr, disable=not enabled, leave=False,
    )


class _PartFile:
    """``<dest>.part`` plus its sidecar ``<dest>.part.json`` (URL, resume validator, total size).

    Keeps a running sha256 of the part's bytes so a resume within one call need not re-read them.
    """

    def __init__(self, dest: Path, url_key: str, chunk_size: int) -> None:
        self.dest = dest
        self.path = dest.with_name(dest.name + ".part")
        self.sidecar = dest.with_name(dest.name + ".part.json")
        self.url_key = url_key
        self.chunk_size = chunk_size
        self._digest: Any = None
        self._hashed = 0

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def resume_point(self) -> tuple[int, str | None, int | None]:
        """(offset, If-Range validator, total) for resuming, or (0, None, None) after a reset."""
        size = self.size()
        if size == 0:
            return 0, None, None
        try:
            meta = json.loads(self.sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        total = meta.get("total")
        # Without a validator a resumed file could silently mix two versions, so start over.
        usable = meta.get("url") == self.url_key and meta.get("validator") and (total is None or size <= total)
        if not usable:
            self.reset()
            return 0, None, None
        return size, meta["validator"], total

    def reset(self) -> None:
        self.path.write_bytes(b"")
        self.sidecar.unlink(missing_ok=True)
        self._digest, self._hashed = hashlib.sha256(), 0

    def start(self, validator: str | None, total: int | None) -> None:
        """Begin a fresh download; the sidecar is written first so a crash mid-body can resume."""
        self.reset()
        payload = {"url": self.url_key, "validator": validator, "total": total}
        tmp = self.sidecar.with_name(self.sidecar.name + ".tmp")
        tmp.write_text(json.dumps(payload), encoding="utf-8")
        os.replace(tmp, self.sidecar)

    def digest(self) -> Any:
        """The running sha256, re-hashing the part from disk when it is not in step with the file."""
        if self._digest is None or self._hashed != self.size():
            self._digest = _hash_file(self.path, self.chunk_size) if self.path.exists() else hashlib.sha256()
            self._hashed = self.size()
        return self._digest

    def append(self, fh: Any, chunk: bytes) -> None:
        fh.write(chunk)
        self._digest.update(chunk)
        self._hashed += len(chunk)

    def sync(self) -> None:
        with open(self.path, "rb+") as fh:
            os.fsync(fh.fileno())

    def publish(self) -> None:
        self.sync()
        os.replace(self.path, self.dest)
        self.sidecar.unlink(missing_ok=True)
        # The rename is only durable once the directory entry is on disk too.
        dir_fd = os.open(self.dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.sidecar.unlink(missing_ok=True)


def _copy_local(url: str, part: _PartFile, *, progress: bool) -> tuple[int, str]:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ConfigError("url", f"{redact_url(url)}: a file:// URL must name a local path, file:///abs/path")
    source = Path(urllib.request.url2pathname(parts.path))
    try:
        src = open(source, "rb")
    except OSError as exc:
        raise DownloadError(f"{redact_url(url)}: cannot read {source}: {exc.strerror}") from exc
    # A local copy is fast to redo, so it always starts from zero instead of resuming.
    part.reset()
    digest = part.digest()
    with src, open(part.path, "ab") as fh:
        with _progress_bar(part.dest.name, os.fstat(src.fileno()).st_size, 0, progress) as bar:
            while chunk := src.read(part.chunk_size):
                part.append(fh, chunk)
                bar.update(len(chunk))
    return part.size(), digest.hexdigest()


def _fetch_with_retries(
    url: str, part: _PartFile, *, expected_size: int | None, progress: bool, timeout: float,
    max_retries: int, backoff: float,
) -> tuple[int, str, int]:
    request_url, authorization = _split_credentials(url)
    return _retry(
        lambda: _fetch_once(request_url, authorization, part, expected_size, progress, timeout), part,
        max_retries=max_retries, backoff=backoff,
    )


def _retry(
    fetch_once: Callable[[], tuple[int, str, int]], part: _PartFile, *, max_retries: int, backoff: float,
    scrub: Callable[[str], str] = lambda text: text,
) -> tuple[int, str, int]:
    """``fetch_once()`` until it stops raising _RetryableError, at most ``max_retries + 1`` times."""
    last_error: Exception | None = None
    for attempt in range(max_retries + 1):
        if attempt:
            _sleep(min(backoff * 2 ** (attempt - 1), _MAX_BACKOFF_S))
        try:
            return fetch_once()
        except _RetryableError as exc:
            last_error = exc
    kept = f" ({part.size()} bytes kept in {part.path} for the next run)" if part.size() else ""
    raise DownloadError(scrub(
        f"{part.url_key}: giving up after {max_retries + 1} attempt(s); last error: {last_error}{kept}"
    ))


def _split_credentials(url: str) -> tuple[str, str | None]:
    """Move ``user:password@`` from the URL into a Basic Authorization header value."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, None
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return redact_url(url), f"Basic {token}"


def _fetch_once(
    request_url: str, authorization: str | None, part: _PartFile, expected_size: int | None,
    progress: bool, timeout: float,
) -> tuple[int, str, int]:
    shown = part.url_key
    offset, validator, known_total = part.resume_point()
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        # If-Range makes the server send the whole new file (200) if it changed since the part began.
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = validator
    request = urllib.request.Request(request_url, headers=headers)
    if authorization:
        # Unredirected: a redirect to another host must not carry the credentials along.
        request.add_unredirected_header("Authorization", authorization)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        with exc:
            if exc.code == 416 and offset:
                return _finish_complete_part(part, offset, known_total, exc.headers.get("Content-Range"))
            if exc.code >= 500:
                raise _RetryableError(f"HTTP {exc.code} {exc.reason}") from exc
            raise DownloadError(f"{shown}: HTTP {exc.code} {exc.reason}") from exc
    except _NETWORK_ERRORS as exc:
        raise _RetryableError(_describe(exc)) from exc

    with response:
        length = _int_header(response.headers.get("Content-Length"))
        if response.status == 206 and offset:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.reset()
                raise _RetryableError(f"asked for bytes from {offset}, got from {start}; starting over")
            # A server (or cache) that ignores If-Range would splice two versions of the file:
            # check the validator and total of the 206 ourselves.
            changed = _changed_since(validator, known_total, response.headers, total)
            if changed:
                part.reset()
                raise _RetryableError(f"the file changed on the server since the partial download began "
                                      f"({changed}); starting over")
        elif response.status == 200:
            # Range ignored or the file changed (If-Range failed): the body is the whole file.
            offset, total = 0, length
            part.start(_validator(response.headers), total)
        else:
            raise DownloadError(f"{shown}: unexpected HTTP {response.status} {response.reason}")
        if expected_size is not None and total is not None and total != expected_size:
            part.discard()  # not the file we want: nothing of it is worth resuming
            raise DownloadError(f"{shown}: server reports {total} bytes, expected_size is {expected_size}")

        digest = part.digest()
        received = 0
        with open(part.path, "ab") as fh, _progress_bar(part.dest.name, total, offset, progress) as bar:
            while True:
                try:
                    chunk = response.read(part.chunk_size)
                except _NETWORK_ERRORS as exc:
                    where = f"connection lost after {offset + received} bytes"
                    raise _RetryableError(f"{where}: {_describe(exc)}") from exc
                if not chunk:
                    break
                part.append(fh, chunk)
                received += len(chunk)
                bar.update(len(chunk))

    # http.client returns a short body without error when the peer closes early: count it ourselves.
    return _checked_size(part, offset, received, length, total, "the server announced"), digest.hexdigest(), offset


def _checked_size(part: _PartFile, offset: int, received: int, length: int | None, total: int | None,
                  announced: str) -> int:
    """The part's size after a body was read; a short or overlong body is retryable."""
    if length is not None and received != length:
        raise _RetryableError(f"connection closed after {offset + received} of {offset + length} bytes")
    size = offset + received
    if total is not None and size != total:
        if size > total:
            part.reset()
        raise _RetryableError(f"got {size} bytes but {announced} {total}")
    return size


def _finish_complete_part(
    part: _PartFile, offset: int, known_total: int | None, content_range: str | None,
) -> tuple[int, str, int]:
    """A 416 answer to ``Range: bytes=N-``: fine when the part already holds the whole file."""
    total = None
    if content_range and content_range.startswith("bytes */"):
        total = _int_header(content_range[len("bytes */"):])
    if total is None or total != offset or known_total not in (None, total):
        part.reset()
        raise _RetryableError(
            f"range not satisfiable: partial file has {offset} bytes, server file has {total}; starting over"
        )
    return offset, part.digest().hexdigest(), offset


def _parse_content_range(value: str | None) -> tuple[int, int | None]:
    """(start, total) from ``bytes START-END/TOTAL`` (TOTAL may be ``*``)."""
    try:
        unit, spec = (value or "").split(" ", 1)
        span, total = spec.split("/", 1)
        start = int(span.split("-", 1)[0])
        if unit != "bytes":
            raise ValueError(unit)
        return start, None if total == "*" else int(total)
    except ValueError as exc:
        raise _RetryableError(f"bad Content-Range {value!r} in a 206 response") from exc


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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError):
        return f"{type(exc).__name__}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# -- s3:// ----------------------------------------------------------------------------------------

# Error codes S3 sends with a non-5xx status that still mean "try again later".
_S3_RETRYABLE_CODES = frozenset({"RequestTimeout", "SlowDown", "Throttling", "ThrottlingException"})


def _parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key) from ``s3://bucket/key``; the key is taken literally (no percent-decoding)."""
    shown = redact_url(url)
    bucket, _, key = url.split("://", 1)[1].partition("/")
    if "@" in bucket:
        raise ConfigError(
            "url", f"{shown}: credentials do not belong in an s3:// URL; use the environment or the S3 resource"
        )
    if not bucket or not key or key.endswith("/"):
        raise ConfigError("url", f"{shown}: an s3:// URL must name one object, s3://bucket/key")
    return bucket, key


class _S3Changed(Exception):
    """A ranged, ETag-guarded request was refused (412 or 416): the part cannot be resumed."""


class _S3Source:
    """One S3 object read through a boto3 client, with botocore's errors sorted into ours.

    Every message this class builds goes through :meth:`scrub`, which blanks the client's (and the
    environment's) access key, secret and session token should a server ever echo one back.
    """

    def __init__(self, bucket: str, key: str, *, shown: str, client: Any, timeout: float) -> None:
        import botocore.exceptions as bex  # lazily: boto3 is only needed for s3:// sources

        self.bucket, self.key, self.shown = bucket, key, shown
        self._bex = bex
        # Worth another attempt: refused/reset/closed connections, timeouts, short or broken bodies.
        self._transient = (
            bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError, OSError, http.client.HTTPException,
        )
        self._secrets: tuple[str, ...] | None = None
        self.client = client
        if client is None:
            try:
                self.client = self._default_client(timeout)
            except bex.BotoCoreError as exc:
                raise self.error(f"cannot create an S3 client: {_describe(exc)}") from self.cause(exc)

    @staticmethod
    def _default_client(timeout: float) -> Any:
        import boto3
        from botocore.config import Config

        # One HTTP attempt per call: our own loop does the retrying, with the caller's backoff.
        config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"total_max_attempts": 1})
        return boto3.client("s3", config=config)

    # -- messages --------------------------------------------------------------------------------

    def scrub(self, text: str) -> str:
        if self._secrets is None:
            names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
            found = [os.environ.get(name) for name in names]
            try:
                creds = self.client._request_signer._credentials  # private, so best effort
                frozen = creds.get_frozen_credentials() if creds is not None else None
                if frozen is not None:
                    found += [frozen.access_key, frozen.secret_key, frozen.token]
            except Exception:  # noqa: BLE001 - a client without the attribute simply has nothing to add
                pass
            # Longest first, so a secret that contains another is blanked whole.
            self._secrets = tuple(sorted({s for s in found if s and len(s) >= 4}, key=len, reverse=True))
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def error(self, message: str) -> DownloadError:
        return DownloadError(self.scrub(f"{self.shown}: {message}"))

    def retryable(self, message: str) -> _RetryableError:
        return _RetryableError(self.scrub(message))

    def cause(self, exc: BaseException) -> BaseException | None:
        """``exc`` to chain to, or None (chain nothing) when its text shows a secret."""
        return exc if self.scrub(str(exc)) == str(exc) else None

    # -- requests --------------------------------------------------------------------------------

    def call(self, operation: str, **params: Any) -> dict[str, Any]:
        """``client.<operation>(Bucket=..., Key=..., **params)`` with errors sorted into ours."""
        bex = self._bex
        try:
            return getattr(self.client, operation)(Bucket=self.bucket, Key=self.key, **params)
        except bex.ClientError as exc:
            error = exc.response.get("Error") or {}
            status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
            code = str(error.get("Code") or status)
            what = f"{code} (HTTP {status})" + (f": {error['Message']}" if error.get("Message") else "")
            if "IfMatch" in params and (status in (412, 416) or code in ("PreconditionFailed", "InvalidRange")):
                raise _S3Changed(what) from None
            if status >= 500 or code in _S3_RETRYABLE_CODES:
                raise self.retryable(what) from self.cause(exc)
            # NoSuchKey, NoSuchBucket, AccessDenied, InvalidAccessKeyId, ...: another try won't help.
            raise self.error(what) from self.cause(exc)
        except self._transient as exc:
            raise self.retryable(_describe(exc)) from self.cause(exc)
        except bex.BotoCoreError as exc:  # no credentials, bad configuration, ...
            raise self.error(_describe(exc)) from self.cause(exc)

    def fetch_once(self, part: _PartFile, expected_size: int | None, progress: bool) -> tuple[int, str, int]:
        offset, etag, known_total = part.resume_point()
        if offset and offset == known_total:
            # A crash between the last byte and the rename: keep the part if the object is unchanged.
            try:
                head = self.call("head_object", IfMatch=etag)
            except _S3Changed:
                head = {}
            if head.get("ContentLength") == offset:
                return offset, part.digest().hexdigest(), offset
            part.reset()
            offset, etag = 0, None
        try:
            return self._get(part, offset, etag, expected_size, progress)
        except _S3Changed:
            # The object was replaced since the part began (or the part is longer than the object).
            part.reset()
            return self._get(part, 0, None, expected_size, progress)

    def _get(
        self, part: _PartFile, offset: int, etag: str | None, expected_size: int | None, progress: bool,
    ) -> tuple[int, str, int]:
        response = self.call("get_object", **({"Range": f"bytes={offset}-", "IfMatch": etag} if offset else {}))
        body = response["Body"]
        try:
            length = response.get("ContentLength")
            if offset:
                start, total = _parse_content_range(response.get("ContentRange"))
                if start != offset or response.get("ETag") != etag:
                    part.reset()
                    raise _RetryableError(f"asked for bytes from {offset} of {etag}, got another range; starting over")
            else:
                total = length
                part.start(response.get("ETag"), total)
            if expected_size is not None and total is not None and total != expected_size:
                part.discard()  # not the object we want: nothing of it is worth resuming
                raise self.error(f"object has {total} bytes, expected_size is {expected_size}")

            digest = part.digest()
            received = 0
            with open(part.path, "ab") as fh, _progress_bar(part.dest.name, total, offset, progress) as bar:
                while True:
                    try:
                        chunk = body.read(part.chunk_size)
                    except self._bex.FlexibleChecksumError as exc:
                        part.reset()  # the bytes on disk are wrong somewhere: keep none of them
                        raise self.retryable(f"checksum mismatch: {_describe(exc)}; starting over") from self.cause(exc)
                    except self._transient as exc:
                        where = f"connection lost after {offset + received} bytes"
                        raise self.retryable(f"{where}: {_describe(exc)}") from self.cause(exc)
                    if not chunk:
                        break
                    part.append(fh, chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        finally:
            body.close()

        return _checked_size(part, offset, received, length, total, "the object has"), digest.hexdigest(), offset
