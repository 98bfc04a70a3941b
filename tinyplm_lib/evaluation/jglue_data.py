"""JGLUE's files and scores: the v1.3 JSON-lines task files read and checked, the predictions file
written and read back, and the metrics computed from predictions alone (numpy, no scipy).

JSTS rows are sentence pairs with a 0-5 similarity; JCommonsenseQA rows a question with five
choices and the index of the right one. Every error names the file, the 1-based line and the field.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tinyplm_lib.errors import InputError

JSTS = "jsts"
JCOMMONSENSEQA = "jcommonsenseqa"
TASKS = (JSTS, JCOMMONSENSEQA)
CHOICES = 5  # JCommonsenseQA is 5-way
JSTS_LABEL_RANGE = (0.0, 5.0)
_GZIP_MAGIC = b"\x1f\x8b"


class Example(NamedTuple):
    """One labelled row: `texts` are the (first, second) segment pairs the model reads.

    JSTS has one pair (sentence1, sentence2); JCommonsenseQA five (question, choiceN), one per
    choice, so both tasks share one tokenizer and batching path.
    """

    id: str | int
    texts: tuple[tuple[str, str], ...]
    label: float | int


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown JGLUE task {task!r}; use one of {', '.join(TASKS)}")
    return task


def read_examples(task: str, path: Path) -> list[Example]:
    """Every row of a JSTS or JCommonsenseQA file (plain or gzip), in file order; empty is an error."""
    parse = _jsts_example if check_task(task) == JSTS else _jcqa_example
    examples, seen = [], {}
    for line_no, row in json_lines(path):
        example = parse(_Row(path, line_no, row))
        if example.id in seen:
            raise InputError(path, f"field 'id': {example.id!r} repeats line {seen[example.id]}", line_no)
        seen[example.id] = line_no
        examples.append(example)
    if not examples:
        raise InputError(path, f"no {task} examples: the file is empty")
    return examples


# sha256 of the JGLUE v1.3 files as the yahoojapan/JGLUE repository publishes them (uncompressed;
# taken from the copies in ../shared/jglue, commit 6f071c0). A score counts as a JGLUE dev score,
# and goes into a model card's model-index, only when the dev file is this one.
JGLUE_V13_SHA256 = {
    (JSTS, "train"): "db6bd653270ac9786759920413a48973164d322998f34dd4ae32202af5e66969",
    (JSTS, "dev"): "7c0bdcb381179f01096c635d058853d96da1e1248d23fe3f5c2beed5dc2d9b1a",
    (JCOMMONSENSEQA, "train"): "9b55fae5ecb3aedd6f8ce5bc09196c3b629864668ec6c18eee4d65c0aa48229e",
    (JCOMMONSENSEQA, "dev"): "0d8d76f3bfa0d174866939882faccdd01fbc2bcd5a76c43748ba0c40a7b3b8d4",
}


def content_sha256(path: Path) -> str:
    """sha256 of a file's content, after gunzip when it is gzip-compressed."""
    with open(path, "rb") as probe:
        compressed = probe.read(2) == _GZIP_MAGIC
    digest = hashlib.sha256()
    with (gzip.open if compressed else open)(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def is_jglue_v13(task: str, split: str, path: Path) -> bool:
    """Whether `path` holds exactly JGLUE v1.3's file for this task and split ("train" or "dev")."""
    return content_sha256(path) == JGLUE_V13_SHA256[(check_task(task), split)]


def json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, JSON object) for every non-blank line of a plain or gzip file."""
    path, line_no = Path(path), 0
    try:
        with open(path, "rb") as probe:
            compressed = probe.read(2) == _GZIP_MAGIC
        opener = gzip.open if compressed else open
        with opener(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if raw.strip():
                    yield line_no, _json_object(path, line_no, raw)
    except FileNotFoundError as exc:
        raise InputError(path, "file not found") from exc
    except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupt gzip stream
        raise InputError(path, f"unreadable after line {line_no}: {exc}") from exc


def _json_object(path: Path, line_no: int, raw: bytes) -> dict:
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 ({exc.reason} at byte {exc.start})", line_no) from exc
    except json.JSONDecodeError as exc:
        raise InputError(path, f"malformed JSON ({exc.msg}, column {exc.colno})", line_no) from exc
    if not isinstance(row, dict):
        raise InputError(path, f"expected a JSON object, got {type(row).__name__}", line_no)
    return row


class _Row:
    """A parsed line with typed field accessors whose errors name the file, line and field."""

    def __init__(self, path: Path, line_no: int, row: dict) -> None:
        self.path, self.line_no, self.row = path, line_no, row

    def error(self, field: str, message: str) -> InputError:
        return InputError(self.path, f"field {field!r}: {message}", self.line_no)

    def get(self, field: str, types: tuple[type, ...], what: str):
        if field not in self.row:
            raise self.error(field, "missing")
        value = self.row[field]
        # bool is an int subclass: true/false is never a valid id, label or score.
        if isinstance(value, bool) or not isinstance(value, types):
            raise self.error(field, f"expected {what}, got {json.dumps(value, ensure_ascii=False)[:40]}")
        return value

    def text(self, field: str) -> str:
        value = self.get(field, (str,), "a string")
        if not value.strip():
            raise self.error(field, "empty text")
        return value

    def ident(self, field: str) -> str | int:
        return self.get(field, (str, int), "a string or integer id")

    def number(self, field: str, low: float, high: float) -> float:
        value = float(self.get(field, (int, float), "a number"))
        if not low <= value <= high:  # also rejects NaN
            raise self.error(field, f"{value} is outside [{low:g}, {high:g}]")
        return value

    def integer(self, field: str, low: int, high: int) -> int:
        value = self.get(field, (int,), "an integer")
        if not low <= value <= high:
            raise self.error(field, f"{value} is outside [{low}, {high}]")
        return value


def _jsts_example(row: _Row) -> Example:
    return Example(id=row.ident("sentence_pair_id"), texts=((row.text("sentence1"), row.text("sentence2")),),
                   label=row.number("label", *JSTS_LABEL_RANGE))


def _jcqa_example(row: _Row) -> Example:
    question = row.text("question")
    texts = tuple((question, row.text(f"choice{index}")) for index in range(CHOICES))
    return Example(id=row.ident("q_id"), texts=texts, label=row.integer("label", 0, CHOICES - 1))


# --- Predictions: one JSON object per dev example, in file order. JSTS: id, label, prediction
# (float); JCommonsenseQA: id, label, prediction (the chosen index) and scores (the 5 logits).


def prediction_rows(task: str, examples: list[Example], outputs: np.ndarray) -> list[dict]:
    """Rows of predictions.jsonl from the model's outputs: (N,) for JSTS, (N, 5) logits for JCQA."""
    rows = []
    for example, output in zip(examples, outputs, strict=True):
        row = {"id": example.id, "label": example.label}
        if check_task(task) == JSTS:
            row["prediction"] = float(output)
        else:
            scores = [float(score) for score in output]
            row["prediction"] = int(np.argmax(scores))
            row["scores"] = scores
        rows.append(row)
    return rows


