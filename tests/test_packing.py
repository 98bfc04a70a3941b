"""Packing whole sentences into sequences, reading them from shards, and 80/10/10 masking at batch time.

The vectorised packing and batches are checked against plain per-sentence references of the
original behaviour, on real JaWiki shards cut small so that sequences span shard boundaries.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from bench.packing import baseline_pack_sentences
from tinyplm_lib.errors import ConfigError
from tinyplm_lib.tokens.shard_writer import encode_corpus
from tinyplm_lib.tokens.shards import TokenShards
from tinyplm_lib.training import packing
from tinyplm_lib.training.packing import (
    IGNORE_INDEX,
    MaskingSpec,
    MicroBatches,
    PackedSequences,
    collate,
    mask_tokens,
    pack_sentences,
)

CLS, SEP, PAD = 2, 3, 0


def reference_pack(lengths: np.ndarray, max_seq_length: int) -> list[tuple[int, int]]:
    """The original greedy packing, one sentence at a time (bench.packing keeps it as its baseline)."""
    return [tuple(r) for r in baseline_pack_sentences(np.asarray(lengths), max_seq_length).tolist()]


def reference_batch(shards: TokenShards, ranges, indices, max_seq_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The original batch, sequence by sequence: [CLS] s1 [SEP] s2 [SEP] …, cut keeping [SEP] last, padded."""
    rows = []
    for index in indices:
        row = [CLS]
        for sentence in range(*ranges[index]):
            row += shards.sentence(sentence).tolist() + [SEP]
        rows.append(row if len(row) <= max_seq_length else row[:max_seq_length - 1] + [SEP])
    width = max(map(len, rows))
    ids = torch.tensor([row + [PAD] * (width - len(row)) for row in rows], dtype=torch.long)
    attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], dtype=torch.long)
    return ids, attention


def ranges_of(bounds: np.ndarray) -> list[tuple[int, int]]:
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def test_packing_keeps_sentences_whole_and_in_budget():
    lengths = np.array([3, 4, 10, 2, 2, 30, 1], dtype=np.int32)
    bounds = pack_sentences(lengths, max_seq_length=16)
    assert bounds.dtype == np.int32
    for first, last in ranges_of(bounds):
        cost = 1 + sum(int(lengths[i]) + 1 for i in range(first, last))
        assert cost <= 16 or last - first == 1  # only a lone over-long sentence may exceed
    assert ranges_of(bounds) == [(0, 2), (2, 4), (4, 5), (5, 6), (6, 7)]


def test_packing_rejects_tiny_sequences_and_handles_empty():
    with pytest.raises(ConfigError, match="max_seq_length"):
        pack_sentences(np.array([1, 2]), 4)
    assert pack_sentences(np.array([], dtype=np.int32), 16).tolist() == [0]


EDGE_CASES = {
    "one sentence": [5],
    "one over-long sentence": [100],
    "over-long among short": [1, 2, 40, 3, 15, 16, 0, 4],
    "exactly filling the budget": [6, 7, 14, 6, 7, 0, 13],  # 1 + 7 + 8 = 16, 1 + 15 = 16, ...
    "budget plus one": [15, 14, 1, 12, 2],
    "empty sentences": [0] * 40,
}


