"""The fixed MLM evaluation set: built byte-identically from real shards, masked once by training's
rule, and scored at exactly its stored positions; mismatched tokenizers and lengths are refused."""

from __future__ import annotations

import json
import lzma
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from tinyplm_lib.errors import ConfigError, InputError, StorageError
from tinyplm_lib.evaluation.mlm import (
    MlmEvalSettings,
    build_mlm_eval_set,
    evaluate_mlm,
    evaluate_mlm_folder,
    read_mlm_eval_set,
)
from tinyplm_lib.files import sha256_file
from tinyplm_lib.tokens.folder import TokenizerFolder
from tinyplm_lib.tokens.shard_writer import encode_corpus
from tinyplm_lib.tokens.shards import TokenShards

IGNORE = -100
WEB_LINES = 600  # of ../shared/corpora's cc100-format sample: a few thousand maskable tokens


@pytest.fixture(scope="module")
def sources(data, web_sample, tmp_path_factory) -> dict[str, Path]:
    """cc100: the shared web sample's first lines encoded here; jawiki: the session's validation shards."""
    root = tmp_path_factory.mktemp("mlm-eval-sources")
    with lzma.open(web_sample, "rt", encoding="utf-8") as handle:
        lines = [next(handle) for _ in range(WEB_LINES)]
    (root / "web.txt").write_text("".join(lines), encoding="utf-8")
    encode_corpus(root / "web.txt", data / "tok", root / "cc100", workers=1)
    return {"cc100": root / "cc100", "jawiki": data / "shards" / "validation"}


@pytest.fixture(scope="module")
def eval_dir(sources, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mlm-eval") / "set"
    build_mlm_eval_set(sources, data / "tok", out, MlmEvalSettings())
    return out


def _tiny_model_dir(root: Path, tokenizer_dir: Path, *, seed: int, max_positions: int = 128) -> Path:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=TokenizerFolder(tokenizer_dir).vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=max_positions)
    folder = root / f"model-{seed}-{max_positions}"
    BertForMaskedLM(config).save_pretrained(str(folder))
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, folder / item.name)
    return folder


class CopyModel(torch.nn.Module):
    """Predicts each position's own input token: right exactly where a chosen token was left unchanged."""

    def __init__(self, vocab_size: int, scale: float = 5.0) -> None:
        super().__init__()
        self.config = BertConfig(vocab_size=vocab_size, max_position_embeddings=512)
        self.scale = scale
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def bert(self, input_ids, attention_mask):
        hidden = torch.nn.functional.one_hot(input_ids, self.config.vocab_size).float() * self.scale
        return SimpleNamespace(last_hidden_state=hidden)

    def cls(self, hidden):
        return hidden


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("field, value", [("max_sequences", 0), ("max_seq_length", 2), ("mlm_probability", 1.0),
                                          ("mlm_probability", 0.0), ("seed", -1)])
def test_settings_refuse_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError) as caught:
        MlmEvalSettings(**{field: value}).validate()
    assert caught.value.setting == field


def test_same_inputs_give_byte_identical_files(sources, data, eval_dir, tmp_path):
    again = tmp_path / "again"
    build_mlm_eval_set(sources, data / "tok", again, MlmEvalSettings())
    assert _files(again) == _files(eval_dir)
    build_mlm_eval_set(sources, data / "tok", again, MlmEvalSettings())  # replaces an earlier set
    assert _files(again) == _files(eval_dir)
    build_mlm_eval_set(sources, data / "tok", again, MlmEvalSettings(seed=7))
    assert _files(again)["cc100/labels.npy"] != _files(eval_dir)["cc100/labels.npy"]
    meta = json.loads((eval_dir / "meta.json").read_text())
    assert meta["tokenizer_files_sha256"] == TokenizerFolder(data / "tok").file_hashes()
    assert meta["corpora"]["cc100"]["source"]["meta_sha256"] == sha256_file(sources["cc100"] / "meta.json")
    assert sorted(p.name for p in again.parent.iterdir()) == ["again"]  # no temporary left beside it


