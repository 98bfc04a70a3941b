"""JGLUE dev scores of stage 1, stage 2 and the random-init control, each stage trained for a wall-clock budget.

    python -m bench.jglue --web FILE.txt.xz --wiki FILE.json.gz --jglue ../shared/jglue --stage-seconds 600 \
        --jglue-settings configs/jglue/bench.json --json OUT.json [--work DIR] [--workers 2]
Stage 1 (cc100) and stage 2 (JaWiki, from stage 1) train with train_stage; both are scored on one fixed MLM
evaluation set, then all three models are fine-tuned on JSTS and JCommonsenseQA (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.report import emit
from tinyplm_lib.evaluation.jglue import ModelSource, finetune, load_settings
from tinyplm_lib.evaluation.jglue_data import JCOMMONSENSEQA, JSTS, TASKS, json_lines, recompute_metrics
from tinyplm_lib.evaluation.mlm import MlmEvalSettings, build_mlm_eval_set, evaluate_mlm_folder
from tinyplm_lib.layout import METRICS_FILE, PREDICTIONS_FILE
from tinyplm_lib.training.distributed import pick_device
from tinyplm_lib.training.stage import RuntimeOptions, StageOptions, train_stage

REPO = Path(__file__).resolve().parents[1]
CORPORA = ("cc100", "jawiki")
# Each stage: the corpus it trains on and the TrainingArguments JSON its settings come from.
STAGES = {"stage1": ("cc100", REPO / "configs/train/stage1-cc100.json"),
          "stage2": ("jawiki", REPO / "configs/train/stage2-jawiki.json")}
SEQ_LEN = 128
# What a CPU run at a wall-clock budget changes in the stage JSON files (written to the report):
# their batch of 32 x 8 accumulated x 512 positions and lr 5e-5 are sized for 128M lines on GPUs;
# ~900 steps of 32 x 128 fit 600 s here, and bench/train.py found lr 5e-4 learns at that size.
# The budget, not the step count, ends training, so the schedule cannot decay to a known end:
# constant after a 50-step warm-up (~6% of the steps, near the JSON's 8%), as in bench/train.py.
CPU_CHANGES = {"max_seq_length": SEQ_LEN, "gradient_accumulation_steps": 1, "learning_rate": 5e-4,
               "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 50, "max_steps": 1_000_000,
               "logging_steps": 50}
CPU_REMOVED = ("warmup_ratio", "fp16")  # warmup_steps replaces the ratio; precision "auto" supersedes fp16
MAX_EVAL_SEQUENCES = 512  # the stage's own packed evaluation; the fixed MLM set is the measure here
JGLUE_METRICS = {JSTS: ("pearson", "spearman"), JCOMMONSENSEQA: ("accuracy",)}


def _log(message: str) -> None:
    print(f"[bench.jglue {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def prepare(opts: argparse.Namespace) -> dict:
    """Corpora, tokenizer and token shards of both corpora under `opts.work`; skipped when prepared.json
    records the same inputs and settings (any change rebuilds all, reusing the shards that still match)."""
    from tinyplm_lib.corpora.cc100 import Cc100Settings, build_cc100_corpus
    from tinyplm_lib.corpora.jawiki import JawikiSettings, build_jawiki_corpus
    from tinyplm_lib.tokens.shard_writer import encode_corpus
    from tinyplm_lib.tokens.tokenizer import TokenizerSettings, train_tokenizer

    work, marker = opts.work, opts.work / "prepared.json"
    settings = {"web": str(opts.web.resolve()), "wiki": str(opts.wiki.resolve()), "max_lines": opts.max_lines,
                "max_documents": opts.max_documents, "vocab_size": opts.vocab_size,
                "limit_alphabet": opts.limit_alphabet, "model_max_length": SEQ_LEN}
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8"))["settings"] == settings:
        _log(f"prepared data reused from {work}")
        return json.loads(marker.read_text(encoding="utf-8"))
    marker.unlink(missing_ok=True)  # until the rebuild ends, no marker vouches for what is in `work`
    started, text = time.perf_counter(), work / "corpora"
    text.mkdir(parents=True, exist_ok=True)
    # As bench/train.py: the cc100 validation budget is 1/50 of the lines (3,000 of the sample's 150k).
    build_cc100_corpus(opts.web, text / "cc100-train.txt", text / "cc100-validation.txt",
                       Cc100Settings(max_lines=opts.max_lines, max_validation_lines=max(200, opts.max_lines // 50)),
                       workers=opts.workers)
    build_jawiki_corpus(opts.wiki, text / "jawiki-train.txt", text / "jawiki-validation.txt",
                        JawikiSettings(max_documents=opts.max_documents), workers=opts.workers)
    # The profile's recipe (configs/full.yaml) on the whole JaWiki train split: its 10M-line sample
    # would hold every line of it, in the same order.
    tokenizer = train_tokenizer(text / "jawiki-train.txt", work / "tokenizer",
                                TokenizerSettings(vocab_size=opts.vocab_size, limit_alphabet=opts.limit_alphabet,
                                                  model_max_length=SEQ_LEN), workers=opts.workers)
    counts = {}
    for corpus in CORPORA:
        for split in ("train", "validation"):
            meta = encode_corpus(text / f"{corpus}-{split}.txt", work / "tokenizer",
                                 work / "shards" / corpus / split, workers=opts.workers)
            counts.setdefault(corpus, {})[split] = {"sentences": meta["num_sentences"], "tokens": meta["num_tokens"]}
    prepared = {"settings": settings, "corpora": counts, "tokenizer_vocab_size": tokenizer["vocab_size"],
                "seconds": round(time.perf_counter() - started, 1)}
    marker.write_text(json.dumps(prepared, indent=1) + "\n", encoding="utf-8")
    return prepared


def stage_arguments(name: str, out: Path) -> dict:
    """The stage's TrainingArguments JSON with CPU_CHANGES applied, written to `out`; returns it."""
    arguments = json.loads(STAGES[name][1].read_text(encoding="utf-8"))
    arguments = {k: v for k, v in arguments.items() if k not in CPU_REMOVED} | CPU_CHANGES
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(arguments, indent=1) + "\n", encoding="utf-8")
    return arguments


