"""The `dagster dev` UI end to end: launch a run over GraphQL, then look at the asset graph in Chromium.

Starts `dagster dev -m tinyplm_assets.definitions` on a free loopback port on a copy of the demo
instance that conftest's `demo_run` materialised with the CLI, re-materialises `bert_stage2_jawiki`
through the `launchRun` mutation (a `pretrain_all` subset, as the asset's launchpad sends it: queued,
then started by the daemon), waits for SUCCESS, and opens the global asset lineage page in headless
Chromium (Debian's `chromium`, which `.ci/run` and `make browser` install): every asset node must
say "Materialized". The screenshot is saved in the test's tmp folder and copied to
$TINYPLM_TEST_ARTIFACTS when set.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT
from demo_instance import DAGSTER, Machine, copy_demo, newest_run_id
from headless_chromium import HeadlessChromium, chromium_path

pytestmark = pytest.mark.slow

JOB = "pretrain_all"
ASSET = "bert_stage2_jawiki"  # re-materialised from the UI; every other asset comes from demo_run
RUN_TIMEOUT_S = 480
# The graph must be drawn at a zoom of at least 0.6, or Dagster draws name-only "minimal" nodes
# without their status row. With the evaluation group the vertical layout is ~3,200 × 2,000 px at
# zoom 1, drawn at ~0.58 in 2400 × 1600 (too small); 3200 × 2000 fits the 19 assets at ~0.75.
WINDOW = (3200, 2000)
SCREENSHOT_NAME = "ui-asset-graph.png"

# One row per asset node drawn in the graph: [asset name, text of its status row].
NODES_JS = """Array.from(document.querySelectorAll('[class*="AssetNode_assetNodeBox"]')).map(box => {
  const label = box.querySelector('[data-tooltip]');
  const rows = box.querySelectorAll('[class*="AssetNode_assetNodeRowBox"]');
  return [label && label.getAttribute('data-tooltip'), rows.length ? rows[rows.length - 1].innerText.trim() : ''];
})"""


def _require_chromium() -> str:
    path = chromium_path()
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed but CI is set: the browser test must run in CI "
                    "(.ci/run and `make browser` install Debian's chromium package)")
    pytest.skip("chromium is not installed (apt-get install chromium, or `make browser` as root); "
                "with CI set this is a failure instead of a skip")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _merged(*paths: Path) -> dict:
    """Run config files layered like `-c a.yaml -c b.yaml`: later files win, dicts merge deeply."""
    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    config: dict = {}
    for path in paths:
        config = merge(config, yaml.safe_load(path.read_text()))
    return config


class DagsterDev:
    """A `dagster dev` process in its own process group, and a GraphQL client for it."""

    def __init__(self, machine: Machine) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The instance reads the repository's dagster.yaml (pools), as with `make dagster-home`.
        env = dict(machine.env, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        self.log_path = machine.root / "dagster-dev.log"
        self._log = open(self.log_path, "wb")
        # Its own session: `dagster dev` stops cleanly (code server and daemon too) on a group SIGTERM.
        self.process = subprocess.Popen(
            [DAGSTER, "dev", "-m", "tinyplm_assets.definitions", "-h", "127.0.0.1", "-p", str(self.port)],
            cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def log_tail(self, size: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-size:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self._log.close()

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
        assert not answer.get("errors"), f"GraphQL errors: {answer['errors']}"
        return answer["data"]

    def wait_until_serving(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"dagster dev exited:\n{self.log_tail()}"
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=5):
                    return
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, f"dagster dev not serving after {timeout} s:\n{self.log_tail()}"
                time.sleep(1)

    def code_location(self, timeout: float = 180) -> tuple[str, str]:
        """(location name, repository name) once the code location has loaded."""
        query = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
            locationOrLoadError { __typename ... on RepositoryLocation { name repositories { name } }
                                  ... on PythonError { message } } } } } }"""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.graphql(query)["workspaceOrError"]["locationEntries"]
            loaded = [e for e in entries if e["loadStatus"] == "LOADED" and e["locationOrLoadError"]]
            if loaded:
                location = loaded[0]["locationOrLoadError"]
                assert location["__typename"] == "RepositoryLocation", f"code location failed to load: {location}"
                return location["name"], location["repositories"][0]["name"]
            assert time.monotonic() < deadline, f"code location not loaded after {timeout} s: {entries}"
            time.sleep(1)

    def run_errors(self, run_id: str) -> list[str]:
        """The error messages in a run's event log (step failures and ERROR-level events)."""
        data = self.graphql("""query Logs($runId: ID!) { logsForRun(runId: $runId) { __typename
            ... on EventConnection { events { __typename
                ... on MessageEvent { message level stepKey }
                ... on ExecutionStepFailureEvent { error { message stack } }
                ... on RunFailureEvent { pipelineFailureError: error { message } } } } } }""", {"runId": run_id})
        events = data["logsForRun"].get("events") or []
        errors = []
        for event in events:
            error = event.get("error") or event.get("pipelineFailureError")
            if error or event.get("level") == "ERROR":
                errors.append(f"[{event.get('stepKey')}] {event.get('message')}"
                              + (f"\n{error['message']}{''.join(error.get('stack') or [])}" if error else ""))
        return errors