def test_rows_are_sampled_single_sentences_truncated_at_max_seq_length(sources, data, tmp_path):
    out = tmp_path / "short"
    meta = build_mlm_eval_set(sources, data / "tok", out, MlmEvalSettings(max_sequences=300, max_seq_length=16))
    specials = TokenizerFolder(data / "tok").special_ids()
    arrays = read_mlm_eval_set(out).corpora["cc100"]
    shards = TokenShards(sources["cc100"])
    assert shards.num_sentences > 300 and len(arrays.lengths) == 300
    index = arrays.sentence_index
    assert (np.diff(index) > 0).all() and index[-1] > 299  # a sample across the split, in corpus order
    assert arrays.input_ids.shape[1] == 16 and arrays.lengths.max() == 16
    original = np.where(arrays.labels != IGNORE, arrays.labels, arrays.input_ids)  # masks undone
    long_ones = 0
    for row, index in enumerate(arrays.sentence_index):
        sentence = shards.sentence(int(index)).astype(np.int64)
        long_ones += len(sentence) > 14
        expected = [specials["[CLS]"], *sentence[:14], specials["[SEP]"]]
        assert arrays.lengths[row] == len(expected)
        assert original[row, :len(expected)].tolist() == expected
        assert (arrays.input_ids[row, len(expected):] == specials["[PAD]"]).all()
    assert long_ones > 0 and meta["corpora"]["cc100"]["truncated"] == long_ones


def test_masks_follow_bert_rule_and_never_touch_specials(eval_dir, data):
    folder = TokenizerFolder(data / "tok")
    mask_id, first_regular = folder.special_ids()["[MASK]"], folder.first_regular_id()
    eval_set = read_mlm_eval_set(eval_dir)
    candidates = chosen = as_mask = unchanged = replaced = 0
    for arrays in eval_set.corpora.values():
        ids, labels = arrays.input_ids.astype(np.int64), arrays.labels.astype(np.int64)
        original = np.where(labels != IGNORE, labels, ids)
        inside = np.arange(ids.shape[1])[None, :] < arrays.lengths[:, None]
        special = original < first_regular
        assert not (labels != IGNORE)[special | ~inside].any()  # [CLS], [SEP], [PAD], [UNK] never chosen
        maskable = (inside & ~special).any(axis=1)  # not all rows: the tiny vocabulary gives rows of [UNK] only
        assert ((labels != IGNORE).any(axis=1) == maskable).all()  # every row that can be scored is
        picked = labels != IGNORE
        candidates += int((inside & ~special).sum())
        chosen += int(picked.sum())
        as_mask += int((ids[picked] == mask_id).sum())
        unchanged += int((ids[picked] == labels[picked]).sum())
        others = picked & (ids != mask_id) & (ids != labels)
        replaced += int(others.sum())
        assert (ids[others] >= first_regular).all()  # random replacements are regular tokens
    assert chosen >= 3000, "too few masked tokens for the tolerances below"
    assert abs(chosen / candidates - 0.15) < 0.015
    assert abs(as_mask / chosen - 0.8) < 0.03
    assert abs(unchanged / chosen - 0.1) < 0.025 and abs(replaced / chosen - 0.1) < 0.025
    assert sum(entry["masked_tokens"] for entry in eval_set.meta["corpora"].values()) == chosen


def test_masks_are_fixed_for_every_model(eval_dir, data, tmp_path):
    first = _tiny_model_dir(tmp_path, data / "tok", seed=0)
    second = _tiny_model_dir(tmp_path, data / "tok", seed=1)
    a = evaluate_mlm_folder(first, eval_dir, device="cpu")
    assert evaluate_mlm_folder(first, eval_dir, device="cpu") == a
    other_batches = evaluate_mlm_folder(first, eval_dir, batch_size=50, device="cpu")
    assert all(other_batches[name]["loss"] == pytest.approx(a[name]["loss"], rel=1e-5) for name in a)
    b = evaluate_mlm_folder(second, eval_dir, device="cpu")
    meta = json.loads((eval_dir / "meta.json").read_text())
    assert set(a) == set(b) == {"cc100", "jawiki"}
    for name in a:
        assert a[name]["masked_tokens"] == b[name]["masked_tokens"] == meta["corpora"][name]["masked_tokens"]
        assert a[name]["sequences"] == b[name]["sequences"] == meta["corpora"][name]["sequences"]
        assert a[name]["loss"] != b[name]["loss"]
        assert a[name]["perplexity"] == pytest.approx(math.exp(a[name]["loss"]))


