"""Resumable training checkpoints, without a single pickle: a directory of `model.safetensors`,
`trainer.safetensors` + `trainer.json` (optimizer, scheduler, grad-scaler and RNG state: the tensors,
and everything else as JSON), `state.json` (`state.TrainingState`: progress, settings fingerprint)
and, written last, the storage `_manifest.json` (size and sha256 of every file), so a half-written
or damaged checkpoint is never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tinyplm_lib.diskspace import SpaceNeeded, disk_errors
from tinyplm_lib.errors import ConfigError, StorageError
from tinyplm_lib.files import atomic_write_json, fsync_file
from tinyplm_lib.layout import MANIFEST_FILE, MODEL_WEIGHTS_FILE
from tinyplm_lib.store.artifacts import (
    ArtifactStore,
    LocalArtifactStore,
    build_manifest,
    read_manifest,
    verify_manifest,
    write_manifest,
)

FORMAT_VERSION = 1
MODEL_FILE = MODEL_WEIGHTS_FILE  # named as in a model folder
TRAINER_TENSORS_FILE = "trainer.safetensors"
TRAINER_JSON_FILE = "trainer.json"
STATE_FILE = "state.json"
REQUIRED_FILES = (MODEL_FILE, TRAINER_TENSORS_FILE, TRAINER_JSON_FILE, STATE_FILE)
# Sizes, measured here: bert-tiny-custom (13M parameters) gives a 52 MB model file and 104 MB of
# Adam moments, written in 0.4 s on this CPU; the test model (0.7M) 2.9 MB + 5.7 MB.
_STEP_DIR = re.compile(r"step-(\d{8,})")
# How safetensors (Rust) reports a failed write: "I/O error: No space left on device (os error 28)".
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class CheckpointSink(Protocol):
    """Where a stage's checkpoints live between attempts (local disk, a bucket, …)."""

    def latest(self) -> Path | None:
        """Local directory of the newest complete checkpoint, or None."""

    def save(self, step: int, directory: Path) -> None:
        """Persist the complete checkpoint in `directory` (which may be moved or copied)."""

    def clear(self) -> None:
        """Remove every checkpoint; called once the stage's output is written."""


class StoreCheckpointSink:
    """Checkpoints as artifacts of an `ArtifactStore`: `<prefix>/step-00000040`, newest `keep` kept.

    The store gives the guarantees: a checkpoint exists only once its manifest is written (last,
    also on S3), and loading verifies every hash — so a crash mid-save leaves the previous one as
    `latest()`, and a checkpoint saved on one machine resumes on another. One writer at a time:
    two trainings sharing a prefix would prune each other's checkpoints.
    """

    def __init__(self, store: ArtifactStore, prefix: str, keep: int = 2) -> None:
        if keep < 1:
            raise ConfigError("keep", f"must keep at least one checkpoint, got {keep}")
        self.store, self.prefix, self.keep = store, prefix.strip("/"), keep

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def steps(self) -> dict[int, str]:
        """Complete checkpoints (those with a manifest) by step, as store keys."""
        found = {}
        for key in self.store.keys(self.prefix):
            match = _STEP_DIR.fullmatch(key.rsplit("/", 1)[-1])
            if match:
                found[int(match.group(1))] = key
        return found

    def latest(self) -> Path | None:
        """The newest checkpoint, verified; a damaged one is an error, not silently skipped."""
        steps = self.steps()
        if not steps:
            return None
        key = steps[max(steps)]
        try:
            return self.store.load(key).path
        except StorageError as exc:
            raise StorageError(f"{exc}; delete {self.store.describe(key)} to resume from the "
                               "checkpoint before it") from exc

    def save(self, step: int, directory: Path) -> None:
        directory = Path(directory)
        if not (directory / MANIFEST_FILE).is_file():
            raise StorageError(f"{directory}: no {MANIFEST_FILE}; write_checkpoint() did not finish")
        self.store.publish(self._key(f"step-{step:08d}"), directory, move=True)
        steps = self.steps()
        for old in sorted(steps)[: -self.keep]:
            self.store.delete(steps[old])

    def clear(self) -> None:
        for key in self.steps().values():
            self.store.delete(key)


class LocalCheckpointSink(StoreCheckpointSink):
    """Checkpoints under one local directory, `<root>/step-00000040/` (notebooks, tests)."""

    def __init__(self, root: Path, keep: int = 2) -> None:
        super().__init__(LocalArtifactStore(root), "", keep)


