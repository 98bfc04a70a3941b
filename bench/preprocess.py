"""Preprocessing benchmark: raw cc100 + JaWiki files to token ids, the original's way against ours.

    .venv/bin/python -m bench.preprocess --web WEB.txt.xz --wiki WIKI.json.gz --json OUT.json --workers 2
Each path runs timed in its own child (`--run baseline`: preprocess_original.py; `--run ours`), then the ids
of every sentence both produced are compared. bench/README.md gives the full command and every field.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.mecab_limit import decompress_seconds, mecab_limit
from bench.preprocess_original import (
    CC100_MAX_LINES,
    CC100_MAX_VALIDATION_LINES,
    CORPORA,
    ORIGINAL_FILES,
    SEED,
    SPLITS,
    prepare_baseline,
)
from bench.proc_sampler import tree_rss_bytes
from bench.report import emit


def _prepare_ours(args):
    from tinyplm_lib.corpora.cc100 import Cc100Settings, build_cc100_corpus
    from tinyplm_lib.corpora.jawiki import JawikiSettings, build_jawiki_corpus
    from tinyplm_lib.parallel import WorkerPool
    from tinyplm_lib.tokens.shard_writer import encode_corpus

    # 1/32 of the documents for validation, as the original's file 31.
    cc100 = Cc100Settings(max_lines=CC100_MAX_LINES, max_validation_lines=CC100_MAX_VALIDATION_LINES,
                          validation_doc_fraction=1 / ORIGINAL_FILES, seed=SEED)

    def run(stages: dict) -> dict:
        out = args.out

        def timed(name: str, build: Callable[[], object]) -> object:
            started = time.perf_counter()
            result = build()
            stages[name] = time.perf_counter() - started
            return result

        def encode(corpus: str) -> None:
            for split in SPLITS:
                encode_corpus(out / f"{corpus}.{split}.txt", args.tokenizer, out / "tokens" / corpus / split,
                              pool=pool)

        # The two corpora, then the two token sets, at the same time: Dagster's default executor runs
        # independent steps concurrently too. The cc100 step waits on xz (one thread), which leaves
        # cores for JaWiki's parsing.
        with WorkerPool(args.workers) as pool, ThreadPoolExecutor(2) as steps:
            started = time.perf_counter()
            c, w = (f.result() for f in [
                steps.submit(timed, "cc100_corpus", lambda: build_cc100_corpus(
                    args.web, out / "cc100.train.txt", out / "cc100.validation.txt", cc100, pool=pool)),
                steps.submit(timed, "jawiki_corpus", lambda: build_jawiki_corpus(
                    args.wiki, out / "jawiki.train.txt", out / "jawiki.validation.txt", JawikiSettings(seed=SEED),
                    pool=pool))])
            stages["corpora_wall"] = time.perf_counter() - started
            started = time.perf_counter()
            for future in [steps.submit(timed, f"{corpus}_tokens", lambda corpus=corpus: encode(corpus))
                           for corpus in CORPORA]:
                future.result()
            stages["tokens_wall"] = time.perf_counter() - started
        return {"lines_cc100": c.lines_read, "lines_jawiki": w.lines_train + w.lines_validation}

    return run


def run_path(args) -> None:
    """Child process: import (start-up), run one path, write its counts, timings and peak RSS."""
    run = (_prepare_ours if args.run == "ours" else prepare_baseline)(args)
    ready = time.time()
    stages: dict = {}
    result = run(stages)
    finished = time.time()
    own, workers = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    result.update(startup_seconds=ready - args.launched, work_seconds=finished - ready,
                  stages={k: round(v, 3) for k, v in stages.items()},
                  cpu_seconds={"main": round(own.ru_utime + own.ru_stime, 2),
                               "workers": round(workers.ru_utime + workers.ru_stime, 2)},
                  # Linux: ru_maxrss is in KiB; RUSAGE_CHILDREN's is the largest worker's.
                  peak_rss_mb=round(max(own.ru_maxrss, workers.ru_maxrss) / 1024, 1))
    args.result.write_text(json.dumps(result), encoding="utf-8")


def measure_path(name: str, args, work: Path, tokenizer: Path) -> dict:
    out = work / name
    out.mkdir()
    result_file = work / f"{name}.result.json"
    launched = time.time()
    command = [sys.executable, "-m", "bench.preprocess", "--run", name, "--web", str(args.web),
               "--wiki", str(args.wiki), "--tokenizer", str(tokenizer), "--out", str(out),
               "--workers", str(args.workers), "--result", str(result_file),
               "--launched", repr(launched)]
    child = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1])
    peak_tree, stop = [0], threading.Event()

    def sample() -> None:  # summed over processes: shared pages (the MeCab dictionary) count twice
        while not stop.wait(0.25):
            peak_tree[0] = max(peak_tree[0], tree_rss_bytes(child.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = child.wait()
    seconds = time.time() - launched
    stop.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"the {name} path failed (exit code {code})")
    result = json.loads(result_file.read_text(encoding="utf-8"))
    lines = result["lines_cc100"] + result["lines_jawiki"]
    return {
        "lines": lines,
        "lines_cc100_input": result["lines_cc100"],
        "lines_jawiki_sentences": result["lines_jawiki"],
        "seconds": round(seconds, 3),
        "lines_per_s": round(lines / seconds),
        "startup_seconds": round(result["startup_seconds"], 3),
        "lines_per_s_excluding_startup": round(lines / result["work_seconds"]),
        "stages_seconds": result["stages"],
        "cpu_seconds": result["cpu_seconds"],
        "peak_rss_mb": result["peak_rss_mb"],
        "peak_tree_rss_mb": round(peak_tree[0] / 2**20, 1),
        "outputs": result.get("outputs"),
    }


def train_shared_tokenizer(args, work: Path) -> tuple[Path, dict]:
    """The one tokenizer both paths use: the default recipe, on our JaWiki train split."""
    from tinyplm_lib.corpora.jawiki import JawikiSettings, build_jawiki_corpus
    from tinyplm_lib.tokens.tokenizer import TokenizerSettings, sample_sentences, train_tokenizer

    setup = work / "setup"
    started = time.perf_counter()
    build_jawiki_corpus(args.wiki, setup / "train.txt", setup / "validation.txt",
                        JawikiSettings(seed=SEED), workers=args.workers)
    settings = TokenizerSettings(seed=SEED)
    sample_sentences(setup / "train.txt", setup / "sample.txt", settings.sample_size, settings.seed)
    info = train_tokenizer(setup / "sample.txt", setup / "tokenizer", settings, workers=args.workers)
    return setup / "tokenizer", {"vocab_size": info["vocab_size"], "sample_lines": info["sample_lines"],
                                 "segment_seconds": info["segment_seconds"],
                                 "seconds": round(time.perf_counter() - started, 3)}


def compare_ids(ours_dir: Path, baseline_outputs: dict) -> dict:
    """Ids of every sentence both paths produced, compared (keyed by the sentence text)."""
    import numpy as np
    from datasets import Dataset, concatenate_datasets

    from tinyplm_lib.tokens.shards import TokenShards

    ours: dict[int, int] = {}
    for corpus in CORPORA:
        for split in SPLITS:
            shards = TokenShards(ours_dir / "tokens" / corpus / split)
            if shards.meta["dropped"]["no_tokens"]:
                raise SystemExit(f"{corpus}/{split}: lines without tokens; cannot align sentences")
            with open(ours_dir / f"{corpus}.{split}.txt", encoding="utf-8") as handle:
                texts = (line.rstrip("\n") for line in handle)
                for i, text in enumerate(t for t in texts if t.strip()):
                    ours[hash(text)] = hash(shards.sentence(i).tobytes())
    rows = compared = mismatched = 0
    matched: set[int] = set()
    examples = []
    for key, files in baseline_outputs.items():
        texts = concatenate_datasets([Dataset.from_file(p) for p in files["text"]])
        ids = concatenate_datasets([Dataset.from_file(p) for p in files["ids"]])
        kept = (t for batch in texts.iter(batch_size=10_000) for t in batch["text"]
                if len(t) > 0 and not t.isspace())
        for batch in ids.select_columns(["input_ids"]).iter(batch_size=10_000):
            for row in batch["input_ids"]:
                text = next(kept)
                rows += 1
                expected = ours.get(hash(text))
                if expected is None:
                    continue
                compared += 1
                matched.add(hash(text))
                if hash(np.asarray(row[1:-1], dtype=np.uint16).tobytes()) != expected:
                    mismatched += 1
                    if len(examples) < 3:
                        examples.append({"corpus": key, "text": text[:200]})
        if next(kept, None) is not None:
            raise SystemExit(f"{key}: more text rows than token rows")
    return {"baseline_rows": rows, "compared_rows": compared, "mismatched_rows": mismatched,
            "ours_distinct_sentences": len(ours),
            "ours_distinct_sentences_compared": len(matched),
            "compared_fraction_of_ours": round(len(matched) / max(len(ours), 1), 4),
            "mismatch_examples": examples}


def _characters(paths: list[Path]) -> int:
    """Characters of the non-empty lines of `paths` (newlines excluded): the text both paths encode."""
    total = 0
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            total += sum(len(line.rstrip("\n")) for line in handle if line.strip())
    return total


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--web", type=Path, required=True, help="cc100-format .txt.xz")
    parser.add_argument("--wiki", type=Path, required=True, help="CirrusSearch .json.gz")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes per path (default: the cores available)")
    parser.add_argument("--work-dir", type=Path, help="keep outputs here (default: a temporary folder)")
    # Internal: one path in a child process.
    parser.add_argument("--run", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    for name, kind in (("--tokenizer", Path), ("--out", Path), ("--result", Path), ("--launched", float)):
        parser.add_argument(name, type=kind, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.web, args.wiki = args.web.resolve(), args.wiki.resolve()
    if args.run:
        run_path(args)
        return {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="tinyplm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        load_before = os.getloadavg()
        tokenizer, tokenizer_info = train_shared_tokenizer(args, work)
        paths = {name: measure_path(name, args, work, tokenizer) for name in ("baseline", "ours")}
        check = compare_ids(work / "ours", paths["baseline"].pop("outputs"))
        paths["ours"].pop("outputs")
        # The limit, on the lines ours encoded (its four corpus files), while nothing else runs.
        encoded = [work / "ours" / f"{corpus}.{split}.txt" for corpus in CORPORA for split in SPLITS]
        limit = {**mecab_limit(encoded),
                 "decompress": {name: decompress_seconds(p) for name, p in (("web", args.web), ("wiki", args.wiki))}}
        chars = _characters(encoded)
        for measured in paths.values():
            per_worker = measured["lines_per_s"] / args.workers
            chars_per_worker = chars / measured["seconds"] / args.workers
            measured.update(chars=chars, chars_per_s=round(chars / measured["seconds"]),
                            lines_per_s_per_worker=round(per_worker), chars_per_s_per_worker=round(chars_per_worker),
                            fraction_of_limit={
                                "lines": round(per_worker / limit["mecab_lines_per_s_per_core"], 3),
                                "chars": round(chars_per_worker / limit["mecab_chars_per_s_per_core"], 3)})
        report = {
            "command": " ".join(["python -m bench.preprocess"] + (argv or sys.argv[1:])),
            "workers": args.workers,
            "inputs": {name: {"path": str(p), "bytes": p.stat().st_size}
                       for name, p in (("web", args.web), ("wiki", args.wiki))},
            "machine": {"cores_available": len(os.sched_getaffinity(0)),
                        "load_average_before": [round(x, 2) for x in load_before],
                        "load_average_after": [round(x, 2) for x in os.getloadavg()]},
            "tokenizer": tokenizer_info,
            "baseline": paths["baseline"],
            "ours": paths["ours"],
            "limit": limit,
            "speedup": round(paths["ours"]["lines_per_s"] / paths["baseline"]["lines_per_s"], 2),
            # Same ids for every sentence both produced, and that covers 90% of ours at least.
            "ids_identical": check["mismatched_rows"] == 0
                             and check["compared_fraction_of_ours"] >= 0.9,
            "ids_check": check,
        }
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return emit(report, args.json, ensure_ascii=False)


if __name__ == "__main__":
    main()
