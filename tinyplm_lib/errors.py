"""Errors that tell the user what to fix: which file, which line, which setting.

Every error tinyplm raises on purpose is a TinyPLMError; workers send them back to the parent intact.
"""

from __future__ import annotations


class TinyPLMError(Exception):
    """Base class of every error tinyplm raises on purpose."""


class InputError(TinyPLMError, ValueError):
    """Bad input data. The message names the file and, where known, the line."""

    def __init__(self, path: object, message: str, line: int | None = None) -> None:
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
        self.reason = message

    def __reduce__(self):  # rebuilt from its own arguments when it crosses a process boundary
        return (type(self), (self.path, self.reason, self.line))


class ConfigError(TinyPLMError, ValueError):
    """A setting out of range or inconsistent with another. The message names the setting."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"setting {setting!r}: {message}")
        self.setting = setting
        self.reason = message

    def __reduce__(self):
        return (type(self), (self.setting, self.reason))


class StorageError(TinyPLMError):
    """An artifact that is missing, incomplete or fails its manifest check."""


class DiskFullError(StorageError):
    """A write that found no room: disk full (ENOSPC), quota (EDQUOT) or file-size limit (EFBIG).

    The message (see `tinyplm_lib.diskspace.disk_errors`) names the path, the space the write needs
    and what is free; `needed`, `free` and `limit` (RLIMIT_FSIZE, for EFBIG) hold the figures in
    bytes, None where unknown.
    """

    def __init__(self, path: object, message: str, needed: int | None, free: int | None,
                 limit: int | None = None) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.reason = message
        self.needed, self.free, self.limit = needed, free, limit

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.needed, self.free, self.limit))