def train_stages(opts: argparse.Namespace) -> tuple[dict, dict]:
    """Stage 1 on cc100, then stage 2 on JaWiki from stage 1, each for `--stage-seconds` of training;
    returns (per stage: progress and losses, per stage: the TrainingArguments JSON used)."""
    results, arguments, previous = {}, {}, None
    for name, (corpus, _) in STAGES.items():
        out = opts.work / "models" / name
        shutil.rmtree(out, ignore_errors=True)  # a folder of an earlier run must not mix into this one
        args_file = opts.work / "runs" / f"{name}-args.json"
        arguments[name] = stage_arguments(name, args_file)
        options = StageOptions(model_config=opts.model_config, training_args=args_file,
                               init_from=previous, max_eval_sequences=MAX_EVAL_SEQUENCES)
        runtime = RuntimeOptions(max_wall_time_s=opts.stage_seconds, dataloader_workers=opts.workers)
        shards = opts.work / "shards" / corpus
        _log(f"{name}: training on {corpus} for {opts.stage_seconds} s")
        metrics = train_stage(shards / "train", shards / "validation", opts.work / "tokenizer", out, options,
                              log=_log, runtime=runtime)
        results[name] = {
            "corpus": corpus, "folder": str(out), "init_from": str(previous) if previous else None,
            "steps": metrics["global_step"], "tokens_seen": metrics["tokens_seen"],
            "wall_time_s": metrics["wall_time_s"], "tokens_per_s": metrics["tokens_per_s"],
            "stopped_early": metrics["stopped_early"], "epochs": metrics["epochs"],
            "train_sequences": metrics["train_sequences"], "train_loss": metrics["train_loss"],
            "packed_eval_loss": metrics["eval_loss"], "packed_untrained_eval_loss": metrics["untrained_eval_loss"],
            "precision": metrics["precision"], "device": metrics["device"], "parameters": metrics["parameters"],
        }
        previous = out
    return results, arguments


def score_mlm(opts: argparse.Namespace, stages: dict) -> tuple[dict, dict]:
    """(the fixed MLM set's description, per stage: loss/accuracy/perplexity per corpus)."""
    eval_dir = opts.work / "mlm-eval"
    meta = build_mlm_eval_set({corpus: opts.work / "shards" / corpus / "validation" for corpus in CORPORA},
                              opts.work / "tokenizer", eval_dir,
                              MlmEvalSettings(max_sequences=opts.mlm_eval_sequences, max_seq_length=SEQ_LEN))
    described = {"folder": str(eval_dir), **meta["settings"],
                 **{corpus: {key: entry[key] for key in ("sequences", "tokens", "masked_tokens")}
                    for corpus, entry in meta["corpora"].items()}}
    scores = {name: evaluate_mlm_folder(Path(stage["folder"]), eval_dir) for name, stage in stages.items()}
    return described, scores


def dev_file(opts: argparse.Namespace, task: str) -> Path:
    """The task's dev file, or its first `--max-dev-examples` rows copied under --work (quick checks)."""
    source = opts.jglue / f"{task}-v1.3-valid.json.gz"
    if opts.max_dev_examples is None:
        return source
    out = opts.work / "jglue-dev" / f"{task}-valid-first{opts.max_dev_examples}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for _, row in json_lines(source):
        if len(rows) == opts.max_dev_examples:
            break
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    out.write_text("".join(rows), encoding="utf-8")
    return out


def recomputed_equal(task: str, folder: Path) -> bool:
    """True when the scores recomputed from predictions.jsonl alone equal metrics.json's exactly."""
    written = json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))
    recomputed = recompute_metrics(task, folder / PREDICTIONS_FILE)
    return all(written.get(key) == value for key, value in recomputed.items())


