"""tinyplm_lib: the plain-Python core of tinyplm (no Dagster imports, ever).

Every pipeline stage — downloads, corpus cleaning and splitting, tokenizer training, token shards,
training and artifact storage — is a function here that a notebook can call directly. The Dagster
wiring lives in ``tinyplm_assets``.
"""