@pytest.fixture(scope="module")
def materialised_ui(demo_run, tmp_path_factory):
    """A `dagster dev` on a copy of the demo instance, after a successful UI launch of `bert_stage2_jawiki`."""
    machine = copy_demo(demo_run, tmp_path_factory.mktemp("ui"))
    dev = DagsterDev(machine)
    try:
        dev.wait_until_serving()
        location, repository = dev.code_location()
        # The whole profile, as pasted into the launchpad: a subset run accepts config for every op.
        run_config = _merged(REPO_ROOT / "configs" / "demo.yaml", REPO_ROOT / "tests" / "configs" / "fast-training.yaml")
        launched = dev.graphql("""mutation Launch($params: ExecutionParams!) { launchRun(executionParams: $params) {
            __typename ... on LaunchRunSuccess { run { runId } } ... on Error { message }
            ... on RunConfigValidationInvalid { errors { message } } } }""",
            {"params": {"selector": {"repositoryLocationName": location, "repositoryName": repository,
                                     "jobName": JOB, "assetSelection": [{"path": [ASSET]}]},
                        "runConfigData": run_config}})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", f"launchRun refused: {launched}"
        run_id = launched["run"]["runId"]

        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            status = dev.graphql("query Run($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }",
                                 {"id": run_id})["runOrError"]["status"]
            if status in ("SUCCESS", "FAILURE", "CANCELED"):
                break
            assert time.monotonic() < deadline, f"run {run_id} still {status} after {RUN_TIMEOUT_S} s:\n{dev.log_tail()}"
            time.sleep(2)
        if status != "SUCCESS":
            errors = "\n\n".join(dev.run_errors(run_id)) or "(no error events)"
            pytest.fail(f"run {run_id} ended {status}; its errors:\n{errors[-8000:]}\n\ndagster dev log:\n{dev.log_tail(3000)}")
        yield {"dev": dev, "run_id": run_id, "cli_run_id": newest_run_id(demo_run.dagster_home)}
    finally:
        dev.stop()


def _expected_assets() -> set[str]:
    from tinyplm_assets.definitions import defs

    return {key.to_user_string() for key in defs.resolve_all_asset_keys()}


def test_graphql_reports_the_ui_run_and_every_asset_materialised(materialised_ui):
    dev, run_id = materialised_ui["dev"], materialised_ui["run_id"]
    steps = dev.graphql("query Run($id: ID!) { runOrError(runId: $id) { ... on Run { stepStats { stepKey status } } } }",
                        {"id": run_id})["runOrError"]["stepStats"]
    assert {step["stepKey"]: step["status"] for step in steps} == {
        ASSET: "SUCCESS", f"{ASSET}_loss_checks": "SUCCESS"}, "the asset and its blocking checks, nothing upstream"
    nodes = dev.graphql("{ assetNodes { assetKey { path } assetMaterializations(limit: 1) { runId } } }")["assetNodes"]
    latest = {"/".join(node["assetKey"]["path"]): node["assetMaterializations"] for node in nodes}
    assert set(latest) == _expected_assets()
    cli_run_id = materialised_ui["cli_run_id"]
    assert {name: [event["runId"] for event in events] for name, events in latest.items()} == {
        name: [run_id if name == ASSET else cli_run_id] for name in latest}


@pytest.fixture(scope="module")
def chromium() -> str:
    """Checked before `materialised_ui` starts its minutes-long run (fixtures resolve in argument order)."""
    return _require_chromium()


def test_asset_graph_in_chromium_shows_every_asset_materialised(chromium, materialised_ui, tmp_path):
    dev = materialised_ui["dev"]
    expected = _expected_assets()
    groups = {node["groupName"] for node in dev.graphql("{ assetNodes { groupName } }")["assetNodes"]}
    # A fresh instance greets the first visit with a newsletter dialog; mark it seen, as "Skip" does.
    dev.graphql("mutation { setNuxSeen }")
    # Groups open (they start collapsed to one box each), by the `expanded` query parameter.
    expanded = ",".join(sorted(f"global@global:{group}" for group in groups))
    with HeadlessChromium(*WINDOW, executable=chromium) as page:
        page.goto(f"{dev.url}/server_info")  # same origin, without the app: set the UI's stored settings
        page.evaluate("localStorage.setItem('asset-graph-direction', JSON.stringify('vertical')); "
                      "localStorage.setItem('communityNux', JSON.stringify('1')); true")
        page.goto(f"{dev.url}/asset-groups?expanded={expanded}")
        # Status rows read "Loading..." until the live data arrives; wait for every node's final word.
        settled = (f"(() => {{ const nodes = {NODES_JS}; return nodes.length >= {len(expected)} && "
                   "nodes.every(([name, status]) => name && status && !status.startsWith('Loading')) ? nodes : null; })()")
        try:
            nodes = page.wait_for(settled, timeout=90)
        finally:
            screenshot = page.screenshot(tmp_path / SCREENSHOT_NAME)
            if os.environ.get("TINYPLM_TEST_ARTIFACTS"):
                saved = Path(os.environ["TINYPLM_TEST_ARTIFACTS"]) / SCREENSHOT_NAME
                saved.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(screenshot, saved)
                print(f"screenshot: {saved}")
            print(f"screenshot: {screenshot}")
        page_text = page.evaluate("document.body.innerText.split('\\n').slice(0, 40).join(' | ')")
    statuses = dict(nodes)
    assert set(statuses) == expected, f"asset nodes drawn: {sorted(statuses)}; page: {page_text}"
    not_materialised = {name: status for name, status in statuses.items() if not status.startswith("Materialized")}
    assert not_materialised == {}, f"see {screenshot}"
    assert "Global asset lineage" in page_text
