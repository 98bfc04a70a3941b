"""Packing whole sentences into sequences, and 80/10/10 masking at batch time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinyplm_lib.errors import ConfigError
from tinyplm_lib.training.packing import IGNORE_INDEX, MaskingSpec, collate, mask_tokens, pack_sentences


def test_packing_keeps_sentences_whole_and_in_budget():
    lengths = np.array([3, 4, 10, 2, 2, 30, 1], dtype=np.int32)
    ranges = pack_sentences(lengths, max_seq_length=16)
    # Every sentence appears exactly once, in order.
    covered = [i for first, last in ranges for i in range(first, last)]
    assert covered == list(range(len(lengths)))
    for first, last in ranges:
        cost = 1 + sum(int(lengths[i]) + 1 for i in range(first, last))
        assert cost <= 16 or last - first == 1  # only a lone over-long sentence may exceed
    assert [tuple(r) for r in ranges] == [(0, 2), (2, 4), (4, 5), (5, 6), (6, 7)]


def test_packing_rejects_tiny_sequences_and_handles_empty():
    with pytest.raises(ConfigError, match="max_seq_length"):
        pack_sentences(np.array([1, 2]), 4)
    assert pack_sentences(np.array([], dtype=np.int32), 16).shape == (0, 2)


SPEC = MaskingSpec(vocab_size=1000, mask_id=4, pad_id=0, special_ids=(0, 1, 2, 3, 4), first_regular_id=15)


def test_masking_rates_and_specials_untouched():
    ids, attention = collate([np.r_[2, np.arange(20, 520), 3].astype(np.int64)] * 64, pad_id=0)
    masked, labels = mask_tokens(ids, SPEC, torch.Generator().manual_seed(0))
    chosen = labels != IGNORE_INDEX
    assert not chosen[:, 0].any() and not chosen[:, -1].any(), "[CLS]/[SEP] are never masked"
    rate = chosen.float().mean().item()
    assert 0.14 < rate < 0.16
    as_mask = (masked == 4) & chosen
    unchanged = (masked == ids) & chosen
    assert 0.78 < as_mask.sum() / chosen.sum() < 0.82
    assert 0.08 < unchanged.sum() / chosen.sum() < 0.12
    replaced = masked[chosen & ~as_mask & ~unchanged]
    assert (replaced >= 15).all(), "random replacements are regular tokens only"
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_masking_is_seeded():
    ids, _ = collate([np.arange(20, 100, dtype=np.int64)] * 4, pad_id=0)
    first = mask_tokens(ids, SPEC, torch.Generator().manual_seed(7))
    again = mask_tokens(ids, SPEC, torch.Generator().manual_seed(7))
    other = mask_tokens(ids, SPEC, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_collate_pads_right_with_attention_mask():
    ids, attention = collate([np.array([5, 6, 7]), np.array([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert attention.tolist() == [[1, 1, 1], [1, 0, 0]]
