"""Corpus-scale benchmark: the real asset graph through Dagster on synthetic corpora of growing size.

    .venv/bin/python -m bench.scale --web WEB.txt.xz --wiki WIKI.json.gz --sizes 1000000,4000000 --json OUT.json
Per size: a synthetic pair (bench/scale_data.py), then one `dagster asset materialize` per asset in order, with the
full profile's settings scaled to the size; each step's wall time, process-tree RSS and disk are sampled from /proc.
Then growth between sizes, MeCab's one-core limit and an extrapolation to the full corpora; see bench/README.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import yaml

from bench.mecab_limit import decompress_seconds, mecab_limit
from bench.proc_sampler import TreeSampler
from bench.report import emit
from bench.scale_data import load_source, synthetic_pair
from tinyplm_lib.layout import SENTENCES_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]
DAGSTER = str(Path(sys.executable).with_name("dagster"))
FULL_PROFILE = REPO_ROOT / "configs" / "full.yaml"
FULL_JAWIKI_SENTENCES = 40_000_000  # ≈38.4M train + 1.2M validation on the full dump (DESIGN.md)
TARGET_CORES = 16
RSS_NOISE = 0.10  # less growth of a peak RSS is flat: training's 7.2 GB moved 6% between two runs at 40k lines


class Step(NamedTuple):
    """One `dagster asset materialize`: what it selects, what its work grows with, where that work runs."""

    name: str
    select: str
    unit: str  # cc100_lines | jawiki_sentences | sample_sentences
    parallel: bool  # True: the bulk runs in the step's WorkerPool; the step process reads, routes and writes


STEPS = (
    Step("cc100_ja_raw", "cc100_ja_raw", "cc100_lines", False),
    Step("jawiki_raw", "jawiki_raw", "jawiki_sentences", False),
    Step("cc100_ja_corpus", "cc100_ja_train,cc100_ja_validation", "cc100_lines", True),
    Step("jawiki_corpus", "jawiki_train,jawiki_validation", "jawiki_sentences", True),
    Step("tokenizer_sample", "tokenizer_sample", "jawiki_sentences", False),
    Step("wordpiece_tokenizer", "wordpiece_tokenizer", "sample_sentences", True),
    Step("cc100_ja_tokens", "cc100_ja_tokens", "cc100_lines", True),
    Step("jawiki_tokens", "jawiki_tokens", "jawiki_sentences", True),
    Step("bert_stage1_cc100", "bert_stage1_cc100", "cc100_lines", False),
    Step("bert_stage2_jawiki", "bert_stage2_jawiki", "jawiki_sentences", False),
)
TRAINING = ("bert_stage1_cc100", "bert_stage2_jawiki")
FIXED_SIZE_OUTPUTS = ("wordpiece_tokenizer", *TRAINING)  # their files' size is set by vocab and model, not data
CORPORA = ("cc100_ja_train", "cc100_ja_validation", "jawiki_train", "jawiki_validation")
THROUGHPUT_STEPS = ("cc100_ja_corpus", "jawiki_corpus", "cc100_ja_tokens", "jawiki_tokens")


def newest_run(dagster_home: Path) -> tuple[dict, dict]:
    """Seconds of each step, and the numeric metadata of each asset materialised, in the instance's newest run."""
    from dagster import DagsterEventType, DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    started, seconds, metadata = {}, {}, {}
    with DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home))) as instance:
        for record in instance.all_logs(instance.get_runs(limit=1)[0].run_id):
            event = record.dagster_event
            kind = event.event_type if event is not None else None
            if kind == DagsterEventType.STEP_START:
                started[event.step_key] = record.timestamp
            elif kind == DagsterEventType.STEP_SUCCESS:
                seconds[event.step_key] = round(record.timestamp - started[event.step_key], 3)
            elif kind == DagsterEventType.ASSET_MATERIALIZATION:
                materialization = event.event_specific_data.materialization
                metadata[materialization.asset_key.to_user_string()] = {
                    key: entry.value for key, entry in materialization.metadata.items()
                    if isinstance(entry.value, (int, float)) and not isinstance(entry.value, bool)}
    return seconds, metadata


def run_step(step: Step, run_dir: Path, env: dict, executor: str) -> dict:
    """Materialise one step in its own session, sampled; its measurements (a failure ends the bench)."""
    log = run_dir / f"{step.name}.log"
    command = [DAGSTER, "asset", "materialize", "-m", "tinyplm_assets.definitions", "--select", step.select,
               "-c", str(run_dir / "run_config.yaml")]
    started = time.perf_counter()
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        sampler = TreeSampler(process.pid, 0 if executor == "in_process" else 1, Path(env["TINYPLM_HOME"]))
        sampler.start()
        code = process.wait()
    seconds, measured = time.perf_counter() - started, sampler.stop()
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-6000:]
        raise SystemExit(f"step {step.name} failed (exit code {code}); {log} ends:\n{tail}")
    step_seconds, metadata = newest_run(Path(env["DAGSTER_HOME"]))
    own = step_seconds.pop(step.name)
    return {"seconds": round(seconds, 3), "step_seconds": own, "checks_seconds": round(sum(step_seconds.values()), 3),
            **measured, "metadata": metadata}


