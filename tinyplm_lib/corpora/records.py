"""What a corpus build counts, and its bad-record policy: skip, count by reason, fail past a limit.

`CorpusStats` is the build's exact counts (the asset's metadata); `BadRecords` applies the policy
in file order; `decode_checked` is the worker's half: a block's lines with the bad ones found.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from tinyplm_lib.corpora.reader import LineBlock, decode_block, over_size
from tinyplm_lib.errors import ConfigError, InputError


@dataclass
class CorpusStats:
    """Exact counts of one corpus build; `to_dict()` is what the asset reports as metadata.

    "lines" are output lines: cc100 lines or JaWiki sentences. lines_read == lines_train +
    lines_validation + the line-level drops. `dropped` counts by reason; keys name their unit.
    """

    source: str = ""
    input_lines: int = 0  # physical lines read from the raw file
    documents_read: int = 0
    documents_train: int = 0
    documents_validation: int = 0
    lines_read: int = 0
    lines_train: int = 0
    lines_validation: int = 0
    chars_train: int = 0
    chars_validation: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    # Bad input records (lines) skipped under the bad-record policy, by reason (`BadRecords`),
    # and the first few of them as {"line", "reason", "detail"}.
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[dict[str, object]] = field(default_factory=list)
    # Records kept after their control characters were removed (cc100 lines, JaWiki articles).
    control_char_records: int = 0
    details: dict[str, object] = field(default_factory=dict)  # builder-specific facts
    seconds: float = 0.0

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


MAX_SKIPPED_EXAMPLES = 5


class BadRecords:
    """The bad-record policy of a corpus build: skip, count by reason, fail past a limit.

    `skip()` is called in file order by the process that routes the workers' results, so the
    counts, the examples and the line an error names are the same for any number of workers.
    More than `max_bad_records` skips raise InputError naming the file and the first bad line,
    with the counts by reason; 0 makes every bad record an error.
    """

    def __init__(self, path: Path, stats: CorpusStats, max_bad_records: int) -> None:
        self.path, self.stats, self.max_bad_records = path, stats, max_bad_records
        self.total = 0

    def skip(self, line: int, reason: str, detail: str) -> None:
        stats = self.stats
        stats.skipped[reason] = stats.skipped.get(reason, 0) + 1
        if len(stats.skipped_examples) < MAX_SKIPPED_EXAMPLES:
            stats.skipped_examples.append({"line": line, "reason": reason, "detail": detail})
        self.total += 1
        if self.total > self.max_bad_records:
            first = stats.skipped_examples[0]
            if self.total == 1:
                summary = f"a bad record ({reason}) and max_bad_records is 0"
            else:
                summary = (f"{self.total} bad records, more than max_bad_records "
                           f"({self.max_bad_records}) allows; the last at line {line}; by reason: "
                           f"{dict(sorted(stats.skipped.items()))}")
            raise InputError(self.path, f"{first['detail']} [{summary}]", line=int(first["line"]))

    def summary(self) -> str:
        """' (N bad records skipped: {...})' for messages about what was left, or ''."""
        if not self.total:
            return ""
        noun = "bad record" if self.total == 1 else "bad records"
        return f" ({self.total} {noun} skipped: {dict(sorted(self.stats.skipped.items()))})"


class BadLine(NamedTuple):
    """Why a worker found a line bad, as `BadRecords.skip` takes it."""

    reason: str  # the key counted in CorpusStats.skipped
    detail: str  # the line's own problem, for the error message


def decode_checked(block: LineBlock, max_record_bytes: int) -> tuple[list[str | None], dict[int, BadLine]]:
    """The block's lines (None where not UTF-8), and {index in the block: BadLine} of the bad ones.

    A line is bad when it is not UTF-8 or longer than `max_record_bytes` bytes (including the
    lines the reader already cut, handed out empty).
    """
    lines, invalid = decode_block(block.data)
    bad = {index: BadLine("invalid_utf8", f"invalid UTF-8 at byte {start} of the line")
           for index, start in invalid}
    too_long = over_size(lines, max_record_bytes) + [
        (line_no - block.first_line, size) for line_no, size in block.long_lines.items()]
    for index, size in too_long:
        bad[index] = BadLine("record_too_long",
                             f"line of {size} bytes, over max_record_bytes ({max_record_bytes})")
    return lines, bad


def check_bad_record_policy(max_bad_records: int, max_record_bytes: int) -> None:
    """The two settings of the bad-record policy, as every corpus builder takes them."""
    if max_bad_records < 0:
        raise ConfigError("max_bad_records", f"must be >= 0 (0: any bad line fails), got {max_bad_records}")
    if max_record_bytes < 1:
        raise ConfigError("max_record_bytes", f"must be >= 1, got {max_record_bytes}")