def run_jglue(opts: argparse.Namespace, stages: dict) -> dict:
    """Both tasks for stage 1, stage 2 and the control (stage 2's config, random init), same settings."""
    settings = load_settings(opts.jglue_settings)
    sources = {name: ModelSource.pretrained(Path(stage["folder"])) for name, stage in stages.items()}
    sources["control"] = ModelSource.control(Path(stages["stage2"]["folder"]))
    dev = {task: dev_file(opts, task) for task in TASKS}
    results: dict = {}
    for name, source in sources.items():
        for task in TASKS:
            out = opts.work / "jglue" / name / task
            metrics = finetune(task, source, opts.work / "tokenizer", opts.jglue / f"{task}-v1.3-train.json.gz",
                               dev[task], out, settings, log=_log)
            results.setdefault(name, {})[task] = {
                **{key: metrics[key] for key in JGLUE_METRICS[task]},
                **{key: metrics[key] for key in ("examples", "train_examples", "steps", "seconds", "train_seconds",
                                                 "train_loss", "device")},
                "folder": str(out), "recomputed_equal": recomputed_equal(task, out),
            }
    return results


def comparison(jglue: dict) -> dict:
    """Per metric: each model's score, and each stage's gain over the control (None where undefined)."""
    table = {}
    for task, keys in JGLUE_METRICS.items():
        for key in keys:
            scores = {name: runs[task][key] for name, runs in jglue.items()}
            control = scores["control"]
            gains = {name: None if value is None or control is None else value - control
                     for name, value in scores.items() if name != "control"}
            table[f"{task}_{key}"] = {"scores": scores, "gain_over_control": gains}
    return table


def machine() -> dict:
    device = pick_device()
    return {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "load_average_before": list(os.getloadavg())}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--web", type=Path, required=True, help="cc100-format .txt.xz")
    parser.add_argument("--wiki", type=Path, required=True, help="CirrusSearch .json.gz")
    parser.add_argument("--jglue", type=Path, required=True, help="folder of <task>-v1.3-{train,valid}.json.gz")
    parser.add_argument("--stage-seconds", type=float, default=600.0, help="training budget of each stage")
    parser.add_argument("--jglue-settings", type=Path, default=REPO / "configs/jglue/bench.json")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tinyplm-bench-jglue"),
                        help="prepared data (cached), models, MLM set, JGLUE predictions and metrics")
    parser.add_argument("--workers", type=int, default=2, help="preparation processes and DataLoader workers")
    # Smaller runs for quick checks and the test; the defaults are the bench's.
    parser.add_argument("--model-config", type=Path, default=REPO / "configs/model/bert-tiny-custom.json")
    parser.add_argument("--max-lines", type=int, default=150_000, help="cc100 lines used")
    parser.add_argument("--max-documents", type=int, default=None, help="JaWiki articles used (default all)")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--limit-alphabet", type=int, default=6129)
    parser.add_argument("--mlm-eval-sequences", type=int, default=2000, help="MLM eval sentences per corpus")
    parser.add_argument("--max-dev-examples", type=int, default=None, help="first N dev rows (default all)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    started = time.perf_counter()
    report: dict = {"command": shlex.join(["python", "-m", "bench.jglue",
                                           *(sys.argv[1:] if argv is None else argv)]),
                    "machine": machine()}
    prepared = prepare(opts)
    stages, arguments = train_stages(opts)
    report["mlm_eval_set"], mlm = score_mlm(opts, stages)
    jglue_started = time.perf_counter()
    jglue = run_jglue(opts, stages)
    report["machine"]["load_average_after"] = list(os.getloadavg())
    report["data"] = prepared
    report["budget"] = {
        "stage_seconds": opts.stage_seconds, "model_config": str(opts.model_config),
        "training_args": arguments,
        "changed_from_stage_json": {"set": CPU_CHANGES, "removed": list(CPU_REMOVED)},
        "dataloader_workers": opts.workers,
        "stages": {name: {key: stage[key] for key in ("steps", "tokens_seen", "wall_time_s", "tokens_per_s")}
                   for name, stage in stages.items()},
        "jglue_settings_file": str(opts.jglue_settings), "jglue_settings": asdict(load_settings(opts.jglue_settings)),
        "max_dev_examples": opts.max_dev_examples,
        "jglue_seconds": round(time.perf_counter() - jglue_started, 1),
    }
    report["stages"] = stages
    report["models"] = {name: {"mlm": mlm.get(name), "jglue": runs} for name, runs in jglue.items()}
    report["comparison"] = comparison(jglue)
    report["recomputed_equal"] = all(run["recomputed_equal"] for runs in jglue.values() for run in runs.values())
    report["seconds"] = round(time.perf_counter() - started, 1)
    return emit(report, opts.json, ensure_ascii=False)


if __name__ == "__main__":
    main()
