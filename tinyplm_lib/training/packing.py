"""Packed MLM sequences from token shards, and masking at batch time.

`[CLS] s1 [SEP] s2 [SEP] … [SEP]`: whole sentences packed greedily, almost no padding (the original
padded one sentence per sequence). Masking follows BERT (15% of non-special positions: 80% `[MASK]`,
10% random, 10% unchanged), drawn per batch from seeded generators: a resumed run is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from tinyplm_lib.errors import ConfigError
from tinyplm_lib.tokens.shards import TokenShards

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips


def pack_sentences(lengths: np.ndarray, max_seq_length: int) -> np.ndarray:
    """Greedy packing: return an (n, 2) int64 array of `[first, last)` sentence ranges.

    Each sequence costs 1 token for `[CLS]` plus `len + 1` per sentence (its `[SEP]`). A sentence
    longer than the whole budget gets a sequence of its own and is truncated when read.
    """
    if max_seq_length < 8:
        raise ConfigError("max_seq_length", f"{max_seq_length} is too small (minimum 8)")
    ranges: list[tuple[int, int]] = []
    budget = max_seq_length - 1
    start, used = 0, 0
    for index, length in enumerate(lengths.tolist()):
        cost = length + 1
        if index > start and used + cost > budget:
            ranges.append((start, index))
            start, used = index, 0
        used += cost
    if len(lengths) > start:
        ranges.append((start, len(lengths)))
    return np.asarray(ranges, dtype=np.int64).reshape(-1, 2)


class PackedSequences(torch.utils.data.Dataset):
    """Packed sequences as one (n, max_seq_length) token matrix, built once with numpy.

    Building it vectorised (no Python loop per sentence) and fetching a batch with one fancy
    index is what lets the loader keep a GPU busy: ~30k sequences/s are needed for 4M tokens/s.
    The matrix lives in RAM, or in a memory-mapped file when `scratch` is given (full corpora).
    """

    def __init__(self, shard_dir: Path, max_seq_length: int, *, cls_id: int, sep_id: int,
                 pad_id: int = 0, scratch: Path | None = None) -> None:
        self.shards = TokenShards(shard_dir)
        self.max_seq_length = max_seq_length
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        lengths = self.shards.lengths().astype(np.int64)
        self.ranges = pack_sentences(lengths, max_seq_length)
        shape = (len(self.ranges), max_seq_length)
        if scratch is not None:
            Path(scratch).parent.mkdir(parents=True, exist_ok=True)
            self.matrix = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint16, shape=shape)
            self.matrix[:] = pad_id
        else:
            self.matrix = np.full(shape, pad_id, dtype=np.uint16)
        self.seq_lengths = self._fill(lengths)

    def _fill(self, lengths: np.ndarray) -> np.ndarray:
        limit = self.max_seq_length
        counts = self.ranges[:, 1] - self.ranges[:, 0]
        seq_of = np.repeat(np.arange(len(self.ranges)), counts)  # sequence of every sentence
        cost = lengths + 1  # the sentence and its [SEP]
        before = np.cumsum(cost) - cost
        start = 1 + before - before[self.ranges[:, 0]][seq_of]  # position of each sentence's first token
        self.matrix[:, 0] = self.cls_id
        sep_at = start + lengths
        fits = sep_at < limit
        self.matrix[seq_of[fits], sep_at[fits]] = self.sep_id
        base = 0
        for k in range(self.shards.num_shards):
            tokens, offsets = self.shards.shard(k)
            n = len(offsets) - 1
            # Blocks of sentences bound the index arrays' memory (8 bytes per token each).
            for first in range(0, n, 200_000):
                last = min(n, first + 200_000)
                lo, hi = int(offsets[first]), int(offsets[last])
                sentence = np.repeat(np.arange(base + first, base + last), np.diff(offsets[first:last + 1]))
                position = start[sentence] + (np.arange(lo, hi) - offsets[sentence - base])
                keep = position < limit - 1  # an over-long sentence is cut, keeping room for [SEP]
                self.matrix[seq_of[sentence[keep]], position[keep]] = tokens[lo:hi][keep]
            base += n
        last_sentence = self.ranges[:, 1] - 1
        ends = np.minimum(start[last_sentence] + lengths[last_sentence] + 1, limit)
        cut = start[last_sentence] + lengths[last_sentence] >= limit
        self.matrix[np.nonzero(cut)[0], limit - 1] = self.sep_id
        return ends.astype(np.int64)

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.matrix[index, : self.seq_lengths[index]].astype(np.int64)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of the given sequences, padded to the longest of them."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.seq_lengths[indices]
        width = int(lengths.max())
        ids = torch.from_numpy(self.matrix[indices, :width].astype(np.int64))
        # From lengths, not from ids == [PAD]: a literal "[PAD]" in the text is a real token.
        attention = (torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None]).long()
        return ids, attention


class MicroBatch(NamedTuple):
    """One process's slice of a global micro-batch, as a DataLoader worker hands it over."""

    epoch: int
    micro_index: int  # within the epoch
    inputs: torch.Tensor  # masked token ids
    labels: torch.Tensor  # IGNORE_INDEX off the mask
    attention: torch.Tensor
    global_masked: int  # masked tokens in the whole global micro-batch (the loss's divisor)
    global_tokens: int  # its tokens, padding excluded


