"""Token shards: encode a real text file, read it back, and check the format's promises.

A small tokenizer (vocab 4,000) is trained on real sentences from ../shared/corpora, then ~3,000
real lines (with blank lines mixed in) are encoded with several shard sizes and worker counts.
"""

from __future__ import annotations

import gzip
import itertools
import json
import lzma
import shutil
from pathlib import Path

import numpy as np
import pytest

from tinyplm_lib.errors import ConfigError, InputError, StorageError
from tinyplm_lib.tokens import shard_writer
from tinyplm_lib.tokens.encoding import FastEncoder
from tinyplm_lib.tokens.shard_writer import encode_corpus
from tinyplm_lib.tokens.shards import TokenShards
from tinyplm_lib.tokens.tokenizer import TokenizerSettings, train_tokenizer


def real_lines(web_path: Path, wiki_path: Path, web_count: int, wiki_count: int) -> list[str]:
    with lzma.open(web_path, "rt", encoding="utf-8") as handle:
        web = list(itertools.islice((s for s in (line.strip() for line in handle) if s), web_count))
    wiki: list[str] = []
    with gzip.open(wiki_path, "rt", encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            if doc.get("namespace") == 0 and "text" in doc:
                wiki.extend(s.strip() + "。" for s in doc["text"].split("。") if s.strip())
            if len(wiki) >= wiki_count:
                break
    return web + wiki[:wiki_count]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, web_sample, wiki_sample) -> tuple[Path, Path, list[str]]:
    """(tokenizer folder, corpus file, its lines). Every 97th line is blank or only spaces."""
    root = tmp_path_factory.mktemp("shards")
    lines = real_lines(web_sample, wiki_sample, 1500, 1500)
    (root / "sample.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    train_tokenizer(root / "sample.txt", root / "tokenizer", TokenizerSettings(vocab_size=4000))
    with_blanks = []
    for i, line in enumerate(lines):
        if i % 97 == 0:
            with_blanks.append("" if i % 2 else " \u3000 ")
        with_blanks.append(line)
    with_blanks.insert(1234, "雪だるま☃と魚の𩸽")  # characters the tokenizer never saw: [UNK]
    text = root / "corpus.txt"
    text.write_text("\n".join(with_blanks) + "\n", encoding="utf-8")
    return root / "tokenizer", text, with_blanks


def shard_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_shards_hold_exactly_the_fast_encoder_ids(tmp_path, corpus):
    tokenizer_dir, text, lines = corpus
    meta = encode_corpus(text, tokenizer_dir, tmp_path / "out", workers=2)
    shards = TokenShards(tmp_path / "out")
    sentences = [line for line in lines if line.strip()]
    expected = FastEncoder.from_dir(tokenizer_dir).encode_batch(sentences)
    assert shards.num_sentences == len(sentences) == meta["num_sentences"] == len(shards)
    assert shards.num_tokens == sum(map(len, expected)) == meta["num_tokens"]
    for i, ids in enumerate(expected):
        got = shards.sentence(i)
        assert got.dtype == np.uint16 and got.tolist() == ids
    assert shards.lengths().dtype == np.int32
    assert shards.lengths().tolist() == [len(ids) for ids in expected]
    written = json.loads((tmp_path / "out" / "meta.json").read_text(encoding="utf-8"))
    # The return value is meta.json plus facts of this run only.
    assert meta == {**written, "shards_encoded": 1, "shards_reused": 0, "workers": 2,
                    "seconds": meta["seconds"]}
    with pytest.raises(IndexError):
        shards.sentence(shards.num_sentences)


def test_meta_json_describes_the_set(tmp_path, corpus):
    tokenizer_dir, text, lines = corpus
    meta = encode_corpus(text, tokenizer_dir, tmp_path / "out", workers=1)
    assert (meta["format_version"], meta["dtype"], meta["offsets_dtype"]) == (1, "uint16", "int64")
    vocab = (tokenizer_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert meta["vocab_size"] == len(vocab)
    assert meta["unk_id"] == 1
    assert set(meta["tokenizer_files_sha256"]) == {"vocab.txt", "tokenizer_config.json",
                                                   "wordpiece.json"}
    assert meta["num_lines"] == len(lines)
    blank = sum(1 for line in lines if not line.strip())
    assert meta["dropped"] == {"empty_line": blank, "no_tokens": 0}
    tokens = np.fromfile(tmp_path / "out" / "shard-00000.tokens.u16", dtype=np.uint16)
    assert meta["unk_tokens"] == np.count_nonzero(tokens == 1) >= 2
    assert meta["source"]["name"] == "corpus.txt" and meta["source"]["bytes"] == text.stat().st_size
    [shard] = meta["shards"]
    assert shard["tokens_file"] == "shard-00000.tokens.u16"
    assert shard["offsets_file"] == "shard-00000.offsets.i64"
    assert shard["first_line"] == 1 and shard["num_lines"] == len(lines)
    assert shard["source_bytes"] == text.stat().st_size
    marker = json.loads((tmp_path / "out" / "shard-00000.json").read_text(encoding="utf-8"))
    assert marker == {"format_version": 1, "shard_lines": 1_000_000,
                      "tokenizer_files_sha256": meta["tokenizer_files_sha256"], "shard": shard}
    offsets = np.fromfile(tmp_path / "out" / shard["offsets_file"], dtype=np.int64)
    assert offsets[0] == 0 and offsets[-1] == meta["num_tokens"]
    assert len(offsets) == meta["num_sentences"] + 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "meta.json", "shard-00000.json", "shard-00000.offsets.i64",
        "shard-00000.tokens.u16"]  # no temporary files left


def test_small_shards_hold_the_same_content_as_one(tmp_path, corpus):
    tokenizer_dir, text, lines = corpus
    encode_corpus(text, tokenizer_dir, tmp_path / "one", workers=1)
    meta = encode_corpus(text, tokenizer_dir, tmp_path / "many", shard_lines=500, workers=1)
    assert len(meta["shards"]) == -(-len(lines) // 500) >= 6
    assert [s["first_line"] for s in meta["shards"]] == list(range(1, len(lines) + 1, 500))
    one, many = TokenShards(tmp_path / "one"), TokenShards(tmp_path / "many")
    assert many.num_shards == len(meta["shards"])
    concatenated = np.concatenate([many.shard(k)[0] for k in range(many.num_shards)])
    assert np.array_equal(concatenated, one.shard(0)[0])
    assert np.array_equal(many.lengths(), one.lengths())
    for i in range(0, one.num_sentences, 37):
        assert np.array_equal(many.sentence(i), one.sentence(i))
    # Re-encoding into the same folder with bigger shards leaves no stale small shard behind.
    meta = encode_corpus(text, tokenizer_dir, tmp_path / "many", shard_lines=2000, workers=1)
    assert meta["shards_reused"] == 0  # markers of another shard size never match
    assert len(list((tmp_path / "many").glob("shard-*"))) == 2 * 3
    assert np.array_equal(TokenShards(tmp_path / "many").lengths(), one.lengths())


def test_workers_do_not_change_a_byte(tmp_path, corpus, monkeypatch):
    tokenizer_dir, text, _ = corpus
    # Chunks of 100 lines: ~30 pool tasks with 4 in flight, so results really arrive interleaved.
    monkeypatch.setattr(shard_writer, "ENCODE_CHUNK_LINES", 100)
    encode_corpus(text, tokenizer_dir, tmp_path / "w1", shard_lines=1300, workers=1)
    encode_corpus(text, tokenizer_dir, tmp_path / "w2", shard_lines=1300, workers=2)
    files = shard_files(tmp_path / "w1")
    assert len(files) == 1 + 3 * 3
    assert files == shard_files(tmp_path / "w2")


def test_truncated_or_missing_files_are_named(tmp_path, corpus):
    tokenizer_dir, text, _ = corpus
    out = tmp_path / "out"
    encode_corpus(text, tokenizer_dir, out, shard_lines=1000, workers=1)
    tokens = out / "shard-00001.tokens.u16"
    data = tokens.read_bytes()
    tokens.write_bytes(data[:-2])
    with pytest.raises(StorageError, match="shard-00001.tokens.u16.*truncated"):
        TokenShards(out)
    tokens.write_bytes(data)
    TokenShards(out)
    offsets = out / "shard-00002.offsets.i64"
    good = np.fromfile(offsets, dtype=np.int64)
    offsets.write_bytes(good[:-1].tobytes())
    with pytest.raises(StorageError, match="shard-00002.offsets.i64"):
        TokenShards(out)
    # Right size, wrong content: the last boundary no longer matches meta.json.
    offsets.write_bytes(np.concatenate([good[:-1], [good[-1] + 1]]).tobytes())
    with pytest.raises(StorageError, match="shard-00002.offsets.i64"):
        TokenShards(out)
    offsets.unlink()
    with pytest.raises(StorageError, match="shard-00002.offsets.i64.*missing"):
        TokenShards(out)
    (out / "meta.json").unlink()
    with pytest.raises(StorageError, match="meta.json"):
        TokenShards(out)


def test_bad_input_is_reported_with_file_and_line(tmp_path, corpus):
    tokenizer_dir = corpus[0]
    bad = tmp_path / "bad.txt"
    bad.write_bytes("一行目。\n二行目。\n".encode() + b"\xff\xfe\n")
    with pytest.raises(InputError, match=r"bad.txt, line 3"):
        encode_corpus(bad, tokenizer_dir, tmp_path / "out", workers=1)
    assert not (tmp_path / "out" / "meta.json").exists()
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(InputError, match="blank.txt"):
        encode_corpus(blank, tokenizer_dir, tmp_path / "out", workers=1)
    with pytest.raises(ConfigError, match="workers"):
        encode_corpus(bad, tokenizer_dir, tmp_path / "out", workers=0)
    with pytest.raises(ConfigError, match="shard_lines"):
        encode_corpus(bad, tokenizer_dir, tmp_path / "out", shard_lines=0)
    with pytest.raises(InputError, match="missing; is this a folder written by train_tokenizer"):
        encode_corpus(bad, tmp_path, tmp_path / "out")


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.iterdir())}


