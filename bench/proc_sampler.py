"""A process tree sampled from /proc while it runs: RSS by role, CPU (the busiest thread too), a folder's disk use.

bench.scale starts one `dagster asset materialize` per step in its own session and reads its tree with
`TreeSampler` every 0.2 s; Linux only (/proc/PID/stat, /proc/PID/task/*/children).
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

_PAGE, _TICK, MB = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK"), 2**20


def _proc_stat(pid: int) -> tuple[float, int, float] | None:
    """(CPU seconds, resident bytes, age in seconds) of a live process, from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # fields[k - 3] is proc(5)'s field k
    return (int(fields[11]) + int(fields[12])) / _TICK, int(fields[21]) * _PAGE, uptime - int(fields[19]) / _TICK


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


_NOT_EXECED_SECONDS = 1.0  # a spawned child younger than this with its parent's command line is that parent's copy


def _busiest_thread_cpu(pid: int) -> float:
    """CPU seconds of the busiest thread of `pid`: a step's serial floor (its reader thread overlaps the rest)."""
    busiest = 0.0
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                text = (task / "stat").read_text()
                fields = text[text.rindex(")") + 2:].split()
                busiest = max(busiest, (int(fields[11]) + int(fields[12])) / _TICK)
    return busiest


def _tree(root: int) -> list[tuple[int, int, int]]:
    """(pid, depth, parent pid) of `root` and every live descendant."""
    found, todo = [], [(root, 0, 0)]
    while todo:
        pid, depth, parent = todo.pop()
        found.append((pid, depth, parent))
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo.extend((int(child), depth + 1, pid) for child in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            pass  # it ended while listed
    return found


def tree_rss_bytes(root: int) -> int:
    """Resident bytes of `root` and all its live descendants, summed (bench.preprocess's tree figure)."""
    return sum(stat[1] for pid, _, _ in _tree(root) if (stat := _proc_stat(pid)) is not None)


def _du_bytes(path: Path) -> int:
    """Bytes on disk (du) of the files under `path`; a file renamed or removed meanwhile counts as nothing."""
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


class TreeSampler(threading.Thread):
    """Every 0.2 s: each process's RSS and CPU time, the tree's summed RSS, the store's size on disk. Roles:
    `main` runs the step (Dagster's step process, or the CLI in process), `worker` a multiprocessing child below
    it (WorkerPool, DataLoader), `cli` the CLI, `helper` the rest (log tailers, orphan watchers)."""

    def __init__(self, root: int, step_depth: int, home: Path) -> None:
        super().__init__(daemon=True)
        self.root, self.step_depth, self.home = root, step_depth, home
        self.processes: dict[int, dict] = {}
        self.peak_tree = self.peak_workers = self.workers_alive = 0
        self.disk_before = self.peak_disk = _du_bytes(home)
        self._done = threading.Event()

    def _role(self, pid: int, depth: int) -> str:
        try:
            spawned = b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # gone already
            spawned = False
        if depth == self.step_depth and (depth == 0 or spawned):
            return "main"
        return "cli" if depth == 0 else "worker" if spawned and depth > self.step_depth else "helper"

    def sample(self) -> None:
        tree_rss = workers_rss = workers = 0
        for pid, depth, parent in _tree(self.root):
            stat = _proc_stat(pid)
            if stat is None:
                continue
            cpu, rss, age = stat
            if depth and age < _NOT_EXECED_SECONDS and _cmdline(pid) == _cmdline(parent):
                # Forked, not yet exec'd: its pages are the parent's (a pool worker being spawned read as a
                # 430 MB worker and added that to the tree). A forked DataLoader worker counts once it is 1 s old.
                continue
            info = self.processes.setdefault(pid, {"role": "helper", "rss": 0, "cpu": 0.0})
            if info["role"] == "helper":  # again until it has exec'd: a spawned child starts as a copy of its parent
                info["role"] = self._role(pid, depth)
            info["rss"], info["cpu"] = max(info["rss"], rss), cpu
            if info["role"] == "main":
                info["thread_cpu"] = max(info.get("thread_cpu", 0.0), _busiest_thread_cpu(pid))
            tree_rss += rss
            if info["role"] == "worker":
                workers_rss, workers = workers_rss + rss, workers + 1
        self.peak_tree, self.peak_workers = max(self.peak_tree, tree_rss), max(self.peak_workers, workers_rss)
        self.workers_alive = max(self.workers_alive, workers)
        self.peak_disk = max(self.peak_disk, _du_bytes(self.home))

    def run(self) -> None:
        while not self._done.wait(0.2):
            self.sample()

    def stop(self) -> dict:
        self._done.set()
        self.join()
        roles = {role: [p for p in self.processes.values() if p["role"] == role]
                 for role in ("cli", "main", "worker", "helper")}
        peak = {role: round(max((p["rss"] for p in found), default=0) / MB, 1) for role, found in roles.items()}
        return {"peak_rss_mb": round(self.peak_tree / MB, 1), "peak_process_rss_mb": max(peak.values()),
                "peak_main_rss_mb": peak["main"], "peak_worker_rss_mb": peak["worker"],
                "peak_workers_rss_mb": round(self.peak_workers / MB, 1), "peak_cli_rss_mb": peak["cli"],
                "workers": self.workers_alive,  # the most alive at once
                "cpu_seconds": {role: round(sum(p["cpu"] for p in found), 2) for role, found in roles.items()},
                "main_busiest_thread_cpu_seconds": round(max((p.get("thread_cpu", 0.0) for p in roles["main"]),
                                                             default=0.0), 2),
                "disk_mb": round((_du_bytes(self.home) - self.disk_before) / MB, 1),
                "peak_disk_mb": round((self.peak_disk - self.disk_before) / MB, 1)}
