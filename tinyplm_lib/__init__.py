"""tinyplm_lib: the plain-Python core of tinyplm (no Dagster imports, ever).

Subpackages follow the pipeline: downloads → corpora → tokens → training, with store/ beneath all;
files.py, layout.py and parallel.py are the primitives they share. Every stage is a function a
notebook can call directly; the Dagster wiring lives in ``tinyplm_assets``.
"""
