"""Training throughput and quality at a fixed wall-clock budget: the original's way against ours.

    python -m bench.train --web FILE.txt.xz --wiki FILE.json.gz --seconds 120 --repeats 3 --json OUT.json
The same BertConfig, data, precision, DataLoader workers and schedule for `--seconds` each, the
run_mlm.py --line_by_line way (HF Trainer, length-grouped by default) and ours (train_stage on packed
shards), `--repeats` times in alternating order; each model scored on one fixed MLM evaluation set
(tinyplm_lib.evaluation.mlm) and on its own validation format. Medians, minima and maxima are
reported (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from bench.report import emit
from bench.train_runs import WARMUP_RATIO, Common, Plan, run_baseline, run_ours, steady_rate
from tinyplm_lib.evaluation.mlm import MlmEvalSettings, build_mlm_eval_set, evaluate_mlm
from tinyplm_lib.training.distributed import pick_device

REPO = Path(__file__).resolve().parents[1]
# Per-side figures reported as the median over repeats (with the per-repeat values under `runs`).
_MEDIANS = ("steps", "planned_steps", "warmup_steps", "tokens", "wall_s", "tokens_per_s", "steady_tokens_per_s",
            "val_loss", "val_accuracy", "val_perplexity", "own_eval_loss")


def prepare(web: Path, wiki: Path, work: Path, *, max_lines: int, vocab_size: int, seq_len: int) -> None:
    """Corpora, tokenizer, our shards and the baseline's token ids (train and validation), cached under `work`."""
    from tinyplm_lib.corpora.cc100 import Cc100Settings, build_cc100_corpus
    from tinyplm_lib.corpora.jawiki import JawikiSettings, build_jawiki_corpus
    from tinyplm_lib.tokens.shard_writer import encode_corpus
    from tinyplm_lib.tokens.tokenizer import TokenizerSettings, train_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "prepared.json").is_file():
        build_cc100_corpus(web, work / "train.txt", work / "validation.txt",
                           Cc100Settings(max_lines=max_lines, max_validation_lines=max(200, max_lines // 50)))
        build_jawiki_corpus(wiki, work / "wiki-train.txt", work / "wiki-validation.txt", JawikiSettings())
        train_tokenizer(work / "wiki-train.txt", work / "tokenizer",
                        TokenizerSettings(vocab_size=vocab_size, model_max_length=seq_len), workers=2)
        for split in ("train", "validation"):
            encode_corpus(work / f"{split}.txt", work / "tokenizer", work / "shards" / split, workers=2)
        _baseline_ids(work, "train", "baseline", seq_len)
        _baseline_ids(work, "validation", "baseline-val", seq_len)
        (work / "prepared.json").write_text(json.dumps({"seq_len": seq_len}) + "\n")


def _baseline_ids(work: Path, split: str, name: str, seq_len: int) -> None:
    """The baseline's preprocessing, as run_mlm does it: each line, truncated, with [CLS] … [SEP]."""
    from tinyplm_lib.tokens.tokenizer import load_tokenizer

    lines = (work / f"{split}.txt").read_text(encoding="utf-8").splitlines()
    encoded = load_tokenizer(work / "tokenizer")(lines, truncation=True, max_length=seq_len)["input_ids"]
    np.save(work / f"{name}-offsets.npy", np.cumsum([0] + [len(ids) for ids in encoded]).astype(np.int64))
    np.save(work / f"{name}-ids.npy", np.concatenate([np.asarray(i, dtype=np.uint16) for i in encoded]))


def precisions(device: torch.device, cpu_precision: str) -> tuple[str, str]:
    """(ours, baseline) precision. On CUDA the baseline keeps the original's fp16 autocast and ours its
    own default (bf16 where the GPU has it); on a CPU both sides run `cpu_precision` (see bench/README.md)."""
    if device.type == "cuda":
        return "auto", "fp16"
    return cpu_precision, cpu_precision


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--web", type=Path)
    parser.add_argument("--wiki", type=Path)
    parser.add_argument("--seconds", type=float, default=120.0, help="training budget of each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, in alternating order")
    parser.add_argument("--calibrate-seconds", type=float, default=60.0,
                        help="a first, unreported run of each side that measures its steps/s (its planned steps)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tinyplm-bench-train"))
    parser.add_argument("--model-config", type=Path, default=REPO / "configs/model/bert-tiny-custom.json")
    parser.add_argument("--batch", type=int, default=32, help="sequences per step, both runs")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate, both runs")
    parser.add_argument("--max-lines", type=int, default=150_000, help="cc100-style lines used")
    parser.add_argument("--vocab-size", type=int, default=32768)
    # Off by default: on the development CPU the compiled encoder was no faster (5.5–5.7k against
    # 5.5–6.5k tokens/s eager) and its first steps cost 5–40 s of the budget.
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile our encoder (and the loss on a GPU)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both runs")
    parser.add_argument("--cpu-precision", choices=("bf16", "fp32"), default="bf16",
                        help="both sides' precision on a CPU (on CUDA: baseline fp16, ours auto)")
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--skip-baseline", action="store_true", help="measure ours only")
    # Grouping is the stronger baseline (it pads far less); the original's JSON leaves HF's default (random).
    parser.add_argument("--baseline-sampling", choices=("random", "group_by_length"), default="group_by_length",
                        help="the baseline Trainer's train_sampling_strategy")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = _parser()
    opts = parser.parse_args(argv)
    if opts.web and opts.wiki:
        prepare(opts.web, opts.wiki, opts.work, max_lines=opts.max_lines, vocab_size=opts.vocab_size,
                seq_len=opts.seq_len)
    if not (opts.work / "prepared.json").is_file():
        parser.error(f"{opts.work} holds no prepared data: give --web and --wiki")
    if not (opts.work / "baseline-val-ids.npy").is_file():  # a work folder prepared before the own-format scores
        _baseline_ids(opts.work, "validation", "baseline-val", opts.seq_len)
    if opts.prepare_only:
        return {}
    device = pick_device()
    # One set for both sides, in neither side's training format: the same sentences and positions
    # whatever either run did. Cheap to build (no MeCab), so it is rebuilt, byte-identical, each run.
    eval_dir = opts.work / "mlm-eval"
    eval_meta = build_mlm_eval_set({"cc100": opts.work / "shards" / "validation"}, opts.work / "tokenizer",
                                   eval_dir, MlmEvalSettings(max_seq_length=opts.seq_len))
    common = Common(work=opts.work, model_config=opts.model_config, batch=opts.batch, lr=opts.lr,
                    seq_len=opts.seq_len, workers=opts.workers, device=device)
    ours_precision, baseline_precision = precisions(device, opts.cpu_precision)
    runners = {"ours": lambda plan, out: run_ours(common, plan, out, precision=ours_precision,
                                                  compile_model=opts.compile)}
    if not opts.skip_baseline:
        runners["baseline"] = lambda plan, out: run_baseline(common, plan, out, sampling=opts.baseline_sampling,
                                                             precision=baseline_precision)
    calibration, plans = {}, {}
    for name, runner in runners.items():
        # Long enough a run that the schedule does not matter; the steady rate sets the real runs' steps.
        probe = runner(Plan(seconds=opts.calibrate_seconds, steps=1_000_000, warmup_steps=1),
                       opts.work / "runs" / f"calibrate-{name}")
        if name == "ours":  # packed: every step about as long
            rate, startup = steady_rate(probe["timing"])
        else:
            # The length-grouped sampler's steps differ ~3× in length (each megabatch longest first), so a
            # short probe's steps/s says little: its tokens/s over the data's mean tokens a step instead.
            rate, startup = probe["tokens_per_s"] / (opts.batch * _mean_line_tokens(opts.work)), 0.0
        plans[name] = Plan.from_rate(opts.seconds, rate, startup)
        calibration[name] = {"seconds": opts.calibrate_seconds, "steps_per_s": rate, "startup_s": startup,
                             "tokens_per_s": probe["tokens_per_s"]}
    runs: dict[str, list[dict]] = {name: [] for name in runners}
    for repeat in range(opts.repeats):
        order = list(runners) if repeat % 2 == 0 else list(reversed(runners))
        for name in order:
            run = runners[name](plans[name], opts.work / "runs" / f"{name}-{repeat}")
            model, _ = run.pop("model"), run.pop("timing")
            fixed = evaluate_mlm(model, eval_dir, batch_size=64, device=device)["cc100"]
            run.update(val_loss=fixed["loss"], val_accuracy=fixed["accuracy"], val_perplexity=fixed["perplexity"],
                       parameters=sum(p.numel() for p in model.parameters()))
            runs[name].append(run)
            del model
    report = _report(opts, device, eval_meta, calibration, runs)
    return emit(report, opts.json)


def _report(opts, device: torch.device, eval_meta: dict, calibration: dict, runs: dict[str, list[dict]]) -> dict:
    report: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "seconds": opts.seconds, "repeats": opts.repeats, "batch_size": opts.batch, "seq_len": opts.seq_len,
        "learning_rate": opts.lr, "workers": opts.workers,
        "schedule": f"linear decay after a warm-up of {WARMUP_RATIO:.0%} of each run's planned steps "
                    f"(planned from a {opts.calibrate_seconds:g} s calibration run of each side)",
        "baseline_sampling": opts.baseline_sampling, "model_config": opts.model_config.name,
        "eval_set": {key: eval_meta["corpora"]["cc100"][key] for key in ("sequences", "masked_tokens")}
        | {"corpus": "cc100", **eval_meta["settings"]},
        "calibration": calibration,
        "parameters": runs["ours"][0]["parameters"],
    }
    for name, side in runs.items():
        summary = {key: _median([run[key] for run in side]) for key in _MEDIANS}
        constant = {key: side[0][key] for key in ("precision", "workers", "compiled", "sampling") if key in side[0]}
        summary["fixed_eval_loss"] = summary["val_loss"]
        report[name] = {**summary, **constant, "runs": side}
    if "baseline" in runs:
        paired = [ours["tokens_per_s"] / base["tokens_per_s"] for ours, base in zip(runs["ours"], runs["baseline"])]
        report["speedup"] = {"median": statistics.median(paired), "min": min(paired), "max": max(paired),
                             "per_repeat": paired}
    return report


def _mean_line_tokens(work: Path) -> float:
    offsets = np.load(work / "baseline-offsets.npy")
    return float(offsets[-1]) / (len(offsets) - 1)


def _median(values: list):
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


if __name__ == "__main__":
    main()
