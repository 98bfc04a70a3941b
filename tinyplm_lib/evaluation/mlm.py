"""The fixed MLM evaluation set ("mlm eval set"): validation sentences one per sequence, masked once.

`build_mlm_eval_set` writes, per corpus, `[CLS] ids[:L-2] [SEP]` rows masked by training's own rule
(`mask_tokens`) as .npy files beside a `meta.json`; `evaluate_mlm` scores any BertForMaskedLM at
exactly those positions, so checkpoints, stages, recipes and the bench's baseline compare like for like.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from tinyplm_lib.errors import ConfigError, InputError, StorageError
from tinyplm_lib.evaluation.mlm_settings import MlmEvalSettings
from tinyplm_lib.files import json_text, replace_dir, sha256_file
from tinyplm_lib.layout import SHARDS_META_FILE, VOCAB_FILE, WORDPIECE_FILE
from tinyplm_lib.tokens.folder import CLS_TOKEN, SEP_TOKEN, TokenizerFolder
from tinyplm_lib.tokens.shards import TokenShards
from tinyplm_lib.training.model import masked_predictions, masking_spec
from tinyplm_lib.training.packing import IGNORE_INDEX, MaskingSpec, mask_tokens

FORMAT = "tinyplm-mlm-eval"
FORMAT_VERSION = 1
META_FILE = "meta.json"
ARRAYS = ("input_ids", "labels", "lengths", "sentence_index")  # one `<name>.npy` each, per corpus
SELECTION = "seeded sample without replacement, kept in corpus order"
_CORPUS_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # a corpus name is a folder name
# Rows masked per call of `mask_tokens`: bounds the float tensors it draws at any max_sequences.
_MASK_CHUNK_ROWS = 1024
# A row left without a masked token is redrawn; after this many rounds (0.85**1000 ~ 1e-71 for a
# one-token sentence at 15%) it is kept unmasked rather than looping on.
_MAX_MASK_ROUNDS = 1000
# Files that decide which id is which token for a model folder: a model is refused on a set built
# with other ones. tokenizer_config.json is left out: rewriting it (for transformers 4.x) changes no id.
MODEL_ID_FILES = (VOCAB_FILE, WORDPIECE_FILE)


class CorpusArrays(NamedTuple):
    """One corpus of a set: padded rows, their true lengths, the labels (IGNORE_INDEX off the mask)."""

    input_ids: np.ndarray  # (sequences, width) uint16, masked, [PAD] after each row's length
    labels: np.ndarray  # (sequences, width) int32
    lengths: np.ndarray  # (sequences,) int32
    sentence_index: np.ndarray  # (sequences,) int64: each row's sentence in the source shards


class MlmEvalSet(NamedTuple):
    meta: dict
    corpora: dict[str, CorpusArrays]


def build_mlm_eval_set(sources: dict[str, Path], tokenizer_dir: Path, out_dir: Path,
                       settings: MlmEvalSettings | None = None) -> dict:
    """Write the set for each `name -> validation shard folder` into `out_dir`; returns meta.json.

    Sentences: a seeded sample of `max_sequences` (all when fewer), kept in corpus order; a sample
    rather than the first ones because a split's first sentences may come from a few documents.
    Sample and masks are seeded by (seed, corpus name): adding a corpus changes no other's. The
    folder is built beside `out_dir` and renamed into place; identical inputs give identical bytes.
    """
    settings = settings or MlmEvalSettings()
    settings.validate()
    if not sources:
        raise ConfigError("sources", "no corpus given")
    for name in sources:
        if not _CORPUS_NAME.match(name):
            raise ConfigError("sources", f"corpus name {name!r}: use letters, digits, '-' and '_' only")
    tokenizer = TokenizerFolder(tokenizer_dir)
    tokenizer.require()
    spec = masking_spec(tokenizer, settings.mlm_probability)
    hashes = tokenizer.file_hashes()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(build, ignore_errors=True)  # a leftover of a build that died
    build.mkdir()
    try:
        corpora = {name: _build_corpus(name, Path(sources[name]), build / name, tokenizer, spec, settings)
                   for name in sorted(sources)}
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "settings": asdict(settings),
                "selection": SELECTION, "tokenizer_files_sha256": hashes, "vocab_size": spec.vocab_size,
                "special_ids": tokenizer.special_ids(), "first_regular_id": spec.first_regular_id,
                "corpora": corpora}
        (build / META_FILE).write_text(json_text(meta, indent=1), encoding="utf-8")
        replace_dir(build, out_dir, is_ours=lambda folder: _format_of(folder) == FORMAT,
                    what="an MLM evaluation set")
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return meta


def _build_corpus(name: str, source: Path, out: Path, tokenizer: TokenizerFolder, spec: MaskingSpec,
                  settings: MlmEvalSettings) -> dict:
    """One corpus's arrays written to `out`; returns its meta.json entry."""
    shards = TokenShards(source)
    if shards.meta.get("tokenizer_files_sha256") != tokenizer.file_hashes():
        raise InputError(source / SHARDS_META_FILE,
                         f"encoded with another tokenizer than {tokenizer.path} (tokenizer_files_sha256 differs)")
    seed = int(np.random.SeedSequence([settings.seed, zlib.crc32(name.encode())]).generate_state(1)[0])
    chosen = _choose(shards.lengths(), settings.max_sequences, np.random.default_rng(seed))
    if len(chosen) == 0:
        raise InputError(source / SHARDS_META_FILE, "holds no sentence with a token")
    specials = tokenizer.special_ids()
    ids, lengths, truncated = _sequences(shards, chosen, settings.max_seq_length,
                                         specials[CLS_TOKEN], specials[SEP_TOKEN], spec.pad_id)
    inputs, labels = _mask(ids, spec, torch.Generator().manual_seed(seed))
    masked = int(np.count_nonzero(labels != IGNORE_INDEX))
    if masked == 0:
        raise InputError(source / SHARDS_META_FILE, "no sampled sentence holds a token that may be masked")
    out.mkdir()
    input_dtype = np.uint16 if spec.vocab_size <= 65536 else np.int32
    arrays = {"input_ids": inputs.astype(input_dtype), "labels": labels.astype(np.int32),
              "lengths": lengths, "sentence_index": chosen}
    for array_name in ARRAYS:
        np.save(out / f"{array_name}.npy", arrays[array_name], allow_pickle=False)
    return {
        "source": {"meta_sha256": sha256_file(source / SHARDS_META_FILE), "num_sentences": shards.num_sentences,
                   "num_tokens": shards.num_tokens, "file": shards.meta.get("source", {}).get("name")},
        "sequences": len(chosen), "tokens": int(lengths.sum()), "truncated": truncated,
        "candidate_tokens": int(np.count_nonzero(~np.isin(ids, spec.special_ids))), "masked_tokens": masked,
        "files": {f"{array_name}.npy": sha256_file(out / f"{array_name}.npy") for array_name in ARRAYS},
    }


