"""Dagster step-kill scenarios of `python -m bench.faults`: real `dagster asset materialize` steps SIGKILLed.

One "machine" per storage (a DAGSTER_HOME and a TINYPLM_HOME; for S3 a bucket on moto_server) first runs
the whole demo graph with `dagster job execute -j pretrain_all`, traced (tinyplm_lib/faultpoints.py):
its artifacts are the references. Each scenario then materialises one step's assets with the real CLI
and SIGKILLs the step's process (and its workers, as an OOM kill of the step would leave nothing else):
- `early`: paused at its first output (a staging folder claimed, a download's first chunk written);
- `middle`: a seeded random moment between that point and the publish, timed from the reference run's
  trace; the kill's own trace proves it landed before the publish began (else it is tried again sooner);
- `publish`: paused half-way through publishing (local: the complete copy not yet installed; S3: the
  old manifest deleted and half the objects uploaded).
Then: the run fails in Dagster, what a downstream step would load is the intact previous version or a
refusal naming the artifact (never a partial one), and the re-materialisation ends byte-identical to
the reference (training: the same steps, eval loss and weights, resumed from a checkpoint when one was
saved before the kill), with no scratch folder or process of the killed run left behind.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.faults.core import Run, ScenarioFailed, scenario
from bench.faults.lab import REPO_ROOT, Lab
from tinyplm_lib import faultpoints
from tinyplm_lib.errors import StorageError
from tinyplm_lib.store.artifacts import LocalArtifactStore

from demo_instance import DAGSTER, machine_env

DEFINITIONS = ["-m", "tinyplm_assets.definitions"]
BUCKET, PREFIX = "tinyplm-step-kill", "bench/step-kill"
RUN_TIMEOUT_S = 600


@dataclass(frozen=True)
class Step:
    """One op of the graph: what `--select` names, and the asset keys its step publishes."""

    name: str
    keys: tuple[str, ...]

    @property
    def select(self) -> str:
        return ",".join(self.keys)


STEPS = (
    Step("cc100_ja_raw", ("cc100_ja_raw",)),
    Step("jawiki_raw", ("jawiki_raw",)),
    Step("jglue_jsts_raw", ("jglue_jsts_raw",)),
    Step("jglue_jcommonsenseqa_raw", ("jglue_jcommonsenseqa_raw",)),
    Step("cc100_ja_corpus", ("cc100_ja_train", "cc100_ja_validation")),
    Step("jawiki_corpus", ("jawiki_train", "jawiki_validation")),
    Step("tokenizer_sample", ("tokenizer_sample",)),
    Step("wordpiece_tokenizer", ("wordpiece_tokenizer",)),
    Step("cc100_ja_tokens", ("cc100_ja_tokens",)),
    Step("jawiki_tokens", ("jawiki_tokens",)),
    Step("bert_stage1_cc100", ("bert_stage1_cc100",)),
    Step("bert_stage2_jawiki", ("bert_stage2_jawiki",)),
    Step("mlm_eval_set", ("mlm_eval_set",)),
    Step("bert_stage1_cc100_eval", ("bert_stage1_cc100_eval",)),
    Step("bert_stage2_jawiki_eval", ("bert_stage2_jawiki_eval",)),
    Step("bert_control_eval", ("bert_control_eval",)),
    Step("bert_release", ("bert_release",)),
)
POINTS = ("early", "middle", "publish")
TRAINING_STEPS = ("bert_stage1_cc100", "bert_stage2_jawiki")
MIDDLE_CHECKPOINT = 20  # a training step's middle kill: while this step's checkpoint is published
LATE = "after the publish of"
STORAGES = ("local", "s3")
# Short stages that still checkpoint (every 10 of 40 steps), so a middle kill has something to resume.
TRAINING = {"max_steps": 40, "save_steps": 10, "eval_steps": 20, "logging_steps": 10}


class Machine:
    """A DAGSTER_HOME + TINYPLM_HOME pair (S3: storing in a bucket) that ran the whole graph once.

    `steps` limits that reference run to some steps without upstream assets (the test suite's cheap
    machine: `Machine(lab, "local", steps=("cc100_ja_raw",))`).
    """

    def __init__(self, lab: Lab, storage: str, steps: tuple[str, ...] | None = None) -> None:
        self.lab, self.storage = lab, storage
        self.root = lab.dir(f"machine-{storage}")
        self.config = _run_config(self.root)
        server = lab.moto() if storage == "s3" else None
        if server is not None:
            lab.cached(f"bucket-{BUCKET}", lambda: server.create_bucket(BUCKET))
        # The test suite's machine: its own DAGSTER_HOME and TINYPLM_HOME under root, offline, S3 in BUCKET.
        self.env = machine_env(self.root, server, bucket=BUCKET)
        self.env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        if server is not None:
            self.env["TINYPLM_S3_PREFIX"] = PREFIX
        trace = self.root / "reference-trace"
        trace.mkdir()
        chosen = [step for step in STEPS if steps is None or step.name in steps]
        what = ["job", "execute", *DEFINITIONS, "-j", "pretrain_all"] if steps is None else \
            ["asset", "materialize", *DEFINITIONS, "--select", ",".join(step.select for step in chosen)]
        self.dagster([*what, *self.config], self.root / "reference.log", fault_dir=trace)
        self.windows = _windows(trace)
        self.reference = {}
        for key in (key for step in chosen for key in step.keys):
            stored = self.store().load(key)
            shutil.copytree(stored.path, self.root / "reference" / key)
            self.reference[key] = stored.manifest

    def dagster(self, args: list[str], log: Path, fault_dir: Path | None = None, pause: str | None = None,
                check: bool = True) -> subprocess.Popen:
        """Run the dagster CLI to its end (`check`: it must succeed), or start it (`check=False`)."""
        env = dict(self.env)
        if fault_dir is not None:
            env[faultpoints.DIR_ENV] = str(fault_dir)
        if pause is not None:
            env[faultpoints.PAUSE_ENV] = pause
        with open(log, "w", encoding="utf-8") as out:
            process = subprocess.Popen([DAGSTER, *args], cwd=REPO_ROOT, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        if check:
            code = _wait(process)
            if code != 0:
                raise ScenarioFailed(f"dagster {' '.join(args[:2])} exited {code}: {_tail(log)}")
        return process

    def store(self, cache: Path | None = None):
        """A store as a downstream step would open it (S3: with its own empty cache, reading the bucket)."""
        if self.storage == "local":
            return LocalArtifactStore(self.root / "home" / "artifacts")
        from tinyplm_lib.store.s3 import S3ArtifactStore

        cache = cache or self.lab.dir(f"reader-{time.monotonic_ns()}")
        return S3ArtifactStore(cache, self.lab.moto().client(), BUCKET, PREFIX)

    def load(self, key: str) -> dict:
        return self.store().load(key).manifest

    def differences(self, key: str) -> list[str]:
        """Files of the stored `key` that differ from the reference run's, wall-clock timings aside.

        Training and evaluation write how long they took (`*_s` and `*seconds` JSON fields, the model
        card's wall time, TensorBoard event files named and stamped by the clock), and a resumed stage
        says so (`resumed_from_step`); nothing else may differ: weights, losses and steps are compared.
        """
        stored, reference = self.store().load(key), self.root / "reference" / key
        new = {e["path"]: e["sha256"] for e in stored.manifest["files"] if "tensorboard/" not in e["path"]}
        old = {e["path"]: e["sha256"] for e in self.reference[key]["files"] if "tensorboard/" not in e["path"]}
        boards = [sum("tensorboard/" in e["path"] for e in m["files"]) for m in (stored.manifest, self.reference[key])]
        differ = [] if boards[0] == boards[1] else [f"tensorboard files {boards[1]} -> {boards[0]}"]
        for path in sorted(set(new) | set(old)):
            if new.get(path) == old.get(path):
                continue
            if path not in new or path not in old:
                differ.append(f"{path} {'added' if path in new else 'missing'}")
            elif _untimed(stored.path / path) != _untimed(reference / path):
                differ.append(path)
        return differ

    def artifacts_root(self) -> Path:
        return self.root / "home" / "artifacts"


def _untimed(path: Path):
    """A file's content with wall-clock timings and `resumed_from_step` masked (JSON), or "N min M s" (.md)."""
    if path.suffix == ".json":
        return _drop_timings(json.loads(path.read_text(encoding="utf-8")))
    if path.suffix == ".md":
        return re.sub(r"\d+ min \d+ s", "<wall time>", path.read_text(encoding="utf-8"))
    return path.read_bytes()


def _drop_timings(value):
    if isinstance(value, dict):
        return {k: _drop_timings(v) for k, v in value.items()
                if not k.endswith(("_s", "seconds")) and k != "resumed_from_step"}
    if isinstance(value, list):
        return [_drop_timings(v) for v in value]
    return value


def _run_config(root: Path) -> list[str]:
    """-c arguments: the demo profile, with both stages shortened to 40 steps that checkpoint every 10."""
    overlay = {"ops": {}}
    for stage, name in (("bert_stage1_cc100", "demo-stage1.json"), ("bert_stage2_jawiki", "demo-stage2.json")):
        arguments = json.loads((REPO_ROOT / "configs" / "train" / name).read_text(encoding="utf-8"))
        arguments.update(TRAINING)
        path = root / f"bench-{name}"
        path.write_text(json.dumps(arguments, indent=1), encoding="utf-8")
        overlay["ops"][stage] = {"config": {"training_args_path": str(path)}}
    path = root / "bench-overlay.yaml"
    path.write_text(json.dumps(overlay), encoding="utf-8")  # JSON is YAML
    return ["-c", "configs/demo.yaml", "-c", str(path)]


def _trace(folder: Path) -> list[tuple[str, str, int, float]]:
    path = folder / faultpoints.TRACE_FILE
    if not path.exists():
        return []
    lines = (line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line.count("\t") == 3)
    return [(point, detail, int(pid), float(when)) for point, detail, pid, when in lines]


def _windows(folder: Path) -> dict[str, float]:
    """Seconds from each step's first output (`early`) to the start of its own publish, by step name."""
    lines = _trace(folder)
    windows = {}
    for step in STEPS:
        published = [(pid, when) for point, detail, pid, when in lines if point == "publish" and detail == step.keys[0]]
        if not published:
            continue
        pid, end = published[0]
        starts = [when for point, _, q, when in lines if q == pid and point == "early"]
        if starts:
            windows[step.name] = end - starts[0]
    return windows


def _wait(process: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(process.pid)
        raise ScenarioFailed(f"dagster still running after {timeout} s") from None


def _tail(log: Path, chars: int = 1500) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-chars:]


def _kill_tree(pid: int) -> dict[int, str]:
    """SIGKILL `pid` and every process below it at once; {pid: its command line, shortened} of those killed."""
    try:
        root = psutil.Process(pid)
        victims = [root, *root.children(recursive=True)]
        named = {proc.pid: " ".join(proc.cmdline())[:80] for proc in victims}
    except psutil.NoSuchProcess:
        return {}
    for proc in victims:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)
    return named


