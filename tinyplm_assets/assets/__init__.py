"""The asset graph, one module per stage: sources → corpora → tokenizer → tokens → models.

Each module holds the assets of one group; `tinyplm_assets.definitions` loads them all.
"""