@pytest.mark.parametrize("block", [1, 3, 64, 1 << 20])
def test_vectorised_packing_equals_the_per_sentence_greedy(block, monkeypatch):
    monkeypatch.setattr(packing, "_PACK_BLOCK", block)  # small blocks: chains cross block edges
    for name, lengths in EDGE_CASES.items():
        lengths = np.array(lengths, dtype=np.int32)
        assert ranges_of(pack_sentences(lengths, 16)) == reference_pack(lengths, 16), name
    rng = np.random.default_rng(block)
    for trial in range(60):
        max_seq_length = int(rng.integers(8, 64))
        pool = [0, 1, max_seq_length - 3, max_seq_length - 2, max_seq_length - 1, 3 * max_seq_length]
        lengths = (rng.integers(0, max_seq_length // 2, int(rng.integers(1, 400))) if trial % 2
                   else rng.choice(pool, int(rng.integers(1, 400))))
        bounds = pack_sentences(lengths, max_seq_length)
        assert ranges_of(bounds) == reference_pack(lengths, max_seq_length), (max_seq_length, lengths.tolist())


@pytest.fixture(scope="module")
def small_shards(data, tmp_path_factory):
    """The demo JaWiki training text in shards of 150 sentences (real ids, many shard boundaries)."""
    out = tmp_path_factory.mktemp("packing") / "shards"
    encode_corpus(data / "train.txt", data / "tok", out, shard_lines=150, workers=1)
    return out


@pytest.mark.parametrize("max_seq_length", [8, 16, 128])
def test_batches_equal_the_reference_across_shard_boundaries(small_shards, max_seq_length):
    shards = TokenShards(small_shards)
    assert shards.num_shards > 3
    packed = PackedSequences(small_shards, max_seq_length, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    ranges = reference_pack(shards.lengths(), max_seq_length)
    assert ranges_of(packed.sentence_bounds) == ranges and len(packed) == len(ranges)
    boundaries = set(np.cumsum([len(shards.shard(k)[1]) - 1 for k in range(shards.num_shards)]).tolist())
    spanning = [i for i, (first, last) in enumerate(ranges) if any(first < b < last for b in boundaries)]
    if max_seq_length == 128:
        assert spanning, "no sequence spans two shards: the test would miss that case"
    rng = np.random.default_rng(max_seq_length)
    index_sets = [np.arange(len(packed)), np.array(spanning[:32] or [0]), np.array([len(packed) - 1, 0, 0])]
    index_sets += [rng.integers(0, len(packed), int(rng.integers(1, 40))) for _ in range(20)]
    for indices in index_sets:
        ids, attention = packed.batch(indices)
        expected_ids, expected_attention = reference_batch(shards, ranges, indices, max_seq_length)
        assert ids.dtype == attention.dtype == torch.long
        assert torch.equal(ids, expected_ids) and torch.equal(attention, expected_attention)
    # Static shapes (compiled training): the same rows padded out to the full length.
    ids, attention = packed.batch(np.array([0]), width=max_seq_length)
    expected_ids, expected_attention = reference_batch(shards, ranges, [0], max_seq_length)
    width = expected_ids.shape[1]
    assert ids.shape == attention.shape == (1, max_seq_length)
    assert torch.equal(ids[:, :width], expected_ids) and torch.equal(attention[:, :width], expected_attention)
    assert (ids[:, width:] == PAD).all() and (attention[:, width:] == 0).all()
    for index in (0, len(packed) // 2, -1):
        expected, _ = reference_batch(shards, ranges, [index], max_seq_length)
        assert packed[index].dtype == np.int64 and packed[index].tolist() == expected[0].tolist()
    with pytest.raises(IndexError):
        packed[len(packed)]


def test_packed_sequences_hold_a_few_bytes_per_sequence(small_shards):
    packed = PackedSequences(small_shards, 128, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    held = sum(value.nbytes for value in vars(packed).values() if isinstance(value, np.ndarray))
    assert held <= 6 * len(packed) + 8 * (packed.shards.num_shards + 1) + 4
    assert packed.sentence_bounds.dtype == np.int32 and packed.seq_lengths.dtype == np.uint16
    # Pickled (a spawned loader worker), it carries the index and maps the shards again.
    copy = pickle.loads(pickle.dumps(packed))
    assert len(pickle.dumps(packed)) < held + 4096
    indices = np.arange(0, len(packed), 7)
    assert all(torch.equal(a, b) for a, b in zip(copy.batch(indices), packed.batch(indices)))


def test_micro_batch_order_is_the_seeded_permutation_in_int32(small_shards):
    packed = PackedSequences(small_shards, 128, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    batches = MicroBatches(packed, 4, SPEC, seed=5, per_epoch=3, start_epoch=0, start_micro=0, count=3)
    order = batches.order(1)
    assert order.dtype == np.int32
    assert order.tolist() == np.random.default_rng([5, 1]).permutation(len(packed)).tolist()


SPEC = MaskingSpec(vocab_size=1000, mask_id=4, pad_id=0, special_ids=(0, 1, 2, 3, 4), first_regular_id=15)


def test_masking_rates_and_specials_untouched():
    ids, _ = collate([np.r_[2, np.arange(20, 520), 3].astype(np.int64)] * 64, pad_id=0)
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