def _wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise ScenarioFailed(f"the run ended before {what}")
        if time.monotonic() > deadline:
            _kill_tree(process.pid)
            raise ScenarioFailed(f"no {what} within {timeout} s")
        time.sleep(0.002)


def _machine(lab: Lab, storage: str) -> Machine:
    return lab.cached(f"machine-{storage}", lambda: Machine(lab, storage))


def _pause_point(step: Step, point: str) -> str | None:
    """TINYPLM_FAULT_PAUSE for a kill at `point` (None: a timed kill, no pause)."""
    if point == "early":
        return "early"
    if point == "publish":
        return f"publish:{step.keys[0]}"
    if step.name in TRAINING_STEPS:  # half-way: while the checkpoint of step 20 of 40 is being published
        return f"publish:checkpoints/{step.name}/step-{MIDDLE_CHECKPOINT:08d}"
    return None


def _kill_at(lab: Lab, machine: Machine, step: Step, point: str, faults: Path, process: subprocess.Popen,
             attempt: int) -> tuple[dict[int, str], str]:
    """SIGKILL the step's process tree at `point`; (the pids killed, where the trace says it was)."""
    pause = _pause_point(step, point)
    if pause is not None:
        paused = faults / faultpoints.PAUSED_FILE
        _wait_for(paused.exists, process, f"the fault point {pause}")
        pid = int(paused.read_text(encoding="utf-8").split("\t")[0])
        return _kill_tree(pid), pause
    _wait_for(lambda: any(line[0] == "early" for line in _trace(faults)), process, "the step's first output")
    _, detail, pid, seen = next(line for line in _trace(faults) if line[0] == "early")
    # A seeded point of the early-to-publish window its last traced run took, halved after a late kill.
    delay = machine.windows[step.name] * lab.rng.uniform(0.25, 0.75) / 2 ** attempt
    time.sleep(max(0.0, seen + delay - time.monotonic()))
    killed = _kill_tree(pid)
    late = [d for p, d, q, _ in _trace(faults) if p == "publish" and q == pid and d in step.keys]
    return killed, f"{LATE} {late[0]}" if late else f"middle ({delay:.3f} s after {detail})"


