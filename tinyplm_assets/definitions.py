"""Assembles the code location: assets, jobs, resources. Nothing else happens here."""

from __future__ import annotations

from dagster import Definitions, load_assets_from_modules

from tinyplm_assets import jobs
from tinyplm_assets.assets import corpora, models, sources, tokenizer, tokens
from tinyplm_assets.resources import ArtifactIOManager, storage_from_env

storage = storage_from_env()

defs = Definitions(
    assets=load_assets_from_modules([sources, corpora, tokenizer, tokens, models]),
    jobs=[jobs.prepare_data, jobs.train_models, jobs.pretrain_all],
    resources={"storage": storage, "io_manager": ArtifactIOManager(storage=storage)},
)
