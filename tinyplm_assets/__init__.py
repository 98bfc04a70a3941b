"""tinyplm_assets: the Dagster wiring of the pipeline; the code location is `tinyplm_assets.definitions`.

Importing this package builds nothing: `dagster dev` (pyproject's `[tool.dagster]`), `-m
tinyplm_assets.definitions` and `workspace.yaml` load `defs` from the definitions module.
"""