class MicroBatches(torch.utils.data.Dataset):
    """The masked micro-batches of a run, from (start_epoch, start_micro) on, for one DataLoader.

    Item k is micro-batch `start_micro + k` counted across epochs of `per_epoch` micro-batches:
    the sequences `order[m*batch:(m+1)*batch]` of its epoch's permutation (seeded by
    (seed, epoch)), masked with a generator seeded by (seed, epoch, m). So any process, and a
    resumed run, builds the same batches; one loader spans epochs, so workers start once.

    With `world > 1` a micro-batch is global: `batch_size × world` sequences, drawn and masked as
    one batch of that size in a one-process run, of which process `rank` keeps rows
    `[rank × batch_size, (rank + 1) × batch_size)`. Items also carry the global micro-batch's
    masked-token and token counts, so the loss is normalised (and tokens counted) exactly as in
    one process without any communication.
    """

    def __init__(self, sequences: PackedSequences, batch_size: int, spec: MaskingSpec, *, seed: int,
                 per_epoch: int, start_epoch: int, start_micro: int, count: int,
                 rank: int = 0, world: int = 1) -> None:
        self.sequences, self.batch_size, self.spec, self.seed = sequences, batch_size, spec, seed
        self.per_epoch, self.start_epoch, self.start_micro, self.count = per_epoch, start_epoch, start_micro, count
        self.rank, self.world = rank, world
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.sequences))}
        return self._orders[epoch]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> MicroBatch:
        flat = self.start_micro + k
        epoch, micro = self.start_epoch + flat // self.per_epoch, flat % self.per_epoch
        # Each rank builds and masks the whole global batch and keeps its rows: N times the host
        # work of its own slice (in loader workers, off the training thread), bought for updates
        # identical to one process's and for no communication.
        size = self.batch_size * self.world
        chosen = self.order(epoch)[micro * size:(micro + 1) * size]
        ids, attention = self.sequences.batch(chosen)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 100_003 + micro)
        inputs, labels = mask_tokens(ids, self.spec, generator)
        masked, tokens = int((labels != IGNORE_INDEX).sum()), int(attention.sum())
        if self.world > 1:
            rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            inputs, labels, attention = (t[rows].contiguous() for t in (inputs, labels, attention))
        return MicroBatch(epoch, micro, inputs, labels, attention, masked, tokens)


@dataclass(frozen=True)
class MaskingSpec:
    """Which ids exist and which are special, for masking."""

    vocab_size: int
    mask_id: int
    pad_id: int
    special_ids: tuple[int, ...]
    first_regular_id: int  # random replacements are drawn from [first_regular_id, vocab_size)
    probability: float = 0.15

    def validate(self) -> None:
        if not 0.0 < self.probability < 1.0:
            raise ConfigError("mlm_probability", f"{self.probability} must lie in (0, 1)")
        if not 0 <= self.first_regular_id < self.vocab_size:
            raise ConfigError("vocab_size", "the vocabulary holds no regular tokens")


def collate(sequences: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch: returns (input_ids, attention_mask) as int64 tensors."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.from_numpy(seq)
        attention[row, : len(seq)] = 1
    return ids, attention


def mask_tokens(
    input_ids: torch.Tensor, spec: MaskingSpec, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (masked input ids, labels) for one batch; labels are IGNORE_INDEX off the mask."""
    labels = input_ids.clone()
    candidates = torch.ones_like(input_ids, dtype=torch.bool)
    for special in spec.special_ids:
        candidates &= input_ids != special
    draw = torch.rand(input_ids.shape, generator=generator)
    chosen = (draw < spec.probability) & candidates
    labels[~chosen] = IGNORE_INDEX
    # One more uniform draw splits the chosen positions 80/10/10.
    action = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (action < 0.8)] = spec.mask_id
    randomised = chosen & (action >= 0.8) & (action < 0.9)
    random_ids = torch.randint(
        spec.first_regular_id, spec.vocab_size, input_ids.shape, generator=generator
    )
    masked[randomised] = random_ids[randomised]
    return masked, labels
