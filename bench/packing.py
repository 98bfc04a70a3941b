"""Packing benchmark: greedy packing of a corpus-sized list of sentence lengths, and batch reading.

    .venv/bin/python -m bench.packing --sentences 100000000 --json OUT.json [--shards DIR] [--lengths-from DIR]
Packs seeded lengths (lognormal around 30 tokens, or resampled from a shard set) at 512 with `pack_sentences`,
against the original per-sentence loop on a prefix; then times `PackedSequences.batch` on `--shards`.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import emit
from tinyplm_lib.tokens.shards import TokenShards
from tinyplm_lib.training.packing import PackedSequences, pack_sentences

GENERATION_BLOCK = 10_000_000  # lengths drawn per block: float64 temporaries stay ~80 MB


def baseline_pack_sentences(lengths: np.ndarray, max_seq_length: int) -> np.ndarray:
    """BASELINE: `pack_sentences` before 2026-12-04 (a Python loop per sentence), kept for comparison."""
    ranges: list[tuple[int, int]] = []
    budget = max_seq_length - 1
    start, used = 0, 0
    for index, length in enumerate(lengths.tolist()):
        cost = length + 1
        if index > start and used + cost > budget:
            ranges.append((start, index))
            start, used = index, 0
        used += cost
    if len(lengths) > start:
        ranges.append((start, len(lengths)))
    return np.asarray(ranges, dtype=np.int64).reshape(-1, 2)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def draw_lengths(count: int, seed: int, shards: Path | None) -> tuple[np.ndarray, str]:
    """int32 sentence lengths: resampled from `shards`, else lognormal (median 25, mean ~30, 1..600)."""
    rng = np.random.default_rng(seed)
    real = TokenShards(shards).lengths() if shards is not None else None
    lengths = np.empty(count, dtype=np.int32)
    for first in range(0, count, GENERATION_BLOCK):
        size = min(GENERATION_BLOCK, count - first)
        if real is not None:
            lengths[first:first + size] = rng.choice(real, size)
        else:
            lengths[first:first + size] = np.clip(rng.lognormal(np.log(25.0), 0.6, size), 1, 600)
    source = f"resampled from {shards} ({len(real)} sentences)" if real is not None else "lognormal(ln 25, 0.6), 1..600"
    return lengths, source


def time_packing(lengths: np.ndarray, max_seq_length: int, baseline_sentences: int) -> dict:
    """The new packing on every length, then both on a prefix: seconds, peak RSS and the speed ratio."""
    rss_before = peak_rss_mb()
    started = time.perf_counter()
    bounds = pack_sentences(lengths, max_seq_length)
    seconds = time.perf_counter() - started
    report = {"sentences": len(lengths), "sequences": len(bounds) - 1, "seconds": round(seconds, 3),
              "sentences_per_s": round(len(lengths) / seconds), "bounds_dtype": str(bounds.dtype),
              "peak_rss_mb_before": rss_before, "peak_rss_mb": peak_rss_mb(),
              "mean_tokens_per_sequence": round(float(lengths.sum(dtype=np.int64) + 2 * len(lengths))
                                                / max(1, len(bounds) - 1), 1)}
    del bounds
    prefix = lengths[:baseline_sentences]
    started = time.perf_counter()
    reference = baseline_pack_sentences(prefix, max_seq_length)
    baseline_seconds = time.perf_counter() - started
    started = time.perf_counter()
    bounds = pack_sentences(prefix, max_seq_length)
    new_seconds = time.perf_counter() - started
    report["prefix"] = {"sentences": len(prefix), "baseline_seconds": round(baseline_seconds, 3),
                        "new_seconds": round(new_seconds, 3), "speedup": round(baseline_seconds / new_seconds, 1),
                        "identical": bool(np.array_equal(reference[:, 0], bounds[:-1])
                                          and (len(reference) == 0 or reference[-1, 1] == bounds[-1]))}
    return report


def time_batches(shards: Path, max_seq_length: int, batch_size: int, batches: int, seed: int) -> dict:
    """Sequences/s of `PackedSequences.batch` on random batches, and of the original in-RAM matrix."""
    started = time.perf_counter()
    packed = PackedSequences(shards, max_seq_length, cls_id=2, sep_id=3, pad_id=0)
    build_seconds = time.perf_counter() - started
    order = np.random.default_rng(seed).permutation(len(packed))
    chosen = [order[np.arange(i * batch_size, (i + 1) * batch_size) % len(order)] for i in range(batches)]
    # The original's batch path (one fancy index into a RAM matrix of every sequence), for reference.
    matrix = np.zeros((len(packed), max_seq_length), dtype=np.uint16)
    for first in range(0, len(packed), 1024):
        ids = packed.batch(np.arange(first, min(first + 1024, len(packed))))[0]
        matrix[first:first + len(ids), :ids.shape[1]] = ids.numpy()

    def matrix_batch(indices):
        lengths = packed.seq_lengths[indices].astype(np.int64)
        ids = torch.from_numpy(matrix[indices, :int(lengths.max())].astype(np.int64))
        return ids, (torch.arange(ids.shape[1])[None, :] < torch.from_numpy(lengths)[:, None]).long()

    report = {"shards": str(shards), "sequences": len(packed), "batch_size": batch_size, "batches": batches,
              "build_seconds": round(build_seconds, 3), "index_bytes_per_sequence":
              packed.sentence_bounds.itemsize + packed.seq_lengths.itemsize}
    for name, read in (("mapped_shards", packed.batch), ("baseline_ram_matrix", matrix_batch)):
        started, tokens = time.perf_counter(), 0
        for indices in chosen:
            tokens += int(read(indices)[1].sum())
        seconds = time.perf_counter() - started
        report[name] = {"sequences_per_s": round(batches * batch_size / seconds),
                        "tokens_per_s": round(tokens / seconds)}
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=100_000_000, help="sentence lengths to pack")
    parser.add_argument("--baseline-sentences", type=int, default=5_000_000,
                        help="prefix packed by both the per-sentence baseline and the new code")
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--lengths-from", type=Path, help="a token shard folder whose sentence lengths are resampled")
    parser.add_argument("--shards", type=Path, help="a token shard folder to read batches from")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, required=True)
    opts = parser.parse_args(argv)
    load_before = os.getloadavg()
    lengths, source = draw_lengths(opts.sentences, opts.seed, opts.lengths_from)
    report: dict = {"max_seq_length": opts.max_seq_length, "lengths": source,
                    "mean_sentence_tokens": round(float(lengths.mean()), 2),
                    "packing": time_packing(lengths, opts.max_seq_length, opts.baseline_sentences)}
    del lengths
    if opts.shards is not None:
        report["batches"] = time_batches(opts.shards, opts.max_seq_length, opts.batch_size, opts.batches, opts.seed)
    report["machine"] = {"python": sys.version.split()[0], "numpy": np.__version__, "platform": platform.platform(),
                         "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
                         "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    return emit(report, opts.json)


if __name__ == "__main__":
    main()
