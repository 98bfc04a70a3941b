"""Unit tests of the cleaning rules and the bracket-aware sentence splitter (pure functions)."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from tinyplm_lib.corpora.cleaning import clean_wiki_text, normalize_line, split_sentences


def _no_space(text: str) -> str:
    return re.sub(r"\s", "", text)


# --- normalize_line (cc100)


def test_normalize_line_nfkc_and_strip():
    assert normalize_line("\u3000ＡＢＣ１２３ ｶﾀｶﾅ？ \n") == "ABC123 カタカナ?"
    assert normalize_line(" \t\u3000 ") == ""


# --- clean_wiki_text


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("東京は首都である[1][23]。人口は多い[注 1][注釈 3]。", "東京は首都である。人口は多い。"),
        ("全角の参照［１２］も消える。", "全角の参照も消える。"),  # NFKC first, then the rule
        ("要る[要出典]。検証[要検証]。範囲[要出典範囲]。", "要る。検証。範囲。"),
        ("切れた[リンク切れ]。時期[いつ?]。人物[誰？]。", "切れた。時期。人物。"),
        # Other brackets are article text (transcriptions, editorial notes) and stay.
        ("発音は[ˈʃɛtlənd]である。[中略]", "発音は[ˈʃɛtlənd]である。[中略]"),
    ],
)
def test_bracket_tags_removed(raw, expected):
    assert clean_wiki_text(raw) == expected


def test_templates_removed_including_nested():
    assert clean_wiki_text("前{{a|{{b}}}}後") == "前後"
    assert clean_wiki_text("{{x}}一{{y|{{z|{{w}}}}}}二{{v}}") == "一二"
    # An unclosed template is left as text, not guessed at.
    assert clean_wiki_text("未完{{abc の文") == "未完{{abc の文"


def test_breadcrumb_removed_at_start():
    text = "ポータル > 歴史 > 織田信長 織田信長は戦国大名である。"
    assert clean_wiki_text(text, title="織田信長") == "織田信長は戦国大名である。"
    assert clean_wiki_text("地理 > 島 > 佐渡島 佐渡島は島である。") == "佐渡島は島である。"
    # A plain comparison, or a chain that does not end in the title: kept.
    assert clean_wiki_text("不等式 5 > 3 である。") == "不等式 5 > 3 である。"
    assert clean_wiki_text("5 > 3 である。", title="織田信長") == "5 > 3 である。"
    # The chain may not run across a sentence end to reach the title.
    assert clean_wiki_text("前文。 > 織田信長 は人名。", title="織田信長") == "前文。 > 織田信長 は人名。"


def test_footnotes_cut_from_first_caret():
    assert clean_wiki_text("本文である。 ^ 注釈の文。 ^ 別の注") == "本文である。"
    assert clean_wiki_text("指数 a^b は残る。") == "指数 a^b は残る。"


def test_non_printables_and_whitespace():
    # ZWSP and NUL are dropped; tab, newline and U+2028 separate words, so they become spaces.
    assert clean_wiki_text("a\u200bb\tc\nd\x00e\u2028f") == "ab c de f"
    assert clean_wiki_text("  前 \u3000  後 \r\n 末  ") == "前 後 末"


# --- split_sentences


def test_split_on_terminators():
    assert split_sentences("今日は晴れ。明日は雨。 あさっては?") == [
        "今日は晴れ。",
        "明日は雨。",
        "あさっては?",
    ]


def test_terminator_runs_stay_together():
    assert split_sentences("本当?!そうだ!!まさか。。。終わり") == ["本当?!", "そうだ!!", "まさか。。。", "終わり"]
    assert split_sentences("本当？！うん。") == ["本当？！", "うん。"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("彼は「本当か。嘘だろう!」と言った。次の文。", ["彼は「本当か。嘘だろう!」と言った。", "次の文。"]),
        ("書名は『一。二?』である。次。", ["書名は『一。二?』である。", "次。"]),
        ("例(注意。後述)です。次。", ["例(注意。後述)です。", "次。"]),
        ("例（注意。後述）です。次。", ["例（注意。後述）です。", "次。"]),
        ("「外『内。』外。」後。次。", ["「外『内。』外。」後。", "次。"]),
    ],
)
def test_no_split_inside_brackets(text, expected):
    assert split_sentences(text) == expected


def test_closing_marks_after_terminator_stay():
    # A stray closer right after a terminator belongs to the sentence it closes.
    assert split_sentences("終わり。」次の文。』") == ["終わり。」", "次の文。』"]


def test_unbalanced_opener_does_not_swallow_text():
    assert split_sentences("「開いたまま。次の文。最後。") == ["「開いたまま。", "次の文。", "最後。"]
    # A mismatched inner opener is ignored; the outer pair still protects its content.
    assert split_sentences("(a「b。c)d。e。") == ["(a「b。c)d。", "e。"]
    # A bracket pair longer than the limit protects nothing.
    long_quote = "「" + "あ。" * 10 + "」"
    assert len(split_sentences(long_quote, max_bracket_chars=5)) == 10


def test_strip_and_drop_empty():
    assert split_sentences("  一。   二。  \t ") == ["一。", "二。"]
    assert split_sentences("   ") == []


def test_no_text_lost_on_real_wiki_text(wiki_sample):
    checked = 0
    with gzip.open(wiki_sample, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if line_no % 2 == 0:
                continue  # index lines
            record = json.loads(line)
            text = clean_wiki_text(record["text"], title=record["title"])
            sentences = split_sentences(text)
            assert _no_space("".join(sentences)) == _no_space(text)
            assert all(s == s.strip() and s for s in sentences)
            checked += 1
            if checked == 300:
                break
    assert checked == 300
