"""A real HTTP file server on 127.0.0.1 for tests, with byte ranges and injectable faults.

``with FileHTTPServer(folder) as server: download(server.url("a.bin"), ...)`` serves the files in
``folder`` with Range / 206 / 416 / ETag / Last-Modified / If-Range, and records every request so a
test can check what a client really asked for. Fault knobs apply to the next N requests.
"""

from __future__ import annotations

import email.utils
import os
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_BODY_CHUNK = 64 * 1024


@dataclass
class RequestRecord:
    """One request as the server saw it, and what it answered."""

    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    body_bytes: int = 0  # body bytes handed to the socket (fewer than announced when a drop was injected)

    @property
    def range(self) -> str | None:
        return self.headers.get("range")

    @property
    def if_range(self) -> str | None:
        return self.headers.get("if-range")


@dataclass
class _Faults:
    ignore_range: bool = False
    ignore_if_range: bool = False  # honour Range even for another version, as a broken cache would
    body_pause: float = 0.0  # seconds to wait after each 64 KiB of body, so a kill lands mid-body
    range_start_shift: int = 0  # answer a Range request with bytes starting this much later
    fail_times: int = 0
    fail_status: int = 503
    drop_times: int = 0
    drop_after_bytes: int = 0
    stall_times: int = 0
    stall_seconds: float = 0.0
    changes: list[tuple[int, str, bytes]] = field(default_factory=list)  # (requests to wait, name, data)


