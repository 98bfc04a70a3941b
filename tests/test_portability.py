"""A model folder any Hugging Face user can load: tokenizer_config.json fields that transformers 4.40+
and 5.x both read the same way, files readable by all, and the model card's snippet that runs.

transformers 4.x itself is not installed here: the fields pinned below are the ones that loaded
under 4.40.2, 4.46.3 and 4.57.6 with the ids, logits and fill-mask answers of 5.25 (AutoTokenizer,
AutoModelForMaskedLM, pipeline("fill-mask")); a change to them must be checked there again.
Trains a 4-step model on conftest's `data`: about 10 s.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tinyplm_lib.evaluation.card import CardInfo, CorpusInfo, StageInfo, model_card, write_model_card
from tinyplm_lib.tokens.folder import SPECIAL_TOKENS
from tinyplm_lib.training.stage import StageOptions, train_stage

from conftest import REPO_ROOT

UNUSED = [f"[unused{i}]" for i in range(10)]
# Every key of the saved tokenizer_config.json. 4.57 reads a list under `extra_special_tokens` as
# a dict and fails, so the unused slots travel as `additional_special_tokens`; a key added by a
# transformers upgrade fails this test until the folder has been loaded under 4.x again.
PORTABLE_KEYS = {
    "added_tokens_decoder", "additional_special_tokens", "backend", "clean_up_tokenization_spaces", "cls_token",
    "do_lower_case",
    "do_subword_tokenize", "do_word_tokenize", "jumanpp_kwargs", "mask_token", "mecab_kwargs", "model_max_length",
    "never_split", "pad_token", "sep_token", "subword_tokenizer_type", "sudachi_kwargs", "tokenizer_class",
    "unk_token", "word_tokenizer_type",
}


@pytest.fixture(scope="module")
def model_dir(data, tmp_path_factory) -> Path:
    """A 4-step stage folder, written under umask 077 so that only an explicit chmod makes it 0644."""
    out = tmp_path_factory.mktemp("portable") / "stage1"
    options = StageOptions(model_config=REPO_ROOT / "configs/model/bert-demo.json",
                           training_args=REPO_ROOT / "configs/train/demo-stage1.json", max_seq_length=64,
                           overrides={"max_steps": 4, "logging_steps": 2, "eval_steps": 4})
    old = os.umask(0o077)
    try:
        train_stage(data / "shards" / "train", data / "shards" / "validation", data / "tok", out, options)
    finally:
        os.umask(old)
    return out


def test_tokenizer_config_holds_only_fields_transformers_4_reads(data):
    config = json.loads((data / "tok" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert set(config) == PORTABLE_KEYS
    assert config["additional_special_tokens"] == UNUSED
    assert config["clean_up_tokenization_spaces"] is False  # 4.40 defaults to true: "123 !" -> "123!"
    assert config["tokenizer_class"] == "BertJapaneseTokenizer"
    assert (config["word_tokenizer_type"], config["subword_tokenizer_type"]) == ("mecab", "wordpiece")
    assert config["mecab_kwargs"] == {"mecab_dic": "unidic_lite"} and config["do_lower_case"] is False
    assert [config[f"{name}_token"] for name in ("pad", "unk", "cls", "sep", "mask")] == list(SPECIAL_TOKENS)
    assert config["model_max_length"] == 64
    # The ids of the specials and unused slots, and the flags FastEncoder and transformers rely on.
    decoder = config["added_tokens_decoder"]
    assert {int(i): entry["content"] for i, entry in decoder.items()} == dict(enumerate([*SPECIAL_TOKENS, *UNUSED]))
    assert all(entry["special"] and not (entry["lstrip"] or entry["rstrip"] or entry["single_word"])
               for entry in decoder.values())
    assert not (data / "tok" / "tokenizer.json").exists()  # no fast tokenizer file for either version to prefer


def test_transformers_5_reads_the_unused_slots_as_special(data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(data / "tok"))
    assert tokenizer.extra_special_tokens == UNUSED
    assert set(UNUSED) <= set(tokenizer.all_special_tokens)
    ids = tokenizer.encode("[unused3]と[unused9]が[MASK]", add_special_tokens=False)
    assert ids[0] == 8 and 14 in ids and ids[-1] == 4  # protected from MeCab, at their own ids
    assert "unused" not in tokenizer.decode(ids, skip_special_tokens=True)


def test_every_file_of_a_model_folder_is_readable_by_all(model_dir):
    write_model_card(model_dir, card_info(model_dir))
    paths = [model_dir, *model_dir.rglob("*")]
    assert {p.name for p in paths} >= {"model.safetensors", "config.json", "tokenizer_config.json", "README.md"}
    modes = {str(p.relative_to(model_dir)): oct(p.stat().st_mode & 0o777) for p in paths}
    assert modes == {name: oct(0o755 if (model_dir / name).is_dir() else 0o644) for name in modes}


def card_info(model_dir: Path) -> CardInfo:
    metrics = json.loads((model_dir / "metrics.json").read_text(encoding="utf-8"))
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return CardInfo(
        model_name="tinyplm-demo", corpora=(CorpusInfo("jawiki", "wikipedia", "Demo JaWiki", "demo", 1, 1),),
        stages=(StageInfo("stage1", "jawiki", metrics["global_step"], metrics["tokens_seen"],
                          metrics["wall_time_s"], metrics["device"], 64, 0.15),),
        parameters=metrics["parameters"], num_hidden_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"], num_attention_heads=config["num_attention_heads"],
        vocab_size=config["vocab_size"], tokenizer_sample_lines=1, repo_id=str(model_dir))


def test_the_cards_load_snippet_runs_on_the_folder(model_dir):
    snippet = re.search(r"```python\n(.*?)```", model_card(card_info(model_dir)), flags=re.DOTALL).group(1)
    printed = []
    exec(snippet, {"print": printed.append})  # noqa: S102 - the card's own code, on the folder
    (predictions,) = printed
    assert len(predictions) == 5  # the pipeline's top_k
    assert [p["score"] for p in predictions] == sorted((p["score"] for p in predictions), reverse=True)
    # The demo vocabulary lacks 首都 ([UNK], dropped from `sequence`): the prediction fills the mask.
    assert all(p["sequence"].startswith("日本") and p["token_str"].removeprefix("##") in p["sequence"]
               for p in predictions)
