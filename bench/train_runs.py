"""The two sides of `bench.train`: the original's run_mlm loop through HF `Trainer`, and our `train_stage`.

Each `run_*` trains the same BertConfig for at most `seconds` (and at most `plan.steps` optimizer
steps, the schedule's length: linear decay after a warm-up of `plan.warmup_steps`), then scores the
model on its own validation format, outside the timed window. Both return a plain dict plus the
model, which `bench.train` scores on the fixed MLM evaluation set.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinyplm_lib.tokens.folder import TokenizerFolder
from tinyplm_lib.training.model import build_model, evaluate, masking_spec, packed_sequences
from tinyplm_lib.training.stage import RuntimeOptions, StageOptions, train_stage

# Settings both sides share; the schedule is the original's (linear decay, warm-up 8% of the run).
TRAIN_ARGS = {"per_device_eval_batch_size": 64, "lr_scheduler_type": "linear", "weight_decay": 0.01,
              "logging_steps": 5, "seed": 42, "report_to": "none"}
WARMUP_RATIO = 0.08  # configs/train/stage1-cc100.json, the original's
PLAN_MARGIN = 1.15  # a calibration run is short and noisy: plan more steps than it predicts
OWN_EVAL_LINES = 1000  # baseline: validation lines, one per sequence; ours: packed validation sequences / 4
MLM_PROBABILITY = 0.15


@dataclass(frozen=True)
class Common:
    """What both sides of one bench run share."""

    work: Path
    model_config: Path
    batch: int
    lr: float
    seq_len: int
    workers: int  # DataLoader workers, the same for both sides
    device: torch.device


@dataclass(frozen=True)
class Plan:
    """One run's budget and schedule: stop at `seconds` or `steps`, whichever comes first."""

    seconds: float
    steps: int
    warmup_steps: int

    @classmethod
    def from_rate(cls, seconds: float, steps_per_s: float, startup_s: float) -> Plan:
        """The steps a side fits in `seconds` at its calibrated rate, plus `PLAN_MARGIN` so that the
        time budget, not the step count, ends a run; warm-up a ratio of them."""
        steps = max(10, int(PLAN_MARGIN * steps_per_s * max(seconds - startup_s, seconds / 2)))
        return cls(seconds=seconds, steps=steps, warmup_steps=math.ceil(WARMUP_RATIO * steps))


def steady_rate(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(steps/s past the first point, start-up seconds) from (step, elapsed) points of one run."""
    (first_step, first_t), (last_step, last_t) = points[0], points[-1]
    if last_step <= first_step or last_t <= first_t:
        raise RuntimeError(f"calibration too short: {len(points)} timing points; raise --calibrate-seconds")
    rate = (last_step - first_step) / (last_t - first_t)
    return rate, max(0.0, first_t - first_step / rate)


def run_baseline(common: Common, plan: Plan, out: Path, *, sampling: str, precision: str) -> dict:
    """run_mlm's line_by_line training loop through HF Trainer, in `precision`, stopped by `plan`."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    examples = _line_examples(common.work, "baseline")
    tokenizer = _ids_only_tokenizer(common.work / "tokenizer")
    stamps: list[tuple[int, float]] = []
    class StopAfter(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            elapsed = time.perf_counter() - self.started
            stamps.append((state.global_step, elapsed))
            if elapsed >= plan.seconds:  # never False: that would undo the Trainer's own stop at max_steps
                control.should_training_stop = True

    torch.manual_seed(42)
    model = build_model(common.model_config, masking_spec(common.work / "tokenizer", MLM_PROBABILITY).vocab_size,
                        512, None)
    # Non-padding tokens of the batches trained on, summed on the device (no sync per step). Counted
    # in the model, not in the collator: that runs in the loader workers and prefetches ahead.
    counted = torch.zeros((), dtype=torch.int64, device=common.device)

    def count(module, args, kwargs):
        if module.training:
            counted.add_(kwargs["attention_mask"].sum())

    model.register_forward_pre_hook(count, with_kwargs=True)
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=common.batch,
                             learning_rate=common.lr, max_steps=plan.steps, warmup_steps=plan.warmup_steps,
                             save_strategy="no", eval_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=common.workers, train_sampling_strategy=sampling,
                             fp16=precision == "fp16", bf16=precision == "bf16",
                             use_cpu=common.device.type == "cpu", **TRAIN_ARGS)
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=MLM_PROBABILITY),
                      callbacks=[StopAfter()])
    started = time.perf_counter()
    result = trainer.train()
    wall, tokens = time.perf_counter() - started, int(counted)
    # Its own format: validation lines, one per sequence, masked by its collator (seeded here).
    torch.manual_seed(42)
    own = trainer.evaluate(eval_dataset=_line_examples(common.work, "baseline-val")[:OWN_EVAL_LINES])
    return {"model": model, "steps": result.global_step, "planned_steps": plan.steps,
            "warmup_steps": plan.warmup_steps, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "steady_tokens_per_s": None, "timing": stamps,
            "own_eval_loss": own["eval_loss"], "precision": precision, "sampling": sampling,
            "workers": common.workers}


