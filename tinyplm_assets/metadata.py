"""Materialisation metadata helpers: text samples and count tables for the UI."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from dagster import MetadataValue


def text_sample(path: Path, lines: int = 5) -> MetadataValue:
    """The first `lines` lines of a UTF-8 text file, as a markdown block."""
    with open(path, encoding="utf-8") as handle:
        sample = [line.rstrip("\n") for line in islice(handle, lines)]
    return MetadataValue.md("\n".join(f"- {line}" for line in sample) or "(empty)")


def flat_counts(stats: dict, prefix: str = "") -> dict:
    """Numbers of a stats dict as top-level metadata entries (nested dicts flattened)."""
    out: dict = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            out.update(flat_counts(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out
