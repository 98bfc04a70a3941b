"""The code location (`dagster dev`, `-m tinyplm_assets.definitions`): assets, checks, jobs, resources.

It only assembles; no other module of the package imports it, so they build no Definitions.
"""

from __future__ import annotations

from dagster import Definitions, load_asset_checks_from_modules, load_assets_from_modules, map_asset_specs

from tinyplm_assets import checks, jobs
from tinyplm_assets.assets import corpora, evaluation, models, sources, tokenizer, tokens
from tinyplm_assets.resources import ArtifactIOManager, storage_from_env

storage = storage_from_env()
# Shown on every asset in the UI; an asset may name more owners in its own decorator.
OWNERS = ["team:tinyplm"]

defs = Definitions(
    assets=map_asset_specs(lambda spec: spec.merge_attributes(owners=OWNERS),
                           load_assets_from_modules([sources, corpora, tokenizer, tokens, models, evaluation])),
    asset_checks=load_asset_checks_from_modules([checks]),
    jobs=[jobs.prepare_data, jobs.train_models, jobs.evaluate_models, jobs.pretrain_all],
    resources={"storage": storage, "io_manager": ArtifactIOManager(storage=storage)},
)
