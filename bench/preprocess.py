"""Preprocessing benchmark: raw cc100 + JaWiki files to token ids, the original's way against ours.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m bench.preprocess \
        --web ../shared/corpora/ja-web-sample.txt.xz \
        --wiki ../shared/corpora/jawiki-sample-cirrussearch-content.json.gz \
        --json bench-preprocess.json --workers 2

One tokenizer is trained up front (not timed), then each path runs in its own process, timed
whole (interpreter start-up and imports included), its peak RSS taken from getrusage over it and
its workers: the original's way (single-process cc100 and JaWiki building, then
BertJapaneseTokenizer through `datasets.map(num_proc=workers)`) and ours (`build_cc100_corpus`,
`build_jawiki_corpus`, `encode_corpus` on one shared WorkerPool). Lines = non-empty cc100 input
lines + JaWiki output sentences, counted the same way for both. `ids_identical`: every sentence
both paths produced got the same ids from both. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CORPORA = ("cc100", "jawiki")
SPLITS = ("train", "validation")
SEED = 42
CC100_MAX_LINES = 128_000_000  # the original's CC100_MAX_SENTENCE_NUM
CC100_MAX_VALIDATION_LINES = 1_000_000  # CC100_MAX_VALIDATION_SENTENCE_NUM
ORIGINAL_FILES = 32  # the original spread documents over 32 files (workers); the last is validation
# The original deduplicated with a per-worker LRU; its size is not recorded. One million
# sentences holds every sentence of the samples, so dedup there is as exact as ours.
ORIGINAL_LRU_SENTENCES = 1_000_000
_ORIGINAL_SPLIT = re.compile(r"(?<=[。?!])")  # the original's splitter: no bracket awareness


# --- the original's way, re-implemented from DESIGN.md section 1 ---------------------------------

def _concatenate(parts: list[Path], out: Path) -> None:
    with open(out, "wb") as target:
        for part in parts:
            with open(part, "rb") as source:
                shutil.copyfileobj(source, target, 1 << 20)
            part.unlink()


def original_cc100(raw: Path, out: Path) -> int:
    """First N non-empty NFKC+strip lines, documents routed to 32 files by a seeded RNG."""
    import lzma
    import random
    import unicodedata

    rng = random.Random(SEED)
    parts = [out / f"cc100-{k:02d}.txt" for k in range(ORIGINAL_FILES)]
    files = [open(p, "w", encoding="utf-8") for p in parts]
    document: list[str] = []
    lines = 0
    with lzma.open(raw, "rt", encoding="utf-8") as handle:
        for raw_line in handle:
            line = unicodedata.normalize("NFKC", raw_line).strip()
            if not line:
                if document:
                    files[rng.randrange(ORIGINAL_FILES)].write("".join(s + "\n" for s in document))
                    document = []
                continue
            document.append(line)
            lines += 1
            if lines >= CC100_MAX_LINES:
                break
    if document:
        files[rng.randrange(ORIGINAL_FILES)].write("".join(s + "\n" for s in document))
    for f in files:
        f.close()
    _concatenate(parts[:-1], out / "cc100.train.txt")
    validation = parts[-1].read_text(encoding="utf-8").splitlines()
    if len(validation) > CC100_MAX_VALIDATION_LINES:  # cut by sampling with replacement (its bug)
        validation = rng.choices(validation, k=CC100_MAX_VALIDATION_LINES)
    (out / "cc100.validation.txt").write_text("".join(s + "\n" for s in validation), encoding="utf-8")
    parts[-1].unlink()
    return lines


def original_jawiki(raw: Path, out: Path) -> int:
    """The original's cleaning, split on 。?!, 10-1000 characters, LRU dedup, article i -> file i % 32."""
    import gzip
    from collections import OrderedDict

    from tinyplm_lib.corpora.cleaning import clean_wiki_text

    parts = [out / f"jawiki-{k:02d}.txt" for k in range(ORIGINAL_FILES)]
    files = [open(p, "w", encoding="utf-8") for p in parts]
    seen: OrderedDict[str, None] = OrderedDict()
    articles = sentences = 0
    with gzip.open(raw, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if "index" in record or record.get("namespace") != 0:
                continue
            text = clean_wiki_text(record.get("text", ""), title=record.get("title"))
            target = files[articles % ORIGINAL_FILES]
            articles += 1
            for sentence in _ORIGINAL_SPLIT.split(text):
                sentence = sentence.strip()
                if not 10 <= len(sentence) <= 1000:
                    continue
                if sentence in seen:
                    seen.move_to_end(sentence)
                    continue
                seen[sentence] = None
                if len(seen) > ORIGINAL_LRU_SENTENCES:
                    seen.popitem(last=False)
                target.write(sentence + "\n")
                sentences += 1
    for f in files:
        f.close()
    _concatenate(parts[:-1], out / "jawiki.train.txt")
    os.replace(parts[-1], out / "jawiki.validation.txt")
    return sentences


def _prepare_baseline(args):
    import datasets
    import transformers
    from datasets import load_dataset
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()  # "could not hash tokenize_function": no cache reuse
    transformers.logging.set_verbosity_error()  # "sequence longer than 512" once per process
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))

    def tokenize_function(examples):  # run_mlm.py --line_by_line
        examples["text"] = [line for line in examples["text"] if len(line) > 0 and not line.isspace()]
        # No truncation, so that every id can be compared; it costs nothing measurable.
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    def run(stages: dict) -> dict:
        out = args.out
        started = time.perf_counter()
        lines_cc100 = original_cc100(args.web, out)
        stages["cc100_corpus"] = time.perf_counter() - started
        started = time.perf_counter()
        lines_jawiki = original_jawiki(args.wiki, out)
        stages["jawiki_corpus"] = time.perf_counter() - started
        outputs = {}
        for corpus in CORPORA:
            started = time.perf_counter()
            # datasets refuses an empty file; a small input can leave file 31 empty.
            files = {split: str(out / f"{corpus}.{split}.txt") for split in SPLITS
                     if (out / f"{corpus}.{split}.txt").stat().st_size}
            raw = load_dataset("text", data_files=files, cache_dir=str(out / "hf-cache"))
            tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"],
                                num_proc=args.workers if args.workers > 1 else None)
            for split in files:
                outputs[f"{corpus}.{split}"] = {
                    "text": [f["filename"] for f in raw[split].cache_files],
                    "ids": [f["filename"] for f in tokenized[split].cache_files],
                }
            stages[f"{corpus}_tokens"] = time.perf_counter() - started
        return {"lines_cc100": lines_cc100, "lines_jawiki": lines_jawiki, "outputs": outputs}

    return run


