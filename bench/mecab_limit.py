"""MeCab's own parsing rate: the physical limit of preprocessing, measured on the lines a run encodes.

    .venv/bin/python -m bench.mecab_limit CORPUS.txt [CORPUS.txt ...] [--max-lines 100000]
Every k-th non-empty line of the given files (one k for all, so the sample keeps the corpora's mix)
goes through `fugashi.GenericTagger` with unidic-lite and `-Owakati` in this one process: nothing but
`parse(line)` is timed. bench.preprocess and bench.scale call `mecab_limit` when their paths are done;
`decompress_seconds` gives the corpus steps' own floor (xz and gzip decode on one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _count_lines(path: Path) -> int:
    count = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            count += block.count(b"\n")
    return count


def sample_lines(paths: list[Path], max_lines: int) -> list[str]:
    """Every k-th non-empty line of `paths`, k the same for all, about `max_lines` in all."""
    total = sum(_count_lines(p) for p in paths)
    step = max(1, -(-total // max_lines))
    lines: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for index, line in enumerate(handle):
                if index % step == 0 and line.strip():
                    lines.append(line.rstrip("\n"))
    return lines


def mecab_limit(paths: list[Path], max_lines: int = 100_000) -> dict:
    """MeCab wakati lines and characters per second on one core, over a sample of `paths`."""
    import fugashi
    import unidic_lite

    tagger = fugashi.GenericTagger(f'-r /dev/null -d "{unidic_lite.DICDIR}" -Owakati')
    lines = sample_lines([Path(p) for p in paths], max_lines)
    if not lines:
        raise SystemExit(f"no non-empty line in {', '.join(map(str, paths))}")
    parse = tagger.parse
    for line in lines[:1000]:  # warm the dictionary's pages and the caches
        parse(line)
    started = time.perf_counter()
    for line in lines:
        parse(line)
    seconds = time.perf_counter() - started
    chars = sum(map(len, lines))
    return {"mecab_lines_per_s_per_core": round(len(lines) / seconds),
            "mecab_chars_per_s_per_core": round(chars / seconds),
            "sample_lines": len(lines), "sample_mean_chars": round(chars / len(lines), 1),
            "seconds": round(seconds, 3), "tagger": "fugashi.GenericTagger unidic-lite -Owakati",
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def decompress_seconds(path: Path) -> dict:
    """Seconds to read a compressed input through once (the corpus steps' single-thread floor)."""
    from tinyplm_lib.corpora.reader import open_raw

    started = time.perf_counter()
    size = 0
    with open_raw(Path(path)) as stream:
        while block := stream.read(1 << 22):
            size += len(block)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "bytes": size, "mb_per_s": round(size / seconds / 1e6, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", type=Path, nargs="+", help="sentence-per-line corpus files")
    parser.add_argument("--max-lines", type=int, default=100_000)
    args = parser.parse_args(argv)
    result = mecab_limit(args.paths, args.max_lines)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
