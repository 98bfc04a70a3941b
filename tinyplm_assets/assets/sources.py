"""Raw corpus downloads: `cc100_ja_raw` and `jawiki_raw`, each a directory holding one file.

Partial downloads live under `<home>/downloads/<asset>/` between runs, so re-materialising after
an interruption resumes with an HTTP Range request instead of starting over. Safe to re-run.
"""


import os

from dagster import AssetExecutionContext, Output, asset

from tinyplm_assets.config import DownloadConfig, JawikiDownloadConfig, resolve_url
from tinyplm_assets.preflight import check_run
from tinyplm_assets.resources import ArtifactStorage
from tinyplm_lib.downloads.download import download, filename_from_url
from tinyplm_lib.downloads.dumps import dump_date_from_url, resolve_cirrussearch_dump


def _pinned_source(config: DownloadConfig) -> tuple[str, dict]:
    return resolve_url(config.url), {}


def _jawiki_source(config: JawikiDownloadConfig) -> tuple[str, dict]:
    """The pinned URL, else the dump that `dump_date` names in `index_url` (looked up for "latest")."""
    if config.url:
        url = resolve_url(config.url)
        date = dump_date_from_url(url)
        return url, {"dump_selection": "pinned url", **({"dump_date": date} if date else {})}
    dump = resolve_cirrussearch_dump(config.dump_date, config.index_url, "jawiki")
    selection = "latest in index" if config.dump_date.strip().lower() == "latest" else "pinned date"
    return dump.url, {"dump_selection": selection, "dump_date": dump.date, "index_url": config.index_url}


def _download_asset(name: str, description: str, config_type: type = DownloadConfig, source=_pinned_source):
    # Dagster reads the config schema from the annotation, evaluated here with this call's class.
    @asset(name=name, group_name="sources", description=description, kinds={"file"})
    def _raw(context: AssetExecutionContext, config: config_type, storage: ArtifactStorage) -> Output:
        check_run(context)
        url, source_metadata = source(config)
        if source_metadata:
            context.log.info(f"source: {source_metadata}")
        partial_dir = storage.downloads_dir() / name
        partial_dir.mkdir(exist_ok=True)
        s3_client = storage.s3_client() if url.startswith("s3://") else None
        result = download(url, partial_dir / filename_from_url(url), expected_sha256=config.sha256,
                          checksum_url=resolve_url(config.checksum_url) if config.checksum_url else None,
                          progress=config.progress, s3_client=s3_client)
        staging = storage.staging_dir(name)
        os.replace(result.path, staging / result.path.name)
        context.log.info(f"downloaded {result.size:,} bytes from {result.url}")
        return Output(staging, metadata={"url": result.url, "file": result.path.name,
                                         "size_bytes": result.size, "sha256": result.sha256,
                                         "resumed_from_bytes": result.resumed_from, **source_metadata})

    return _raw


cc100_ja_raw = _download_asset(
    "cc100_ja_raw",
    "cc100-ja `ja.txt.xz` as downloaded (~15 GB xz in the full profile): one paragraph per line, "
    "documents separated by blank lines.",
)
jawiki_raw = _download_asset(
    "jawiki_raw",
    "A JaWiki CirrusSearch content dump (`jawiki-YYYYMMDD-cirrussearch-content.json.gz`): "
    "Elasticsearch bulk lines, one index line and one document line per page. Without a pinned "
    "`url`, `dump_date` (default 'latest') picks the dump from the CirrusSearch index.",
    JawikiDownloadConfig,
    _jawiki_source,
)

__all__ = ["cc100_ja_raw", "jawiki_raw"]
