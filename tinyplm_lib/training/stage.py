"""Masked-language-model training of one stage, driven by HF `TrainingArguments` JSON files.

`train_stage()` runs three phases: `prepare_stage` (training.prepare) checks and builds, `train_loop`
(training.loop) trains and saves checkpoints, `finish_stage` (here) evaluates the model and writes a
standard Hugging Face folder: `model.safetensors`, `config.json`, the tokenizer files, `metrics.json`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from tinyplm_lib.files import atomic_write_json
from tinyplm_lib.layout import LOSS_CURVE_FILE, METRICS_FILE, TENSORBOARD_DIR, TRAINER_DIR, TRAINING_SETTINGS_FILE
from tinyplm_lib.training.arguments import RuntimeOptions, StageOptions
from tinyplm_lib.training.checkpoints import CheckpointSink
from tinyplm_lib.training.curves import loss_curve_png, write_tensorboard
from tinyplm_lib.training.distributed import World
from tinyplm_lib.training.loop import LoopEnd, train_loop
from tinyplm_lib.training.prepare import PreparedStage, prepare_stage

# The options come with train_stage: callers import all three from here.
__all__ = ["RuntimeOptions", "StageOptions", "train_stage", "finish_stage", "stage_metrics"]
logger = logging.getLogger(__name__)


def train_stage(
    train_dir: Path,
    validation_dir: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    options: StageOptions,
    log: Callable[[str], None] = logger.info,
    *,
    checkpoints: CheckpointSink | None = None,
    on_step: Callable[[int], None] | None = None,
    runtime: RuntimeOptions | None = None,
    world: World | None = None,
) -> dict:
    """Train one stage into `out_dir` (a Hugging Face model folder); return its metrics.

    A `BertForMaskedLM` — from scratch (stage 1) or from an earlier stage (`options.init_from`) — is
    trained on packed token shards and evaluated on the validation shards (loss, masked-token
    accuracy, perplexity, and the same loss for an untrained model of the same shape, as a
    yardstick). Usable from a notebook:

        train_stage(train_dir, val_dir, tok_dir, out_dir,
                    StageOptions(Path("configs/model/bert-tiny-custom.json"), Path("configs/train/stage1.json")),
                    checkpoints=LocalCheckpointSink(Path("checkpoints/stage1")))

    With `checkpoints`, a checkpoint is saved every `save_steps` optimizer steps (save_strategy
    "steps"; never at the last step) and a later call with the same settings and data continues
    from the newest one, ending with the weights and metrics of an uninterrupted run; the sink is
    cleared once `out_dir` is written. `on_step(step)` runs after every optimizer step and its
    checkpoint (tests raise from it to simulate a crash).

    Under torchrun pass `world=distributed.from_env()`: every process trains on its slice of each
    global micro-batch (see `tinyplm_lib.training.distributed`), rank 0 alone evaluates, saves checkpoints
    and writes `out_dir`, and only rank 0 returns the metrics (the others return {}).
    """
    stage = prepare_stage(train_dir, validation_dir, tokenizer_dir, out_dir, options, log,
                          checkpoints=checkpoints, runtime=runtime, world=world)
    end = train_loop(stage, checkpoints, on_step)
    if not stage.world.is_main:
        stage.world.barrier()  # rank 0 evaluates and publishes; the others wait for it to finish
        return {}
    return finish_stage(stage, end, checkpoints)


def finish_stage(stage: PreparedStage, end: LoopEnd, checkpoints: CheckpointSink | None) -> dict:
    """The last phase, on rank 0: final evaluation, the model folder written, checkpoints cleared."""
    final = stage.evaluate()
    metrics = stage_metrics(stage, final, end)
    _save_folder(stage, metrics)
    if checkpoints is not None:
        checkpoints.clear()  # only now: the output above is what they were kept for
    stage.log(f"eval loss {final['loss']:.3f} (untrained {stage.state.untrained_eval_loss:.3f}), "
              f"accuracy {final['accuracy']:.3f}, perplexity {final['perplexity']:.1f}")
    stage.world.barrier()
    return metrics


def stage_metrics(stage: PreparedStage, final: dict, end: LoopEnd) -> dict:
    """`metrics.json`: the final evaluation, the yardsticks, progress, speed and the run's shape."""
    state, wall = stage.state, end.wall_s
    history = state.history
    return {
        "eval_loss": final["loss"], "eval_accuracy": final["accuracy"], "perplexity": final["perplexity"],
        "eval_masked_tokens": final["masked_tokens"], "eval_sequences": final["sequences"],
        "initial_eval_loss": state.initial_eval_loss, "untrained_eval_loss": state.untrained_eval_loss,
        "train_loss": next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None),
        "global_step": state.global_step, "epochs": state.epoch + 1, "tokens_seen": state.tokens_seen,
        "tokens_per_s": state.tokens_seen / wall if wall > 0 else None, "wall_time_s": wall,
        "resumed_from_step": stage.resumed_from_step, "stopped_early": end.stopped_early,
        "precision": stage.precision, "device": str(stage.world.device), "processes": stage.world.size,
        "max_seq_length": stage.arguments.max_seq_length, "mlm_probability": stage.arguments.mlm_probability,
        "parameters": sum(p.numel() for p in stage.model.parameters()),
        "train_sequences": len(stage.train_set), "history": history,
    }


def _save_folder(stage: PreparedStage, metrics: dict) -> None:
    out_dir = stage.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    stage.model.save_pretrained(str(out_dir))
    for item in stage.tokenizer.path.iterdir():
        if item.is_file() and not item.name.startswith("_"):  # not the storage manifest
            shutil.copy2(item, out_dir / item.name)
    atomic_write_json(out_dir / METRICS_FILE, metrics, indent=1)
    write_tensorboard(metrics["history"], out_dir / TENSORBOARD_DIR)
    loss_curve_png(metrics["history"], out_dir / LOSS_CURVE_FILE)
    training_args = json.loads(stage.arguments.args.to_json_string())
    # The trainer's scratch inside this (staging) folder, deleted below: recording its random name
    # would make two identical trainings differ, and it names nothing that exists afterwards.
    training_args["output_dir"] = TRAINER_DIR
    settings = {"training_args": training_args,
                "stage": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(stage.options).items()}}
    atomic_write_json(out_dir / TRAINING_SETTINGS_FILE, settings, indent=1, default=str)
    shutil.rmtree(out_dir / TRAINER_DIR, ignore_errors=True)
    # safetensors 0.8 writes model.safetensors through a temporary file created 0600 (the others
    # follow the umask): a model folder is for sharing, so all can read it, whatever the umask.
    for path in (out_dir, *out_dir.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
