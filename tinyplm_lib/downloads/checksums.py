"""Published checksums: the ``SHA256SUMS`` / ``md5sums.txt`` / ``ja.txt.xz.sha256`` file a source puts
beside its data, parsed, and a downloaded file compared with its entry.

Fetching the checksum file is :func:`tinyplm_lib.downloads.download.fetch_published_checksum`.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import NamedTuple

from tinyplm_lib.downloads.source import DownloadError

# Hex digest length -> algorithm, for checksum files that do not name theirs.
_DIGEST_LENGTHS = {32: "md5", 40: "sha1", 64: "sha256", 128: "sha512"}
_BSD_CHECKSUM = re.compile(r"^(MD5|SHA1|SHA256|SHA512) ?\((.+)\) ?= ?([0-9A-Fa-f]+)$")
# A checksum file is a few lines per published file; anything far larger is not one.
_MAX_CHECKSUM_FILE_BYTES = 4 << 20


class PublishedChecksum(NamedTuple):
    """A file's digest as its source publishes it, and where (the checksum file's redacted URL)."""

    algorithm: str
    digest: str
    source: str

    def mismatch(self, path: Path, sha256: str, chunk_size: int) -> str:
        """Empty when ``path`` (whose ``sha256`` is known) matches, else what differs.

        Algorithms other than sha256 cost one more read of the file.
        """
        if self.algorithm == "sha256":
            actual = sha256
        else:
            digest = hashlib.new(self.algorithm)
            with open(path, "rb") as fh:
                while chunk := fh.read(chunk_size):
                    digest.update(chunk)
            actual = digest.hexdigest()
        return "" if actual == self.digest else f"{self.algorithm} {actual}, published {self.digest} in {self.source}"


def read_checksum_file(path: Path, name: str, source: str) -> tuple[str, str]:
    """(algorithm, hex digest) of ``name`` in the checksum file at ``path``, fetched from ``source``."""
    size = path.stat().st_size
    if size > _MAX_CHECKSUM_FILE_BYTES:
        raise DownloadError(f"{source}: {size} bytes is too large for a checksum file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DownloadError(f"{source}: not a text checksum file ({exc})") from exc
    return parse_checksum_file(text, name, source)


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
