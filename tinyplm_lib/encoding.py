"""Fast encoding: MeCab segmentation plus a Rust WordPiece, id-for-id equal to BertJapaneseTokenizer.

`BertJapaneseTokenizer` runs its WordPiece in Python; `FastEncoder` segments with the same fugashi
tagger (unidic-lite) and hands the words to a `tokenizers` WordPiece with a `WhitespaceSplit`
pre-tokenizer, so token shards can be built several times faster with identical ids.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer

from tinyplm_lib.errors import InputError

# File names inside a tokenizer folder. `wordpiece.json` is not a name AutoTokenizer looks for, so
# the folder still loads as the slow BertJapaneseTokenizer while the fast path reads the same vocab.
VOCAB_FILE = "vocab.txt"
CONFIG_FILE = "tokenizer_config.json"
WORDPIECE_FILE = "wordpiece.json"
UNK_TOKEN = "[UNK]"
MISSING_HINT = "missing; is this a folder written by train_tokenizer?"
# Entries of FastEncoder's word -> ids table before it is cleared: ~200 bytes each, so ~40 MB.
WORD_CACHE_SIZE = 200_000


class MecabSegmenter:
    """NFKC, then MeCab (fugashi + unidic-lite) surface forms, as one space-joined string.

    Built exactly like transformers' `MecabTokenizer(mecab_dic="unidic_lite")`, plus `-Owakati`:
    wakati output equalled the node surfaces on 49,730/49,730 real sentences and 20,000 random
    strings, and runs 31k sentences/s against 21k for node objects (measured here, one core).
    """

    def __init__(self) -> None:
        import fugashi
        import unidic_lite

        dic_dir = unidic_lite.DICDIR
        mecabrc = os.path.join(dic_dir, "mecabrc")
        self._tagger = fugashi.GenericTagger(f'-d "{dic_dir}" -r "{mecabrc}" -Owakati')

    def words(self, text: str) -> list[str]:
        """The words of `text`, after NFKC, as MecabTokenizer does first.

        `str.split()` splits MeCab's output on every character Python calls whitespace:
        BertJapaneseTokenizer's WordPiece splits its words the same way, and Rust's
        `WhitespaceSplit` knows a subset of them (not U+001C..U+001F), so both WordPiece
        implementations receive identical words.
        """
        normalized = unicodedata.normalize("NFKC", text)
        if not normalized:
            return []
        return self._tagger.parse(normalized).split()

    def segment(self, text: str) -> str:
        """The words of `text` separated by single spaces ("" when it holds none)."""
        return " ".join(self.words(text))


def map_in_order(func: Callable, items: Iterable, *, workers: int, initializer: Callable,
                 initargs: tuple = ()) -> Iterator:
    """`func(item)` for every item, computed by `workers` processes, yielded in input order.

    Workers hold the MeCab tagger / encoder that `initializer` builds (neither pickles). At most
    2 * workers items are in flight, so a corpus streams through in flat memory (Pool.imap would
    read its input ahead without bound). With one worker everything runs in this process.
    """
    if workers == 1:
        initializer(*initargs)
        yield from map(func, items)
        return
    # spawn, not fork: the caller may hold threads (Dagster, the Rust pool of tokenizers).
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(func, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def read_vocab(vocab_path: Path) -> dict[str, int]:
    """vocab.txt as transformers' `load_vocab` reads it (a repeated token keeps its last id)."""
    vocab: dict[str, int] = {}
    with open(vocab_path, encoding="utf-8") as handle:
        for index, line in enumerate(handle.readlines()):
            vocab[line.rstrip("\n")] = index
    return vocab


