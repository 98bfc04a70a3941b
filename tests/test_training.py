"""Training one stage from the library: folder contract, metrics, stage 2 from stage 1, bad settings.

Checkpoints and resuming are in test_resume.py; both train on conftest's session fixture `data`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinyplm_lib.errors import ConfigError
from tinyplm_lib.training.arguments import load_training_arguments
from tinyplm_lib.training.stage import StageOptions, train_stage

from conftest import REPO_ROOT

MODEL = REPO_ROOT / "configs" / "model" / "bert-demo.json"
ARGS = REPO_ROOT / "configs" / "train" / "demo-stage1.json"


def _train(data: Path, out: Path, **kwargs) -> dict:
    options = StageOptions(model_config=MODEL, training_args=ARGS, max_seq_length=64,
                           overrides={"max_steps": 40, "logging_steps": 10}, **kwargs)
    return train_stage(data / "shards" / "train", data / "shards" / "validation", data / "tok", out, options)


def test_stage_writes_a_standard_hf_folder_with_metrics(data, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    metrics = _train(data, tmp_path / "stage1")
    folder = tmp_path / "stage1"
    for name in ("model.safetensors", "config.json", "vocab.txt", "tokenizer_config.json", "metrics.json"):
        assert (folder / name).is_file(), name
    assert not list(folder.glob("*.bin")), "weights are safetensors, never pickles"
    assert (folder / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((folder / "tensorboard").glob("events.out.tfevents.*")), "TensorBoard event file"
    assert metrics["global_step"] == 40
    assert [h["step"] for h in metrics["history"] if "train_loss" in h] == [10, 20, 30, 40]
    assert metrics["eval_loss"] < metrics["untrained_eval_loss"]
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["eval_loss"], rel=1e-6)
    assert json.loads((folder / "metrics.json").read_text())["eval_loss"] == metrics["eval_loss"]
    model = AutoModelForMaskedLM.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert model.config.vocab_size == len(tokenizer)  # the embedding follows the tokenizer
    assert model.config.hidden_size == json.loads(MODEL.read_text())["hidden_size"]


def test_stage2_continues_from_stage1_weights(data, tmp_path):
    stage1 = _train(data, tmp_path / "s1")
    stage2 = _train(data, tmp_path / "s2", init_from=tmp_path / "s1")
    # Stage 2 starts where stage 1 ended (same data here): its starting loss is stage 1's final loss.
    assert stage2["initial_eval_loss"] == pytest.approx(stage1["eval_loss"], rel=1e-4)
    assert stage2["initial_eval_loss"] < stage2["untrained_eval_loss"]


def test_training_is_reproducible(data, tmp_path):
    first = _train(data, tmp_path / "a")
    second = _train(data, tmp_path / "b")
    assert first["eval_loss"] == pytest.approx(second["eval_loss"], rel=1e-5)


def test_stage2_refuses_a_different_tokenizer(data, tmp_path):
    _train(data, tmp_path / "s1")
    vocab = tmp_path / "s1" / "vocab.txt"
    vocab.write_text(vocab.read_text(encoding="utf-8").replace("[unused0]", "[unusedX]"), encoding="utf-8")
    with pytest.raises(ConfigError, match="init_from"):
        _train(data, tmp_path / "s2", init_from=tmp_path / "s1")


def test_model_smaller_than_vocab_is_rejected(data, tmp_path):
    small = tmp_path / "small.json"
    small.write_text(json.dumps({**json.loads(MODEL.read_text()), "vocab_size": 100}))
    options = StageOptions(model_config=small, training_args=ARGS, max_seq_length=64)
    with pytest.raises(ConfigError, match="vocab_size"):
        train_stage(data / "shards" / "train", data / "shards" / "validation", data / "tok",
                    tmp_path / "out", options)


def test_batch_larger_than_the_data_is_rejected(data, tmp_path):
    # 564 packed sequences cannot fill one optimizer step of 100 x 8; this used to loop forever.
    options = StageOptions(model_config=MODEL, training_args=ARGS, max_seq_length=64,
                           overrides={"per_device_train_batch_size": 100, "gradient_accumulation_steps": 8})
    with pytest.raises(ConfigError, match="per_device_train_batch_size.*do not fill one optimizer step"):
        train_stage(data / "shards" / "train", data / "shards" / "validation", data / "tok", tmp_path / "out",
                    options)


def test_run_mlm_json_is_accepted_and_unknown_keys_rejected(tmp_path):
    legacy = tmp_path / "run_mlm.json"
    legacy.write_text(json.dumps({"model_name_or_path": "x", "train_file": "a.txt", "line_by_line": True,
                                  "max_seq_length": 256, "warmup_ratio": 0.08, "learning_rate": 5e-5,
                                  "evaluation_strategy": "steps", "eval_steps": 7, "num_train_epochs": 1}))
    args, extras = load_training_arguments(legacy, tmp_path / "out")
    assert extras == {"max_seq_length": 256}
    assert args.warmup_steps == 0.08 and args.get_warmup_steps(1000) == 80
    assert str(args.eval_strategy.value) == "steps"
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"learning_rat": 1e-3}))
    with pytest.raises(ConfigError, match="learning_rat"):
        load_training_arguments(typo, tmp_path / "out")
    bad = tmp_path / "bad.json"
    bad.write_text('{"learning_rate": 1e-3,\n "seed": }')
    with pytest.raises(ConfigError, match="line 2"):
        load_training_arguments(bad, tmp_path / "out")
    negative = tmp_path / "neg.json"
    negative.write_text(json.dumps({"learning_rate": -1}))
    with pytest.raises(ConfigError, match="learning_rate"):
        load_training_arguments(negative, tmp_path / "out")


def test_packed_sequences_match_naive_concatenation(data):
    """The vectorised packing gives [CLS] s1 [SEP] s2 [SEP] … exactly, sentence by sentence."""
    import itertools

    import numpy as np

    from tinyplm_lib.tokens.shards import TokenShards
    from tinyplm_lib.training.packing import PackedSequences

    for max_len in (16, 64):  # 16 forces over-long sentences to be cut
        packed = PackedSequences(data / "shards" / "train", max_len, cls_id=2, sep_id=3, pad_id=0)
        shards = TokenShards(data / "shards" / "train")
        for index, (first, last) in enumerate(itertools.pairwise(packed.sentence_bounds.tolist())):
            naive = [2]
            for sentence in range(first, last):
                naive += shards.sentence(sentence).tolist() + [3]
            if len(naive) > max_len:
                naive = naive[: max_len - 1] + [3]
            assert packed[index].tolist() == naive
        _, attention = packed.batch(np.array([0, len(packed) - 1]))
        assert attention.sum().item() == packed.seq_lengths[[0, len(packed) - 1]].sum()


def test_masked_only_projection_gives_the_full_head_loss():
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from tinyplm_lib.training.model import masked_predictions

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64)).eval()
    inputs = torch.randint(5, 300, (3, 20))
    attention = torch.ones_like(inputs)
    labels = torch.full_like(inputs, -100)
    labels[:, ::4] = inputs[:, ::4]
    full = model(input_ids=inputs, attention_mask=attention, labels=labels).loss
    logits, targets = masked_predictions(model, inputs, attention, labels)
    assert logits.shape == (15, 300)
    assert torch.nn.functional.cross_entropy(logits, targets).item() == pytest.approx(full.item(), rel=1e-5)


@pytest.mark.parametrize("rows", [0, 1, 15, 16, 17, 70])
def test_chunked_cross_entropy_equals_torch_in_loss_and_gradient(rows):
    """The CPU loss (rows a chunk at a time) against torch's, for fp32 and bf16 logits, across chunk edges."""
    import torch

    from tinyplm_lib.training.cpu_kernels import ChunkedCrossEntropy
    from tinyplm_lib.training.loop import masked_loss_sum

    generator = torch.Generator().manual_seed(rows)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(rows, 5000, generator=generator) * 4).to(dtype)
        targets = torch.randint(0, 5000, (rows,), generator=generator)
        ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        loss = masked_loss_sum(ours, targets) * 0.37
        expected = torch.nn.functional.cross_entropy(theirs.float(), targets, reduction="sum") * 0.37
        (loss + 0 * ours.sum()).backward()  # a graph even with no rows
        (expected + 0 * theirs.sum()).backward()
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-5)
        assert ours.grad.dtype == dtype
        assert torch.allclose(ours.grad.float(), theirs.grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                              atol=1e-3 if dtype == torch.bfloat16 else 1e-7)
    assert ChunkedCrossEntropy.ROWS < 70  # the largest case spans several chunks


