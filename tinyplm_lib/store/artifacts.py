"""The artifact store contract and its local implementation: directories published atomically.

The manifest (`_manifest.json`: path, size and sha256 of every file) is written last; a directory
without one is not an artifact, and loading verifies it, so a torn or altered artifact is refused.
Scratch dirs (`.staging/`, `.incoming/`) of dead runs are removed by the next, never reused.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tinyplm_lib import faultpoints
from tinyplm_lib.diskspace import SpaceNeeded, disk_errors, tree_bytes
from tinyplm_lib.errors import StorageError
from tinyplm_lib.files import atomic_write_json, sha256_file
from tinyplm_lib.layout import MANIFEST_FILE
from tinyplm_lib.store.locks import LOCKS_DIR, AssetLock, LocalLock
from tinyplm_lib.store.scratch import claim_scratch_dir, exchange_paths, release_scratch_dir, sweep_scratch

MANIFEST_FORMAT = 1
# Scratch folders under a store's root; their entries are never artifacts.
SCRATCH_DIRS = (".staging", ".incoming", ".trash")


def artifact_key(key_parts: Sequence[str], partition: str | None = None) -> str:
    """The one place a storage path is derived from an asset key (and partition).

    `["bert_stage1_cc100"]` → `bert_stage1_cc100`; `["tokens", "cc100"]`, partition `x` →
    `tokens/cc100/partition=x`. Parts are checked so no key can escape the storage root.
    """
    parts = list(key_parts)
    if partition is not None:
        parts.append(f"partition={partition}")
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\\" in part or part.startswith("."):
            raise StorageError(f"asset key part {part!r} cannot be used as a storage path")
    return "/".join(parts)


def build_manifest(directory: Path) -> dict:
    """List every regular file under `directory` (except the manifest) with size and sha256."""
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST_FILE:
            continue
        if path.is_symlink():
            raise StorageError(f"{path}: symbolic links cannot be stored as artifacts")
        files.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return {"format": MANIFEST_FORMAT, "files": files}


def write_manifest(directory: Path, manifest: dict) -> None:
    atomic_write_json(directory / MANIFEST_FILE, manifest, sort_keys=True)


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise StorageError(
            f"{directory}: no {MANIFEST_FILE}; the artifact was never completely written "
            "(re-materialise the asset that produces it)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"{path}: unreadable manifest ({exc})") from exc
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), list):
        raise StorageError(f"{path}: unknown manifest format {manifest.get('format')!r}")
    return manifest


def verify_manifest(directory: Path, manifest: dict, *, check_hashes: bool = True) -> None:
    """Raise StorageError naming the first file that is missing, resized or altered."""
    for entry in manifest["files"]:
        path = directory / entry["path"]
        if not path.is_file():
            raise StorageError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise StorageError(f"{path}: size {size} differs from the manifest's {entry['size']}")
        if check_hashes and sha256_file(path) != entry["sha256"]:
            raise StorageError(f"{path}: sha256 differs from the manifest (corrupted or modified)")


def manifest_totals(manifest: dict) -> tuple[int, int]:
    """(number of files, total bytes) of an artifact."""
    return len(manifest["files"]), sum(entry["size"] for entry in manifest["files"])


@dataclass(frozen=True)
class StoredArtifact:
    """A verified artifact: where it lies and what its manifest says."""

    path: Path
    manifest: dict

    @property
    def num_files(self) -> int:
        return manifest_totals(self.manifest)[0]

    @property
    def num_bytes(self) -> int:
        return manifest_totals(self.manifest)[1]


class ArtifactStore:
    """Artifacts by key, published atomically with a manifest; subclasses decide where bytes live.

    Every store keeps a local directory tree, `<root>/<artifact_key>/`: the artifacts themselves
    for `LocalArtifactStore`, a verified cache of the bucket for `S3ArtifactStore`. Writers build
    their output in `staging_dir()` (inside the root, so publishing is a rename, not a copy of
    gigabytes) and hand it to `publish()`.
    """

    def __init__(self, root: Path, *, verify_hashes: bool = True) -> None:
        self.root = Path(root).resolve()
        self.verify_hashes = verify_hashes

    def path_for(self, key: str) -> Path:
        return self.root / key

    def staging_dir(self, label: str) -> Path:
        """A fresh empty directory on the same filesystem as the store, locked while we live.

        Leftovers of crashed runs are removed first (see `remove_leftovers`): a new run never
        reuses or appends to another run's half-written files.
        """
        self.remove_leftovers()
        return claim_scratch_dir(self.root / ".staging", f"{label}-{uuid.uuid4().hex[:12]}")

    def remove_leftovers(self) -> list[Path]:
        """Delete scratch directories whose owner process is gone; returns what was removed.

        Staging and incoming directories of live processes (this one included) are kept; a
        `.trash` entry is always garbage (an old version being deleted).
        """
        removed = []
        for name in SCRATCH_DIRS:
            removed += sweep_scratch(self.root / name, locked=name != ".trash")
        return removed

    def publish(self, key: str, source: Path, *, move: bool = False) -> StoredArtifact:
        """Store `source` as `key`, replacing any old version.

        `source` is moved when it lies inside the root or `move` is set (scratch the caller no
        longer needs), else copied, so a user's own directory is never taken away.
        """
        with disk_errors(self.path_for(key), lambda: _space_to_publish(Path(source)), f"{source} into the store"):
            incoming, manifest = self._prepare(source, move)  # which removed its partial copy
        try:
            self._commit(key, incoming, manifest)
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            release_scratch_dir(incoming)
            raise
        return StoredArtifact(self._install(key, incoming), manifest)

    def load(self, key: str) -> StoredArtifact:
        """A local, verified copy of `key`; StorageError says what is missing or wrong."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def keys(self, prefix: str) -> list[str]:
        """Keys of the complete artifacts (those with a manifest) under `prefix/`, sorted."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove an artifact; a missing one is not an error."""
        shutil.rmtree(self.path_for(key), ignore_errors=True)

    def describe(self, key: str) -> str:
        """Where `key` lives, for messages and metadata (never with credentials)."""
        return str(self.path_for(key))

    def lock(self, key: str, run_id: str) -> AssetLock:
        """`key`'s materialisation lock for `run_id`: a lock file under the root (see store/locks.py)."""
        return LocalLock(self.root / LOCKS_DIR, key, run_id)

    # -- where bytes go: the one thing subclasses change ------------------------------------
    def _commit(self, key: str, incoming: Path, manifest: dict) -> None:
        """Make the complete, manifested `incoming` directory durable as `key`.

        Locally it already is: `_install` renames it into place next.
        """
        faultpoints.reached("publish", key)

    # -- shared steps ------------------------------------------------------------------------
    def _new_incoming(self, create: bool = True) -> Path:
        """A claimed scratch path in `.incoming/` (created unless `create` is False)."""
        return claim_scratch_dir(self.root / ".incoming", uuid.uuid4().hex, create=create)

    def _prepare(self, source: Path, move: bool = False) -> tuple[Path, dict]:
        source = Path(source)
        if not source.exists():
            raise StorageError(f"{source}: nothing to store (the asset produced no files)")
        self.remove_leftovers()
        incoming = self._new_incoming(create=source.is_file())
        try:
            if source.is_file():
                # A single-file value becomes a directory holding that file.
                _move_or_copy(source, incoming / source.name, self.root, move)
            else:
                _move_or_copy(source, incoming, self.root, move)
                release_scratch_dir(source)  # a staging directory moved away is no longer ours
            manifest = build_manifest(incoming)
            write_manifest(incoming, manifest)
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            release_scratch_dir(incoming)
            raise
        return incoming, manifest

    def _install(self, key: str, incoming: Path) -> Path:
        """Give the complete `incoming` directory its final local name, replacing the old one.

        The old version is swapped out whole, never edited in place. Where the kernel can
        exchange two names atomically (Linux renameat2), a crash leaves the old or the new
        complete directory; elsewhere the old one is first moved to `.trash/`, so a crash in
        between leaves neither (the next run rebuilds it), never a mixture.
        """
        final = self.path_for(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            if final.exists() and exchange_paths(incoming, final):
                shutil.rmtree(incoming, ignore_errors=True)  # `incoming` now holds the old version
                return final
            trash = None
            if final.exists():
                trash = self.root / ".trash" / uuid.uuid4().hex
                trash.parent.mkdir(parents=True, exist_ok=True)
                os.replace(final, trash)
            os.replace(incoming, final)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
            return final
        finally:
            release_scratch_dir(incoming)

    def _local_keys(self, prefix: str) -> list[str]:
        base = self.path_for(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        keys = (m.parent.relative_to(self.root).as_posix() for m in base.rglob(MANIFEST_FILE))
        # Staging, incoming and trash directories start with a dot: never artifacts.
        return sorted(k for k in keys if not any(part.startswith(".") for part in k.split("/")))


class LocalArtifactStore(ArtifactStore):
    """Artifacts under one local root directory: `<root>/<artifact_key>/` plus a manifest."""

    def load(self, key: str) -> StoredArtifact:
        path = self.path_for(key)
        if not path.is_dir():
            raise StorageError(
                f"artifact {key!r} not found under {self.root}; materialise it first"
            )
        manifest = read_manifest(path)
        verify_manifest(path, manifest, check_hashes=self.verify_hashes)
        return StoredArtifact(path, manifest)

    def exists(self, key: str) -> bool:
        return (self.path_for(key) / MANIFEST_FILE).is_file()

    def keys(self, prefix: str) -> list[str]:
        return self._local_keys(prefix)


def _move_or_copy(source: Path, dest: Path, root: Path, move: bool = False) -> None:
    if move or source.resolve().is_relative_to(root):
        try:
            os.replace(source, dest)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:  # another filesystem: fall back to a copy
                raise
    if source.is_dir():
        _copy_tree(source, dest)
    else:
        shutil.copy2(source, dest)


def _copy_tree(source: Path, dest: Path) -> None:
    # Not shutil.copytree: it goes on after a failed file and reports all failures as one
    # shutil.Error without an errno, so a full disk would read as any other error.
    for folder, _, files in os.walk(source, onerror=_raise, followlinks=True):  # links followed, as copytree
        here = dest / os.path.relpath(folder, source)
        here.mkdir()
        for name in files:
            shutil.copy2(os.path.join(folder, name), here / name)


def _raise(error: OSError) -> None:
    raise error


def _space_to_publish(source: Path) -> SpaceNeeded:
    """What a publish writes, for a DiskFullError: a copy of `source`, or only a manifest of a
    few kB where it was moved in (it is then gone from its old place)."""
    if source.exists():
        return SpaceNeeded(tree_bytes(source), f"the size of {source}, copied in")
    return SpaceNeeded(4096, "its manifest; the files were moved in, not copied")

