"""JGLUE fine-tuning: the task files and their errors, the metrics, the settings, and short fine-tunes
of a tiny BERT (conftest's `data` tokenizer) on slices of the real JSTS and JCommonsenseQA files.

The slices are read from ../shared/jglue at test time and written to a temporary folder.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyplm_lib.errors import ConfigError, InputError
from tinyplm_lib.evaluation.jglue import (
    PREDICTIONS_FILE,
    JglueSettings,
    ModelSource,
    collate,
    encode,
    finetune,
    load_settings,
    predict,
    sample_train,
    train,
)
from tinyplm_lib.evaluation.jglue_data import (
    JCOMMONSENSEQA,
    JSTS,
    accuracy,
    average_ranks,
    pearson,
    read_examples,
    recompute_metrics,
    spearman,
)
from tinyplm_lib.tokens.folder import CLS_TOKEN, PAD_TOKEN, SEP_TOKEN, TokenizerFolder
from tinyplm_lib.tokens.tokenizer import load_tokenizer

from conftest import REPO_ROOT

SHARED_JGLUE = REPO_ROOT.parent / "shared" / "jglue"
SETTINGS = JglueSettings(epochs=2, learning_rate=1e-3, per_device_train_batch_size=16, per_device_eval_batch_size=16,
                         max_seq_length=64, seed=7, warmup_ratio=0.1, weight_decay=0.01)
JSTS_ROW = {"sentence_pair_id": "9", "yjcaptions_id": "1-2-3", "sentence1": "犬が走っています。",
            "sentence2": "猫が寝ています。", "label": 1.2}
JCQA_ROW = {"q_id": 9, "question": "雨の日に使うものは？", "choice0": "傘", "choice1": "靴", "choice2": "本",
            "choice3": "机", "choice4": "皿", "label": 0}


def shared_file(task: str, split: str) -> Path:
    path = SHARED_JGLUE / f"{task}-v1.3-{split}.json.gz"
    assert path.is_file(), f"missing shared JGLUE file {path}"
    return path


def write_slice(task: str, split: str, rows: int, out: Path) -> Path:
    """The first `rows` lines of a real file, gzip when `out` ends in .gz (both forms are read)."""
    with gzip.open(shared_file(task, split), "rb") as handle:
        lines = [next(handle) for _ in range(rows)]
    opener = gzip.open if out.suffix == ".gz" else open
    with opener(out, "wb") as handle:
        handle.writelines(lines)
    return out


@pytest.fixture(scope="module")
def tiny_model(data, tmp_path_factory) -> Path:
    """A 1-layer, hidden-32 BertForMaskedLM folder with the `data` tokenizer's files beside it."""
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path_factory.mktemp("tiny_model")
    tokenizer = TokenizerFolder(data / "tok")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, architectures=["BertForMaskedLM"])
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(str(folder))
    for item in tokenizer.path.iterdir():
        shutil.copy2(item, folder / item.name)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("jglue")
    return {
        "jsts_train": write_slice(JSTS, "train", 64, root / "jsts-train.json.gz"),
        "jsts_dev": write_slice(JSTS, "valid", 32, root / "jsts-valid.json"),
        "jcqa_train": write_slice(JCOMMONSENSEQA, "train", 64, root / "jcqa-train.json"),
        "jcqa_dev": write_slice(JCOMMONSENSEQA, "valid", 32, root / "jcqa-valid.json.gz"),
    }


@pytest.fixture(scope="module")
def runs(tiny_model, files, tmp_path_factory) -> dict[str, Path]:
    """Five short fine-tunes: JSTS pretrained (twice, same seed), JSTS control, JCQA pretrained and control."""
    root = tmp_path_factory.mktemp("runs")
    plan = {
        "jsts": (JSTS, ModelSource.pretrained(tiny_model)),
        "jsts_again": (JSTS, ModelSource.pretrained(tiny_model)),
        "jsts_control": (JSTS, ModelSource.control(tiny_model)),
        "jcqa": (JCOMMONSENSEQA, ModelSource.pretrained(tiny_model)),
        "jcqa_control": (JCOMMONSENSEQA, ModelSource.control(tiny_model)),
    }
    for name, (task, source) in plan.items():
        prefix = "jsts" if task == JSTS else "jcqa"
        finetune(task, source, tiny_model, files[f"{prefix}_train"], files[f"{prefix}_dev"], root / name, SETTINGS)
    return {name: root / name for name in plan}


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- Task files