def test_rerun_skips_complete_shards_and_redoes_only_what_changed(tmp_path, corpus):
    tokenizer_dir, text, lines = corpus
    out = tmp_path / "out"
    first = encode_corpus(text, tokenizer_dir, out, shard_lines=1000, workers=1)
    assert (first["shards_encoded"], first["shards_reused"]) == (4, 0)
    before, files = _mtimes(out), shard_files(out)

    again = encode_corpus(text, tokenizer_dir, out, shard_lines=1000, workers=2)
    assert (again["shards_encoded"], again["shards_reused"]) == (0, 4)
    assert shard_files(out) == files
    assert {k: v for k, v in _mtimes(out).items() if k != "meta.json"} == \
        {k: v for k, v in before.items() if k != "meta.json"}  # not one shard file rewritten

    # One line of shard 2 changes (same line count): only shard 2 is encoded again, and the set
    # equals a fresh encoding of the new text.
    changed = list(lines)
    changed[2100] = "吾輩は猫である。名前はまだ無い。"
    text.with_name("changed.txt").write_text("\n".join(changed) + "\n", encoding="utf-8")
    edited = text.with_name("changed.txt")
    before = _mtimes(out)
    meta = encode_corpus(edited, tokenizer_dir, out, shard_lines=1000, workers=1)
    assert (meta["shards_encoded"], meta["shards_reused"]) == (1, 3)
    rewritten = {k for k, v in _mtimes(out).items() if before.get(k) != v}
    assert rewritten == {"meta.json", "shard-00002.json", "shard-00002.tokens.u16",
                         "shard-00002.offsets.i64"}
    encode_corpus(edited, tokenizer_dir, tmp_path / "fresh", shard_lines=1000, workers=1)
    assert shard_files(out) == shard_files(tmp_path / "fresh")

    # A damaged shard file fails its sha256: that shard alone is encoded again.
    tokens = out / "shard-00000.tokens.u16"
    data = bytearray(tokens.read_bytes())
    data[10] ^= 1
    tokens.write_bytes(bytes(data))
    meta = encode_corpus(edited, tokenizer_dir, out, shard_lines=1000, workers=1)
    assert (meta["shards_encoded"], meta["shards_reused"]) == (1, 3)
    assert shard_files(out) == shard_files(tmp_path / "fresh")

    # Lines appended: the partial last shard no longer ends the file, so it is encoded again.
    with open(edited, "a", encoding="utf-8") as handle:
        handle.write("追加の一行。\n")
    meta = encode_corpus(edited, tokenizer_dir, out, shard_lines=1000, workers=1)
    assert (meta["shards_encoded"], meta["shards_reused"]) == (1, 3)
    assert meta["num_lines"] == len(lines) + 1


def test_another_tokenizer_invalidates_every_shard(tmp_path, corpus):
    tokenizer_dir, text, _ = corpus
    out = tmp_path / "out"
    encode_corpus(text, tokenizer_dir, out, shard_lines=1500, workers=1)
    copy = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, copy)
    with open(copy / "tokenizer_config.json", "a", encoding="utf-8") as handle:
        handle.write("\n")  # same settings, other bytes: the recorded sha256 no longer matches
    meta = encode_corpus(text, copy, out, shard_lines=1500, workers=1)
    assert (meta["shards_encoded"], meta["shards_reused"]) == (3, 0)