def _stored(machine: Machine, key: str, before: dict) -> tuple[str, str]:
    """What a downstream step would get for `key`: ("intact" | "changed" | "refused", detail)."""
    try:
        manifest = machine.load(key)
    except StorageError as exc:
        return "refused", str(exc)
    return ("intact" if manifest == before else "changed"), ""


def _kill_step(lab: Lab, run: Run, step: Step, point: str, storage: str) -> None:
    machine = _machine(lab, storage)
    work = lab.dir(f"kill-{step.name}-{point}-{storage}")
    select = ["asset", "materialize", *DEFINITIONS, "--select", step.select, *machine.config]
    for attempt in range(3):
        before = {key: machine.load(key) for key in step.keys}
        faults, log = work / f"faults-{attempt}", work / f"killed-{attempt}.log"
        faults.mkdir()
        process = machine.dagster(select, log, fault_dir=faults, pause=_pause_point(step, point), check=False)
        killed, landed = _kill_at(lab, machine, step, point, faults, process, attempt)
        code = _wait(process)
        run.note(f"attempt {attempt}: killed {len(killed)} process(es) at {landed}; dagster exited {code}")
        if landed.startswith(LATE):  # the step had finished: nothing was killed, try sooner
            continue
        run.note("killed: " + "; ".join(sorted(set(killed.values()))))
        _check_killed_run(run, code, log, killed)
        _check_stored(run, machine, step, before, expected_refused=storage == "s3" and point == "publish")
        traced = work / f"rerun-trace-{attempt}"
        traced.mkdir()
        machine.dagster(select, work / f"rerun-{attempt}.log", fault_dir=traced)
        machine.windows.update(_windows(traced))  # the next timed kill follows this machine's current pace
        if point == "middle" and step.name in TRAINING_STEPS:
            _check_resumed(run, work / f"rerun-{attempt}.log")
        for key in step.keys:
            differ = machine.differences(key)
            run.artifact(not differ, f"the re-materialised {key} differs from the reference run's: {differ[:5]}")
        root = machine.artifacts_root()
        scratch = [p.name for name in (".staging", ".incoming") if (root / name).is_dir()
                   for p in (root / name).iterdir()]
        run.check(not scratch, f"scratch of the killed run left: {scratch}")
        return
    raise ScenarioFailed(f"every middle kill came after the step had published ({step.name})")