def _choose(lengths: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `count` sentences with at least one token (all when fewer), ascending (int64)."""
    eligible = np.flatnonzero(lengths > 0)
    if len(eligible) > count:
        eligible = np.sort(eligible[rng.choice(len(eligible), size=count, replace=False)])
    return eligible.astype(np.int64)


def _sequences(shards: TokenShards, chosen: np.ndarray, max_seq_length: int, cls_id: int, sep_id: int,
               pad_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(int64 ids padded to the longest row, int32 lengths, rows truncated) of `[CLS] s[:L-2] [SEP]`."""
    keep = max_seq_length - 2
    sentences = [shards.sentence(int(i)) for i in chosen]
    lengths = np.array([min(len(s), keep) + 2 for s in sentences], dtype=np.int32)
    ids = np.full((len(sentences), int(lengths.max())), pad_id, dtype=np.int64)
    ids[:, 0] = cls_id
    for row, sentence in enumerate(sentences):
        body = sentence[:keep]
        ids[row, 1:1 + len(body)] = body
        ids[row, 1 + len(body)] = sep_id
    return ids, lengths, sum(len(s) > keep for s in sentences)


def _mask(ids: np.ndarray, spec: MaskingSpec, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Training's masking rule, drawn once; a row left with no masked token while it has a candidate
    is redrawn whole (the rule conditioned on at least one mask), so every row is scored."""
    inputs, labels = [], []
    special = torch.tensor(spec.special_ids, dtype=torch.long)
    for start in range(0, len(ids), _MASK_CHUNK_ROWS):
        chunk = torch.from_numpy(ids[start:start + _MASK_CHUNK_ROWS])
        masked, chunk_labels = mask_tokens(chunk, spec, generator)
        maskable = (~torch.isin(chunk, special)).any(dim=1)
        for _ in range(_MAX_MASK_ROUNDS):
            empty = torch.nonzero(maskable & (chunk_labels == IGNORE_INDEX).all(dim=1)).flatten()
            if len(empty) == 0:
                break
            masked[empty], chunk_labels[empty] = mask_tokens(chunk[empty], spec, generator)
        inputs.append(masked.numpy())
        labels.append(chunk_labels.numpy())
    return np.concatenate(inputs), np.concatenate(labels)


def _format_of(folder: Path) -> str | None:
    try:
        return json.loads((folder / META_FILE).read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def read_meta(eval_dir: Path) -> dict:
    """The set's meta.json; a StorageError naming the file when it is missing or not such a set."""
    path = Path(eval_dir) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StorageError(f"{path}: not a readable MLM evaluation set ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise StorageError(f"{path}: not an MLM evaluation set of format {FORMAT} v{FORMAT_VERSION}")
    return meta


def read_mlm_eval_set(eval_dir: Path) -> MlmEvalSet:
    """The set's meta and arrays, every file checked against the sha256 meta.json lists."""
    eval_dir = Path(eval_dir)
    meta = read_meta(eval_dir)
    corpora = {}
    for name, entry in meta["corpora"].items():
        arrays = {}
        for array_name in ARRAYS:
            path = eval_dir / name / f"{array_name}.npy"
            if not path.is_file() or sha256_file(path) != entry["files"][f"{array_name}.npy"]:
                raise StorageError(f"{path}: missing or not the file {eval_dir / META_FILE} lists")
            arrays[array_name] = np.load(path, allow_pickle=False)
        corpora[name] = CorpusArrays(**arrays)
    return MlmEvalSet(meta, corpora)


def check_model_fits(config, meta: dict, eval_dir: Path) -> None:
    """A ConfigError when a model with this config cannot be scored on the set."""
    if config.vocab_size != meta["vocab_size"]:
        raise ConfigError("vocab_size", f"the model has {config.vocab_size} tokens but the set in {eval_dir} "
                                        f"was built with a tokenizer of {meta['vocab_size']}")
    length = meta["settings"]["max_seq_length"]
    if length > config.max_position_embeddings:
        raise ConfigError("max_seq_length", f"the set in {eval_dir} has max_seq_length {length}, more than the "
                                            f"model's max_position_embeddings {config.max_position_embeddings}")


def check_tokenizer(model_dir: Path, meta: dict, eval_dir: Path) -> None:
    """An InputError unless `model_dir`'s id-deciding tokenizer files are those the set was built with."""
    model_dir = Path(model_dir)
    if not (model_dir / VOCAB_FILE).is_file():
        raise InputError(model_dir / VOCAB_FILE, "missing; the model folder's tokenizer cannot be checked")
    built_with = meta["tokenizer_files_sha256"]
    for name in MODEL_ID_FILES:
        path = model_dir / name
        if path.is_file() and sha256_file(path) != built_with.get(name):
            raise InputError(path, f"differs from the tokenizer the MLM evaluation set {eval_dir} was built "
                                   "with; the set's ids would mean other tokens to this model")


@torch.no_grad()
def evaluate_mlm(model, eval_dir: Path, *, batch_size: int = 64, device: torch.device | str | None = None) -> dict:
    """Per corpus: token-weighted cross entropy, accuracy and perplexity at the set's masked positions.

    fp32, no dropout. `device` None: where the model already is; otherwise the model is moved there.
    """
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
    eval_set = read_mlm_eval_set(eval_dir)
    check_model_fits(model.config, eval_set.meta, eval_dir)
    if device is None:
        device = next(model.parameters()).device
    model.to(device)
    was_training = model.training
    model.eval()
    try:
        return {name: _score(model, arrays, batch_size, torch.device(device))
                for name, arrays in eval_set.corpora.items()}
    finally:
        model.train(was_training)


def _score(model, arrays: CorpusArrays, batch_size: int, device: torch.device) -> dict:
    loss_sum, correct, masked = 0.0, 0, 0
    for start in range(0, len(arrays.lengths), batch_size):
        lengths = torch.from_numpy(arrays.lengths[start:start + batch_size].astype(np.int64))
        width = int(lengths.max())  # rows are padded to the set's longest; a batch to its own
        inputs = torch.from_numpy(arrays.input_ids[start:start + batch_size, :width].astype(np.int64))
        labels = torch.from_numpy(arrays.labels[start:start + batch_size, :width].astype(np.int64))
        attention = (torch.arange(width)[None, :] < lengths[:, None]).long()
        logits, targets = masked_predictions(model, inputs.to(device), attention.to(device), labels.to(device))
        logits = logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += int((logits.argmax(-1) == targets).sum())
        masked += targets.numel()
    loss = loss_sum / masked
    return {"loss": loss, "accuracy": correct / masked, "perplexity": math.exp(min(loss, 50.0)),
            "masked_tokens": masked, "sequences": len(arrays.lengths)}


def evaluate_mlm_folder(model_dir: Path, eval_dir: Path, *, batch_size: int = 64,
                        device: torch.device | str | None = None) -> dict:
    """`evaluate_mlm` of a saved Hugging Face model folder, after checking its tokenizer files.

    `device` None: CUDA when available, else the CPU.
    """
    from transformers import BertForMaskedLM

    from tinyplm_lib.training.distributed import pick_device

    check_tokenizer(model_dir, read_meta(eval_dir), eval_dir)
    model = BertForMaskedLM.from_pretrained(str(model_dir))
    return evaluate_mlm(model, eval_dir, batch_size=batch_size, device=pick_device() if device is None else device)
