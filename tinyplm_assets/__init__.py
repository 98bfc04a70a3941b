"""tinyplm_assets: the Dagster code location. `dagster dev -m tinyplm_assets` loads `defs`."""

from tinyplm_assets.definitions import defs

__all__ = ["defs"]
