"""Build the bundled tinyplm demo corpus from its human-editable sources.

Run from the repository root::

    python data/demo/build.py

It reads ``data/demo/src/web.txt`` (cc100-style plain text) and ``data/demo/src/wiki.txt``
(articles in the source format described in ``data/demo/README.md``), validates both, and
writes, deterministically (byte-identical on every run):

* ``data/demo/demo-cc100.txt.xz`` -- the web text unchanged, xz (preset 9, CRC64), in the
  layout of cc100's ``ja.txt.xz``: one paragraph per line, documents separated by one empty
  line, the file ends with an empty line.
* ``data/demo/demo-jawiki-cirrussearch.json.gz`` -- gzip (level 9, mtime 0, no file name) of
  Elasticsearch bulk lines in the layout of a jawiki CirrusSearch dump: for each article an
  ``{"index":{"_type":"page","_id":"<page_id>"}}`` line, then one JSON document.

Options: ``--web`` / ``--wiki`` pick other source files, ``--out-dir`` another output folder,
``--check`` verifies that the outputs on disk are up to date without writing anything
(exit status 1 when they are not).

Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import sys
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_WEB = HERE / "src" / "web.txt"
DEFAULT_WIKI = HERE / "src" / "wiki.txt"
DEFAULT_OUT_DIR = HERE

CC100_NAME = "demo-cc100.txt.xz"
JAWIKI_NAME = "demo-jawiki-cirrussearch.json.gz"

TIMESTAMP = "2026-01-01T00:00:00Z"

# jawiki namespace numbers -> the namespace_text CirrusSearch writes for them.
NAMESPACES = {
    0: "",
    1: "ノート",
    2: "利用者",
    4: "Wikipedia",
    6: "ファイル",
    8: "MediaWiki",
    10: "Template",
    12: "Help",
    14: "Category",
    100: "Portal",
}

HEADER_RE = re.compile(r"^@@@ (\d+) \| (\d+) \| (\S(?:.*\S)?)$")
HEADING_RE = re.compile(r"^(={2,6}) (\S(?:.*\S)?) \1$")
ESCAPE_RE = re.compile(r"<U\+([0-9A-Fa-f]{4,6})>")
TITLE_FORBIDDEN = set("#<>[]|{}_")


class SourceError(ValueError):
    """A source file does not follow its format; the message names the file and line."""


@dataclass
class Article:
    page_id: int
    namespace: int
    title: str
    line: int  # line number of the header, for messages
    categories: list[str] = field(default_factory=list)
    headings: list[str] = field(default_factory=list)
    lead: list[str] = field(default_factory=list)  # paragraphs before the first heading
    paragraphs: list[str] = field(default_factory=list)  # every body paragraph, in order
    footnotes: list[str] = field(default_factory=list)

    def text(self) -> str:
        # CirrusSearch: plain text on one line, paragraphs joined by single spaces;
        # headings are not part of `text` (they have their own field); the rendered
        # reference list ends up at the end as " ^ ..." items.
        return " ".join(self.paragraphs + self.footnotes)

    def opening_text(self) -> str | None:
        return " ".join(self.lead) if self.lead else None


def _err(path: Path, lineno: int, msg: str) -> SourceError:
    return SourceError(f"{path}:{lineno}: {msg}")


def _check_chars(path: Path, lineno: int, s: str) -> None:
    for ch in s:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cf", "Cs", "Co", "Cn") or ch in "\u2028\u2029":
            raise _err(
                path,
                lineno,
                f"raw control/format character U+{ord(ch):04X}; write it as <U+{ord(ch):04X}>",
            )


def _unescape(path: Path, lineno: int, s: str) -> str:
    def repl(m: re.Match[str]) -> str:
        cp = int(m.group(1), 16)
        if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF or cp in (0x0A, 0x0D):
            raise _err(path, lineno, f"escape {m.group(0)} is not allowed")
        return chr(cp)

    return ESCAPE_RE.sub(repl, s)


def _read_utf8_lines(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SourceError(f"{path}: file not found") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raise SourceError(f"{path}:1: starts with a UTF-8 byte-order mark; remove it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = raw.count(b"\n", 0, exc.start) + 1
        raise SourceError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason})") from None
    if "\r" in text:
        lineno = text.count("\n", 0, text.index("\r")) + 1
        raise SourceError(f"{path}:{lineno}: carriage return found; use LF line ends only")
    if text and not text.endswith("\n"):
        raise SourceError(f"{path}: the last line has no line end")
    return text.split("\n")[:-1] if text else []


# --------------------------------------------------------------------------- web.txt


def read_web(path: Path) -> tuple[bytes, int, int]:
    """Validate the cc100-style source; return (bytes, documents, text lines)."""
    lines = _read_utf8_lines(path)
    if not lines:
        raise SourceError(f"{path}: empty file; at least one document is required")
    if lines[0] == "":
        raise SourceError(f"{path}:1: the file must start with a document, not an empty line")
    if lines[-1] != "":
        raise SourceError(
            f"{path}:{len(lines)}: the file must end with an empty line "
            "(the last document is followed by one empty line, like cc100's ja.txt)"
        )
    docs = 0
    text_lines = 0
    prev_empty = True
    for i, line in enumerate(lines, 1):
        if line == "":
            if prev_empty:
                raise SourceError(
                    f"{path}:{i}: two empty lines in a row; documents are separated by exactly one"
                )
            prev_empty = True
            continue
        if not line.strip():
            raise SourceError(f"{path}:{i}: whitespace-only line; use a truly empty line between documents")
        for ch in line:
            if unicodedata.category(ch) == "Cc" and ch != "\t":
                raise SourceError(f"{path}:{i}: control character U+{ord(ch):04X}")
        if prev_empty:
            docs += 1
        prev_empty = False
        text_lines += 1
    return ("\n".join(lines) + "\n").encode("utf-8"), docs, text_lines


# --------------------------------------------------------------------------- wiki.txt


def parse_wiki(path: Path) -> list[Article]:
    """Parse and validate the article source (see the README for the format)."""
    lines = _read_utf8_lines(path)
    articles: list[Article] = []
    cur: Article | None = None
    seen_ids: dict[int, int] = {}
    seen_titles: dict[tuple[int, str], int] = {}
    in_header_block = False  # directly after the header: @category lines allowed

    def finish(a: Article | None) -> None:
        if a is None:
            return
        if not a.paragraphs:
            raise _err(path, a.line, f"article {a.title!r} has no body paragraph")

    for lineno, line in enumerate(lines, 1):
        if line == "":
            in_header_block = False
            continue
        if line != line.strip(" \u3000"):
            raise _err(path, lineno, "leading or trailing spaces")
        _check_chars(path, lineno, line)
        if line.startswith("#") and cur is None:
            continue
        if line.startswith("@@@"):
            m = HEADER_RE.match(line)
            if not m:
                raise _err(path, lineno, "bad article header; expected '@@@ <page_id> | <namespace> | <title>'")
            finish(cur)
            page_id, ns, title = int(m.group(1)), int(m.group(2)), m.group(3)
            if page_id <= 0 or m.group(1).startswith("0"):
                raise _err(path, lineno, f"bad page_id {m.group(1)!r}; a positive integer without leading zeros")
            if ns not in NAMESPACES:
                raise _err(path, lineno, f"unknown namespace {ns}; known: {sorted(NAMESPACES)}")
            bad = sorted(set(title) & TITLE_FORBIDDEN)
            if bad:
                raise _err(path, lineno, f"title contains characters MediaWiki forbids: {''.join(bad)!r}")
            if page_id in seen_ids:
                raise _err(path, lineno, f"duplicate page_id {page_id} (first on line {seen_ids[page_id]})")
            if (ns, title) in seen_titles:
                raise _err(path, lineno, f"duplicate title {title!r} in namespace {ns} "
                           f"(first on line {seen_titles[(ns, title)]})")
            seen_ids[page_id] = lineno
            seen_titles[(ns, title)] = lineno
            cur = Article(page_id=page_id, namespace=ns, title=title, line=lineno)
            articles.append(cur)
            in_header_block = True
            continue
        if cur is None:
            raise _err(path, lineno, "text before the first '@@@ ...' article header "
                       "(only '#' comment lines may come first)")
        if line.startswith("@category"):
            if not in_header_block:
                raise _err(path, lineno, "@category lines must follow the article header directly")
            if not line.startswith("@category "):
                raise _err(path, lineno, "expected '@category <name>'")
            name = line[len("@category "):].strip()
            if not name or set(name) & TITLE_FORBIDDEN:
                raise _err(path, lineno, f"bad category name {name!r}")
            if name in cur.categories:
                raise _err(path, lineno, f"duplicate category {name!r}")
            cur.categories.append(name)
            continue
        in_header_block = False
        if line.startswith("@"):
            raise _err(path, lineno, f"unknown directive {line.split()[0]!r}; lines starting with '@' are reserved")
        if line.startswith("="):
            m = HEADING_RE.match(line)
            if not m:
                raise _err(path, lineno, "bad heading; expected '== text ==' (2 to 6 '=' on both sides)")
            if cur.footnotes:
                raise _err(path, lineno, "heading after a footnote; footnote lines ('^ ...') must come last")
            cur.headings.append(m.group(2))
            continue
        text = _unescape(path, lineno, line)
        if line.startswith("^"):
            if not line.startswith("^ ") or len(line) < 3:
                raise _err(path, lineno, "footnote lines look like '^ text'")
            cur.footnotes.append(text)
            continue
        if cur.footnotes:
            raise _err(path, lineno, "paragraph after a footnote; footnote lines ('^ ...') must come last")
        cur.paragraphs.append(text)
        if not cur.headings:
            cur.lead.append(text)
    finish(cur)
    if not articles:
        raise SourceError(f"{path}: no articles found")
    return articles


def cirrus_bulk(articles: list[Article]) -> bytes:
    out = io.StringIO()
    for a in articles:
        text = a.text()
        doc = {
            "wiki": "jawiki",
            "namespace": a.namespace,
            "namespace_text": NAMESPACES[a.namespace],
            "title": a.title,
            "timestamp": TIMESTAMP,
            "category": a.categories,
            "text": text,
            "text_bytes": len(text.encode("utf-8")),
            "content_model": "wikitext",
            "language": "ja",
            "heading": a.headings,
            "opening_text": a.opening_text(),
            "page_id": a.page_id,
        }
        index = {"index": {"_type": "page", "_id": str(a.page_id)}}
        for obj in (index, doc):
            line = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
            assert "\n" not in line
            out.write(line + "\n")
    return out.getvalue().encode("utf-8")


# --------------------------------------------------------------------------- output


def xz_bytes(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9)


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        gz.write(data)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--web", type=Path, default=DEFAULT_WEB, help="cc100-style source (default: %(default)s)")
    ap.add_argument("--wiki", type=Path, default=DEFAULT_WIKI, help="article source (default: %(default)s)")
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="output folder (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="verify the outputs are up to date; write nothing")
    args = ap.parse_args(argv)

    try:
        web, n_docs, n_lines = read_web(args.web)
        articles = parse_wiki(args.wiki)
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    outputs = {
        args.out_dir / CC100_NAME: xz_bytes(web),
        args.out_dir / JAWIKI_NAME: gzip_bytes(cirrus_bulk(articles)),
    }
    ns0 = sum(1 for a in articles if a.namespace == 0)
    print(f"web:  {n_docs} documents, {n_lines} text lines, {len(web)} bytes ({args.web})")
    print(f"wiki: {len(articles)} articles ({ns0} in namespace 0, {len(articles) - ns0} in others) ({args.wiki})")

    stale = []
    for path, data in outputs.items():
        digest = hashlib.sha256(data).hexdigest()
        if args.check:
            ok = path.is_file() and path.read_bytes() == data
            print(f"{'ok   ' if ok else 'STALE'} {path} sha256 {digest}")
            if not ok:
                stale.append(path)
        else:
            write_atomic(path, data)
            print(f"wrote {path} ({len(data)} bytes, sha256 {digest})")
    if stale:
        print("error: outputs are out of date; run: python data/demo/build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