def run_ours(common: Common, plan: Plan, out: Path, *, precision: str, compile_model: bool) -> dict:
    """`train_stage` on the packed shards, stopped by `plan`."""
    from transformers import BertForMaskedLM

    out.mkdir(parents=True, exist_ok=True)
    args_file = out / "ours-args.json"
    args_file.write_text(json.dumps({**TRAIN_ARGS, "per_device_train_batch_size": common.batch,
                                     "learning_rate": common.lr, "max_seq_length": common.seq_len,
                                     "max_steps": plan.steps, "warmup_steps": plan.warmup_steps}))
    # Evaluation inside the stage (before and after training) is kept tiny: it is not training.
    options = StageOptions(model_config=common.model_config, training_args=args_file, max_eval_sequences=16)
    runtime = RuntimeOptions(max_wall_time_s=plan.seconds, compile=compile_model, precision=precision,
                             dataloader_workers=common.workers)
    work = common.work
    metrics = train_stage(work / "shards" / "train", work / "shards" / "validation", work / "tokenizer",
                          out / "ours", options, log=lambda message: None, runtime=runtime)
    model = BertForMaskedLM.from_pretrained(str(out / "ours")).to(common.device)
    logged = [h for h in metrics["history"] if "tokens_seen" in h]
    # Past the first logging interval: compilation, worker start-up and warm-up excluded.
    steady = ((logged[-1]["tokens_seen"] - logged[0]["tokens_seen"]) / (logged[-1]["elapsed_s"] - logged[0]["elapsed_s"])
              if len(logged) > 2 else None)
    tokenizer = TokenizerFolder(work / "tokenizer")
    spec = masking_spec(tokenizer, MLM_PROBABILITY)
    validation = packed_sequences(work / "shards" / "validation", tokenizer, spec, common.seq_len)
    own = evaluate(model, validation, spec, batch_size=64, device=common.device, seed=42,
                   max_sequences=OWN_EVAL_LINES // 4)  # ~4 lines a packed sequence at 128
    return {"model": model, "steps": metrics["global_step"], "planned_steps": plan.steps,
            "warmup_steps": plan.warmup_steps, "tokens": metrics["tokens_seen"], "wall_s": metrics["wall_time_s"],
            "tokens_per_s": metrics["tokens_per_s"], "steady_tokens_per_s": steady,
            "timing": [(h["step"], h["elapsed_s"]) for h in logged],
            "own_eval_loss": own["loss"], "precision": metrics["precision"], "compiled": compile_model,
            "workers": common.workers}


def _line_examples(work: Path, name: str) -> list[dict]:
    """The baseline's examples: one line's ids each, as run_mlm's tokenize step left them."""
    ids, offsets = np.load(work / f"{name}-ids.npy"), np.load(work / f"{name}-offsets.npy")
    return [{"input_ids": ids[offsets[i]:offsets[i + 1]].astype(np.int64).tolist()} for i in range(len(offsets) - 1)]


def _ids_only_tokenizer(tokenizer_dir: Path):
    """The collator only needs ids, padding and special-token ids: this stand-in supplies them from the
    same vocab without MeCab (absent on GPU boxes); the ids were made by BertJapaneseTokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece(TokenizerFolder(tokenizer_dir).ids, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
