"""Fault-injection bench: one fault each, injected into real parts on 127.0.0.1 (the test HTTP server,
moto_server, a cuttable TCP proxy, SIGKILLed children). Passed: the artifact ends byte-identical to a clean
run's, or a clear error names the file, line or setting while what was stored still loads (`data_lost`
counts artifacts that ended wrong or missing). `python -m bench.faults` (__main__.py) runs them; core.py
registers and reports; scenarios by category in download, inputs, storage, s3, steps. See bench/README.md.
"""

from __future__ import annotations

from bench.faults import concurrent, dagster_kill, disk, download, inputs, s3, steps, storage  # noqa: F401  (each registers its scenarios)
from bench.faults.core import SCENARIOS, Run, Scenario, ScenarioFailed, run_all, run_scenario
from bench.faults.lab import Lab

__all__ = ["SCENARIOS", "Lab", "Run", "Scenario", "ScenarioFailed", "run_all", "run_scenario"]
