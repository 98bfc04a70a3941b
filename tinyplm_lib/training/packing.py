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
_PACK_BLOCK = 1 << 20  # sentences per block of `pack_sentences`: five int64 arrays of it, 40 MB


def pack_sentences(lengths: np.ndarray, max_seq_length: int) -> np.ndarray:
    """Greedy packing: return the n + 1 bounds of n sequences; sequence i holds sentences [b[i], b[i+1]).

    Each sequence costs 1 token for `[CLS]` plus `len + 1` per sentence (its `[SEP]`). A sentence
    longer than the whole budget gets a sequence of its own and is truncated when read. Bounds are
    int32 (int64 beyond 2**31 - 1 sentences). The greedy end of a sequence starting at any sentence
    is found for a block of starts at once (a binary search in the costs' running sum); only the
    walk from one sequence to the next is a Python loop, per sequence rather than per sentence.
    """
    if max_seq_length < 8:
        raise ConfigError("max_seq_length", f"{max_seq_length} is too small (minimum 8)")
    lengths = np.asarray(lengths)
    count = len(lengths)
    budget = max_seq_length - 1
    starts: list[np.ndarray] = []
    start = 0
    for first in range(0, count, _PACK_BLOCK):
        last = min(count, first + _PACK_BLOCK)
        # Every sentence costs at least 1, so no sequence reaches more than `budget` sentences ahead.
        cost_sum = np.zeros(min(count, last + budget) - first + 1, dtype=np.int64)
        np.cumsum(lengths[first:first + len(cost_sum) - 1], dtype=np.int64, out=cost_sum[1:])
        cost_sum[1:] += np.arange(1, len(cost_sum), dtype=np.int64)
        ends = np.searchsorted(cost_sum, cost_sum[:last - first] + budget, side="right") - 1
        np.maximum(ends, np.arange(1, last - first + 1), out=ends)  # at least one sentence each
        step = memoryview(ends)  # plain ints, several times faster to index than numpy scalars
        chain: list[int] = []
        local = start - first
        while local < last - first:
            chain.append(local)
            local = step[local]
        starts.append(np.asarray(chain, dtype=np.int64) + first)
        start = local + first
    dtype = np.int32 if count <= np.iinfo(np.int32).max else np.int64
    return np.concatenate([*starts, [count]]).astype(dtype)


