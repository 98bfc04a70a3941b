"""Every scenario of bench/faults/ as a test, plus the bench's command line and its JSON report.

Scenarios start real servers on 127.0.0.1 (HTTP, moto_server, a TCP proxy) and real child
processes killed with SIGKILL; a failing one shows its detail. The step scenarios (corpus, shards,
training killed and re-run) are marked slow. About a minute and a half on 2 cores in all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `bench` is a folder of the repository, not an installed package

from bench import faults  # noqa: E402
from bench.faults import Lab, Run  # noqa: E402

REPORT_KEYS = {"scenarios", "passed", "failed", "data_lost", "seconds", "python", "platform", "results"}
RESULT_KEYS = {"name", "category", "summary", "passed", "data_lost", "seconds", "detail"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One workspace for all scenarios, so the slices, demo data and moto_server are built once."""
    workspace = Lab(tmp_path_factory.mktemp("faults"))
    yield workspace
    workspace.close()


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=[pytest.mark.slow] if item.category == "step" else [])
    for name, item in faults.SCENARIOS.items()
])
def test_scenario(lab, name):
    result = faults.run_scenario(lab, faults.SCENARIOS[name])
    assert result["passed"] and result["data_lost"] == 0, result["detail"]


def test_at_least_15_scenarios_in_every_category():
    categories = {item.category for item in faults.SCENARIOS.values()}
    assert len(faults.SCENARIOS) >= 15
    assert categories == {"download", "input", "storage", "s3", "step"}
    assert all(item.summary for item in faults.SCENARIOS.values())


def test_a_scenario_that_loses_data_is_reported_failed(lab):
    def loses_data(lab: Lab, run: Run) -> None:
        run.artifact(False, "the artifact is gone")
        run.note("ran to the end")

    def crashes(lab: Lab, run: Run) -> None:
        raise RuntimeError("boom")

    lost = faults.run_scenario(lab, faults.Scenario("loses_data", "storage", "x", loses_data))
    assert (lost["passed"], lost["data_lost"]) == (False, 1)
    assert lost["detail"] == "data lost: the artifact is gone | ran to the end"
    crashed = faults.run_scenario(lab, faults.Scenario("crashes", "storage", "x", crashes))
    assert crashed["passed"] is False and "unexpected RuntimeError: boom" in crashed["detail"]


def test_command_line_writes_the_json_report(tmp_path):
    out = tmp_path / "faults.json"
    chosen = ["download_connection_dropped", "impossible_settings_fail_before_work"]
    done = subprocess.run([sys.executable, "-m", "bench.faults", "--json", str(out), "--only", *chosen],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    assert REPORT_KEYS <= set(report)
    assert (report["scenarios"], report["passed"], report["failed"], report["data_lost"]) == (2, 2, 0, 0)
    assert [r["name"] for r in report["results"]] == chosen
    for result in report["results"]:
        assert set(result) == RESULT_KEYS
        assert result["passed"] is True and result["data_lost"] == 0 and result["seconds"] >= 0
    assert "2/2 scenarios passed, data_lost 0" in done.stdout

    listed = subprocess.run([sys.executable, "-m", "bench.faults", "--list"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120, check=True).stdout
    assert [line.split()[0] for line in listed.splitlines()] == list(faults.SCENARIOS)
    unknown = subprocess.run([sys.executable, "-m", "bench.faults", "--only", "no_such_scenario"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "no_such_scenario" in unknown.stderr