def test_loaders_read_the_real_files():
    jsts = read_examples(JSTS, shared_file(JSTS, "train"))
    assert len(jsts) == 12_451
    assert jsts[1].id == "1" and jsts[1].label == 3.8
    assert jsts[1].texts == (("二人の男性がジャンボジェット機を見ています。", "2人の男性が、白い飛行機を眺めています。"),)
    jcqa = read_examples(JCOMMONSENSEQA, shared_file(JCOMMONSENSEQA, "valid"))
    assert len(jcqa) == 1_119 and jcqa[0].id == 8939 and jcqa[0].label == 2
    assert jcqa[0].texts[2] == ("電子機器で使用される最も主要な電子回路基板の事をなんと言う？", "マザーボード")
    assert {len(example.texts) for example in jcqa} == {5}
    assert {example.label for example in jcqa} == {0, 1, 2, 3, 4}


def test_plain_and_gzip_files_read_alike(files, tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_bytes(gzip.decompress(files["jsts_train"].read_bytes()))
    assert read_examples(JSTS, plain) == read_examples(JSTS, files["jsts_train"])


def _bad(row: dict, **changes) -> str:
    row = {**row, **changes}
    return json.dumps({k: v for k, v in row.items() if v is not _DROP}, ensure_ascii=False)


_DROP = object()
BAD_LINES = [
    (JSTS, '{"sentence_pair_id": "9", "sentence1": "犬"', "malformed JSON", None),
    (JSTS, "[1, 2]", "expected a JSON object", None),
    (JSTS, _bad(JSTS_ROW, sentence2=_DROP), "missing", "sentence2"),
    (JSTS, _bad(JSTS_ROW, label="3.0"), "expected a number", "label"),
    (JSTS, _bad(JSTS_ROW, label=5.5), "outside [0, 5]", "label"),
    (JSTS, _bad(JSTS_ROW, sentence1=""), "empty text", "sentence1"),
    (JSTS, _bad(JSTS_ROW, sentence_pair_id=["9"]), "id", "sentence_pair_id"),
    (JSTS, _bad(JSTS_ROW, sentence_pair_id="0"), "repeats line 1", "id"),
    (JCOMMONSENSEQA, _bad(JCQA_ROW, label=5), "outside [0, 4]", "label"),
    (JCOMMONSENSEQA, _bad(JCQA_ROW, label=True), "expected an integer", "label"),
    (JCOMMONSENSEQA, _bad(JCQA_ROW, label=1.0), "expected an integer", "label"),
    (JCOMMONSENSEQA, _bad(JCQA_ROW, choice3=3), "expected a string", "choice3"),
    (JCOMMONSENSEQA, _bad(JCQA_ROW, choice4=_DROP), "missing", "choice4"),
]


@pytest.mark.parametrize(("task", "line", "reason", "field"), BAD_LINES)
def test_bad_line_names_file_line_and_field(task, line, reason, field, files, tmp_path):
    """Two good rows, a blank line, then the bad one: the error points at line 4."""
    source = files["jsts_train"] if task == JSTS else files["jcqa_train"]
    with gzip.open(source, "rb") if source.suffix == ".gz" else open(source, "rb") as handle:
        good = [next(handle) for _ in range(2)]
    path = tmp_path / "bad.json"
    path.write_bytes(b"".join(good) + b"\n" + line.encode("utf-8") + b"\n")
    with pytest.raises(InputError) as caught:
        read_examples(task, path)
    message = str(caught.value)
    assert message.startswith(f"{path}, line 4: ") and reason in message
    assert caught.value.line == 4
    if field is not None:
        assert f"field {field!r}" in message


def test_empty_missing_and_truncated_files(files, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(InputError, match="empty"):
        read_examples(JSTS, empty)
    with pytest.raises(InputError, match="not found"):
        read_examples(JSTS, tmp_path / "absent.json.gz")
    truncated = tmp_path / "truncated.json.gz"
    truncated.write_bytes(files["jsts_train"].read_bytes()[:-40])
    with pytest.raises(InputError, match=str(truncated)):
        read_examples(JSTS, truncated)
    with pytest.raises(ValueError, match="unknown JGLUE task"):
        read_examples("jnli", files["jsts_train"])


# --- Metrics


def test_pearson_and_spearman_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert pearson(x, 3 * x + 2) == pytest.approx(1.0, abs=1e-15)
    assert pearson(x, -0.5 * x) == pytest.approx(-1.0, abs=1e-15)
    assert pearson(x, np.full(5, 2.0)) is None  # constant predictions: undefined, not 0 or NaN
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)  # monotone but not linear
    assert pearson(x, np.exp(x)) < 0.95
    assert average_ranks(np.array([1.0, 2.0, 2.0, 3.0])).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks(np.array([3.0, 1.0, 3.0, 3.0])).tolist() == [3.0, 1.0, 3.0, 3.0]
    # ranks [1, 2.5, 2.5, 4] vs [1, 3, 2, 4]: centred dot 4.5 over sqrt(4.5 * 5) = 3 / sqrt(10)
    assert spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0, 4.0])) == pytest.approx(3 / math.sqrt(10))
    assert accuracy(np.array([0, 1, 2, 3]), np.array([0, 1, 4, 4])) == 0.5