def test_attention_setting_is_checked_and_resolved_per_device():
    import torch

    from tinyplm_lib.training.arguments import RuntimeOptions

    assert RuntimeOptions().resolve_attention(torch.device("cpu")) == "tinyplm_cpu"
    assert RuntimeOptions().resolve_attention(torch.device("cuda")) == "sdpa"
    assert RuntimeOptions(attention="sdpa").resolve_attention(torch.device("cpu")) == "sdpa"
    with pytest.raises(ConfigError, match="attention"):
        RuntimeOptions(attention="flash").resolve_attention(torch.device("cpu"))


@pytest.mark.slow
def test_compiled_training_matches_eager_without_dropout(data, tmp_path):
    """`runtime.compile`: static-width batches and a compiled encoder train like the eager path (no dropout,
    whose random streams differ): the same losses step by step and the same final evaluation."""
    import torch._dynamo

    from tinyplm_lib.training.stage import RuntimeOptions

    config = json.loads(MODEL.read_text()) | {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    (tmp_path / "model.json").write_text(json.dumps(config))
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        options = StageOptions(model_config=tmp_path / "model.json", training_args=ARGS, max_seq_length=64,
                               overrides={"max_steps": 6, "logging_steps": 1})
        runs[compiled] = train_stage(data / "shards" / "train", data / "shards" / "validation", data / "tok",
                                     tmp_path / f"out-{compiled}", options,
                                     runtime=RuntimeOptions(precision="fp32", compile=compiled, dataloader_workers=0))
    losses = {compiled: [h["train_loss"] for h in run["history"] if "train_loss" in h] for compiled, run in runs.items()}
    assert len(losses[True]) == 6
    # Fused kernels sum in another order: equal at first, drifting by float rounding as updates compound.
    assert losses[True][:3] == pytest.approx(losses[False][:3], rel=2e-3)
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)
    assert runs[True]["eval_loss"] == pytest.approx(runs[False]["eval_loss"], rel=1e-2)


