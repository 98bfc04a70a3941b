"""The original project's preprocessing, re-implemented from DESIGN.md section 1: the baseline path.

`python -m bench.preprocess` runs it in a child (`--run baseline`): single-process cc100 and JaWiki
corpus building into 32 files (the last is validation), then run_mlm.py's `--line_by_line`
tokenisation through `datasets.map(num_proc=workers)` with BertJapaneseTokenizer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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


def prepare_baseline(args):
    """Imports (timed as start-up), then `run(stages)`: both corpora the original's way, then tokens."""
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