# --- Settings


@pytest.mark.parametrize("name", ["default", "demo"])
def test_repository_settings_load(name):
    settings = load_settings(REPO_ROOT / "configs" / "jglue" / f"{name}.json")
    assert settings.max_seq_length <= 128 and settings.epochs >= 1
    assert (settings == JglueSettings()) == (name == "default"), "the dataclass defaults are default.json's"


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("epochs", 0, "outside"), ("epochs", 1.5, "integer"), ("learning_rate", 0, "outside"),
    ("learning_rate", "1e-4", "number"), ("warmup_ratio", 1.5, "outside"), ("weight_decay", -0.1, "outside"),
    ("per_device_train_batch_size", True, "integer"), ("max_seq_length", 4, "outside"),
    ("max_train_examples", 0, "outside"), ("seed", -1, "outside"), ("epoch", 3, "unknown setting"),
    ("_comment", ["why"], "string"),
])
def test_bad_settings_name_the_key(key, value, reason, tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"epochs": 1, key: value}), encoding="utf-8")
    with pytest.raises(ConfigError, match=reason) as caught:
        load_settings(path)
    assert caught.value.setting == key and str(path) in str(caught.value)


def test_settings_file_must_be_a_json_object(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text("{'epochs': 1}", encoding="utf-8")
    with pytest.raises(ConfigError, match=str(path)):
        load_settings(path)
    path.write_text('{"max_train_examples": null}', encoding="utf-8")
    assert load_settings(path) == JglueSettings()


def test_train_sample_is_seeded_and_in_file_order(files):
    examples = read_examples(JSTS, files["jsts_train"])
    chosen = sample_train(examples, replace(SETTINGS, max_train_examples=10))
    again = sample_train(examples, replace(SETTINGS, max_train_examples=10))
    other = sample_train(examples, replace(SETTINGS, max_train_examples=10, seed=8))
    assert chosen == again != other and len(chosen) == 10
    positions = [examples.index(example) for example in chosen]
    assert positions == sorted(positions)
    assert sample_train(examples, replace(SETTINGS, max_train_examples=1000)) == examples


# --- Models and fine-tuning


def test_pretrained_source_keeps_the_encoder_and_control_is_seeded(tiny_model):
    from transformers import BertForMaskedLM

    saved = BertForMaskedLM.from_pretrained(str(tiny_model)).bert.embeddings.word_embeddings.weight
    pretrained = ModelSource.pretrained(tiny_model).build(JSTS, seed=1)
    control = ModelSource.control(tiny_model).build(JSTS, seed=1)
    control_again = ModelSource.control(tiny_model).build(JSTS, seed=1)
    assert type(pretrained).__name__ == "BertForSequenceClassification"
    assert pretrained.config.problem_type == "regression" and pretrained.config.num_labels == 1
    assert torch.equal(pretrained.bert.embeddings.word_embeddings.weight, saved)
    assert not torch.equal(control.bert.embeddings.word_embeddings.weight, saved)
    assert all(torch.equal(a, b) for a, b in zip(control.state_dict().values(), control_again.state_dict().values(),
                                                 strict=True))
    assert type(ModelSource.pretrained(tiny_model).build(JCOMMONSENSEQA, seed=1)).__name__ == "BertForMultipleChoice"


def test_pairs_are_encoded_with_segments_and_padded_per_batch(tiny_model, files):
    tokenizer = load_tokenizer(tiny_model)
    ids = TokenizerFolder(tiny_model).special_ids()
    jsts = encode(tokenizer, read_examples(JSTS, files["jsts_dev"])[:4], max_seq_length=16)
    first = jsts[0].input_ids[0]
    assert first[0] == ids[CLS_TOKEN] and first.count(ids[SEP_TOKEN]) == 2 and first[-1] == ids[SEP_TOKEN]
    types = jsts[0].token_type_ids[0]
    second_start = first.index(ids[SEP_TOKEN]) + 1
    assert types == [0] * second_start + [1] * (len(first) - second_start)
    assert all(len(item.input_ids[0]) <= 16 for item in jsts)
    batch = collate(jsts, ids[PAD_TOKEN])
    lengths = [len(item.input_ids[0]) for item in jsts]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["input_ids"][batch["attention_mask"] == 0].eq(ids[PAD_TOKEN]).all()
    jcqa = encode(tokenizer, read_examples(JCOMMONSENSEQA, files["jcqa_dev"])[:3], max_seq_length=64)
    assert collate(jcqa, ids[PAD_TOKEN])["token_type_ids"].shape[:2] == (3, 5)


def test_training_fits_the_train_set(tiny_model, files):
    """Many passes over 32 pairs: the squared error on them falls well below where it started."""
    tokenizer = load_tokenizer(tiny_model)
    examples = read_examples(JSTS, files["jsts_train"])[:32]
    encoded = encode(tokenizer, examples, max_seq_length=64)
    labels = torch.tensor([example.label for example in examples])
    model = ModelSource.pretrained(tiny_model).build(JSTS, seed=3)

    def squared_error() -> float:
        return float(np.mean((predict(model, encoded, 16, tokenizer.pad_token_id, torch.device("cpu")) -
                              labels.numpy()) ** 2))

    before = squared_error()
    result = train(model, encoded, labels, replace(SETTINGS, epochs=30, learning_rate=1e-2), tokenizer.pad_token_id,
                   torch.device("cpu"), log=lambda _: None)
    assert result.steps == 60
    assert squared_error() < 0.25 * before  # measured: 9.03 -> 0.60


def test_jsts_outputs_recompute_to_the_reported_scores(runs, files):
    metrics = json.loads((runs["jsts"] / "metrics.json").read_text(encoding="utf-8"))
    rows = rows_of(runs["jsts"] / PREDICTIONS_FILE)
    assert [row["id"] for row in rows] == [example.id for example in read_examples(JSTS, files["jsts_dev"])]
    assert all(isinstance(row["prediction"], float) for row in rows)
    recomputed = recompute_metrics(JSTS, runs["jsts"] / PREDICTIONS_FILE)
    assert recomputed == {key: metrics[key] for key in ("pearson", "spearman", "examples")}
    labels, predictions = (np.array([row[k] for row in rows]) for k in ("label", "prediction"))
    assert metrics["pearson"] == pytest.approx(np.corrcoef(labels, predictions)[0, 1])
    assert metrics["task"] == JSTS and metrics["examples"] == 32 and metrics["train_examples"] == 64
    assert metrics["steps"] == 8  # 2 epochs of ceil(64 / 16)
    assert metrics["model_source"] == "pretrained" and metrics["device"] == "cpu"
    assert metrics["settings"]["seed"] == SETTINGS.seed


def test_jcqa_outputs_recompute_to_the_reported_scores(runs, files):
    metrics = json.loads((runs["jcqa"] / "metrics.json").read_text(encoding="utf-8"))
    rows = rows_of(runs["jcqa"] / PREDICTIONS_FILE)
    assert [row["id"] for row in rows] == [example.id for example in read_examples(JCOMMONSENSEQA, files["jcqa_dev"])]
    for row in rows:
        assert len(row["scores"]) == 5 and row["prediction"] == int(np.argmax(row["scores"]))
    assert metrics["accuracy"] == sum(row["prediction"] == row["label"] for row in rows) / 32
    assert recompute_metrics(JCOMMONSENSEQA, runs["jcqa"] / PREDICTIONS_FILE) == {
        "accuracy": metrics["accuracy"], "examples": 32}


def test_recompute_reads_the_file(runs, tmp_path):
    """A changed prediction changes the recomputed score: nothing is taken from metrics.json."""
    rows = rows_of(runs["jcqa"] / PREDICTIONS_FILE)
    before = recompute_metrics(JCOMMONSENSEQA, runs["jcqa"] / PREDICTIONS_FILE)["accuracy"]
    right = rows[0]["prediction"] == rows[0]["label"]
    rows[0]["prediction"] = (rows[0]["label"] + 1) % 5 if right else rows[0]["label"]
    edited = tmp_path / PREDICTIONS_FILE
    edited.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    assert recompute_metrics(JCOMMONSENSEQA, edited)["accuracy"] == pytest.approx(before + (-1 if right else 1) / 32)
    edited.write_text('{"id": 1, "label": 2}\n', encoding="utf-8")
    with pytest.raises(InputError, match="line 1: field 'prediction': missing"):
        recompute_metrics(JCOMMONSENSEQA, edited)


def test_same_seed_same_predictions_and_control_differs(runs):
    assert (runs["jsts"] / PREDICTIONS_FILE).read_bytes() == (runs["jsts_again"] / PREDICTIONS_FILE).read_bytes()
    for task in ("jsts", "jcqa"):
        pretrained, control = rows_of(runs[task] / PREDICTIONS_FILE), rows_of(runs[f"{task}_control"] / PREDICTIONS_FILE)
        key = "prediction" if task == "jsts" else "scores"
        assert [row[key] for row in pretrained] != [row[key] for row in control]
        assert json.loads((runs[f"{task}_control"] / "metrics.json").read_text())["model_source"] == "control"


def test_finetune_refuses_what_cannot_fit(tiny_model, data, files, tmp_path):
    too_long = replace(SETTINGS, max_seq_length=256)
    with pytest.raises(ConfigError, match="max_position_embeddings 128") as caught:
        finetune(JSTS, ModelSource.pretrained(tiny_model), tiny_model, files["jsts_train"], files["jsts_dev"],
                 tmp_path / "out", too_long)
    assert caught.value.setting == "max_seq_length"
    other_tokenizer = tmp_path / "other_tokenizer"
    shutil.copytree(tiny_model, other_tokenizer)
    tokens = (other_tokenizer / "vocab.txt").read_text(encoding="utf-8").split("\n")
    tokens[20], tokens[21] = tokens[21], tokens[20]  # same size, different ids
    (other_tokenizer / "vocab.txt").write_text("\n".join(tokens), encoding="utf-8")
    with pytest.raises(ConfigError, match="is not the tokenizer") as caught:
        finetune(JSTS, ModelSource.pretrained(tiny_model), other_tokenizer, files["jsts_train"], files["jsts_dev"],
                 tmp_path / "out", SETTINGS)
    assert caught.value.setting == "tokenizer_dir"
    with pytest.raises(InputError, match="config.json"):
        finetune(JSTS, ModelSource.control(tmp_path), tiny_model, files["jsts_train"], files["jsts_dev"],
                 tmp_path / "out", SETTINGS)
    assert not (tmp_path / "out").exists()


def test_only_jglues_own_files_count_as_jglue(tmp_path):
    from tinyplm_lib.evaluation.jglue_data import is_jglue_v13

    assert is_jglue_v13(JSTS, "dev", SHARED_JGLUE / "jsts-v1.3-valid.json.gz")
    assert is_jglue_v13(JCOMMONSENSEQA, "train", SHARED_JGLUE / "jcommonsenseqa-v1.3-train.json.gz")
    assert not is_jglue_v13(JSTS, "train", SHARED_JGLUE / "jsts-v1.3-valid.json.gz")  # the wrong split
    demo = REPO_ROOT / "data" / "demo" / "jglue" / "jsts-v1.3" / "valid-v1.3.json"
    assert not is_jglue_v13(JSTS, "dev", demo)
    edited = tmp_path / "valid.json"
    edited.write_bytes(gzip.decompress((SHARED_JGLUE / "jsts-v1.3-valid.json.gz").read_bytes()) + b"\n")
    assert not is_jglue_v13(JSTS, "dev", edited)  # one byte more is another file
