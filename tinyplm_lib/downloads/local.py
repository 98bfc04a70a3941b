"""Local source: a ``file:///abs/path`` URL, copied into the part file.

A local copy is fast to redo, so it always starts from zero instead of resuming, and nothing about
it is worth retrying.
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from pathlib import Path

from tinyplm_lib.downloads.partfile import PartFile
from tinyplm_lib.downloads.source import DownloadError, Fetched, redact_url
from tinyplm_lib.errors import ConfigError


class LocalSource:
    """One local file named by a ``file://`` URL (host empty or ``localhost``)."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError("url", f"{redact_url(url)}: a file:// URL must name a local path, file:///abs/path")
        self.shown = redact_url(url)
        self.path = Path(urllib.request.url2pathname(parts.path))

    def scrub(self, text: str) -> str:
        return text

    def fetch_once(self, part: PartFile, expected_size: int | None, progress: bool) -> Fetched:
        try:
            src = open(self.path, "rb")
        except OSError as exc:
            raise DownloadError(f"{self.shown}: cannot read {self.path}: {exc.strerror}") from exc
        with src:
            part.reset()
            part.receive(src.read, total=os.fstat(src.fileno()).st_size, progress=progress)
        return Fetched(part.size(), part.digest().hexdigest(), 0)