def write_checkpoint(directory: Path, *, model, optimizer, scheduler, scaler, state: dict) -> None:
    """Write a complete checkpoint into `directory` (created; must not hold an older one).

    `state` is JSON-able progress (step, position in the epoch, history, fingerprint …). The global
    RNG states are captured here, so call this where a resumed run should continue from.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise StorageError(f"{directory}: not empty; a checkpoint is written into a fresh directory")
    _save_tensors(_unique_tensors(model.state_dict()), directory / MODEL_FILE)
    tensors: dict[str, torch.Tensor] = {}
    tree = _to_json_tree({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "scaler": scaler.state_dict(), "rng": _capture_rng()}, "", tensors)
    _save_tensors(tensors, directory / TRAINER_TENSORS_FILE)
    # Floats are written as Python's shortest round-trip repr, so losses and learning rates come
    # back bit for bit.
    atomic_write_json(directory / TRAINER_JSON_FILE, tree, indent=1)
    atomic_write_json(directory / STATE_FILE, {**state, "format_version": FORMAT_VERSION}, indent=1)
    for name in (MODEL_FILE, TRAINER_TENSORS_FILE):
        fsync_file(directory / name)
    write_manifest(directory, build_manifest(directory))  # last: its presence means complete


def read_checkpoint(directory: Path) -> dict:
    """Verify and load a checkpoint: {"state", "model", "optimizer", "scheduler", "scaler", "rng"}.

    Raises StorageError naming the file that is missing, truncated, altered or of another format.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    listed = {entry["path"] for entry in manifest["files"]}
    for name in REQUIRED_FILES:
        if name not in listed:
            raise StorageError(f"{directory / name}: not in the checkpoint's {MANIFEST_FILE}")
    verify_manifest(directory, manifest)
    state = _read_json(directory / STATE_FILE)
    if state.get("format_version") != FORMAT_VERSION:
        raise StorageError(f"{directory / STATE_FILE}: checkpoint format {state.get('format_version')!r}, "
                           f"this code reads format {FORMAT_VERSION}")
    tensors = _read_safetensors(directory / TRAINER_TENSORS_FILE)
    try:
        objects = _from_json_tree(_read_json(directory / TRAINER_JSON_FILE), tensors)
    except KeyError as exc:
        raise StorageError(f"{directory / TRAINER_TENSORS_FILE}: tensor {exc} listed in "
                           f"{TRAINER_JSON_FILE} is missing") from exc
    return {"state": state, "model": _read_safetensors(directory / MODEL_FILE), **objects}


def restore_checkpoint(pieces: dict, *, model, optimizer, scheduler, scaler) -> list[str]:
    """Load what read_checkpoint() returned into live objects and set the global RNG states.

    Call it last before the training loop continues: anything drawing random numbers afterwards
    (building a model, say) would shift dropout. Returns notes on state that could not be restored
    (CUDA RNG or grad-scaler state when resuming on another kind of device).
    """
    _load_weights(model, pieces["model"])
    optimizer.load_state_dict(pieces["optimizer"])
    scheduler.load_state_dict(pieces["scheduler"])
    notes = []
    if bool(pieces["scaler"]) == scaler.is_enabled():
        if pieces["scaler"]:
            scaler.load_state_dict(pieces["scaler"])
    else:
        notes.append("grad-scaler state not restored (fp16 loss scaling was "
                     f"{'on' if pieces['scaler'] else 'off'} when saved)")
    notes += _restore_rng(pieces["rng"])
    return notes