def predictions_text(rows: list[dict]) -> str:
    # Python's float repr round-trips exactly, so scores recomputed from the file equal the originals.
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def read_predictions(task: str, path: Path) -> list[dict]:
    """The rows of a predictions.jsonl, checked field by field."""
    rows = []
    for line_no, raw in json_lines(path):
        row = _Row(path, line_no, raw)
        if check_task(task) == JSTS:
            parsed = {"label": row.number("label", *JSTS_LABEL_RANGE),
                      "prediction": row.number("prediction", -np.inf, np.inf)}
        else:
            parsed = {"label": row.integer("label", 0, CHOICES - 1),
                      "prediction": row.integer("prediction", 0, CHOICES - 1)}
        rows.append({"id": row.ident("id"), **parsed})
    if not rows:
        raise InputError(path, "no predictions: the file is empty")
    return rows


def recompute_metrics(task: str, predictions_path: Path) -> dict:
    """The scores `finetune` reports, recomputed from predictions.jsonl alone."""
    return score_rows(task, read_predictions(task, predictions_path))


def score_rows(task: str, rows: list[dict]) -> dict:
    """JSTS: Pearson and Spearman; JCommonsenseQA: accuracy; both with the number of examples."""
    labels = np.array([row["label"] for row in rows], dtype=np.float64)
    predictions = np.array([row["prediction"] for row in rows], dtype=np.float64)
    if check_task(task) == JSTS:
        return {"pearson": pearson(labels, predictions), "spearman": spearman(labels, predictions),
                "examples": len(rows)}
    return {"accuracy": accuracy(labels, predictions), "examples": len(rows)}


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r; None where it is undefined (fewer than 2 values, or one side constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson needs two 1-D arrays of one length, got {x.shape} and {y.shape}")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.dot(dx, dx) * np.dot(dy, dy))
    if len(x) < 2 or denominator == 0.0:
        return None
    return float(np.clip(np.dot(dx, dy) / denominator, -1.0, 1.0))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span ([1, 2, 2, 3] -> [1, 2.5, 2.5, 4])."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_run = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    run = np.cumsum(starts_run) - 1
    starts = np.flatnonzero(starts_run)
    ends = np.append(starts[1:], len(values))  # exclusive
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = ((starts + ends - 1) / 2.0 + 1.0)[run]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho: Pearson's r of the average ranks (as scipy.stats.spearmanr computes it)."""
    return pearson(average_ranks(x), average_ranks(y))


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.shape != predictions.shape or labels.size == 0:
        raise ValueError(f"accuracy needs two non-empty arrays of one shape, got {labels.shape} and {predictions.shape}")
    return float(np.mean(labels == predictions))
