"""A benchmark's report: written as indented JSON to `--json` (when given) and printed."""

from __future__ import annotations

import json
from pathlib import Path


def emit(report: dict, path: Path | None, *, ensure_ascii: bool = True) -> dict:
    text = json.dumps(report, indent=1, ensure_ascii=ensure_ascii)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
    print(text)
    return report