class FileHTTPServer:
    """Serves ``root`` over HTTP/1.1 from a background thread; a context manager.

    Knobs (thread-safe, each counted in requests that reach the handler): ``ignore_range``,
    ``ignore_if_range``, ``body_pause``, ``range_start_shift``, ``fail_next``, ``drop_next``,
    ``stall_next``, ``change_content``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.requests: list[RequestRecord] = []
        self._faults = _Faults()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> FileHTTPServer:
        handler = type("_BoundHandler", (_Handler,), {"controller": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        # A short poll interval: shutdown() waits for it, and every test stops a server.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="FileHTTPServer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FileHTTPServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    def url(self, name: str, userinfo: str = "") -> str:
        at = f"{userinfo}@" if userinfo else ""
        return f"http://{at}127.0.0.1:{self.port}/{urllib.parse.quote(name)}"

    # -- fault knobs ----------------------------------------------------------------------------

    @property
    def ignore_range(self) -> bool:
        return self._faults.ignore_range

    @ignore_range.setter
    def ignore_range(self, value: bool) -> None:
        with self._lock:
            self._faults.ignore_range = value

    @property
    def ignore_if_range(self) -> bool:
        return self._faults.ignore_if_range

    @ignore_if_range.setter
    def ignore_if_range(self, value: bool) -> None:
        with self._lock:
            self._faults.ignore_if_range = value

    @property
    def body_pause(self) -> float:
        return self._faults.body_pause

    @body_pause.setter
    def body_pause(self, value: float) -> None:
        with self._lock:
            self._faults.body_pause = value

    @property
    def range_start_shift(self) -> int:
        return self._faults.range_start_shift

    @range_start_shift.setter
    def range_start_shift(self, value: int) -> None:
        with self._lock:
            self._faults.range_start_shift = value

    def fail_next(self, times: int, status: int = 503) -> None:
        """Answer the next ``times`` requests with ``status`` and a short text body."""
        with self._lock:
            self._faults.fail_times, self._faults.fail_status = times, status

    def drop_next(self, times: int, after_bytes: int) -> None:
        """Close the connection after ``after_bytes`` body bytes on the next ``times`` requests."""
        with self._lock:
            self._faults.drop_times, self._faults.drop_after_bytes = times, after_bytes

    def stall_next(self, times: int, seconds: float) -> None:
        """Wait ``seconds`` before sending headers on the next ``times`` requests (for timeouts)."""
        with self._lock:
            self._faults.stall_times, self._faults.stall_seconds = times, seconds

    def change_content(self, name: str, data: bytes, after_requests: int = 0) -> None:
        """Replace file ``name`` now, or just before the request after the next ``after_requests``."""
        with self._lock:
            if after_requests <= 0:
                self._replace(name, data)
            else:
                self._faults.changes.append((after_requests, name, data))

    def range_requests(self) -> list[str | None]:
        return [r.range for r in self.requests]

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- internals used by the handler ----------------------------------------------------------

    def _replace(self, name: str, data: bytes) -> None:
        path = self.root / name
        old_mtime = path.stat().st_mtime if path.exists() else time.time()
        tmp = path.with_name(path.name + ".swap")
        tmp.write_bytes(data)
        # Last-Modified has one-second resolution: move it well past the old one so both the ETag
        # and the date validator change even when the swap happens within the same second.
        new_mtime = max(old_mtime + 10, time.time())
        os.utime(tmp, (new_mtime, new_mtime))
        os.replace(tmp, path)

    def _take_faults(self) -> dict[str, Any]:
        """Decide the faults for one request and count it down, atomically.

        Content changes apply here, at the start of a request, so that a client retrying at once
        cannot race the end of the previous request's handler.
        """
        with self._lock:
            f = self._faults
            pending = []
            for count, name, data in f.changes:
                if count <= 0:
                    self._replace(name, data)
                else:
                    pending.append((count - 1, name, data))
            f.changes = pending
            taken = {"ignore_range": f.ignore_range, "range_start_shift": f.range_start_shift,
                     "ignore_if_range": f.ignore_if_range, "body_pause": f.body_pause,
                     "fail": None, "drop": None, "stall": 0.0}
            if f.fail_times > 0:
                f.fail_times -= 1
                taken["fail"] = f.fail_status
            elif f.drop_times > 0:
                f.drop_times -= 1
                taken["drop"] = f.drop_after_bytes
            if f.stall_times > 0:
                f.stall_times -= 1
                taken["stall"] = f.stall_seconds
            return taken

    def _log(self, record: RequestRecord) -> None:
        # Logged on arrival, not on completion: a client may finish reading before the handler ends.
        with self._lock:
            self.requests.append(record)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    controller: FileHTTPServer
    _record: RequestRecord | None = None

    def send_header(self, keyword: str, value: str) -> None:
        if self._record is not None:
            self._record.response_headers[keyword] = value
        super().send_header(keyword, value)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature from the base
        pass  # keep pytest output clean; the controller keeps its own request log

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        record = RequestRecord(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        self.controller._log(record)
        self._record = record
        try:
            self._answer(record, head)
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client went away; nothing more to do

    def _answer(self, record: RequestRecord, head: bool) -> None:
        faults = self.controller._take_faults()
        if faults["stall"]:
            time.sleep(faults["stall"])
        if faults["fail"] is not None:
            self._send_text(record, faults["fail"], "injected failure\n")
            return
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        path = (self.controller.root / name).resolve()
        if path.is_dir() and (path / "index.html").is_file():
            path = path / "index.html"  # a directory answers with its listing page, as web servers do
        if not path.is_file() or self.controller.root.resolve() not in path.parents:
            self._send_text(record, 404, "not found\n")
            return

        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            size = st.st_size
            etag = f'"{size:x}-{st.st_mtime_ns:x}"'
            last_modified = email.utils.formatdate(st.st_mtime, usegmt=True)
            start, end = 0, size - 1
            status = 200
            wanted = None if faults["ignore_range"] else _parse_range(record.range, size)
            if_range = record.if_range
            if wanted is not None and if_range is not None and if_range not in (etag, last_modified) \
                    and not faults["ignore_if_range"]:
                wanted = None  # the client's copy is of another version: send the whole file
            if wanted == "unsatisfiable":
                record.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if wanted is not None:
                start, end = wanted
                start = min(start + faults["range_start_shift"], end)
                status = 206
            length = end - start + 1 if size else 0

            record.status = status
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8" if path.suffix == ".html"
                             else "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", last_modified)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if head:
                return

            limit = length if faults["drop"] is None else min(length, faults["drop"])
            fh.seek(start)
            while record.body_bytes < limit:
                chunk = fh.read(min(_BODY_CHUNK, limit - record.body_bytes))
                if not chunk:
                    break
                record.body_bytes += len(chunk)
                self.wfile.write(chunk)
                if faults["body_pause"]:
                    self.wfile.flush()
                    time.sleep(faults["body_pause"])
            if faults["drop"] is not None:
                # Cut the connection mid-body, as a flaky network or a restarted server would.
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

    def _send_text(self, record: RequestRecord, status: int, text: str) -> None:
        body = text.encode()
        record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _parse_range(value: str | None, size: int) -> tuple[int, int] | str | None:
    """One ``bytes=`` range as (start, end) inclusive, "unsatisfiable", or None to send everything.

    Multi-range and malformed headers are ignored (a full 200 answer is allowed for those).
    """
    if not value or not value.startswith("bytes=") or "," in value:
        return None
    first, _, last = value[len("bytes="):].strip().partition("-")
    try:
        if first == "":  # suffix range: the last N bytes
            count = int(last)
            return (max(size - count, 0), size - 1) if count > 0 and size else "unsatisfiable"
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size:
        return "unsatisfiable"
    if end < start:
        return None
    return start, min(end, size - 1)