def run_config(pair, size: int, args, run_dir: Path) -> dict:
    """configs/full.yaml with file:// sources, its line budgets scaled to `size` and `--workers` everywhere."""
    ops = yaml.safe_load(FULL_PROFILE.read_text(encoding="utf-8"))["ops"]
    cc100 = ops["cc100_ja_corpus"]["config"]
    fraction = size / cc100["max_lines"]
    ops["cc100_ja_raw"]["config"] = {"url": pair.web.resolve().as_uri(), "progress": False}
    ops["jawiki_raw"]["config"] = {"url": pair.wiki.resolve().as_uri(), "progress": False}
    cc100.update(max_lines=size, max_validation_lines=max(1000, round(cc100["max_validation_lines"] * fraction)))
    sample = ops["tokenizer_sample"]["config"]
    sample["sample_size"] = round(sample["sample_size"] * fraction)
    for op in ("cc100_ja_corpus", "jawiki_corpus", "wordpiece_tokenizer", "cc100_ja_tokens", "jawiki_tokens"):
        ops[op]["config"]["workers"] = args.workers
    # The profile's TrainingArguments for a few steps, evaluated once at the end (eval/save_steps stay above).
    # Accumulation 1: a step costs 1/8, memory the same; lr 1e-3: 3 steps beat an untrained model, as the
    # blocking check `beats_untrained_model` demands.
    for stage in TRAINING:
        path, stage_config = run_dir / f"{stage}.training_args.json", ops[stage]["config"]
        values = json.loads((REPO_ROOT / stage_config["training_args_path"]).read_text(encoding="utf-8"))
        values.pop("num_train_epochs", None)
        values.update(max_steps=args.train_steps, gradient_accumulation_steps=1, logging_steps=1, learning_rate=1e-3)
        path.write_text(json.dumps(values, indent=1), encoding="utf-8")
        stage_config.update(training_args_path=str(path), max_eval_sequences=64)
    return {"ops": ops, "execution": {"config": {args.executor: {}}}}


def step_work(step: str, run: dict) -> tuple[int, int] | None:
    """(lines, characters) a step reads: the input's lines for raw and corpus steps, the sentences after them."""
    meta = {name: values for record in run["assets"].values() for name, values in record["metadata"].items()}
    if step.endswith(("_raw", "_corpus")):
        profile = run["synthetic"]["cc100" if step.startswith("cc100") else "jawiki"]
        return profile["lines"], profile["chars"]
    if step == "wordpiece_tokenizer":
        return meta[step]["sample_lines"], meta[step]["sample_chars"]
    if step in ("tokenizer_sample", "cc100_ja_tokens", "jawiki_tokens"):
        corpus = meta["jawiki_train" if step == "tokenizer_sample" else step.replace("_tokens", "_train")]
        splits = ("train",) if step == "tokenizer_sample" else ("train", "validation")
        return sum(corpus[f"lines_{s}"] for s in splits), sum(corpus[f"chars_{s}"] for s in splits)
    return None