class PackedSequences(torch.utils.data.Dataset):
    """Packed sequences of a shard folder, their tokens read batch by batch from the mapped shards.

    Memory does not grow with the corpus's tokens: besides the shards' maps it holds 6 bytes per
    sequence (int32 first sentence, uint16 length: ~36 MB for 3B tokens at 512; it was a
    (sequences × max_seq_length) uint16 matrix, ~6 GB); building it reads every sentence's length
    once (4 bytes per sentence, freed after). A batch gathers all its sentences' tokens with a few
    vectorised numpy calls per shard; a sequence may span two shards.
    """

    def __init__(self, shard_dir: Path, max_seq_length: int, *, cls_id: int, sep_id: int, pad_id: int = 0) -> None:
        self.shard_dir, self.max_seq_length = Path(shard_dir), max_seq_length
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        self._map_shards()
        self.shard_first_sentence = np.cumsum([0, *(len(offsets) - 1 for offsets in self._offsets)])
        lengths = self.shards.lengths()
        self.sentence_bounds = pack_sentences(lengths, max_seq_length)  # sequence i: [b[i], b[i+1])
        # [CLS], then every sentence and its [SEP]; only a lone over-long sentence exceeds the limit.
        tokens = np.add.reduceat(lengths, self.sentence_bounds[:-1], dtype=np.int64) if len(self) else 0
        total = 1 + tokens + np.diff(self.sentence_bounds)
        dtype = np.uint16 if max_seq_length <= np.iinfo(np.uint16).max else np.int32
        self.seq_lengths = np.minimum(total, max_seq_length).astype(dtype)

    def _map_shards(self) -> None:
        self.shards = TokenShards(self.shard_dir)
        # Plain ndarray views of the maps: np.memmap's indexing adds ~2 µs a call (a batch of 32 at
        # 512 on 8 shards took 234 µs through np.memmap, 193 µs through views).
        maps = [self.shards.shard(k) for k in range(self.shards.num_shards)]
        self._tokens = [np.asarray(tokens) for tokens, _ in maps]
        self._offsets = [np.asarray(offsets) for _, offsets in maps]

    def __getstate__(self) -> dict:
        # Pickled for a spawned loader worker: the shards are mapped again there, never copied.
        return {name: value for name, value in self.__dict__.items()
                if name not in ("shards", "_tokens", "_offsets")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._map_shards()

    def __len__(self) -> int:
        return len(self.sentence_bounds) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return self._ids(np.array([range(len(self))[index]]))[0]

    def batch(self, indices: np.ndarray, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of the given sequences, padded to the longest of them (or to `width`)."""
        indices = np.asarray(indices, dtype=np.int64)
        ids = torch.from_numpy(self._ids(indices, width))
        lengths = torch.from_numpy(self.seq_lengths[indices].astype(np.int64))
        # From lengths, not from ids == [PAD]: a literal "[PAD]" in the text is a real token.
        attention = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        return ids, attention

    def _ids(self, indices: np.ndarray, width: int | None = None) -> np.ndarray:
        """int64 ids (len(indices), longest length or `width`): `[CLS] s1 [SEP] s2 [SEP] …`, then [PAD]."""
        limit = self.max_seq_length
        first = self.sentence_bounds[indices].astype(np.int64)
        count = self.sentence_bounds[indices + 1] - first
        lead = np.cumsum(count) - count  # each row's first entry in the per-sentence arrays below
        row = np.repeat(np.arange(len(indices)), count)
        sentence = np.arange(int(count.sum())) + np.repeat(first - lead, count)
        shard = np.searchsorted(self.shard_first_sentence, sentence, side="right") - 1
        order = np.argsort(shard, kind="stable")  # the sentences grouped by shard, `_o` arrays in this order
        present, group_first = np.unique(shard[order], return_index=True)
        local_o = sentence[order] - self.shard_first_sentence[shard[order]]
        start_o, end_o = np.empty(len(sentence), dtype=np.int64), np.empty(len(sentence), dtype=np.int64)
        edges = np.append(group_first, len(sentence))
        for k, lo, hi in zip(present, edges[:-1], edges[1:]):
            start_o[lo:hi] = self._offsets[k][local_o[lo:hi]]
            end_o[lo:hi] = self._offsets[k][local_o[lo:hi] + 1]
        size = np.empty_like(start_o)
        size[order] = end_o - start_o
        before = np.cumsum(size + 1) - (size + 1)
        start = 1 + before - np.repeat(before[lead], count)  # column of each sentence's first token
        ids = np.full((len(indices), width or int(self.seq_lengths[indices].max())), self.pad_id, dtype=np.int64)
        ids[:, 0] = self.cls_id
        # Flat indices (row × width + column): a 2-D fancy index took 1.5 times as long.
        flat, row_start = ids.reshape(-1), row * ids.shape[1]
        flat[row_start + np.minimum(start + size, limit - 1)] = self.sep_id  # a cut sentence keeps its [SEP] last
        take = np.minimum(size, limit - 1 - start)[order]  # tokens read, shard by shard
        within = np.arange(int(take.sum())) - np.repeat(np.cumsum(take) - take, take)
        source = np.repeat(start_o, take) + within
        values = np.empty(len(source), dtype=np.uint16)
        cuts = np.append(np.cumsum(take)[group_first] - take[group_first], len(source))
        for k, lo, hi in zip(present, cuts[:-1], cuts[1:]):
            values[lo:hi] = self._tokens[k][source[lo:hi]]
        flat[np.repeat((row_start + start)[order], take) + within] = values
        return ids


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
                 rank: int = 0, world: int = 1, width: int | None = None) -> None:
        self.sequences, self.batch_size, self.spec, self.seed = sequences, batch_size, spec, seed
        self.width = width  # pad every batch to this many positions (static shapes); None: the longest
        self.per_epoch, self.start_epoch, self.start_micro, self.count = per_epoch, start_epoch, start_micro, count
        self.rank, self.world = rank, world
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.sequences))
            self._orders = {epoch: order.astype(np.int32 if len(order) <= np.iinfo(np.int32).max else np.int64)}
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
        ids, attention = self.sequences.batch(chosen, self.width)
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
