"""The fault bench's core: the scenario registry, the record of one scenario, and the report.

`python -m bench.faults` runs what `@scenario(category)` registered here (see bench/faults/__main__.py);
a scenario is a function `(Lab, Run) -> None` whose docstring's first line is its summary.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.faults.lab import Lab
from tinyplm_lib.files import atomic_write_json


class ScenarioFailed(AssertionError):
    """A check that ends the scenario at once (what follows would make no sense without it)."""


class Run:
    """The record of one scenario: notes, failed checks, and artifacts that ended wrong or missing."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.failures: list[str] = []
        self.data_lost = 0

    def note(self, text: str) -> None:
        self.notes.append(text)

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
        return bool(ok)

    def require(self, ok: bool, what: str) -> None:
        if not ok:
            raise ScenarioFailed(what)

    def artifact(self, ok: bool, what: str) -> bool:
        """An artifact that must be intact; a wrong or missing one counts as data lost."""
        if not ok:
            self.data_lost += 1
            self.failures.append(f"data lost: {what}")
        return bool(ok)

    def raises(self, error: type[BaseException], call: Callable[[], object], *mentions: str) -> BaseException:
        """The error `call()` must raise, its message checked to name each of `mentions`."""
        try:
            call()
        except error as exc:
            message = str(exc)
            for text in mentions:
                self.check(str(text) in message, f"the {type(exc).__name__} does not name {text!r}: {message}")
            self.note(f"{type(exc).__name__}: {_short(message)}")
            return exc
        raise ScenarioFailed(f"expected {error.__name__}, but the call succeeded")


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Scenario:
    name: str
    category: str
    summary: str
    run: Callable[[Lab, Run], None]


# The order of --list and of the report: by category, then as defined in the category's module.
CATEGORIES = ("download", "input", "storage", "s3", "step", "dagster_step_kill", "disk_full", "concurrent_runs")
SCENARIOS: dict[str, Scenario] = {}


def scenario(category: str):
    """Register a scenario function; its docstring's first line is its summary."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; known: {CATEGORIES}")

    def register(func: Callable[[Lab, Run], None]) -> Callable[[Lab, Run], None]:
        summary = (func.__doc__ or "").strip().splitlines()[0]
        SCENARIOS[func.__name__] = Scenario(func.__name__, category, summary, func)
        # Category order whatever order the modules are imported in (sorted() keeps each module's order).
        ordered = sorted(SCENARIOS.values(), key=lambda item: CATEGORIES.index(item.category))
        SCENARIOS.clear()
        SCENARIOS.update((item.name, item) for item in ordered)
        return func
    return register


def run_scenario(lab: Lab, item: Scenario) -> dict:
    """Run one scenario; never raises. passed: no failed check and no data lost."""
    run = Run()
    started = time.perf_counter()
    try:
        item.run(lab, run)
    except ScenarioFailed as exc:
        run.failures.append(str(exc))
    except Exception as exc:  # noqa: BLE001 - an unexpected error is a failed scenario, reported
        tail = "".join(traceback.format_exception(exc)[-3:])
        run.failures.append(f"unexpected {type(exc).__name__}: {exc} | {tail}")
    return {
        "name": item.name,
        "category": item.category,
        "summary": item.summary,
        "passed": not run.failures and run.data_lost == 0,
        "data_lost": run.data_lost,
        "seconds": round(time.perf_counter() - started, 3),
        "detail": " | ".join(run.failures + run.notes),
    }


def run_all(names: list[str] | None = None, workdir: Path | None = None, log=print) -> dict:
    """Run the named scenarios (all by default) and return the report."""
    chosen = [SCENARIOS[name] for name in names] if names else list(SCENARIOS.values())
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="tinyplm-faults-", dir=workdir))
    lab = Lab(root)
    results = []
    try:
        for item in chosen:
            result = run_scenario(lab, item)
            results.append(result)
            log(f"{'PASS' if result['passed'] else 'FAIL'} {item.name} ({result['seconds']:.1f} s): "
                f"{result['detail'][:300]}")
    finally:
        lab.close()
        shutil.rmtree(root, ignore_errors=True)
    passed = sum(r["passed"] for r in results)
    return {
        "scenarios": len(results),
        "passed": passed,
        "failed": len(results) - passed,
        "data_lost": sum(r["data_lost"] for r in results),
        "categories": _categories(results),
        "seconds": round(time.perf_counter() - started, 2),
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)),
        # Timings on a shared machine depend on what else runs: the 1/5/15-minute load averages.
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "results": results,
    }


def _categories(results: list[dict]) -> dict[str, dict[str, int]]:
    """{category: {"scenarios": n, "passed": p}}, in CATEGORIES order, for the categories that ran."""
    counts = {name: {"scenarios": 0, "passed": 0} for name in CATEGORIES}
    for result in results:
        counts[result["category"]]["scenarios"] += 1
        counts[result["category"]]["passed"] += int(result["passed"])
    return {name: count for name, count in counts.items() if count["scenarios"]}


def write_report(report: dict, path: Path) -> None:
    """The report as indented UTF-8 JSON (bench/results/faults.json is one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, report, indent=1, ensure_ascii=False)
