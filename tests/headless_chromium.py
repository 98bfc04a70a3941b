"""A headless Chromium driven over the DevTools protocol, for browser tests of the Dagster UI.

``with HeadlessChromium(width=2400, height=1600) as page: page.goto(url); page.wait_for(js)``
talks CDP over ``--remote-debugging-pipe`` (fds 3 and 4, NUL-separated JSON), so no port and no
websocket library is needed. The browser is Debian's ``chromium`` (``apt-get install chromium``).
"""

from __future__ import annotations

import base64
import fcntl
import itertools
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


def _move_above_9(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


class BrowserError(RuntimeError):
    """Chromium exited, a DevTools command failed, or the page never reached the awaited state."""


class HeadlessChromium:
    """One browser with one page (tab) of ``width`` × ``height`` CSS pixels; a context manager."""

    def __init__(self, width: int = 1600, height: int = 1000, executable: str | None = None) -> None:
        self.width, self.height = width, height
        self.executable = executable or chromium_path()
        if self.executable is None:
            raise BrowserError("no chromium executable on PATH (Debian: apt-get install chromium)")
        self._ids = itertools.count(1)
        self._buffer = b""
        self._session: str | None = None
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        self._log = tempfile.TemporaryFile()
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> HeadlessChromium:
        commands_r, self._commands_w = os.pipe()
        self._replies_r, replies_w = os.pipe()
        # Move the child's ends above 9 so that neither is already fd 3 or 4 when bash moves them.
        commands_r, replies_w = (_move_above_9(fd) for fd in (commands_r, replies_w))
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
                f"--user-data-dir={self._profile.name}", "--remote-debugging-pipe", "about:blank"]
        # Chromium reads commands on fd 3 and writes replies on fd 4; the shell puts the pipes there.
        script = f'exec "$0" "$@" 3<&{commands_r} 4>&{replies_w} {commands_r}<&- {replies_w}>&-'
        self._process = subprocess.Popen(["bash", "-c", script, self.executable, *args], pass_fds=(commands_r, replies_w),
                                         stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                         start_new_session=True)
        os.close(commands_r)
        os.close(replies_w)
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
            self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                      session=False)["sessionId"]
            self.send("Page.enable")
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.__exit__(None, None, None)  # `with` calls __exit__ only once __enter__ has returned
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            if self._process is not None and self._process.poll() is None:
                try:
                    self.send("Browser.close", session=False, timeout=10)
                except BrowserError:
                    pass
                try:
                    self._process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self._process.pid, 9)
                    self._process.wait(timeout=10)
        finally:
            os.close(self._commands_w)
            os.close(self._replies_r)
            self._log.close()
            self._profile.cleanup()

    # -- DevTools protocol ------------------------------------------------------------------------

    def send(self, method: str, params: dict | None = None, *, session: bool = True, timeout: float = 60) -> dict:
        """Send one command and wait for its reply (events arriving meanwhile are dropped)."""
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session and self._session:
            message["sessionId"] = self._session
        try:
            os.write(self._commands_w, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise BrowserError(f"chromium exited before {method}: {self.log_tail()}") from None
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline, method)
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read_message(self, deadline: float, waiting_for: str) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"no DevTools reply to {waiting_for} in time")
            ready, _, _ = select.select([self._replies_r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._replies_r, 1 << 20)
                if not chunk:
                    raise BrowserError(f"chromium exited while waiting for {waiting_for}: {self.log_tail()}")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def log_tail(self, size: int = 3000) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-size:]

    # -- page helpers ----------------------------------------------------------------------------

    def goto(self, url: str) -> None:
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"{url}: {result['errorText']}")

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}…: {result['exceptionDetails'].get('text')}: "
                               f"{result['result'].get('description', '')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, interval: float = 0.5) -> Any:
        """Poll ``expression`` until it returns a truthy value; BrowserError with the last value after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"after {timeout} s still falsy ({value!r}): {expression[:200]}")
            time.sleep(interval)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