# --- ours -----------------------------------------------------------------------------------------

def _prepare_ours(args):
    from tinyplm_lib.corpora.cc100 import Cc100Settings, build_cc100_corpus
    from tinyplm_lib.corpora.jawiki import JawikiSettings, build_jawiki_corpus
    from tinyplm_lib.parallel import WorkerPool
    from tinyplm_lib.tokens.shards import encode_corpus

    # 1/32 of the documents for validation, as the original's file 31.
    cc100 = Cc100Settings(max_lines=CC100_MAX_LINES, max_validation_lines=CC100_MAX_VALIDATION_LINES,
                          validation_doc_fraction=1 / ORIGINAL_FILES, seed=SEED)

    def run(stages: dict) -> dict:
        out = args.out
        with WorkerPool(args.workers) as pool:
            started = time.perf_counter()
            c = build_cc100_corpus(args.web, out / "cc100.train.txt", out / "cc100.validation.txt",
                                   cc100, pool=pool)
            stages["cc100_corpus"] = time.perf_counter() - started
            started = time.perf_counter()
            w = build_jawiki_corpus(args.wiki, out / "jawiki.train.txt", out / "jawiki.validation.txt",
                                    JawikiSettings(seed=SEED), pool=pool)
            stages["jawiki_corpus"] = time.perf_counter() - started
            for corpus in CORPORA:
                started = time.perf_counter()
                for split in SPLITS:
                    encode_corpus(out / f"{corpus}.{split}.txt", args.tokenizer,
                                  out / "tokens" / corpus / split, pool=pool)
                stages[f"{corpus}_tokens"] = time.perf_counter() - started
        return {"lines_cc100": c.lines_read, "lines_jawiki": w.lines_train + w.lines_validation}

    return run


# --- one path in its own process ------------------------------------------------------------------

def run_path(args) -> None:
    """Child process: import (start-up), run one path, write its counts, timings and peak RSS."""
    run = (_prepare_ours if args.run == "ours" else _prepare_baseline)(args)
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


def _tree_rss_bytes(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants, from /proc."""
    total, todo = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        current = todo.pop()
        try:
            total += int(Path(f"/proc/{current}/statm").read_text().split()[1]) * page
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


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
            peak_tree[0] = max(peak_tree[0], _tree_rss_bytes(child.pid))

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


# --- setup and comparison -------------------------------------------------------------------------

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
            "ours": {**paths["ours"],
                     "lines_per_s_per_worker": round(paths["ours"]["lines_per_s"] / args.workers)},
            "speedup": round(paths["ours"]["lines_per_s"] / paths["baseline"]["lines_per_s"], 2),
            # Same ids for every sentence both produced, and that covers 90% of ours at least.
            "ids_identical": check["mismatched_rows"] == 0
                             and check["compared_fraction_of_ours"] >= 0.9,
            "ids_check": check,
        }
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=1, ensure_ascii=False)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    print(text)
    return report


if __name__ == "__main__":
    main()
