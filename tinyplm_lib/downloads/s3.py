"""S3 source: ``s3://bucket/key`` read through a boto3 client; a resume is ``Range`` plus ``IfMatch``.

The key is taken literally, as the AWS CLI does. botocore's errors are sorted into retryable
(5xx, throttling, broken connections) and final ones, and every message is scrubbed of the access
key, secret and session token in case a server echoes one back.
"""

from __future__ import annotations

import http.client
import os
from collections.abc import Callable
from typing import Any

from tinyplm_lib.downloads.partfile import PartFile
from tinyplm_lib.downloads.source import (
    DownloadError,
    Fetched,
    RetryableError,
    checked_size,
    describe,
    parse_content_range,
    redact_url,
)
from tinyplm_lib.errors import ConfigError

# Error codes S3 sends with a non-5xx status that still mean "try again later".
_S3_RETRYABLE_CODES = frozenset({"RequestTimeout", "SlowDown", "Throttling", "ThrottlingException"})


def parse_s3_url(url: str) -> tuple[str, str]:
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


class S3Source:
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
                raise self.error(f"cannot create an S3 client: {describe(exc)}") from self.cause(exc)

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

    def retryable(self, message: str) -> RetryableError:
        return RetryableError(self.scrub(message))

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
            raise self.retryable(describe(exc)) from self.cause(exc)
        except bex.BotoCoreError as exc:  # no credentials, bad configuration, ...
            raise self.error(describe(exc)) from self.cause(exc)

    def fetch_once(self, part: PartFile, expected_size: int | None, progress: bool) -> Fetched:
        offset, etag, known_total = part.resume_point()
        if offset and offset == known_total:
            # A crash between the last byte and the rename: keep the part if the object is unchanged.
            try:
                head = self.call("head_object", IfMatch=etag)
            except _S3Changed:
                head = {}
            if head.get("ContentLength") == offset:
                return Fetched(offset, part.digest().hexdigest(), offset)
            part.reset()
            offset, etag = 0, None
        try:
            return self._get(part, offset, etag, expected_size, progress)
        except _S3Changed:
            # The object was replaced since the part began (or the part is longer than the object).
            part.reset()
            return self._get(part, 0, None, expected_size, progress)

    def _get(
        self, part: PartFile, offset: int, etag: str | None, expected_size: int | None, progress: bool,
    ) -> Fetched:
        response = self.call("get_object", **({"Range": f"bytes={offset}-", "IfMatch": etag} if offset else {}))
        body = response["Body"]
        try:
            length = response.get("ContentLength")
            if offset:
                start, total = parse_content_range(response.get("ContentRange"))
                if start != offset or response.get("ETag") != etag:
                    part.reset()
                    raise RetryableError(f"asked for bytes from {offset} of {etag}, got another range; starting over")
            else:
                total = length
                part.start(response.get("ETag"), total)
            if expected_size is not None and total is not None and total != expected_size:
                part.discard()  # not the object we want: nothing of it is worth resuming
                raise self.error(f"object has {total} bytes, expected_size is {expected_size}")
            received = part.receive(self._reader(body, part), total=total, progress=progress)
        finally:
            body.close()
        size = checked_size(part, offset, received, length, total, "the object has")
        return Fetched(size, part.digest().hexdigest(), offset)

    def _reader(self, body: Any, part: PartFile) -> Callable[[int], bytes]:
        """``body.read``, with botocore's failures sorted into retryable errors."""

        def read(size: int) -> bytes:
            try:
                return body.read(size)
            except self._bex.FlexibleChecksumError as exc:
                part.reset()  # the bytes on disk are wrong somewhere: keep none of them
                raise self.retryable(f"checksum mismatch: {describe(exc)}; starting over") from self.cause(exc)
            except self._transient as exc:
                where = f"connection lost after {part.length} bytes"
                raise self.retryable(f"{where}: {describe(exc)}") from self.cause(exc)

        return read
