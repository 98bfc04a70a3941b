"""Step scenarios of `python -m bench.faults`: corpus, shards or training SIGKILLed, then re-run.

Each runs the step in a child process, kills it mid-way at a seeded random point and re-runs it:
the result must be byte-identical to an uninterrupted run's, with the killed run's leftovers removed.
"""

from __future__ import annotations

import lzma
import shutil
from collections.abc import Callable
from pathlib import Path

from bench.faults.children import child_result, kill_when, run_child, start_child
from bench.faults.core import Run, scenario
from bench.faults.lab import CC100_SETTINGS, JAWIKI_SETTINGS, Lab, tree_digest
from tinyplm_lib.layout import MODEL_WEIGHTS_FILE, SENTENCES_FILE
from tinyplm_lib.store.artifacts import LocalArtifactStore


def _has_output(root: Path) -> Callable[[], bool]:
    """True once the step wrote a byte into a staging dir (a corpus .tmp, JaWiki work files)."""
    staging = root / ".staging"
    return lambda: staging.is_dir() and any(p.is_file() and p.stat().st_size > 0 for p in staging.rglob("*")
                                            if not p.name.endswith(".lock"))


def _corpus_step_killed(lab: Lab, run: Run, corpus: str, raw: Path) -> None:
    work = lab.dir(f"step-killed-{corpus}")
    settings = CC100_SETTINGS if corpus == "cc100" else JAWIKI_SETTINGS
    args = {"corpus": corpus, "raw": str(raw), "settings": settings}
    reference, seconds = run_child("corpus_step", work / "reference.log", ready=_has_output(work / "reference"),
                                   root=str(work / "reference"), **args)
    root = work / "store"
    landed = None
    for attempt in range(3):
        process = start_child("corpus_step", work / f"kill-{attempt}.log", root=str(root), **args)
        delay = lab.rng.uniform(0, 0.8 * seconds) if attempt == 0 else 0.0
        if kill_when(process, _has_output(root), delay):
            landed = delay
            break
        child_result(process, work / f"kill-{attempt}.log")
    run.require(landed is not None, "every run finished before the kill")
    stale = [p for p in (root / ".staging").iterdir() if p.is_dir()]
    rerun, _ = run_child("corpus_step", work / "rerun.log", root=str(root), **args)
    store = LocalArtifactStore(root)
    for split, manifest in reference["manifests"].items():
        key = f"{corpus}_{split}"
        run.artifact(rerun["manifests"][split] == manifest, f"the re-run's {key} differs from the clean run's")
        run.artifact(store.load(key).manifest == manifest, f"the stored {key} differs from the clean run's")
    gone = [p.name for p in stale if p.exists()]
    run.check(not gone, f"staging dirs of the killed run were kept: {gone}")
    run.note(f"step takes {seconds:.2f} s after its first write; killed {landed:.2f} s in, leaving "
             f"{len(stale)} staging dirs; re-run byte-identical ({reference['lines_train']:,} train lines)")


@scenario("step")
def cc100_step_killed_then_rerun(lab: Lab, run: Run) -> None:
    """SIGKILL during the cc100 corpus step, then a re-run: byte-identical artifacts, leftovers removed."""
    _corpus_step_killed(lab, run, "cc100", lab.cc100_slice())


@scenario("step")
def jawiki_step_killed_then_rerun(lab: Lab, run: Run) -> None:
    """SIGKILL during the JaWiki corpus step, then a re-run: byte-identical artifacts, leftovers removed."""
    _corpus_step_killed(lab, run, "jawiki", lab.jawiki_slice())


