"""Text cleaning and sentence splitting for the Japanese corpora.

`normalize_line` is the whole of the cc100 cleaning (control characters out, NFKC, strip);
`clean_wiki_text` applies the original's JaWiki rules to a CirrusSearch `text` field;
`split_sentences` cuts on 。?! outside 「」『』() （） brackets. Pure functions, no I/O.
"""

from __future__ import annotations

import re
import unicodedata

# tests/test_properties.py states what each of these functions may remove, and checks it.

# --- JaWiki cleaning rules (the original's, in its order). All patterns assume NFKC text, so
# full-width ［］？｛｝＾ have already become their ASCII forms. Bracketed patterns never cross
# another bracket, so one unclosed "[" cannot eat the text up to some unrelated "]".

# Reference markers left by the renderer: [1], [12], and note markers [注 1], [注釈 3], [注 a].
_CITATION = re.compile(r"\[(?:\d{1,4}|(?:注釈|脚注|注)\s*[0-9A-Za-z]{1,4})\]")
# Maintenance tags: [要出典], [要検証], [要出典範囲] ... every "[要…]" tag.
_NEEDS_TAG = re.compile(r"\[要[^\[\]]{0,30}\]")
# Dead-link and question tags: [リンク切れ], [いつ?], [誰?], [どこ?] ...
_QUESTION_TAG = re.compile(r"\[(?:リンク切れ|[^\[\]]{1,30}\?)\]")
# Innermost template leftover; applied repeatedly so {{a|{{b}}}} goes from the inside out.
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
# A navigation breadcrumb "Portal > Section > Title" that some pages start with. Without the
# title only a chain of at least two " > " separators of space-free segments counts, so that
# ordinary text such as "5 > 3 である" survives.
_BREADCRUMB_NO_TITLE = re.compile(r"^\s*(?:[^\s>]{1,50} > ){2,}[^\s>]{1,100}(?=\s|$)")
_FOOTNOTES = " ^ "  # the rendered notes section starts with " ^ " and runs to the end of text
_WHITESPACE = re.compile(r"\s+")
# Control characters (Unicode Cc) that are not whitespace: C0 but tab..CR and U+001C..U+001F,
# DEL, C1 but NEL. MeCab reads C strings, so a NUL silently ended a line's text there; the others
# are noise. NFKC never produces one (checked on every code point), so removing them first is enough.
CONTROL_CHARS = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")


def has_control_chars(text: str) -> bool:
    """True if `text` holds a character CONTROL_CHARS matches (whitespace controls do not count)."""
    return not text.isprintable() and CONTROL_CHARS.search(text) is not None


def normalize_line(text: str) -> str:
    """NFKC-normalise and strip one line, control characters removed first (see CONTROL_CHARS).

    The original's cc100 cleaning was NFKC + strip; removing controls before NFKC (not after)
    keeps the result NFKC-normalised, e.g. for "e\\x00\\u0301".
    """
    if has_control_chars(text):
        text = CONTROL_CHARS.sub("", text)
    return unicodedata.normalize("NFKC", text).strip()


def _drop_non_printable(text: str) -> str:
    # Most article text is already printable: test once in C before walking characters.
    if text.isprintable():
        return text
    # Whitespace-like characters (tab, newline, U+2028 ...) separate words, so they become a
    # space; other non-printables (controls, zero-width marks, private use) are dropped.
    return "".join(c if c.isprintable() else (" " if c.isspace() else "") for c in text)


def clean_wiki_text(text: str, title: str | None = None) -> str:
    """Clean one CirrusSearch article `text` with the original's rules; returns one line.

    `title`, when given, anchors breadcrumb removal ("X > Y > Title" at the start) exactly as the
    original did; without it only an unambiguous chain of two or more separators is removed.
    """
    text = unicodedata.normalize("NFKC", text)
    text = _drop_non_printable(text)
    text = _CITATION.sub("", text)
    text = _NEEDS_TAG.sub("", text)
    # Nested templates: each pass removes the innermost level; stop when nothing changes.
    while "{{" in text:
        reduced = _TEMPLATE.sub("", text)
        if reduced == text:
            break  # an unclosed "{{" is left as text rather than guessed at
        text = reduced
    if title:
        title = unicodedata.normalize("NFKC", title).strip()
        # The pattern can only match where " > title" occurs: most articles skip compiling it
        # (one regex per title was a tenth of the JaWiki cleaning time).
        if f" > {title}" in text:
            crumb = re.compile(r"^\s*[^。]{1,200}? > " + re.escape(title) + r"(?=\s|$)")
            text = crumb.sub("", text, count=1)
    else:
        text = _BREADCRUMB_NO_TITLE.sub("", text, count=1)
    cut = text.find(_FOOTNOTES)
    if cut >= 0:
        text = text[:cut]
    text = _QUESTION_TAG.sub("", text)
    # Again: a removed tag or invisible character can leave a base letter before a combining mark
    # ("e[1]\u0301" -> "e\u0301"), which NFKC composes; without this the output was not NFKC and a
    # second cleaning changed it. Cheap: CPython returns normalised text after a quick check.
    text = unicodedata.normalize("NFKC", text)
    return _WHITESPACE.sub(" ", text).strip()


# --- Sentence splitting. Terminators are checked in both widths so that text which skipped NFKC
# still splits; the pipeline always normalises first.
_OPENERS = {"「": "」", "『": "』", "(": ")", "（": "）"}
_CLOSER_TO_OPENER = {close: open_ for open_, close in _OPENERS.items()}
_BRACKET = re.compile(r"[「」『』()（）]")
# A run of terminators ("?!", "。。") plus closing marks right after it ends one sentence.
_TERMINATOR_RUN = re.compile(r"[。｡?？!！]+[」』)）】〕”’]*")


def _bracket_spans(text: str, max_bracket_chars: int) -> list[tuple[int, int]]:
    """Top-level (start, end) index pairs of matched brackets, in order."""
    stack: list[tuple[str, int]] = []
    spans: list[tuple[int, int]] = []
    for match in _BRACKET.finditer(text):
        char, pos = match.group(), match.start()
        if char in _OPENERS:
            stack.append((char, pos))
            continue
        opener = _CLOSER_TO_OPENER[char]
        for depth in range(len(stack) - 1, -1, -1):
            if stack[depth][0] == opener:
                # Openers above the match never closed: they are dropped, i.e. ignored, so an
                # unbalanced "「" cannot protect (swallow) the rest of the text.
                start = stack[depth][1]
                del stack[depth:]
                if pos - start <= max_bracket_chars:
                    spans.append((start, pos))
                break
        # A closer with no opener is plain text.
    spans.sort()
    top: list[tuple[int, int]] = []
    for start, end in spans:
        if top and start < top[-1][1]:
            continue  # nested inside the previous top-level span
        top.append((start, end))
    return top


def split_sentences(text: str, max_bracket_chars: int = 1000) -> list[str]:
    """Split on 。?! runs outside brackets; strip each sentence and drop empty ones.

    Brackets are 「」『』() （）. Unmatched openers and closers are ignored, and so is a pair
    spanning more than `max_bracket_chars` (such a "sentence" would exceed any length limit).
    """
    spans = _bracket_spans(text, max_bracket_chars)
    sentences: list[str] = []
    start = 0
    span_index = 0
    for match in _TERMINATOR_RUN.finditer(text):
        pos = match.start()
        while span_index < len(spans) and spans[span_index][1] < pos:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] < pos:
            continue  # inside a bracket: not a sentence end
        end = match.end()
        sentence = text[start:end].strip()
        if sentence:
            sentences.append(sentence)
        start = end
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences
