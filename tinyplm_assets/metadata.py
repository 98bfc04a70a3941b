"""Materialisation metadata for the UI: text samples, count tables, tokenisation samples and the
links from an artifact to the exact artifacts it was made from. Only formatting: the records come
from the library (`tinyplm_lib.tokens.inspection`, the corpus stats, the manifests)."""

from __future__ import annotations

import base64
import hashlib
import json
from itertools import islice
from pathlib import Path

from dagster import AssetKey, MetadataValue

from tinyplm_lib.store.artifacts import read_manifest
from tinyplm_lib.tokens.inspection import shard_tokens, tokenisation_steps


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


def skipped_records(stats: dict) -> dict:
    """The bad-record policy's outcome of a corpus build (`CorpusStats.to_dict()`): the total,
    the counts by reason and the first examples (line, reason, detail), present even when zero
    so that runs compare entry by entry."""
    counts = dict(sorted(stats.get("skipped", {}).items()))
    return {"skipped_total": sum(counts.values()),
            "skipped_records": MetadataValue.json(counts),
            "skipped_examples": MetadataValue.json(list(stats.get("skipped_examples", [])))}


def manifest_digest(manifest: dict) -> str:
    """sha256 of an artifact's manifest: one hash that names the exact files (the IO manager
    reports it as `manifest_sha256`)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def made_from(**inputs: tuple[str, Path]) -> dict:
    """Links to the artifacts an asset was made from: `label=(asset name, loaded path)` gives
    `label` (a link to that asset in the UI) and `label_manifest_sha256` (which version of it:
    equal to the `manifest_sha256` of the upstream materialisation that was used)."""
    out: dict = {}
    for label, (asset_name, path) in inputs.items():
        out[label] = MetadataValue.asset(AssetKey(asset_name))
        out[f"{label}_manifest_sha256"] = manifest_digest(read_manifest(Path(path)))
    return out


def _cell(text: str) -> str:
    # A markdown table cell: a pipe would end the cell (GFM unescapes \| even in code spans),
    # a newline the row.
    return text.replace("|", "\\|").replace("\n", " ")


def _code(token: str) -> str:
    # One code span per token shows where tokens begin and end.
    return f"`` {token} ``" if "`" in token else f"`{token}`"


def tokenisation_sample(tokenizer_dir: Path, sentences: list[str]) -> MetadataValue:
    """Each sentence through the saved tokenizer, step by step: MeCab words, WordPiece tokens,
    ids and the decoded text, as `AutoTokenizer.from_pretrained(folder)` gives them."""
    parts = []
    for number, step in enumerate(tokenisation_steps(tokenizer_dir, sentences), 1):
        rows = [("MeCab words", " ".join(map(_code, step.words))),
                ("WordPiece tokens", " ".join(map(_code, step.tokens))),
                ("ids", " ".join(map(str, step.ids))),
                ("decoded", step.decoded)]
        table = "\n".join(f"| {name} | {_cell(value)} |" for name, value in rows)
        parts.append(f"**{number}.** {_cell(step.sentence)}\n\n| step | result |\n|---|---|\n{table}")
    return MetadataValue.md("\n\n".join(parts) or "(no sentences)")


def decoded_sample(shard_dir: Path, tokenizer_dir: Path, sentences: int = 3) -> MetadataValue:
    """The first sentences of a shard as WordPiece tokens, to eyeball the segmentation."""
    rows = [" ".join(tokens) for tokens in shard_tokens(shard_dir, tokenizer_dir, sentences)]
    return MetadataValue.md("\n".join(f"- `{row}`" for row in rows))


def png_markdown(label: str, png: bytes) -> MetadataValue:
    """A PNG inlined as markdown, so the UI shows it without access to the artifact store."""
    return MetadataValue.md(f"![{label}](data:image/png;base64,{base64.b64encode(png).decode()})")
