"""The MeCab + WordPiece tokenizer: seeded training sample, training, and loading.

The recipe is the original's (NFKC, MeCab with unidic-lite, WordPiece with a `##` prefix, five
specials plus unused slots), but MeCab runs in a process pool outside the trainer, and the result is
a folder that `AutoTokenizer.from_pretrained` loads offline as `BertJapaneseTokenizer`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tinyplm_lib.errors import ConfigError, InputError
from tinyplm_lib.files import json_text, replace_dir, tmp_path
from tinyplm_lib.layout import TOKENIZER_CONFIG_FILE, TOKENIZER_INFO_FILE, VOCAB_FILE
from tinyplm_lib.parallel import WorkerPool, map_in_order, pool_or_own, resolve_workers
from tinyplm_lib.tokens.encoding import worker_segmenter
from tinyplm_lib.tokens.folder import SPECIAL_TOKENS, UNK_TOKEN, TokenizerFolder

MAX_VOCAB_SIZE = 65536  # token shards store ids as uint16
SEGMENT_CHUNK_LINES = 2000  # lines per pool task: large enough that pickling is a small overhead


@dataclass(frozen=True)
class TokenizerSettings:
    """Settings of the tokenizer recipe; the defaults are the original's."""

    vocab_size: int = 32768  # tokens asked for, specials included; a small corpus may give fewer
    limit_alphabet: int = 6129  # most frequent characters kept as the initial alphabet
    min_frequency: int = 2  # a merge must occur at least this often
    num_unused: int = 10  # [unused0]..[unusedN-1] after the five specials
    model_max_length: int = 512  # written to tokenizer_config.json
    sample_size: int = 10_000_000  # training lines drawn from the corpus
    seed: int = 42  # seed of the training sample

    def validate(self) -> None:
        reserved = len(SPECIAL_TOKENS) + self.num_unused
        if self.num_unused < 0:
            raise ConfigError("num_unused", f"must be >= 0, got {self.num_unused}")
        if not reserved < self.vocab_size <= MAX_VOCAB_SIZE:
            raise ConfigError("vocab_size", f"must be in ({reserved}, {MAX_VOCAB_SIZE}] (specials + "
                              f"unused = {reserved}; shards store uint16), got {self.vocab_size}")
        # Alphabet and its `##` forms enter the vocabulary whatever vocab_size says.
        if not 1 <= self.limit_alphabet <= (MAX_VOCAB_SIZE - reserved) // 2:
            raise ConfigError("limit_alphabet", f"must be in [1, {(MAX_VOCAB_SIZE - reserved) // 2}] "
                              f"so alphabet + ## alphabet fit uint16 ids, got {self.limit_alphabet}")
        if self.min_frequency < 0:
            raise ConfigError("min_frequency", f"must be >= 0, got {self.min_frequency}")
        if self.model_max_length < 2:
            raise ConfigError("model_max_length", f"must be >= 2, got {self.model_max_length}")
        if self.sample_size < 1:
            raise ConfigError("sample_size", f"must be >= 1, got {self.sample_size}")
        if self.seed < 0:
            raise ConfigError("seed", f"must be >= 0, got {self.seed}")

    def all_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS) + [f"[unused{i}]" for i in range(self.num_unused)]


