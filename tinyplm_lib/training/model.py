"""The model a stage trains and how it is scored: a `BertForMaskedLM` built from a BertConfig JSON
or a previous stage's folder, its forward pass at the masked positions only, and the seeded
evaluation (loss, accuracy, perplexity) every stage and `bench.train` report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForMaskedLM

from tinyplm_lib.errors import ConfigError
from tinyplm_lib.tokens.folder import CLS_TOKEN, MASK_TOKEN, PAD_TOKEN, SEP_TOKEN, TokenizerFolder
from tinyplm_lib.training.arguments import RuntimeOptions
from tinyplm_lib.training.packing import IGNORE_INDEX, MaskingSpec, PackedSequences, mask_tokens


def build_model(model_config: Path, vocab_size: int, max_seq_length: int, init_from: Path | None):
    """A fresh BertForMaskedLM from a BertConfig JSON, or the weights of `init_from`."""
    if init_from is not None:
        model = BertForMaskedLM.from_pretrained(str(init_from))
        if model.config.vocab_size != vocab_size:
            raise ConfigError(
                "init_from",
                f"{init_from} has vocab_size {model.config.vocab_size} but the tokenizer has {vocab_size}",
            )
        return model
    try:
        config = BertConfig.from_json_file(str(model_config))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError("model_config", f"{model_config}: {exc}") from exc
    if config.vocab_size < vocab_size:
        raise ConfigError(
            "vocab_size",
            f"{model_config} sets vocab_size {config.vocab_size}, smaller than the tokenizer's {vocab_size}",
        )
    # A tokenizer trained on a small corpus may hold fewer tokens than asked for; the embedding
    # matrix follows the tokenizer so no row is dead weight.
    config.vocab_size = vocab_size
    if config.max_position_embeddings < max_seq_length:
        raise ConfigError(
            "max_seq_length",
            f"{max_seq_length} exceeds max_position_embeddings {config.max_position_embeddings} of {model_config}",
        )
    return BertForMaskedLM(config)


def masking_spec(tokenizer: TokenizerFolder | Path, probability: float) -> MaskingSpec:
    """Special and regular ids, read from `vocab.txt` (no MeCab needed on a training machine)."""
    folder = tokenizer if isinstance(tokenizer, TokenizerFolder) else TokenizerFolder(tokenizer)
    ids = folder.special_ids()
    # Specials and [unusedN] lead the vocabulary; none is masked, and random replacements skip them.
    first_regular = folder.first_regular_id()
    spec = MaskingSpec(vocab_size=folder.vocab_size, mask_id=ids[MASK_TOKEN], pad_id=ids[PAD_TOKEN],
                       special_ids=tuple(range(first_regular)), first_regular_id=first_regular,
                       probability=probability)
    spec.validate()
    return spec


def packed_sequences(shard_dir: Path, tokenizer: TokenizerFolder, spec: MaskingSpec,
                     max_seq_length: int) -> PackedSequences:
    """A split's token shards packed into `[CLS] s1 [SEP] s2 [SEP] …` sequences of this tokenizer."""
    ids = tokenizer.special_ids()
    return PackedSequences(shard_dir, max_seq_length, cls_id=ids[CLS_TOKEN], sep_id=ids[SEP_TOKEN],
                           pad_id=spec.pad_id)


def masked_predictions(model, inputs, attention, labels, encoder=None):
    """(logits, targets) at the masked positions only.

    The encoder runs on every position, but the 768→vocab projection (32,768 columns) only where
    a loss is taken: ~15% of the work of the full `BertForMaskedLM` head. Measured on this CPU
    for the 13M model: ~1.3k → ~3.6k tokens/s (NOTES.md). The model stays a `BertForMaskedLM`.
    `encoder` replaces `model.bert`'s forward (a compiled one); None runs it as it is.
    """
    hidden = (encoder or model.bert)(input_ids=inputs, attention_mask=attention).last_hidden_state
    selected = labels != IGNORE_INDEX
    return model.cls(hidden[selected]), labels[selected]


class MaskedLM(torch.nn.Module):
    """`masked_predictions` as a module's forward, so DistributedDataParallel can wrap it.

    With `compile`, the encoder's forward is compiled for static shapes (every batch padded to the
    full length): a plain function, not a submodule, so the parameters stay registered once, and
    evaluation (which calls `model.bert` itself, in other shapes and without gradients) runs eager
    instead of recompiling. Compiling the head too was measured slower on the CPU (dynamic row count).
    """

    def __init__(self, model, compile: bool = False) -> None:
        super().__init__()
        self.model = model
        self._encoder = torch.compile(model.bert.forward, dynamic=False) if compile else None

    def forward(self, inputs, attention, labels):
        return masked_predictions(self.model, inputs, attention, labels, self._encoder)


@torch.no_grad()
def evaluate(model, dataset: PackedSequences, spec: MaskingSpec, *, batch_size: int,
             device: torch.device, seed: int, max_sequences: int, runtime: RuntimeOptions | None = None) -> dict:
    """Token-weighted MLM loss and accuracy over fixed, seeded masks (same masks for any model)."""
    runtime = runtime or RuntimeOptions(precision="fp32")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    count = min(len(dataset), max_sequences)
    loss_sum, correct, masked = 0.0, 0, 0
    for start in range(0, count, batch_size):
        ids, attention = dataset.batch(np.arange(start, min(start + batch_size, count)))
        inputs, labels = mask_tokens(ids, spec, generator)
        with runtime.autocast(device):
            logits, targets = masked_predictions(model, inputs.to(device), attention.to(device), labels.to(device))
        if targets.numel() == 0:
            continue
        logits = logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        masked += targets.numel()
    model.train()
    if masked == 0:
        raise ConfigError("validation", "the validation split produced no masked tokens to evaluate")
    loss = loss_sum / masked
    return {"loss": loss, "accuracy": correct / masked, "perplexity": math.exp(min(loss, 50.0)),
            "masked_tokens": masked, "sequences": count}