def test_scores_are_exact_for_a_model_with_known_predictions(eval_dir, tmp_path):
    eval_set = read_mlm_eval_set(eval_dir)
    model = CopyModel(eval_set.meta["vocab_size"])
    result = evaluate_mlm(model, eval_dir, batch_size=37)
    lse = math.log(math.exp(model.scale) + model.config.vocab_size - 1)  # log-sum-exp of a one-hot row
    for name, arrays in eval_set.corpora.items():
        picked = arrays.labels != IGNORE
        right = int((arrays.input_ids[picked] == arrays.labels[picked]).sum())
        total = int(picked.sum())
        assert 0 < right < total
        assert result[name]["accuracy"] == right / total
        expected_loss = (right * (lse - model.scale) + (total - right) * lse) / total
        assert result[name]["loss"] == pytest.approx(expected_loss, rel=1e-5)
    # The same set with every chosen token left unchanged: the copy model is then always right.
    restored = tmp_path / "restored"
    shutil.copytree(eval_dir, restored)
    meta = json.loads((restored / "meta.json").read_text())
    for name, arrays in eval_set.corpora.items():
        path = restored / name / "input_ids.npy"
        np.save(path, np.where(arrays.labels != IGNORE, arrays.labels, arrays.input_ids).astype(np.uint16))
        with pytest.raises(StorageError, match="input_ids.npy"):
            read_mlm_eval_set(restored)  # an edited file is noticed
        meta["corpora"][name]["files"]["input_ids.npy"] = sha256_file(path)
        (restored / "meta.json").write_text(json.dumps(meta))
    perfect = evaluate_mlm(model, restored)
    assert all(perfect[name]["accuracy"] == 1.0 for name in perfect)
    assert all(perfect[name]["loss"] == pytest.approx(lse - model.scale, rel=1e-4) for name in perfect)


def test_a_model_with_another_tokenizer_is_refused(eval_dir, data, tmp_path):
    model_dir = _tiny_model_dir(tmp_path, data / "tok", seed=0)
    tokens = (model_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    tokens[-3], tokens[-2] = tokens[-2], tokens[-3]  # same size, two ids swapped
    (model_dir / "vocab.txt").write_text("\n".join(tokens), encoding="utf-8")
    with pytest.raises(InputError, match="vocab.txt"):
        evaluate_mlm_folder(model_dir, eval_dir, device="cpu")
    vocab_size = json.loads((eval_dir / "meta.json").read_text())["vocab_size"]
    bigger = BertForMaskedLM(BertConfig(vocab_size=vocab_size + 1, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ConfigError, match="vocab_size"):
        evaluate_mlm(bigger, eval_dir)


def test_shards_of_another_tokenizer_are_refused(sources, data, tmp_path):
    other = tmp_path / "tok"
    shutil.copytree(data / "tok", other)
    with (other / "vocab.txt").open("a", encoding="utf-8") as handle:
        handle.write("追加トークン\n")
    with pytest.raises(InputError, match="another tokenizer"):
        build_mlm_eval_set(sources, other, tmp_path / "set")
    assert not (tmp_path / "set").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_a_set_longer_than_the_model_positions_is_refused(eval_dir, data, tmp_path):
    model_dir = _tiny_model_dir(tmp_path, data / "tok", seed=0, max_positions=64)
    with pytest.raises(ConfigError, match="max_position_embeddings 64"):
        evaluate_mlm_folder(model_dir, eval_dir, device="cpu")


def test_a_folder_that_is_not_a_set_is_not_replaced(sources, data, tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="refusing to replace"):
        build_mlm_eval_set(sources, data / "tok", tmp_path / "set")
    assert (tmp_path / "set" / "notes.txt").read_text() == "keep me"
