"""Raw files to token shards on 1 worker and on a shared pool of 2: the same bytes everywhere.

A slice of the real samples in ../shared/corpora (20,000 cc100 lines, 150 JaWiki articles) goes
through both corpus builders, a small tokenizer and `encode_corpus`, with blocks and chunks made
small so that results really arrive from both workers interleaved. About 15 s on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import tinyplm_lib.corpora.cc100 as cc100_module
import tinyplm_lib.corpora.jawiki as jawiki_module
import tinyplm_lib.tokens.shard_writer as shards_module
from tinyplm_lib.corpora.cc100 import Cc100Settings, build_cc100_corpus
from tinyplm_lib.corpora.jawiki import JawikiSettings, build_jawiki_corpus
from tinyplm_lib.errors import ConfigError, InputError
from tinyplm_lib.parallel import WorkerPool, map_in_order
from tinyplm_lib.tokens.encoding import FastEncoder, worker_encoder
from tinyplm_lib.tokens.shard_writer import encode_corpus
from tinyplm_lib.tokens.shards import TokenShards
from tinyplm_lib.tokens.tokenizer import TokenizerSettings, train_tokenizer

CC100 = Cc100Settings(max_lines=20_000, max_validation_lines=1_000, validation_doc_fraction=0.1)
JAWIKI = JawikiSettings(max_documents=150, validation_fraction=0.1)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _preprocess(web: Path, wiki: Path, out: Path, tokenizer: Path, **parallel) -> dict:
    """Both corpora and their shards, as the pipeline builds them; returns the stats."""
    cc = build_cc100_corpus(web, out / "cc100" / "train.txt", out / "cc100" / "validation.txt",
                            CC100, **parallel)
    wk = build_jawiki_corpus(wiki, out / "jawiki" / "train.txt", out / "jawiki" / "validation.txt",
                             JAWIKI, work_dir=out, **parallel)
    metas = {}
    for corpus in ("cc100", "jawiki"):
        for split in ("train", "validation"):
            metas[f"{corpus}/{split}"] = encode_corpus(
                out / corpus / f"{split}.txt", tokenizer, out / "tokens" / corpus / split,
                shard_lines=3000, **parallel)
    return {"cc100": cc, "jawiki": wk, "tokens": metas}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, web_sample, wiki_sample):
    root = tmp_path_factory.mktemp("parallel")
    # The tokenizer comes from a first JaWiki build, as in the pipeline.
    build_jawiki_corpus(wiki_sample, root / "t.txt", root / "v.txt", JAWIKI, workers=1)
    train_tokenizer(root / "t.txt", root / "tokenizer", TokenizerSettings(vocab_size=3000),
                    workers=2)
    with pytest.MonkeyPatch.context() as patch:
        # Small blocks and chunks: dozens of pool tasks per stage, 4 in flight.
        patch.setattr(cc100_module, "BLOCK_BYTES", 1 << 16)
        patch.setattr(jawiki_module, "BLOCK_BYTES", 1 << 16)
        patch.setattr(shards_module, "ENCODE_CHUNK_LINES", 500)
        one = _preprocess(web_sample, wiki_sample, root / "one", root / "tokenizer", workers=1)
        with WorkerPool(2) as pool:
            two = _preprocess(web_sample, wiki_sample, root / "two", root / "tokenizer", pool=pool)
    return root, one, two


def test_one_and_two_workers_give_the_same_bytes(runs):
    root, one, two = runs
    files = _files(root / "one")
    assert files == _files(root / "two")
    # Corpora, splits and shards are all there: 4 text files, 4 shard sets of >= 1 shard.
    assert sum(name.endswith(".txt") for name in files) == 4
    assert sum(name.endswith("meta.json") for name in files) == 4
    assert len([n for n in files if n.startswith("tokens/cc100/train/shard-")]) == 3 * 7
    for corpus in ("cc100", "jawiki"):
        a, b = one[corpus].to_dict(), two[corpus].to_dict()
        assert (a.pop("details")["workers"], b.pop("details")["workers"]) == (1, 2)
        a.pop("seconds"), b.pop("seconds")
        assert a == b


def test_the_slice_is_what_the_settings_ask_for(runs):
    root, one, _ = runs
    cc, wk = one["cc100"], one["jawiki"]
    assert cc.lines_read == CC100.max_lines and cc.lines_validation > 0
    assert wk.documents_read == JAWIKI.max_documents and wk.lines_validation > 0
    train = (root / "one" / "cc100" / "train.txt").read_text(encoding="utf-8").splitlines()
    assert len(train) == cc.lines_train == one["tokens"]["cc100/train"]["num_sentences"]


def test_shards_hold_the_encoder_ids_of_the_corpus(runs):
    root, _, _ = runs
    encoder = FastEncoder.from_dir(root / "tokenizer")
    lines = (root / "two" / "jawiki" / "validation.txt").read_text(encoding="utf-8").splitlines()
    shards = TokenShards(root / "two" / "tokens" / "jawiki" / "validation")
    assert [shards.sentence(i).tolist() for i in range(len(shards))] == encoder.encode_batch(lines)


def test_worker_counts_are_checked():
    with pytest.raises(ConfigError, match="workers"):
        WorkerPool(0)
    with pytest.raises(ConfigError, match="workers"):
        list(map_in_order(str, [1], workers=-1))
    with WorkerPool(None) as pool:
        assert pool.workers >= 1  # None: every available core


def test_an_error_in_a_worker_arrives_whole(tmp_path):
    # The errors' own __init__ does not survive pickling; the pool carries them across intact.
    with WorkerPool(2) as pool, pytest.raises(InputError, match="missing; is this a folder") as info:
        list(pool.map_in_order(worker_encoder, [tmp_path]))
    assert info.value.path == str(tmp_path / "vocab.txt") and info.value.line is None