@scenario("step")
def token_shards_killed_then_resumed(lab: Lab, run: Run) -> None:
    """SIGKILL during shard encoding, then a re-run in the same folder: finished shards reused, identical files."""
    work = lab.dir("shards-killed")
    text = work / SENTENCES_FILE
    with lzma.open(lab.cc100_slice(), "rb") as handle:
        text.write_bytes(handle.read())
    args = {"text": str(text), "tokenizer": str(lab.demo_data() / "tok"), "shard_lines": 2000}
    out = work / "out"
    # The clean run goes alongside the one to be killed (20 shards of ~0.1 s each here).
    clean = start_child("shards", work / "reference.log", out=str(work / "reference"), **args)
    process = start_child("shards", work / "killed.log", out=str(out), **args)
    landed = kill_when(process, lambda: len(list(out.glob("shard-*.json"))) >= 2, lab.rng.uniform(0, 0.2))
    if not landed:  # finished first: kill the next run as soon as two shards are done
        child_result(process, work / "killed.log")
        shutil.rmtree(out)
        process = start_child("shards", work / "killed.log", out=str(out), **args)
        landed = kill_when(process, lambda: len(list(out.glob("shard-*.json"))) >= 2, 0.0)
    reference = child_result(clean, work / "reference.log")
    run.require(landed, "encoding finished before the kill")
    done = len(list(out.glob("shard-*.json")))
    stray = sorted(p.name for p in out.glob(".*.tmp"))
    resumed, _ = run_child("shards", work / "resumed.log", out=str(out), **args)
    run.check(resumed["shards_reused"] >= 2, f"only {resumed['shards_reused']} shards reused")
    run.check(resumed["shards_reused"] + resumed["shards_encoded"] == reference["shards_encoded"],
              f"shard counts {resumed} against {reference}")
    run.artifact(tree_digest(out) == tree_digest(work / "reference"), "the resumed shards differ from a clean run's")
    run.note(f"killed with {done} of {reference['shards_encoded']} shards done and {len(stray)} temporaries; "
             f"re-run reused {resumed['shards_reused']}, encoded {resumed['shards_encoded']}; files identical")


STEPS = 16  # of the demo model on demo shards, checkpointed every 4


@scenario("step")
def training_killed_then_resumed(lab: Lab, run: Run) -> None:
    """SIGKILL of a training stage after a checkpoint: the re-run resumes and ends at the same step and weights."""
    from tinyplm_lib.training.checkpoints import LocalCheckpointSink

    data = lab.demo_data()
    work = lab.dir("training-killed")
    args = {"data": str(data), "steps": STEPS, "save_steps": 4}
    # The uninterrupted run goes alongside the one to be killed, which is paced (sleeps per step).
    clean = start_child("train", work / "reference.log", out=str(work / "reference"),
                        checkpoints=str(work / "reference-ckpt"), pace=0.0, **args)
    sink = LocalCheckpointSink(work / "ckpt")
    process = start_child("train", work / "killed.log", out=str(work / "out"), checkpoints=str(sink.store.root),
                          pace=0.2, **args)
    killed = kill_when(process, lambda: max(sink.steps(), default=0) >= 8, lab.rng.uniform(0, 0.3), timeout=300)
    reference = child_result(clean, work / "reference.log")
    run.require(killed, "the stage finished before the kill")
    saved = max(sink.steps())
    run.check(not (work / "out" / MODEL_WEIGHTS_FILE).exists(), "the killed stage wrote its final model")
    resumed, _ = run_child("train", work / "resumed.log", out=str(work / "out"), checkpoints=str(sink.store.root),
                           pace=0.0, **args)
    run.check(resumed["resumed_from_step"] == saved, f"resumed from {resumed['resumed_from_step']}, saved {saved}")
    run.artifact(resumed["global_step"] == reference["global_step"] == STEPS,
                 f"final step {resumed['global_step']} against {reference['global_step']}")
    run.check(abs(resumed["eval_loss"] - reference["eval_loss"]) < 1e-6,
              f"eval loss {resumed['eval_loss']} against {reference['eval_loss']}")
    weights = [(work / folder / MODEL_WEIGHTS_FILE).read_bytes() for folder in ("out", "reference")]
    same = weights[0] == weights[1]
    run.artifact(same, "the resumed model's weights differ from the uninterrupted run's")
    run.note(f"killed after checkpoint {saved}; resumed to step {resumed['global_step']}, "
             f"eval loss {resumed['eval_loss']:.6f} = {reference['eval_loss']:.6f}, identical weights")