class FastEncoder:
    """Encode text to WordPiece ids without [CLS]/[SEP], equal to BertJapaneseTokenizer's.

    Literal special strings in raw text ("[MASK]", "[unused3]", …: every added token of the saved
    tokenizer) are split out before NFKC and MeCab and map to their own ids, as the slow
    tokenizer's added-token trie does. A full-width "［MASK］" is not one of them: NFKC turns it
    into "[MASK]" only after that split, so both tokenizers give "[", "MASK", "]".
    """

    def __init__(self, wordpiece: Tokenizer, special_tokens: dict[str, int]) -> None:
        # Only the model is used: NFKC and word splitting happen in MecabSegmenter, in Python, as in
        # MecabTokenizer. The Rust NFKC of tokenizers 0.23 uses older tables than Python 3.11
        # (Unicode 14.0): 72 code points differ, e.g. Python maps ㋿ (U+32FF) to 令和 and Rust keeps
        # it. Rust's NFKC leaves Python-NFKC text unchanged (checked on every code point), so the
        # normalizer saved in wordpiece.json is harmless for training and for other readers.
        model = wordpiece.model
        if (model.continuing_subword_prefix, model.max_input_chars_per_word) != ("##", 100):
            # BertJapaneseTokenizer's WordpieceTokenizer hard-codes both.
            raise ValueError("the WordPiece model must use the '##' prefix and 100 characters per word")
        self._wordpiece = wordpiece
        self._model = model
        self._word_ids: dict[str, tuple[int, ...]] = {}
        self._segmenter = MecabSegmenter()
        self._special_ids = dict(special_tokens)
        # Longest first, so one special string that is a prefix of another never wins early.
        alternatives = sorted(self._special_ids, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
        # Every special string starts with one of these characters: texts without them skip the regex.
        self._special_starts = frozenset(token[0] for token in alternatives)
        self._unk_id = wordpiece.token_to_id(UNK_TOKEN)
        if self._unk_id is None:
            raise ValueError(f"the WordPiece vocabulary has no {UNK_TOKEN}")

    @classmethod
    def from_dir(cls, tokenizer_dir: Path) -> FastEncoder:
        """Load `wordpiece.json` and the added tokens of a folder written by `train_tokenizer`."""
        tokenizer_dir = Path(tokenizer_dir)
        for name in (VOCAB_FILE, CONFIG_FILE, WORDPIECE_FILE):
            if not (tokenizer_dir / name).is_file():
                raise InputError(tokenizer_dir / name, MISSING_HINT)
        wordpiece = Tokenizer.from_file(str(tokenizer_dir / WORDPIECE_FILE))
        vocab = read_vocab(tokenizer_dir / VOCAB_FILE)
        # The slow tokenizer reads vocab.txt; the fast one must hold the very same table.
        if wordpiece.get_vocab(with_added_tokens=False) != vocab:
            raise InputError(tokenizer_dir / WORDPIECE_FILE, f"vocabulary differs from {VOCAB_FILE}")
        config = json.loads((tokenizer_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        specials: dict[str, int] = {}
        for key, entry in config.get("added_tokens_decoder", {}).items():
            content = entry["content"]
            if vocab.get(content) != int(key):
                raise InputError(tokenizer_dir / CONFIG_FILE, f"added token {content!r} has id {key}, "
                                 f"vocab.txt says {vocab.get(content)}")
            if entry.get("lstrip") or entry.get("rstrip") or entry.get("single_word"):
                # Those flags make the slow tokenizer eat neighbouring spaces; not reproduced here.
                raise InputError(tokenizer_dir / CONFIG_FILE,
                                 f"added token {content!r} uses lstrip/rstrip/single_word")
            specials[content] = int(key)
        return cls(wordpiece, specials)

    @property
    def unk_id(self) -> int:
        return self._unk_id

    @property
    def vocab_size(self) -> int:
        return self._wordpiece.get_vocab_size(with_added_tokens=False)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Literal strings protected from segmentation, with their ids."""
        return dict(self._special_ids)

    def segment(self, text: str) -> str:
        """MeCab words of `text` (specials not protected): what the WordPiece model receives."""
        return self._segmenter.segment(text)

    def encode(self, text: str) -> list[int]:
        if self._special_re is None or not any(c in text for c in self._special_starts):
            return self._encode_words(self._segmenter.words(text))
        ids: list[int] = []
        for is_special, piece in self._split_specials(text):
            if is_special:
                ids.append(self._special_ids[piece])
            else:
                ids.extend(self._encode_words(self._segmenter.words(piece)))
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def _encode_words(self, words: list[str]) -> list[int]:
        # A word's pieces never depend on its neighbours, and MeCab words follow Zipf's law, so a
        # word -> ids table answers most words with one dict lookup. On 4,000 real sentences the
        # WordPiece step took 0.11 s through `encode_batch_fast` and 0.03 s with a warm table
        # (MeCab itself takes 0.16 s). Misses go to the Rust WordPiece model one word at a time:
        # the words hold no whitespace, so the WhitespaceSplit step would be a no-op.
        cache = self._word_ids
        ids: list[int] = []
        for word in words:
            pieces = cache.get(word)
            if pieces is None:
                if len(cache) >= WORD_CACHE_SIZE:
                    cache.clear()  # bounded memory: rare words (numbers, names) never stop coming
                pieces = cache[word] = tuple(token.id for token in self._model.tokenize(word))
            ids.extend(pieces)
        return ids

    def _split_specials(self, text: str) -> list[tuple[bool, str]]:
        if self._special_re is None or not any(c in text for c in self._special_starts):
            return [(False, text)]
        pieces: list[tuple[bool, str]] = []
        start = 0
        for match in self._special_re.finditer(text):
            if match.start() > start:
                pieces.append((False, text[start:match.start()]))
            pieces.append((True, match.group()))
            start = match.end()
        if start < len(text):
            pieces.append((False, text[start:]))
        return pieces
