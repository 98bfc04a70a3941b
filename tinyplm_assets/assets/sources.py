"""Raw downloads: `cc100_ja_raw` and `jawiki_raw` (one file each), and the JGLUE tasks' files.

`jglue_jsts_raw` and `jglue_jcommonsenseqa_raw` each hold `train.json` and `dev.json` (`.json.gz`
when the source was gzipped), the JGLUE v1.3 splits the evaluation assets fine-tune and score on.

Partial downloads live under `<home>/downloads/<asset>/` between runs, so re-materialising after
an interruption resumes with an HTTP Range request instead of starting over. Safe to re-run.
"""


import os

from dagster import AssetExecutionContext, Output, asset
from pydantic import Field

from tinyplm_assets.config import DownloadConfig, JawikiDownloadConfig, JglueDownloadConfig, jglue_url, resolve_url
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



def _fetch(storage: ArtifactStorage, name: str, url: str, sha256: str | None, progress: bool):
    url = resolve_url(url)
    partial_dir = storage.downloads_dir() / name
    partial_dir.mkdir(exist_ok=True)
    s3_client = storage.s3_client() if url.startswith("s3://") else None
    return download(url, partial_dir / filename_from_url(url), expected_sha256=sha256, progress=progress,
                    s3_client=s3_client)


def _jglue_asset(task: str, title: str):
    defaults = {"train_url": jglue_url(task, "train"), "dev_url": jglue_url(task, "valid")}
    # The task's upstream URLs as this asset's defaults; the fields keep their descriptions.
    config_type = type(f"{task.title()}DownloadConfig", (JglueDownloadConfig,), {
        "__annotations__": {key: str for key in defaults},
        **{key: Field(default=url, description=JglueDownloadConfig.model_fields[key].description)
           for key, url in defaults.items()},
    })
    name = f"jglue_{task}_raw"

    @asset(name=name, group_name="sources", kinds={"file"},
           description=f"JGLUE v1.3 {title}: `train.json` and `dev.json` (JGLUE's `valid`), JSON lines as "
                       "published (CC BY-SA 4.0, Yahoo Japan). Scored by the evaluation assets.")
    def _raw(context: AssetExecutionContext, config: config_type, storage: ArtifactStorage) -> Output:
        check_run(context)
        staging = storage.staging_dir(name)
        metadata = {}
        for split, url, sha256 in (("train", config.train_url, config.train_sha256),
                                   ("dev", config.dev_url, config.dev_sha256)):
            result = _fetch(storage, f"{name}-{split}", url, sha256, config.progress)
            suffix = ".json.gz" if result.path.name.endswith(".gz") else ".json"
            os.replace(result.path, staging / f"{split}{suffix}")
            context.log.info(f"{split}: {result.size:,} bytes from {result.url}")
            metadata.update({f"{split}_url": result.url, f"{split}_bytes": result.size,
                             f"{split}_sha256": result.sha256})
        return Output(staging, metadata=metadata)

    return _raw


jglue_jsts_raw = _jglue_asset("jsts", "JSTS (sentence similarity, 0-5)")
jglue_jcommonsenseqa_raw = _jglue_asset("jcommonsenseqa", "JCommonsenseQA (5-way multiple choice)")

__all__ = ["cc100_ja_raw", "jawiki_raw", "jglue_jcommonsenseqa_raw", "jglue_jsts_raw"]
