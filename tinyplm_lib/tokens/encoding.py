"""Fast encoding: MeCab segmentation plus a Rust WordPiece, id-for-id equal to BertJapaneseTokenizer.

`BertJapaneseTokenizer` runs its WordPiece in Python; `FastEncoder` segments with the same fugashi
tagger (unidic-lite) and looks each word's pieces up in a table filled by the `tokenizers`
WordPiece model, so token shards are built several times faster with identical ids.
"""

from __future__ import annotations

import os
import re
import unicodedata
from array import array
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from tinyplm_lib.errors import InputError
from tinyplm_lib.layout import VOCAB_FILE
from tinyplm_lib.parallel import worker_state
from tinyplm_lib.tokens.folder import UNK_TOKEN, TokenizerFolder

# Entries of FastEncoder's word -> ids table before it is cleared: ~200 bytes each, so ~40 MB.
WORD_CACHE_SIZE = 200_000
# Stands between two texts' words in `encode_packed`: MeCab never outputs it (a NUL is a
# separator, see MecabSegmenter.parse_normalized) and `str.split` keeps it as a word of its own.
_TEXT_END = "\x00"


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
        return self.parse_normalized(normalized).split()

    def parse_normalized(self, normalized: str) -> str:
        """MeCab's wakati output for text already NFKC-normalised and not empty.

        A NUL separates words like a space: MeCab reads C strings, so everything after a NUL
        was silently lost (also by BertJapaneseTokenizer, which keeps that behaviour; the corpus
        cleaners remove NUL, so shards built from them are the same either way).
        """
        if "\x00" in normalized:
            normalized = normalized.replace("\x00", " ")
        return self._tagger.parse(normalized)

    def segment(self, text: str) -> str:
        """The words of `text` separated by single spaces ("" when it holds none)."""
        return " ".join(self.words(text))


def worker_encoder(tokenizer_dir: Path) -> FastEncoder:
    """This process's FastEncoder for `tokenizer_dir`, loaded once (pool tasks call this).

    Keyed by the files' inode, size and mtime: a folder replaced in place is loaded again.
    """
    folder = TokenizerFolder(Path(tokenizer_dir).resolve())
    key = ("encoder", str(folder.path), folder.file_stats())
    return worker_state(key, lambda: FastEncoder.from_dir(tokenizer_dir))


def worker_segmenter() -> MecabSegmenter:
    return worker_state(("segmenter",), MecabSegmenter)


class _WordPieces(dict):
    """word -> its WordPiece ids as packed machine integers; a miss asks the Rust model once.

    A word's pieces never depend on its neighbours, and MeCab words follow Zipf's law, so after a
    few thousand lines nearly every word is one C-level dict lookup: `b"".join(map(table.__getitem__,
    words))` encodes a line without a Python-level loop over its words. `fixed` entries (the text
    separator) survive the clearing.
    """

    def __init__(self, model, typecode: str, fixed: dict[str, bytes]) -> None:
        super().__init__(fixed)
        self._model, self._typecode, self._fixed = model, typecode, fixed

    def __missing__(self, word: str) -> bytes:
        if len(self) >= WORD_CACHE_SIZE:
            self.clear()  # bounded memory: rare words (numbers, names) never stop coming
            self.update(self._fixed)
        pieces = self[word] = array(self._typecode, [t.id for t in self._model.tokenize(word)]).tobytes()
        return pieces


