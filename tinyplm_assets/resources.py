"""Resources: where artifacts live, and the IO manager that stores every asset value there.

Environment variables are read here and nowhere else: `TINYPLM_HOME` (artifact root, default
`<project>/.tinyplm`). The IO manager stores directories, never pickles: an asset returns the
path of a finished staging directory and downstream assets receive the verified stored path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dagster import ConfigurableIOManager, ConfigurableResource, InputContext, MetadataValue, OutputContext

from tinyplm_lib.errors import StorageError
from tinyplm_lib.storage import LocalArtifactStore, StoredArtifact, artifact_key

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def default_home() -> str:
    return os.environ.get("TINYPLM_HOME", str(PROJECT_ROOT / ".tinyplm"))


class ArtifactStorage(ConfigurableResource):
    """The artifact store: `<home>/artifacts/<asset key>/` with a manifest per artifact."""

    home: str = default_home()
    verify_hashes: bool = True  # re-hash every file on load; size checks alone when False

    def store(self) -> LocalArtifactStore:
        return LocalArtifactStore(Path(self.home) / "artifacts", verify_hashes=self.verify_hashes)

    def staging_dir(self, label: str) -> Path:
        """An empty directory on the store's filesystem, for an asset to write its value into."""
        return self.store().staging_dir(label)

    def downloads_dir(self) -> Path:
        """Persistent partial downloads, kept across runs so an interrupted download resumes."""
        path = Path(self.home) / "downloads"
        path.mkdir(parents=True, exist_ok=True)
        return path


class ArtifactIOManager(ConfigurableIOManager):
    """Publishes asset directories atomically with a manifest; loads them verified."""

    storage: ArtifactStorage

    def handle_output(self, context: OutputContext, obj: Path) -> None:
        if not isinstance(obj, (str, Path)):
            raise StorageError(
                f"asset {context.asset_key.to_user_string()} returned {type(obj).__name__}; "
                "artifact assets must return the Path of the directory they wrote"
            )
        stored = self.storage.store().publish(_key(context), Path(obj))
        context.add_output_metadata(_metadata(stored))

    def load_input(self, context: InputContext) -> Path:
        return self.storage.store().load(_key(context)).path


def _key(context: OutputContext | InputContext) -> str:
    partition = context.asset_partition_key if context.has_asset_partitions else None
    return artifact_key(context.asset_key.path, partition)


def _metadata(stored: StoredArtifact) -> dict:
    manifest_digest = hashlib.sha256(json.dumps(stored.manifest, sort_keys=True).encode()).hexdigest()
    return {
        "path": MetadataValue.path(str(stored.path)),
        "files": stored.num_files,
        "bytes": stored.num_bytes,
        "manifest_sha256": manifest_digest,
    }
