"""The part file: ``<dest>.part`` and its sidecar ``<dest>.part.json``, which make a download resumable.

The sidecar records the URL, the resume validator (ETag or Last-Modified) and the total size; a part
without a usable sidecar is never trusted. Bytes are hashed as they are appended, and the finished
part is fsynced and renamed to ``dest``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from tinyplm_lib import faultpoints
from tinyplm_lib.files import atomic_write_json, fsync_dir, fsync_file


class ResumePoint(NamedTuple):
    """Where a download continues: the part's size, its If-Range validator and the total size, if known."""

    offset: int
    validator: str | None
    total: int | None


_FRESH = ResumePoint(0, None, None)


class PartFile:
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

    @property
    def length(self) -> int:
        """Bytes hashed so far: while :meth:`receive` runs, the part's size counting unflushed writes."""
        return self._hashed

    def resume_point(self) -> ResumePoint:
        """Where to resume, or offset 0 (and no validator) after a reset."""
        size = self.size()
        if size == 0:
            return _FRESH
        try:
            meta = json.loads(self.sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        total = meta.get("total")
        # Without a validator a resumed file could silently mix two versions, so start over.
        usable = meta.get("url") == self.url_key and meta.get("validator") and (total is None or size <= total)
        if not usable:
            self.reset()
            return _FRESH
        return ResumePoint(size, meta["validator"], total)

    def reset(self) -> None:
        self.path.write_bytes(b"")
        self.sidecar.unlink(missing_ok=True)
        self._digest, self._hashed = hashlib.sha256(), 0

    def start(self, validator: str | None, total: int | None) -> None:
        """Begin a fresh download; the sidecar is written first so a crash mid-body can resume."""
        self.reset()
        # Compact JSON, as parts left by earlier versions hold. Not fsynced: neither are the part's
        # bytes before publish(), and losing the sidecar only means starting over.
        payload = {"url": self.url_key, "validator": validator, "total": total}
        atomic_write_json(self.sidecar, payload, indent=None, durable=False)

    def digest(self) -> Any:
        """The running sha256, re-hashing the part from disk when it is not in step with the file."""
        if self._digest is None or self._hashed != self.size():
            self._digest = _sha256_of(self.path, self.chunk_size) if self.path.exists() else hashlib.sha256()
            self._hashed = self.size()
        return self._digest

    def append(self, fh: Any, chunk: bytes) -> None:
        fh.write(chunk)
        self._digest.update(chunk)
        self._hashed += len(chunk)

    def receive(self, read: Callable[[int], bytes], *, total: int | None, progress: bool) -> int:
        """Append ``read(chunk_size)`` until it returns no bytes; the number of bytes received.

        ``read`` turns its own failures into the caller's errors; a progress bar counts from the
        part's current size towards ``total``.
        """
        self.digest()  # in step with the file, so that append() continues it
        received = 0
        with open(self.path, "ab") as fh, _progress_bar(self.dest.name, total, self.size(), progress) as bar:
            while chunk := read(self.chunk_size):
                self.append(fh, chunk)
                if not received:
                    faultpoints.reached("early", self.dest.name)
                received += len(chunk)
                bar.update(len(chunk))
        return received

    def publish(self) -> None:
        fsync_file(self.path)
        os.replace(self.path, self.dest)
        self.sidecar.unlink(missing_ok=True)
        # The rename is only durable once the directory entry is on disk too.
        fsync_dir(self.dest.parent)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.sidecar.unlink(missing_ok=True)


def _sha256_of(path: Path, chunk_size: int) -> Any:
    """A hashlib sha256 object fed with the file (not its hex digest: appends continue it)."""
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
