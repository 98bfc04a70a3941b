"""Resources: where artifacts live, and the IO manager that stores every asset value there.

Settings come from the environment through `tinyplm_assets.environment`; credentials never do
(boto3 finds them itself). The IO manager stores directories, never pickles: an asset returns the
path of a finished staging directory and downstream assets receive the verified stored path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from dagster import (
    AssetExecutionContext,
    ConfigurableIOManager,
    ConfigurableResource,
    InitResourceContext,
    InputContext,
    MetadataValue,
    OutputContext,
)
from pydantic import Field

from tinyplm_assets.environment import default_home, s3_settings
from tinyplm_assets.metadata import manifest_digest
from tinyplm_lib import faultpoints
from tinyplm_lib.errors import StorageError
from tinyplm_lib.store import locks
from tinyplm_lib.store.artifacts import ArtifactStore, LocalArtifactStore, StoredArtifact, artifact_key


class ArtifactStorage(ConfigurableResource):
    """The artifact store: `<home>/artifacts/<asset key>/`, or S3 with that tree as its cache."""

    home: str = Field(default_factory=default_home, description="local root: artifacts (or S3 cache), downloads")
    verify_hashes: bool = Field(default=True, description="re-hash files on load; size checks alone when False")
    s3_bucket: Optional[str] = Field(default=None, description="store on S3 in this bucket; None = local")
    s3_prefix: str = Field(default="tinyplm", description="key prefix inside the bucket")
    s3_endpoint_url: Optional[str] = Field(default=None, description="S3-compatible endpoint (MinIO, …)")
    s3_region: Optional[str] = None
    s3_max_attempts: int = Field(default=5, description="attempts per S3 request before failing")

    def store(self) -> ArtifactStore:
        root = self._root()
        if not self.s3_bucket:
            return LocalArtifactStore(root, verify_hashes=self.verify_hashes)
        from tinyplm_lib.store.s3 import S3ArtifactStore

        return S3ArtifactStore(root, self.s3_client(), self.s3_bucket, self.s3_prefix,
                               verify_hashes=self.verify_hashes)

    def s3_client(self):
        """A boto3 S3 client from dagster-aws's S3Resource, with this resource's endpoint and region."""
        from dagster_aws.s3 import S3Resource  # here: boto3 costs every code-location load ~1.5 s

        return S3Resource(endpoint_url=self.s3_endpoint_url, region_name=self.s3_region,
                          max_attempts=self.s3_max_attempts).get_client()

    def _root(self) -> Path:
        return Path(self.home) / "artifacts"

    def staging_dir(self, label: str) -> Path:
        """An empty directory on the store's filesystem, for an asset to write its value into."""
        # Staging is always local (under the same root for either store): no S3 client needed.
        staging = LocalArtifactStore(self._root()).staging_dir(label)
        faultpoints.reached("early", label)
        return staging

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
        store = self.storage.store()
        with locks.publishing(store, _key(context), context.run_id):  # taken by check_run at the step's start
            stored = store.publish(_key(context), Path(obj))
        metadata = _metadata(stored)
        location = store.describe(_key(context))
        if location != str(stored.path):  # on S3, `path` is only this machine's cache
            metadata["stored_at"] = MetadataValue.path(location)
        context.add_output_metadata(metadata)

    def load_input(self, context: InputContext) -> Path:
        return self.storage.store().load(_key(context)).path

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        # The end of a step (of the run, in-process): a failed step's locks are released here.
        if context.run_id:
            locks.release_run(context.run_id)


def hold_asset_locks(context: AssetExecutionContext) -> None:
    """Take the materialisation locks of every asset this step writes; `check_run` calls it first thing.

    Held until each is published (or the step ends), so a second run of the same asset fails at its
    start with a LockHeld naming the holder, before any work (see tinyplm_lib/store/locks.py).
    """
    partition = context.partition_key if context.has_partition_key else None
    keys = [artifact_key(key.path, partition) for key in context.selected_asset_keys]
    locks.hold(context.resources.storage.store(), keys, context.run_id)


def _key(context: OutputContext | InputContext) -> str:
    partition = context.asset_partition_key if context.has_asset_partitions else None
    return artifact_key(context.asset_key.path, partition)


def _metadata(stored: StoredArtifact) -> dict:
    return {
        "path": MetadataValue.path(str(stored.path)),
        "files": stored.num_files,
        "bytes": stored.num_bytes,
        "manifest_sha256": manifest_digest(stored.manifest),
    }


def storage_from_env(resolve: bool = False) -> ArtifactStorage:
    """The storage resource as the environment sets it: S3 when TINYPLM_S3_BUCKET is set.

    `resolve=False` keeps `EnvVar`s (a code location); `resolve=True` reads them now (a script).
    """
    return ArtifactStorage(**s3_settings(resolve))
