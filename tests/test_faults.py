"""Every scenario of bench/faults/ as a test (but the 102 Dagster step kills: one of them), the CLI, the report.

Scenarios start real servers on 127.0.0.1 (HTTP, moto_server, a TCP proxy), real `dagster` processes,
a tmpfs to fill, and real child processes killed with SIGKILL; a failing one shows its detail. The step,
concurrent-run and checkpoint disk-full scenarios, and the step kill, are marked slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `bench` is a folder of the repository, not an installed package

from bench import faults
from bench.faults import Lab, Run

REPORT_KEYS = {"scenarios", "passed", "failed", "data_lost", "categories", "seconds", "python", "platform", "results"}
# The step-kill scenarios run the dagster CLI ~4 times each after a whole-graph reference run: 102 of them
# are for the bench (`python -m bench.faults`); one runs below, on a machine that built one asset.
BENCH_ONLY = {"dagster_step_kill"}
SLOW = {"step", "concurrent_runs"}
SLOW_SCENARIOS = {"checkpoint_disk_full"}
RESULT_KEYS = {"name", "category", "summary", "passed", "data_lost", "seconds", "detail"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One workspace for all scenarios, so the slices, demo data and moto_server are built once."""
    workspace = Lab(tmp_path_factory.mktemp("faults"))
    yield workspace
    workspace.close()


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=[pytest.mark.slow] if item.category in SLOW or name in SLOW_SCENARIOS else [])
    for name, item in faults.SCENARIOS.items() if item.category not in BENCH_ONLY
])
def test_scenario(lab, name):
    result = faults.run_scenario(lab, faults.SCENARIOS[name])
    assert result["passed"] and result["data_lost"] == 0, result["detail"]


def test_the_scenarios_cover_every_category_the_issue_asks_for():
    counts = {}
    for item in faults.SCENARIOS.values():
        counts[item.category] = counts.get(item.category, 0) + 1
    assert set(counts) == {"download", "input", "storage", "s3", "step", "dagster_step_kill", "disk_full",
                           "concurrent_runs"}
    assert len(faults.SCENARIOS) >= 60
    assert counts["dagster_step_kill"] >= 36 and counts["disk_full"] >= 4 and counts["concurrent_runs"] >= 2
    assert all(item.summary for item in faults.SCENARIOS.values())


@pytest.mark.slow
def test_a_dagster_step_killed_mid_upload_to_s3_is_refused_then_rematerialised(lab):
    """The bench's kill scenario through the real CLI, on a machine whose reference run built one asset."""
    from bench.faults import dagster_kill

    lab.cached("machine-s3", lambda: dagster_kill.Machine(lab, "s3", steps=("cc100_ja_raw",)))
    result = faults.run_scenario(lab, faults.SCENARIOS["kill_cc100_ja_raw_publish_s3"])
    assert result["passed"] and result["data_lost"] == 0, result["detail"]
    assert "killed" in result["detail"] and "at publish" in result["detail"]


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
    chosen = ["download_connection_dropped", "bad_json_line_in_jawiki"]
    done = subprocess.run([sys.executable, "-m", "bench.faults", "--json", str(out), "--only", *chosen],
                          check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    assert REPORT_KEYS <= set(report)
    assert (report["scenarios"], report["passed"], report["failed"], report["data_lost"]) == (2, 2, 0, 0)
    assert [r["name"] for r in report["results"]] == chosen
    assert report["categories"] == {"download": {"scenarios": 1, "passed": 1}, "input": {"scenarios": 1, "passed": 1}}
    for result in report["results"]:
        assert set(result) == RESULT_KEYS
        assert result["passed"] is True and result["data_lost"] == 0 and result["seconds"] >= 0
    assert "2/2 scenarios passed, data_lost 0" in done.stdout

    listed = subprocess.run([sys.executable, "-m", "bench.faults", "--list"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120, check=True).stdout
    assert [line.split()[0] for line in listed.splitlines()] == list(faults.SCENARIOS)
    unknown = subprocess.run([sys.executable, "-m", "bench.faults", "--only", "no_such_scenario"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=120, check=False)
    assert unknown.returncode == 2 and "no_such_scenario" in unknown.stderr
