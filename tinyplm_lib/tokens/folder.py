"""The tokenizer folder as one type: its vocabulary, special tokens, settings and file hashes.

Every reader of a tokenizer folder (the encoder, shards, masking, checks, metadata) goes through
`TokenizerFolder` rather than opening its files itself. The folder is written by
`tokens.tokenizer.train_tokenizer`; reading needs neither MeCab nor transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tinyplm_lib.errors import ConfigError, InputError
from tinyplm_lib.files import sha256_file
from tinyplm_lib.layout import TOKENIZER_CONFIG_FILE, TOKENIZER_INFO_FILE, VOCAB_FILE, WORDPIECE_FILE

# BERT's special tokens, in vocabulary order; train_tokenizer adds [unused0..9] after them.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN = SPECIAL_TOKENS
# The files that decide token ids; their hashes identify a tokenizer (shard reuse, checkpoints).
ID_FILES = (VOCAB_FILE, TOKENIZER_CONFIG_FILE, WORDPIECE_FILE)
MISSING_HINT = "missing; is this a folder written by train_tokenizer?"


@dataclass(frozen=True)
class TokenizerFolder:
    """A tokenizer folder on disk. Attributes are read lazily and cached; errors name the file."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def vocab_path(self) -> Path:
        return self.path / VOCAB_FILE

    @property
    def config_path(self) -> Path:
        return self.path / TOKENIZER_CONFIG_FILE

    @property
    def wordpiece_path(self) -> Path:
        return self.path / WORDPIECE_FILE

    def require(self, names: tuple[str, ...] = ID_FILES) -> None:
        """An InputError naming the first of `names` that is not a file in the folder."""
        for name in names:
            if not (self.path / name).is_file():
                raise InputError(self.path / name, MISSING_HINT)

    @cached_property
    def tokens(self) -> list[str]:
        """vocab.txt's tokens in id order (a ConfigError of setting `tokenizer` when unreadable).

        Split on "\n" only, as transformers' `load_vocab` does (`readlines`): `splitlines` would
        also split a token at U+2028, U+0085 or \x1c and shift every later id.
        """
        try:
            text = self.vocab_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("tokenizer", f"{self.vocab_path}: {exc}") from exc
        tokens = text.split("\n")
        if tokens[-1] == "":
            tokens.pop()  # the final newline ends the last token; it starts none
        return tokens

    @cached_property
    def ids(self) -> dict[str, int]:
        """token -> id as transformers' `load_vocab` reads it (a repeated token keeps its last id)."""
        return {token: index for index, token in enumerate(self.tokens)}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def special_ids(self) -> dict[str, int]:
        """Id of each of BERT's special tokens; a ConfigError naming the file when one is missing."""
        missing = [token for token in SPECIAL_TOKENS if token not in self.ids]
        if missing:
            raise ConfigError("tokenizer", f"{self.vocab_path} lacks the special tokens {missing}")
        return {token: self.ids[token] for token in SPECIAL_TOKENS}

    def first_regular_id(self) -> int:
        """Specials and [unusedN] lead the vocabulary: the id of the first ordinary token."""
        return next((i for i, t in enumerate(self.tokens) if not (t.startswith("[") and t.endswith("]"))),
                    len(self.tokens))

    @cached_property
    def info(self) -> dict:
        """`tinyplm_tokenizer.json` (settings and counts of the training run); {} when absent."""
        path = self.path / TOKENIZER_INFO_FILE
        if not path.is_file():
            return {}
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError("tokenizer", f"{path}: {exc}") from exc
        if not isinstance(value, dict):
            raise ConfigError("tokenizer", f"{path}: expected a JSON object")
        return value

    @property
    def requested_vocab_size(self) -> int | None:
        """The vocab_size the tokenizer was trained with (None when not made by train_tokenizer)."""
        requested = self.info.get("requested_vocab_size")
        return requested if isinstance(requested, int) else None

    @cached_property
    def config(self) -> dict:
        """`tokenizer_config.json` as transformers saved it (its added tokens and their ids)."""
        return json.loads(self.config_path.read_text(encoding="utf-8"))

    def file_hashes(self, names: tuple[str, ...] = ID_FILES) -> dict[str, str]:
        """sha256 of the named files (by default those that decide ids), by file name."""
        return {name: sha256_file(self.path / name) for name in names}

    def file_stats(self, names: tuple[str, ...] = ID_FILES) -> tuple:
        """(inode, size, mtime) of each named file, None if absent: changes when a file is replaced.

        A cheap identity for per-process caches; hashing would read the files on every lookup.
        """
        stats = []
        for name in names:
            try:
                info = (self.path / name).stat()
                stats.append((info.st_ino, info.st_size, info.st_mtime_ns))
            except FileNotFoundError:
                stats.append(None)
        return tuple(stats)

    def same_vocab(self, other_dir: Path) -> bool:
        """True when `other_dir` holds a byte-identical vocab.txt (a model folder made with this one)."""
        other = Path(other_dir) / VOCAB_FILE
        return other.is_file() and other.read_bytes() == self.vocab_path.read_bytes()
