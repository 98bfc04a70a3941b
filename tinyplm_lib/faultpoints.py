"""Fault points: named places in a step where the fault bench stops a process so it can SIGKILL it there.

Inert unless `TINYPLM_FAULT_DIR` is set: one environment lookup per call, nothing written. With it set
(bench/faults/dagster_kill.py sets it for real `dagster asset materialize` runs), every point reached
appends `point<TAB>detail<TAB>pid<TAB>monotonic seconds` to `<dir>/trace`, which tells the bench where a
step was when it was killed. When `TINYPLM_FAULT_PAUSE` is `point` or `point:detail` and matches, the
process writes its pid to `<dir>/paused` and sleeps until it is killed, so a kill lands exactly there
instead of wherever a timer happens to fire.

The points (`POINTS`): `early`, a step's first output claimed or written (a staging folder, a download's
first chunk); `publish`, an artifact half published (local: the complete `.incoming` copy with its
manifest, not yet installed; S3: the old manifest deleted and half the files uploaded).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

DIR_ENV = "TINYPLM_FAULT_DIR"
PAUSE_ENV = "TINYPLM_FAULT_PAUSE"
POINTS = ("early", "publish")
TRACE_FILE = "trace"
PAUSED_FILE = "paused"


def reached(point: str, detail: str = "") -> None:
    """Record that this process reached `point` (about `detail`: an asset key or a label); pause if asked."""
    directory = os.environ.get(DIR_ENV)
    if not directory:
        return
    folder = Path(directory)
    # One short append per line: lines of concurrent step processes do not interleave.
    with open(folder / TRACE_FILE, "a", encoding="utf-8") as trace:
        trace.write(f"{point}\t{detail}\t{os.getpid()}\t{time.monotonic():.6f}\n")
    wanted = os.environ.get(PAUSE_ENV, "")
    if wanted not in (point, f"{point}:{detail}"):
        return
    paused = folder / PAUSED_FILE
    temporary = paused.with_name(f".{PAUSED_FILE}.{os.getpid()}")
    temporary.write_text(f"{os.getpid()}\t{point}\t{detail}\n", encoding="utf-8")
    os.replace(temporary, paused)
    while True:  # until SIGKILL; a bench that died leaves a sleeper, not a half-killed step
        time.sleep(60)