def test_cpu_attention_and_dropout_are_the_same_functions():
    """`tinyplm_cpu` attention equals HF's eager attention without dropout (with padding masked); with
    dropout, FastDropout keeps ~1 − p of the elements, scaled by 1 / (1 − p), and nothing in eval mode."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from tinyplm_lib.training.cpu_kernels import CPU_ATTENTION, FastDropout, use_fast_dropout

    torch.manual_seed(0)
    config = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM(config).eval()
    inputs = torch.randint(5, 300, (3, 20))
    attention = torch.ones_like(inputs)
    attention[1, 12:] = 0  # padding: the additive mask must reach the custom function
    model.set_attn_implementation("eager")
    expected = model(input_ids=inputs, attention_mask=attention).logits
    model.set_attn_implementation(CPU_ATTENTION)
    ours = model(input_ids=inputs, attention_mask=attention).logits
    assert torch.allclose(ours, expected, atol=1e-5)

    training = BertForMaskedLM(BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128))
    assert use_fast_dropout(training) == sum(isinstance(m, torch.nn.Dropout) for m in training.modules()) > 0
    assert all(type(m) is FastDropout for m in training.modules() if isinstance(m, torch.nn.Dropout))
    dropout = FastDropout(0.1)
    x = torch.ones(400_000)
    y = dropout(x)
    assert (y == 0).float().mean().item() == pytest.approx(0.1, abs=0.005)
    assert y.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]
    assert torch.equal(dropout.eval()(x), x)