def materialise(pair, size: int, args, steps: list[Step]) -> dict:
    """Every step for one size in a fresh Dagster instance and store; the run's record."""
    run_dir = args.work / f"run-{size}"
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "dagster_home").mkdir(parents=True)
    (run_dir / "home").mkdir()
    shutil.copyfile(REPO_ROOT / "dagster.yaml", run_dir / "dagster_home" / "dagster.yaml")
    (run_dir / "run_config.yaml").write_text(json.dumps(run_config(pair, size, args, run_dir), indent=1),
                                             encoding="utf-8")  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TINYPLM_"))}
    env.update(DAGSTER_HOME=str(run_dir / "dagster_home"), TINYPLM_HOME=str(run_dir / "home"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", DAGSTER_DISABLE_TELEMETRY="1")
    run = {"cc100_lines": size, "jawiki_articles": pair.jawiki_articles,
           "jawiki_sentences": pair.profiles["synthetic"]["jawiki"]["lines"], "assets": {},
           "synthetic": pair.profiles["synthetic"]}
    for step in steps:
        print(f"[bench.scale] {size:,} lines: {step.name}", file=sys.stderr, flush=True)
        run["assets"][step.name] = run_step(step, run_dir, env, args.executor)
    for name, record in run["assets"].items():
        work = step_work(name, run)
        if work is not None and record["step_seconds"] > 0:
            record.update(lines=work[0], chars=work[1], lines_per_s=round(work[0] / record["step_seconds"]),
                          chars_per_s=round(work[1] / record["step_seconds"]))
    run["units"] = {"cc100_lines": size, "jawiki_sentences": run["jawiki_sentences"],
                    "sample_sentences": run["assets"].get("wordpiece_tokenizer", {}).get("lines")}
    run["total_seconds"] = round(sum(a["seconds"] for a in run["assets"].values()), 3)
    run["ours_lines_per_s_per_worker"] = None
    if all(step in run["assets"] for step in THROUGHPUT_STEPS):  # raw files to shards: input lines, kept sentences
        jawiki = run["assets"]["jawiki_corpus"]["metadata"]["jawiki_train"]
        lines = size + jawiki["lines_train"] + jawiki["lines_validation"]
        seconds = sum(run["assets"][step]["step_seconds"] for step in THROUGHPUT_STEPS)
        run["ours_lines_per_s_per_worker"] = round(lines / seconds / args.workers, 1)
    return run


def growth(runs: list[dict], key: str, per_line: bool = False) -> dict:
    """Per asset: `key` at the largest size over the smallest (per cc100 line with `per_line`), and the max."""
    small, large = runs[0], runs[-1]
    scale = large["cc100_lines"] / small["cc100_lines"] if per_line else 1
    ratios = {name: round(record[key] / small["assets"][name][key] / scale, 3) if small["assets"][name][key] else None
              for name, record in large["assets"].items() if not (per_line and name in TRAINING)}
    return {**ratios, "max": max((r for r in ratios.values() if r is not None), default=None)}


def _linear(x: tuple[int, int, int], a: float, b: float, flat_below: float = 0.0) -> float:
    """A measure that is `a` at x[0] and `b` at x[1], at x[2]: linear, never below `b`; flat when it grew
    by less than the share `flat_below` (RSS: a few MB of noise would be multiplied ~40x from 4M lines)."""
    if b <= a * (1 + flat_below):
        return b
    return b + (b - a) / (x[1] - x[0]) * (x[2] - x[1])


def extrapolate(runs: list[dict], workers: int, targets: dict, gpu_tokens_per_s: float | None = None) -> dict:
    """Each asset at the full profile's size on TARGET_CORES cores, linear from the two largest sizes."""
    first, last = runs[-2], runs[-1]
    detail, stays, peak_disk, peak_rss, seconds, training_seconds = {}, 0.0, 0.0, 0.0, 0.0, {}
    for step in (s for s in STEPS if s.name in last["assets"]):
        x = (first["units"][step.unit], last["units"][step.unit], targets[step.unit])
        a, b = first["assets"][step.name], last["assets"][step.name]
        work = [r["step_seconds"] + r["checks_seconds"] for r in (a, b)]  # event log: no CLI start-up in it
        wall = b["seconds"] + _linear(x, *work) - work[1]
        serial = _linear(x, a["main_busiest_thread_cpu_seconds"], b["main_busiest_thread_cpu_seconds"])
        cores_seconds = max(serial, wall * workers / TARGET_CORES) if step.parallel else wall
        workers_then = TARGET_CORES if step.parallel else b["workers"]
        rss = (b["peak_cli_rss_mb"] + _linear(x, a["peak_main_rss_mb"], b["peak_main_rss_mb"], RSS_NOISE)
               + workers_then * _linear(x, a["peak_worker_rss_mb"], b["peak_worker_rss_mb"], RSS_NOISE))
        disk, disk_peak = ((b["disk_mb"], b["peak_disk_mb"]) if step.name in FIXED_SIZE_OUTPUTS else
                           (_linear(x, a["disk_mb"], b["disk_mb"]), _linear(x, a["peak_disk_mb"], b["peak_disk_mb"])))
        training = step.name in TRAINING
        if training and gpu_tokens_per_s:  # one epoch, as both stage JSONs say; tokens per unit from the shards
            corpus = "cc100_ja_tokens" if step.unit == "cc100_lines" else "jawiki_tokens"
            tokens = last["assets"][corpus]["metadata"][corpus]["train.num_tokens"] / x[1] * x[2]
            training_seconds[step.name] = {"tokens": round(tokens), "seconds": round(tokens / gpu_tokens_per_s)}
        detail[step.name] = {"unit": step.unit, "parallel": step.parallel,
                             "seconds": None if training else round(cores_seconds),
                             "seconds_on_measured_workers": None if training else round(wall),
                             "serial_seconds": round(serial), "peak_rss_mb": round(rss), "workers": workers_then,
                             "disk_mb": round(disk), "peak_disk_mb": round(disk_peak)}
        seconds += 0.0 if training else cores_seconds
        peak_disk, stays, peak_rss = max(peak_disk, stays + disk_peak), stays + disk, max(peak_rss, rss)
    return {"cc100_lines": targets["cc100_lines"], "jawiki_sentences": targets["jawiki_sentences"],
            "tokenizer_sample_sentences": targets["sample_sentences"], "cores": TARGET_CORES,
            "seconds": round(seconds), "training": training_seconds or None, "gpu_tokens_per_s": gpu_tokens_per_s,
            "training_seconds": sum(t["seconds"] for t in training_seconds.values()) if training_seconds else None,
            "note": "seconds: the data steps; training: shard tokens at full size over --gpu-tokens-per-s",
            "peak_rss_mb": round(peak_rss), "disk_gb": round(stays / 1024, 1),
            "peak_disk_gb": round(peak_disk / 1024, 1),
            "from_sizes": [first["cc100_lines"], last["cc100_lines"]], "assets": detail}


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--web", type=Path, required=True, help="real cc100-format .txt.xz to recombine")
    parser.add_argument("--wiki", type=Path, required=True, help="real CirrusSearch .json.gz to recombine")
    parser.add_argument("--sizes", required=True, help="cc100 lines per run, comma-separated (at least two)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="default: every core")
    parser.add_argument("--seed", type=int, default=42, help="of the synthetic text")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tinyplm-bench-scale",
                        help="the generated inputs (a cache) and each size's Dagster instance and store")
    parser.add_argument("--through", default=STEPS[-1].name, choices=[s.name for s in STEPS], help="last step")
    parser.add_argument("--train-steps", type=int, default=3, help="optimizer steps per training stage")
    parser.add_argument("--executor", choices=("multiprocess", "in_process"), default="multiprocess",
                        help="Dagster's executor: multiprocess as users run it; in_process starts faster")
    parser.add_argument("--keep", action="store_true", help="keep each size's store (default: removed)")
    parser.add_argument("--gpu-tokens-per-s", type=float, help="measured training rate for training_seconds")
    args = parser.parse_args(argv)
    args.sizes = sorted(int(s) for s in args.sizes.split(","))
    if len(args.sizes) < 2 or len(set(args.sizes)) < len(args.sizes):
        parser.error("--sizes needs at least two different sizes")
    args.work = args.work.resolve()
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    steps = list(STEPS[:[s.name for s in STEPS].index(args.through) + 1])
    profile = yaml.safe_load(FULL_PROFILE.read_text(encoding="utf-8"))["ops"]
    targets = {"cc100_lines": profile["cc100_ja_corpus"]["config"]["max_lines"],
               "jawiki_sentences": FULL_JAWIKI_SENTENCES,
               "sample_sentences": profile["tokenizer_sample"]["config"]["sample_size"]}
    load_before, runs, synthetic, limit = os.getloadavg(), [], {}, None
    source = functools.cache(lambda: load_source(args.web, args.wiki))  # loaded once, if a size is not cached
    for size in args.sizes:
        pair = synthetic_pair(args.web, args.wiki, size, args.seed, args.work / "inputs", source)
        synthetic["source"] = pair.profiles["source"]
        synthetic[str(size)] = {k: v for k, v in pair.to_dict().items() if k != "profiles"} | pair.profiles["synthetic"]
        runs.append(materialise(pair, size, args, steps))
        artifacts = args.work / f"run-{size}" / "home" / "artifacts"
        corpora = [p for name in CORPORA if (p := artifacts / name / SENTENCES_FILE).exists()]
        if size == args.sizes[-1] and corpora:  # ~50k lines of the largest run's text, while nothing else runs
            limit = mecab_limit(corpora, max_lines=50_000)
            limit["decompress"] = {"cc100": decompress_seconds(pair.web), "jawiki": decompress_seconds(pair.wiki)}
        if not args.keep:
            shutil.rmtree(args.work / f"run-{size}" / "home", ignore_errors=True)
    ours = runs[-1]["ours_lines_per_s_per_worker"]
    report = {
        "command": " ".join(["python -m bench.scale"] + (sys.argv[1:] if argv is None else argv)),
        "workers": args.workers, "executor": args.executor, "through": args.through, "seed": args.seed,
        "machine": {"cores_available": len(os.sched_getaffinity(0)),
                    "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "synthetic": synthetic,
        "runs": [{k: v for k, v in run.items() if k != "synthetic"} for run in runs],
        "rss_growth": growth(runs, "peak_rss_mb"),
        "seconds_per_line_growth": growth(runs, "step_seconds", per_line=True),
        "limit": limit,
        "ours_lines_per_s_per_worker": ours,
        "ours_fraction_of_limit": round(ours / limit["mecab_lines_per_s_per_core"], 3) if ours and limit else None,
        "extrapolation": extrapolate(runs, args.workers, targets, args.gpu_tokens_per_s),
    }
    return emit(report, args.json, ensure_ascii=False)


if __name__ == "__main__":
    main()