def _check_killed_run(run: Run, code: int, log: Path, killed: dict[int, str]) -> None:
    """Dagster saw the step die: the run failed with a STEP_FAILURE, and no killed process lives on."""
    run.check(code != 0, f"dagster exited {code} although its step was killed")
    run.check("ChildProcessCrashException" in _tail(log, 200_000) and "STEP_FAILURE" in _tail(log, 200_000),
              "the run's log shows no STEP_FAILURE from the crashed step process")
    left = [pid for pid in killed if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    run.check(not left, f"processes of the killed step still run: {left}")


def _check_resumed(run: Run, log: Path) -> None:
    """Killed while publishing the checkpoint of step 20: the re-run resumes from step 10's."""
    found = re.search(r"resumed from \S+ at step (\d+)/", _tail(log, 1_000_000))
    resumed = int(found[1]) if found else None
    run.check(resumed == MIDDLE_CHECKPOINT - TRAINING["save_steps"],
              f"the re-run resumed from step {resumed}, not from the last complete checkpoint "
              f"({MIDDLE_CHECKPOINT - TRAINING['save_steps']})")
    run.note(f"the re-run resumed at step {resumed}")


def _check_stored(run: Run, machine: Machine, step: Step, before: dict, expected_refused: bool) -> None:
    """After the kill: the previous version intact, or (S3 mid-publish) refused naming the artifact."""
    for index, key in enumerate(step.keys):
        outcome, detail = _stored(machine, key, before[key])
        want = "refused" if expected_refused and index == 0 else "intact"
        if outcome == "changed":
            run.artifact(False, f"after the kill {key} loads with bytes that match no published version")
        elif outcome != want:
            run.check(False, f"after the kill {key} is {outcome} ({detail[:200]}), expected {want}")
        elif outcome == "refused":
            run.check(key in detail, f"the refusal does not name {key}: {detail[:300]}")


def _register(step: Step, point: str, storage: str) -> None:
    def _scenario(lab: Lab, run: Run) -> None:
        _kill_step(lab, run, step, point, storage)

    _scenario.__name__ = f"kill_{step.name}_{point}_{storage}"
    _scenario.__doc__ = (f"`dagster asset materialize` of {step.name} ({storage} storage), its step SIGKILLed "
                         f"at {point}, then re-materialised: the reference's bytes, nothing partial loaded.")
    scenario("dagster_step_kill")(_scenario)


for _storage in STORAGES:
    for _step in STEPS:
        for _point in POINTS:
            _register(_step, _point, _storage)
