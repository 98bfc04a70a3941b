"""Child processes for the fault bench: started in their own session, awaited, or SIGKILLed.

A child is `python -m bench.faults.jobs JOB '{json args}'` (see jobs.py): one library call in its
own process group, so that SIGKILL takes it and its workers down at once with no clean-up, as a
crash or an OOM kill would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.faults.core import ScenarioFailed
from bench.faults.lab import REPO_ROOT

# Not imported from jobs.py: running `-m bench.faults.jobs` after the package had imported it warns.
JOBS_MODULE = "bench.faults.jobs"
RESULT_PREFIX = "RESULT "  # the line a job prints its JSON result on


def start_child(job: str, log: Path, env: dict | None = None, **args) -> subprocess.Popen:
    """`python -m bench.faults.jobs job args` in a new session; its output goes to `log`."""
    environment = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    with open(log, "w", encoding="utf-8") as out:
        return subprocess.Popen([sys.executable, "-m", JOBS_MODULE, job, json.dumps(args)], cwd=REPO_ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env=environment, start_new_session=True)


def child_result(process: subprocess.Popen, log: Path, timeout: float = 300) -> dict:
    """The RESULT the child printed; ScenarioFailed with its output when it failed."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        raise ScenarioFailed(f"child {process.args[3]} still running after {timeout} s") from None
    output = log.read_text(encoding="utf-8", errors="replace")
    if process.returncode != 0:
        raise ScenarioFailed(f"child {process.args[3]} exited {process.returncode}: {output[-2000:]}")
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise ScenarioFailed(f"child {process.args[3]} printed no result: {output[-2000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def run_child(job: str, log: Path, ready: Callable[[], bool] | None = None, **args) -> tuple[dict, float]:
    """Run a child to the end: (its result, seconds from `ready()` first true to its exit)."""
    process = start_child(job, log, **args)
    seen = None
    while process.poll() is None:
        if seen is None and ready is not None and ready():
            seen = time.monotonic()
        time.sleep(0.002)
    ended = time.monotonic()
    return child_result(process, log), ended - (seen if seen is not None else ended)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], delay: float, timeout: float = 120) -> bool:
    """SIGKILL the child's process group `delay` s after `ready()` turns true.

    True if the kill landed while the child ran; False if it finished (or died) first.
    """
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            return False
        if time.monotonic() > deadline:
            kill_group(process)
            raise ScenarioFailed(f"child {process.args[3]} never got ready in {timeout} s")
        time.sleep(0.002)
    stop = time.monotonic() + delay
    while time.monotonic() < stop:
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    if process.poll() is not None:
        return False
    kill_group(process)
    return process.returncode == -signal.SIGKILL
