"""JaWiki pass 1, worker side: a block of CirrusSearch dump lines parsed, cleaned, split and hashed.

`parse_block` runs in a worker process and gives one named outcome per line; the pairing of index
and document lines, which needs the lines before, is left to `jawiki._FirstPass` in the parent.
"""

from __future__ import annotations

import json
import sys
from array import array
from typing import NamedTuple

from tinyplm_lib.corpora.cleaning import clean_wiki_text, has_control_chars, split_sentences
from tinyplm_lib.corpora.dedup import sentence_hash
from tinyplm_lib.corpora.reader import LineBlock
from tinyplm_lib.corpora.records import BadLine, decode_checked


class ParseTask(NamedTuple):
    """Pool task: a block of dump lines and the limits its lines are held to."""

    block: LineBlock
    min_chars: int  # sentence length limits, in characters after cleaning
    max_chars: int
    max_record_bytes: int


class IndexLine(NamedTuple):
    """An `{"index": {...}}` line, announcing the document on the next line."""

    doc_id: object  # the index's "_id" (any JSON value), None when absent


class Sentences(NamedTuple):
    """A namespace-0 article's text, cleaned, split into sentences and length-filtered."""

    found: int  # sentences after splitting
    kept: int  # within [min_chars, max_chars]
    too_short: int
    too_long: int
    blob: bytes  # the kept sentences in UTF-8, each followed by b"\n"
    hashes: bytes  # their `sentence_hash`es, little-endian uint64


class DocumentLine(NamedTuple):
    """A document line: what pass 1 needs of it, computed before its pairing is known."""

    namespace: object  # any JSON value; only an int 0 is an article
    has_page_id: bool
    page_id: object
    has_text: bool  # "text" is a string
    sentences: Sentences | None  # None unless namespace 0 with a string text
    control_chars: bool  # the text held control characters (removed by clean_wiki_text)


# The outcome of one dump line; None for a blank line.
Outcome = BadLine | IndexLine | DocumentLine | None


class ParsedBlock(NamedTuple):
    """Pool result: one outcome per line of the block, in file order."""

    first_line: int
    outcomes: list[Outcome]


def parse_block(task: ParseTask) -> ParsedBlock:
    """Pool task: decode a block, find its bad lines and parse the others."""
    lines, bad = decode_checked(task.block, task.max_record_bytes)
    outcomes = [bad[index] if bad and index in bad else _parse_line(line, task)
                for index, line in enumerate(lines)]
    return ParsedBlock(task.block.first_line, outcomes)


def _parse_line(line: str, task: ParseTask) -> Outcome:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return BadLine("malformed_json", f"malformed JSON ({exc.msg} at column {exc.colno})")
    except (ValueError, RecursionError) as exc:
        # A number over Python's 4,300-digit limit, or "[[[[…" deeper than the parser's stack.
        return BadLine("malformed_json", f"malformed JSON ({str(exc)[:100]})")
    if not isinstance(record, dict):
        return BadLine("not_a_json_object", "expected a JSON object")
    if "index" in record and len(record) == 1:
        index_entry = record["index"]
        return IndexLine(index_entry.get("_id") if isinstance(index_entry, dict) else None)
    return _clean_document(record, task.min_chars, task.max_chars)


def _clean_document(record: dict, min_chars: int, max_chars: int) -> DocumentLine:
    namespace = record.get("namespace")
    text = record.get("text")
    has_page_id = "page_id" in record
    page_id = record.get("page_id")
    if not isinstance(namespace, int) or namespace != 0 or not isinstance(text, str):
        return DocumentLine(namespace, has_page_id, page_id, isinstance(text, str), None, False)
    title = record.get("title") if isinstance(record.get("title"), str) else None
    sentences = split_sentences(clean_wiki_text(text, title=title))
    kept = [s for s in sentences if min_chars <= len(s) <= max_chars]
    too_short = sum(1 for s in sentences if len(s) < min_chars)
    hashes = array("Q", map(sentence_hash, kept))
    if sys.byteorder != "little":  # the dedup step reads little-endian uint64
        hashes.byteswap()
    blob = "".join(s + "\n" for s in kept).encode()
    found = Sentences(len(sentences), len(kept), too_short, len(sentences) - len(kept) - too_short,
                      blob, hashes.tobytes())
    return DocumentLine(namespace, has_page_id, page_id, True, found, has_control_chars(text))
