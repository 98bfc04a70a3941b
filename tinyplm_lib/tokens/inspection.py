"""A saved tokenizer and its token shards, shown step by step for a reader to check by eye.

`tokenisation_steps` walks sentences through the folder as `AutoTokenizer.from_pretrained(folder)`
does (MeCab words, WordPiece tokens, ids, decoded text); `shard_tokens` turns the first sentences
of a shard folder back into WordPiece tokens. The asset metadata formats these records for the UI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TokenisationStep:
    """One sentence through the tokenizer: what each stage of it gives."""

    sentence: str
    words: tuple[str, ...]  # MeCab (fugashi + unidic-lite) words, after NFKC
    tokens: tuple[str, ...]  # WordPiece tokens of those words
    ids: tuple[int, ...]
    decoded: str  # the ids decoded again: the text back, with spaces between words


def tokenisation_steps(tokenizer_dir: Path, sentences: list[str]) -> list[TokenisationStep]:
    """Each sentence through the saved tokenizer folder, one record per sentence."""
    # Imported here: transformers and MeCab load in seconds, and only the tokenizer step needs them.
    from tinyplm_lib.tokens.encoding import MecabSegmenter
    from tinyplm_lib.tokens.tokenizer import load_tokenizer

    tokenizer, segmenter = load_tokenizer(tokenizer_dir), MecabSegmenter()
    steps = []
    for sentence in sentences:
        tokens = tokenizer.tokenize(sentence)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        steps.append(TokenisationStep(sentence, tuple(segmenter.words(sentence)), tuple(tokens), tuple(ids),
                                      tokenizer.decode(ids)))
    return steps


def shard_tokens(shard_dir: Path, tokenizer_dir: Path, sentences: int = 3) -> list[list[str]]:
    """The first `sentences` sentences of a shard folder as WordPiece tokens."""
    from tinyplm_lib.tokens.shards import TokenShards
    from tinyplm_lib.tokens.tokenizer import load_tokenizer

    shards, tokenizer = TokenShards(shard_dir), load_tokenizer(tokenizer_dir)
    return [tokenizer.convert_ids_to_tokens(shards.sentence(i).tolist())
            for i in range(min(sentences, shards.num_sentences))]
