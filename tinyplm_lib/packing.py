"""Packed MLM sequences from token shards, and masking at batch time.

A packed sequence is `[CLS] s1 [SEP] s2 [SEP] … [SEP]`: whole sentences are added greedily until
the next one would not fit, so training pays for almost no padding (the original padded one
sentence per sequence). Masking follows BERT: 15% of the non-special positions, of which 80%
become `[MASK]`, 10% a random regular token and 10% stay unchanged; it is drawn per batch from a
seeded generator, so a run (and its resumption) is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinyplm_lib.errors import ConfigError
from tinyplm_lib.shards import TokenShards

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
    """Random access to packed sequences; token data stays memory-mapped on disk."""

    def __init__(self, shard_dir: Path, max_seq_length: int, *, cls_id: int, sep_id: int) -> None:
        self.shards = TokenShards(shard_dir)
        self.max_seq_length = max_seq_length
        self.cls_id, self.sep_id = cls_id, sep_id
        self.ranges = pack_sentences(self.shards.lengths(), max_seq_length)

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, index: int) -> np.ndarray:
        first, last = self.ranges[index]
        pieces = [np.asarray([self.cls_id], dtype=np.int64)]
        for sentence in range(first, last):
            pieces.append(self.shards.sentence(sentence).astype(np.int64))
            pieces.append(np.asarray([self.sep_id], dtype=np.int64))
        ids = np.concatenate(pieces)
        if len(ids) > self.max_seq_length:  # only a single over-long sentence gets here
            ids = np.concatenate([ids[: self.max_seq_length - 1], [self.sep_id]])
        return ids

    def num_tokens(self) -> int:
        """Non-padding tokens over all sequences (specials included)."""
        lengths = self.shards.lengths().astype(np.int64)
        return int(lengths.sum() + len(lengths) + len(self.ranges))


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