def settings_fingerprint(settings: dict) -> str:
    """sha256 of the canonical JSON of everything that changes a training's result."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def find_resumable(sink: CheckpointSink, settings: dict, log: Callable[[str], None]) -> dict | None:
    """The newest checkpoint in `sink`, read and verified, if it was made with `settings`; else None.

    A checkpoint of other settings (say, a changed learning rate) is logged with what changed, and
    the sink is cleared, since its stale higher-numbered checkpoints would otherwise stay the
    newest. A damaged one raises StorageError naming the file: silently retraining would hide a
    disk or bucket that needs fixing, and deleting that one directory falls back to the previous.
    """
    directory = sink.latest()
    if directory is None:
        return None
    try:
        pieces = read_checkpoint(directory)
    except StorageError as exc:
        raise StorageError(f"{exc}. Not resuming from a damaged checkpoint: delete {directory} to fall "
                           "back to the one before it, or remove all checkpoints to start over") from exc
    if pieces["state"].get("fingerprint") != settings_fingerprint(settings):
        changed = _differences(pieces["state"].get("settings", {}), settings)
        log(f"not resuming from {directory}: made with other settings ({'; '.join(changed) or 'unknown'}); "
            "removing the old checkpoints and training from scratch")
        sink.clear()
        return None
    return {**pieces, "directory": directory}


def save_to_sink(sink: CheckpointSink, scratch: Path, step: int, state: dict, **objects) -> None:
    """write_checkpoint() into the local `scratch` directory, then hand it to the sink.

    A full disk raises DiskFullError naming `scratch` and the checkpoint's size; the partial
    checkpoint is removed and the sink's earlier ones stay as they were.
    """
    shutil.rmtree(scratch, ignore_errors=True)  # a leftover of an attempt that died mid-write
    try:
        with disk_errors(scratch, lambda: _checkpoint_bytes(objects["model"], objects["optimizer"]),
                         f"the checkpoint of step {step}", cleanup=lambda: shutil.rmtree(scratch, ignore_errors=True)):
            write_checkpoint(scratch, state=state, **objects)
            sink.save(step, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # still there when the sink copied rather than moved


def _checkpoint_bytes(model, optimizer) -> SpaceNeeded:
    """A checkpoint's size: the model's tensors (tied ones once) and the optimizer's, as safetensors
    store them, raw; the JSON files and headers beside them are a few kB."""
    tensors: dict[str, torch.Tensor] = {}
    _to_json_tree(optimizer.state_dict(), "", tensors)
    weights = sum(t.nbytes for t in _unique_tensors(model.state_dict()).values())
    moments = sum(t.nbytes for t in tensors.values())
    return SpaceNeeded(weights + moments, f"the model's tensors, {weights:,} bytes, and the optimizer's, {moments:,}")


def _differences(saved: dict, current: dict) -> list[str]:
    changed = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{key}.{sub}: {old.get(sub)!r} -> {new.get(sub)!r}"
                        for sub in sorted(set(old) | set(new)) if old.get(sub) != new.get(sub)][:5]
        else:
            changed.append(key)
    return changed


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, an I/O failure raised as the OSError it is (a full disk included)."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as exc:
        found = _OS_ERROR.search(str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


def _unique_tensors(state_dict: dict) -> dict[str, torch.Tensor]:
    # Tied weights (BERT's decoder = word embeddings) are one tensor under two names; safetensors
    # refuses shared memory, so each is stored once and _load_weights accepts the alias missing.
    kept, seen = {}, set()
    for name, tensor in state_dict.items():
        identity = _identity(tensor)
        if identity not in seen:
            seen.add(identity)
            kept[name] = tensor.detach().to("cpu").contiguous()
    return kept


def _identity(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
            tuple(tensor.shape), tuple(tensor.stride()))


def _load_weights(model, weights: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    live = model.state_dict()
    aliases_loaded = {_identity(live[name]) for name in weights if name in live}
    missing = [name for name in missing if _identity(live[name]) not in aliases_loaded]
    if missing or unexpected:
        raise StorageError(f"{MODEL_FILE}: does not fit the model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")


def _capture_rng() -> dict:
    rng = {"torch_cpu": torch.get_rng_state(), "numpy": _numpy_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _numpy_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)}


def _restore_rng(rng: dict) -> list[str]:
    torch.set_rng_state(rng["torch_cpu"])
    state = rng["numpy"]
    np.random.set_state((state["kind"], np.asarray(state["keys"], dtype=np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))
    random.setstate(rng["python"])
    cuda = rng.get("torch_cuda")
    if torch.cuda.is_available():
        if cuda is not None and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            return ["CUDA RNG state not restored (saved on another device count): dropout differs"]
    return []


def _to_json_tree(value, key: str, tensors: dict[str, torch.Tensor]):
    """JSON-able copy of a state_dict-like value; tensors go to `tensors` under dotted keys."""
    if isinstance(value, torch.Tensor):
        if key in tensors:
            raise ValueError(f"checkpoint key {key!r} occurs twice")
        tensors[key] = value.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(value, (list, tuple)):
        items = [_to_json_tree(item, f"{key}.{i}", tensors) for i, item in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _to_json_tree(v, f"{key}.{k}".lstrip("."), tensors) for k, v in value.items()}
        if all(isinstance(k, int) for k in value):  # optimizer state is keyed by parameter index
            return {"__int_keys__": {str(k): _to_json_tree(v, f"{key}.{k}", tensors) for k, v in value.items()}}
        raise TypeError(f"cannot checkpoint {key}: dict keys must be all str or all int")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint {key}: {type(value).__name__} is neither a tensor nor JSON")


def _from_json_tree(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_from_json_tree(item, tensors) for item in value]
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__tuple__"}:
            return tuple(_from_json_tree(item, tensors) for item in value["__tuple__"])
        if set(value) == {"__int_keys__"}:
            return {int(k): _from_json_tree(v, tensors) for k, v in value["__int_keys__"].items()}
        return {k: _from_json_tree(v, tensors) for k, v in value.items()}
    return value


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise StorageError(f"{path}: unreadable safetensors file ({exc})") from exc


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"{path}: unreadable JSON ({exc})") from exc