class FastEncoder:
    """Encode text to WordPiece ids without [CLS]/[SEP], equal to BertJapaneseTokenizer's.

    Literal special strings in raw text ("[MASK]", "[unused3]", …: every added token of the saved
    tokenizer) are split out before NFKC and MeCab and map to their own ids, as the slow
    tokenizer's added-token trie does. A full-width "［MASK］" is not one of them: NFKC turns it
    into "[MASK]" only after that split, so both tokenizers give "[", "MASK", "]".
    """

    def __init__(self, wordpiece: Tokenizer, special_tokens: dict[str, int]) -> None:
        # Only the model is used: NFKC and word splitting happen here, in Python, as in
        # MecabTokenizer. The Rust NFKC of tokenizers 0.23 uses older tables than Python 3.11
        # (Unicode 14.0): 72 code points differ, e.g. Python maps ㋿ (U+32FF) to 令和 and Rust keeps
        # it. Rust's NFKC leaves Python-NFKC text unchanged (checked on every code point), so the
        # normalizer saved in wordpiece.json is harmless for training and for other readers.
        model = wordpiece.model
        if (model.continuing_subword_prefix, model.max_input_chars_per_word) != ("##", 100):
            # BertJapaneseTokenizer's WordpieceTokenizer hard-codes both.
            raise ValueError("the WordPiece model must use the '##' prefix and 100 characters per word")
        self._wordpiece = wordpiece
        size = wordpiece.get_vocab_size(with_added_tokens=True)
        # uint16 whenever the ids fit (every tokenizer train_tokenizer makes): what shards store.
        self.typecode = "H" if size <= 1 << 16 else "I"
        self.dtype = np.dtype(np.uint16 if self.typecode == "H" else np.uint32)
        # The largest value of the type marks a text's end in encode_packed, unless it is an id.
        top = np.iinfo(self.dtype).max
        self._end_id = top if size <= top else None
        fixed = {} if self._end_id is None else {_TEXT_END: array(self.typecode, [top]).tobytes()}
        self._pieces = _WordPieces(model, self.typecode, fixed)
        self._segmenter = MecabSegmenter()
        self._parse = self._segmenter.parse_normalized
        self._special_ids = dict(special_tokens)
        self._special_bytes = {token: array(self.typecode, [i]).tobytes()
                               for token, i in self._special_ids.items()}
        # Longest first, so one special string that is a prefix of another never wins early.
        alternatives = sorted(self._special_ids, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
        # Every special string starts with one of these characters: texts without them (nearly
        # all) skip the alternation.
        starts = "".join(sorted({token[0] for token in alternatives}))
        self._special_start_re = re.compile(f"[{re.escape(starts)}]") if starts else None
        self._unk_id = wordpiece.token_to_id(UNK_TOKEN)
        if self._unk_id is None:
            raise ValueError(f"the WordPiece vocabulary has no {UNK_TOKEN}")

    @classmethod
    def from_dir(cls, tokenizer_dir: Path) -> FastEncoder:
        """Load `wordpiece.json` and the added tokens of a folder written by `train_tokenizer`.

        `wordpiece.json` is not a name AutoTokenizer looks for, so the folder still loads as the
        slow BertJapaneseTokenizer, which reads vocab.txt; the fast path checks it holds the same.
        """
        folder = TokenizerFolder(tokenizer_dir)
        folder.require()
        wordpiece = Tokenizer.from_file(str(folder.wordpiece_path))
        vocab = folder.ids
        if wordpiece.get_vocab(with_added_tokens=False) != vocab:
            raise InputError(folder.wordpiece_path, f"vocabulary differs from {VOCAB_FILE}")
        specials: dict[str, int] = {}
        for key, entry in folder.config.get("added_tokens_decoder", {}).items():
            content = entry["content"]
            if vocab.get(content) != int(key):
                raise InputError(folder.config_path, f"added token {content!r} has id {key}, "
                                 f"{VOCAB_FILE} says {vocab.get(content)}")
            if entry.get("lstrip") or entry.get("rstrip") or entry.get("single_word"):
                # Those flags make the slow tokenizer eat neighbouring spaces; not reproduced here.
                raise InputError(folder.config_path,
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
        return array(self.typecode, self._pack(text)).tolist()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_packed(self, texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """(every text's ids concatenated, as `dtype`; int32 ids per text): what shards store.

        The texts' MeCab words are joined, with a separator word after each text, and looked up in
        one pass, so no Python code runs per text or per word beyond MeCab's own call: on real
        cc100-format lines (105 characters) the time beyond MeCab's ~43 us fell from ~13 to ~10 us
        a line (here). Texts holding a special string take the per-text path.
        """
        texts = texts if isinstance(texts, list) else list(texts)
        if self._end_id is None or any(map(self._has_special, texts)):
            packed = list(map(self._pack, texts))
            lengths = np.fromiter(map(len, packed), dtype=np.int32, count=len(packed))
            return np.frombuffer(b"".join(packed), dtype=self.dtype), lengths // self.dtype.itemsize
        nfkc, parse = unicodedata.normalize, self._parse
        words = f" {_TEXT_END} ".join([parse(n) if (n := nfkc("NFKC", text)) else "" for text in texts])
        ids = np.frombuffer(b"".join(map(self._pieces.__getitem__, f"{words} {_TEXT_END}".split())),
                            dtype=self.dtype)
        ends = np.flatnonzero(ids == self._end_id)
        lengths = (np.diff(ends, prepend=-1) - 1).astype(np.int32)
        return ids[ids != self._end_id], lengths

    def _has_special(self, text: str) -> bool:
        return self._special_start_re is not None and self._special_start_re.search(text) is not None \
            and self._special_re.search(text) is not None

    def _pack(self, text: str) -> bytes:
        if self._special_start_re is None or not self._special_start_re.search(text):
            return self._pack_words(text)
        parts: list[bytes] = []
        start = 0
        for match in self._special_re.finditer(text):
            if match.start() > start:
                parts.append(self._pack_words(text[start:match.start()]))
            parts.append(self._special_bytes[match.group()])
            start = match.end()
        if start < len(text):
            parts.append(self._pack_words(text[start:]))
        return b"".join(parts)

    def _pack_words(self, text: str) -> bytes:
        # NFKC first, as MecabTokenizer does; see MecabSegmenter.words for the split.
        normalized = unicodedata.normalize("NFKC", text)
        if not normalized:
            return b""
        return b"".join(map(self._pieces.__getitem__, self._parse(normalized).split()))