def sample_sentences(corpus_path: Path, out_path: Path, sample_size: int, seed: int) -> int:
    """Write a seeded uniform sample of the non-empty lines of `corpus_path`, in corpus order.

    Reservoir sampling (Algorithm R with `random.Random(seed)`) over line ordinals only: which lines
    it keeps depends on how many came before, never on their text, so pass 1 draws the sample as
    int64 ordinals (8 bytes a line: 80 MB for the original's 10M, where holding the lines took
    ~2.6 GB) and pass 2 copies those lines out. Returns the number of lines written.
    """
    if sample_size < 1:
        raise ConfigError("sample_size", f"must be >= 1, got {sample_size}")
    corpus_path, out_path = Path(corpus_path), Path(out_path)
    chosen = _reservoir_ordinals(corpus_path, sample_size, seed)
    # Written beside the output and renamed at the end: a corpus line that is not UTF-8 fails the
    # step naming it and leaves an older sample intact.
    partial = tmp_path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(corpus_path, "rb") as handle, open(partial, "wb") as out:
            _copy_chosen(handle, out, corpus_path, chosen)
        os.replace(partial, out_path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return len(chosen)


def _reservoir_ordinals(corpus_path: Path, sample_size: int, seed: int) -> np.ndarray:
    """Pass 1: the 0-based ordinals (among non-empty lines) Algorithm R keeps, sorted."""
    rng = random.Random(seed)
    slots = array("q")
    seen = 0
    with open(corpus_path, "rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue
            if seen < sample_size:
                slots.append(seen)
            else:
                slot = rng.randrange(seen + 1)
                if slot < sample_size:
                    slots[slot] = seen
            seen += 1
    return np.sort(np.frombuffer(slots, dtype=np.int64))


def _copy_chosen(handle, out, corpus_path: Path, chosen: np.ndarray) -> None:
    """Pass 2: write the non-empty lines whose ordinal is in `chosen`, LF-terminated, checked UTF-8."""
    # Python ints a million at a time: a whole 10M-line list would cost ~360 MB, numpy scalars 3x the time.
    wanted = (n for first in range(0, len(chosen), 1 << 20) for n in chosen[first:first + (1 << 20)].tolist())
    target = next(wanted, None)
    ordinal = 0
    for line_number, raw in enumerate(handle, start=1):
        if target is None:
            break
        if not raw.strip():
            continue
        if ordinal == target:
            line = raw.rstrip(b"\r\n")
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(corpus_path, f"not UTF-8 ({exc.reason})", line=line_number) from None
            out.write(line + b"\n")
            target = next(wanted, None)
        ordinal += 1


# The first character of every word, with the space before it: what remains is the word[1:]s.
_WORD_START = re.compile(r"(?:^| ).")


def _segment_chunk(lines: list[str]) -> list[str]:
    segmenter = worker_segmenter()
    return [segmenter.segment(line) for line in lines]


class SegmentedChunk(NamedTuple):
    """What a pool worker returns for one chunk of the training sample."""

    lines: list[str]  # each input line's words joined by spaces ("" when it holds none)
    char_counts: Counter  # occurrences of every character but the space
    non_initial: set[str]  # characters seen after a word's first: they get a `##` form


def _segment_chunk_with_counts(lines: list[str]) -> SegmentedChunk:
    """Pool task: segment a chunk and count its characters.

    Counted in the worker: in the parent these counts cost a third of the MeCab time (0.33 s
    against 0.99 s for 20,000 real lines), enough to starve a large pool.
    """
    segmented = _segment_chunk(lines)
    text = " ".join(words for words in segmented if words)
    counts = Counter(text)
    counts.pop(" ", None)
    return SegmentedChunk(segmented, counts, set(_WORD_START.sub("", text)))


def _chunked(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def segment_lines(lines: Iterable[str], workers: int | None = 1,
                  pool: WorkerPool | None = None) -> Iterator[str]:
    """NFKC + MeCab surface forms joined by spaces, one output per input line, in order.

    With `workers > 1` (None: every core) or a `pool`, chunks of lines go to worker processes
    (`map_in_order`), streaming.
    """
    workers = resolve_workers(workers)
    chunks = _chunked(lines, SEGMENT_CHUNK_LINES)
    results = map_in_order(_segment_chunk, chunks, workers=workers, pool=pool)
    for segmented in results:
        yield from segmented


class _SegmentedSample:
    """The segmented sample, on disk for the trainer, with what a deterministic run needs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = self.chars = self.words = 0
        self.seconds = 0.0
        self.char_counts: Counter[str] = Counter()
        self.non_initial: set[str] = set()

    def write(self, sample_path: Path, pool: WorkerPool) -> None:
        """Segment every line of `sample_path` on `pool` into `self.path`, counting as it goes."""
        started = time.perf_counter()
        chunks = _chunked(self._read(sample_path), SEGMENT_CHUNK_LINES)
        with open(self.path, "w", encoding="utf-8") as out:
            for chunk in pool.map_in_order(_segment_chunk_with_counts, chunks):
                for words in chunk.lines:
                    if words:
                        out.write(words + "\n")
                        self.words += words.count(" ") + 1
                self.char_counts.update(chunk.char_counts)
                self.non_initial.update(chunk.non_initial)
        self.seconds = round(time.perf_counter() - started, 3)
        if self.words == 0:
            raise InputError(sample_path, "the training sample holds no words")

    def _read(self, sample_path: Path) -> Iterator[str]:
        with open(sample_path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    raise InputError(sample_path, f"not UTF-8 ({exc.reason})", line=line_number) from None
                self.lines += 1
                self.chars += len(line)
                yield line

    def alphabet(self, limit: int) -> list[str]:
        """The `limit` most frequent characters, ties broken by code point, in code point order."""
        ranked = sorted(self.char_counts, key=lambda c: (-self.char_counts[c], ord(c)))
        return sorted(ranked[:limit], key=ord)


def _new_wordpiece(vocab: dict[str, int] | None = None):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    # max_input_chars_per_word=100 is BertJapaneseTokenizer's WordpieceTokenizer default.
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=UNK_TOKEN, continuing_subword_prefix="##",
                                           max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.NFKC()  # no lowercasing: Japanese has no case to fold
    # MeCab already split the words: a WhitespaceSplit keeps "(" "1928" apart exactly as MeCab
    # did; the default BERT pre-tokenizer re-splits punctuation and gave equal ids on only 87.5%
    # of sentences (NOTES.md).
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _train_deterministic(sample: _SegmentedSample, settings: TokenizerSettings) -> list[str]:
    """Run the WordPiece trainer so that the same sample always gives the same vocabulary.

    Left alone, tokenizers 0.23 numbers the `##c` tokens in hash-map order, which differs from
    process to process, and breaks ties between equally frequent merges by those numbers: two
    trainings on the same 8,000 real sentences gave vocabularies that differed in order and in 2
    tokens. Handing the trainer its alphabet (`initial_alphabet`, ties broken by code point) and
    every `##c` up front, in code point order, fixes every number before the first merge.
    Returns the vocabulary in id order: specials, alphabet, `##` alphabet, merges in order.
    """
    from tokenizers import trainers

    specials = settings.all_special_tokens()
    alphabet = sample.alphabet(settings.limit_alphabet)
    continuation = ["##" + c for c in sorted(sample.non_initial.intersection(alphabet), key=ord)]
    trainer = trainers.WordPieceTrainer(
        vocab_size=settings.vocab_size, min_frequency=settings.min_frequency, show_progress=False,
        special_tokens=specials + continuation, initial_alphabet=alphabet,
        limit_alphabet=len(alphabet), continuing_subword_prefix="##",
    )
    wordpiece = _new_wordpiece()
    wordpiece.train([str(sample.path)], trainer=trainer)
    vocab = wordpiece.get_vocab(with_added_tokens=False)
    by_id = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in by_id] == list(range(len(by_id))), "trainer ids are not contiguous"
    first = specials + alphabet + continuation
    assert set(first) <= vocab.keys(), "trainer dropped part of the given alphabet"
    taken = set(first)
    return first + [t for t in by_id if t not in taken]


def train_tokenizer(sample_path: Path, out_dir: Path, settings: TokenizerSettings,
                    workers: int | None = None, pool: WorkerPool | None = None) -> dict:
    """Train WordPiece on the MeCab-segmented sample and save a loadable tokenizer folder.

    MeCab runs in `workers` processes (None: every available core), or the given `pool`'s; the
    Rust trainer then reads the segmented words, never calling back into Python.

    `out_dir` gets `vocab.txt` + `tokenizer_config.json` (BertJapaneseTokenizer), `wordpiece.json`
    (the `tokenizers` model, for FastEncoder) and `tinyplm_tokenizer.json` (settings and counts).
    The folder is built beside `out_dir` and renamed into place; the same sample and settings
    give byte-identical files. Returns counts and timings.
    """
    settings.validate()
    sample_path, out_dir = Path(sample_path), Path(out_dir)
    # A pool made here closes once MeCab is done, before the Rust trainer starts its threads.
    with pool_or_own(pool, workers) as segment_pool:
        if not sample_path.is_file():
            raise InputError(sample_path, "training sample not found")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        build = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
        if build.exists():
            shutil.rmtree(build)
        build.mkdir()
        # MeCab runs once, in the pool; its output waits on disk (about 3 bytes per character)
        # while the Rust trainer reads it back with its own threads.
        sample = _SegmentedSample(build / "segmented.txt")
        try:
            sample.write(sample_path, segment_pool)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    try:
        started = time.perf_counter()
        tokens = _train_deterministic(sample, settings)
        train_seconds = round(time.perf_counter() - started, 3)
        sample.path.unlink()
        info = _write_folder(build, tokens, sample, settings)
        replace_dir(build, out_dir, is_ours=lambda folder: (folder / TOKENIZER_CONFIG_FILE).exists(),
                    what="a tokenizer folder")
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return {**info, "segment_seconds": sample.seconds, "train_seconds": train_seconds,
            "workers": segment_pool.workers}


def _write_folder(build: Path, tokens: list[str], sample: _SegmentedSample,
                  settings: TokenizerSettings) -> dict:
    """Write the tokenizer's files into the `build` folder; returns what tinyplm_tokenizer.json holds."""
    from transformers import BertJapaneseTokenizer

    specials = settings.all_special_tokens()
    (build / VOCAB_FILE).write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    folder = TokenizerFolder(build)
    fast = _new_wordpiece({t: i for i, t in enumerate(tokens)})
    fast.add_special_tokens(specials)
    fast.save(str(folder.wordpiece_path))
    hf_tokenizer = BertJapaneseTokenizer(
        str(folder.vocab_path), do_lower_case=False, word_tokenizer_type="mecab",
        subword_tokenizer_type="wordpiece", mecab_kwargs={"mecab_dic": "unidic_lite"},
        model_max_length=settings.model_max_length,
        # As extra special tokens the unused slots are protected from MeCab like [MASK] is.
        extra_special_tokens=specials[len(SPECIAL_TOKENS):],
    )
    hf_tokenizer.save_pretrained(str(build))
    _make_config_portable(folder.config_path)
    info = {
        "settings": asdict(settings),
        "vocab_size": len(tokens),
        "requested_vocab_size": settings.vocab_size,
        "alphabet_size": sum(1 for t in tokens[len(specials):] if len(t) == 1),
        "continuation_tokens": sum(t.startswith("##") for t in tokens),
        "sample_lines": sample.lines,
        "sample_chars": sample.chars,
        "sample_words": sample.words,
        "distinct_chars": len(sample.char_counts),
        "files_sha256": folder.file_hashes(tuple(p.name for p in sorted(build.iterdir()) if p.is_file())),
    }
    # Only deterministic fields go to disk, so two identical trainings give identical folders.
    (build / TOKENIZER_INFO_FILE).write_text(json_text(info, indent=1, ensure_ascii=False), encoding="utf-8")
    return info


def _make_config_portable(config_path: Path) -> None:
    """Rewrite transformers 5's tokenizer_config.json so that 4.40+ loads it and behaves the same.

    5.x saves the unused slots as a list `extra_special_tokens`: 4.57 reads it as a dict ("'list' object
    has no attribute 'keys'"), 4.46 ignores it. As `additional_special_tokens` 4.x reads them and 5.25
    maps them back (`from_pretrained`). 4.40 defaults `clean_up_tokenization_spaces` to true ("123!"
    for 5.x's "123 !"): written out. Sorted, indent 2 as transformers writes: same inputs, same bytes.
    """
    config = json.loads(config_path.read_text(encoding="utf-8"))
    extra = config.pop("extra_special_tokens", None)
    if extra:
        config["additional_special_tokens"] = extra
    config.setdefault("clean_up_tokenization_spaces", False)
    config_path.write_text(json_text(config, indent=2, sort_keys=True, ensure_ascii=False), encoding="utf-8")


def load_tokenizer(tokenizer_dir: Path):
    """The saved folder as a `BertJapaneseTokenizer`, offline (no Hub lookup for a local path)."""
    from transformers import AutoTokenizer

    folder = TokenizerFolder(tokenizer_dir)
    folder.require((TOKENIZER_CONFIG_FILE,))
    return AutoTokenizer.from_pretrained(str(folder.path))
