"""A stage's progress as one record, `TrainingState`: what a checkpoint's `state.json` holds.

It saves itself with the model, optimizer, scheduler, grad-scaler and RNG states
(`checkpoints.save_to_sink`) and restores itself from the newest checkpoint made with the same
settings; `stage_settings()` lists those settings, whose fingerprint decides what may be resumed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tinyplm_lib.files import sha256_file
from tinyplm_lib.layout import MODEL_CONFIG_FILE
from tinyplm_lib.training.arguments import StageArguments, StageOptions, plain_value, read_json_object
from tinyplm_lib.training.checkpoints import (
    FORMAT_VERSION,
    CheckpointSink,
    find_resumable,
    restore_checkpoint,
    save_to_sink,
)
from tinyplm_lib.training.distributed import World
from tinyplm_lib.training.packing import MaskingSpec, PackedSequences

# Every TrainingArguments field the loop reads that changes its result: a checkpoint made under
# other values is not resumed. save_strategy and save_steps are left out on purpose (saving more
# or less often changes nothing); tests/test_resume.py fails when the stage reads a field not listed.
_RESULT_FIELDS = (
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "lr_scheduler_type", "warmup_steps", "max_steps", "num_train_epochs", "seed", "fp16", "bf16",
    "logging_steps", "eval_strategy", "eval_steps",
)
# Not progress: what the state was made on and with; a resumed run writes its own.
_IDENTITY = ("device", "fingerprint", "settings")


@dataclass
class TrainingState:
    """Progress of a stage, field for field the `state.json` of its checkpoints (in that order).

    The loop updates it as it goes; `running_loss` and `elapsed_s` are set when it is saved (the
    loop keeps the running loss on the device, and the clock in `PreparedStage.started`).
    """

    global_step: int = 0
    epoch: int = 0
    next_micro_index: int = 0  # within `epoch`: where a resumed run's batches continue
    tokens_seen: int = 0
    running_loss: float = 0.0  # summed since the last logged step
    running_count: int = 0  # micro-batches in that sum
    history: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    initial_eval_loss: float | None = None  # measured once, by the first attempt
    untrained_eval_loss: float | None = None
    device: str = ""
    fingerprint: str = ""
    settings: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {item.name: getattr(self, item.name) for item in fields(self)}

    def save(self, sink: CheckpointSink, scratch: Path, *, model, optimizer, scheduler, scaler) -> None:
        """A complete checkpoint of this state and the live objects, written to `scratch`, given to `sink`."""
        save_to_sink(sink, scratch, self.global_step, self.as_json(),
                     model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)

    @classmethod
    def restore(cls, pieces: dict, *, device: str, fingerprint: str, settings: dict, model, optimizer,
                scheduler, scaler, log: Callable[[str], None]) -> TrainingState:
        """Load a checkpoint that `find_checkpoint` returned into the live objects and the global
        RNG states (call it last before the loop); return its progress."""
        for note in restore_checkpoint(pieces, model=model, optimizer=optimizer, scheduler=scheduler,
                                       scaler=scaler):
            log(note)
        saved = pieces["state"]
        progress = {item.name: saved[item.name] for item in fields(cls) if item.name not in _IDENTITY}
        return cls(**progress, device=device, fingerprint=fingerprint, settings=settings)


def find_checkpoint(checkpoints: CheckpointSink | None, settings: dict, log, world: World) -> dict | None:
    """The newest checkpoint made with `settings`, read and verified, or None.

    Rank 0 looks first (an S3 sink fills its local cache); the others then read the same files.
    """
    if checkpoints is None:
        return None
    resume = find_resumable(checkpoints, settings, log) if world.is_main else None
    world.barrier()
    if not world.is_main:
        resume = find_resumable(checkpoints, settings, lambda message: None)
    return resume


def stage_settings(arguments: StageArguments, options: StageOptions, spec: MaskingSpec, total_steps: int,
                   train_set: PackedSequences, eval_set: PackedSequences, processes: int) -> dict:
    """Everything that changes a stage's result, as JSON: contents and hashes, never paths."""
    args = arguments.args
    training = {name: plain_value(getattr(args, name)) for name in _RESULT_FIELDS}
    training["resolved_warmup_steps"] = args.get_warmup_steps(total_steps)
    training["resolved_total_steps"] = total_steps
    settings = {
        "checkpoint_format": FORMAT_VERSION, "training_args": training,
        "max_seq_length": arguments.max_seq_length, "max_eval_sequences": options.max_eval_sequences,
        "masking": asdict(spec), "model_config": read_json_object(options.model_config, "model_config"),
        "train_shards": train_set.shards.meta, "validation_shards": eval_set.shards.meta,
    }
    if options.init_from is not None:
        init_from = Path(options.init_from)
        settings["init_from"] = {"config": read_json_object(init_from / MODEL_CONFIG_FILE, "init_from"),
                                 **{p.name: sha256_file(p) for p in sorted(init_from.glob("*.safetensors"))}}
    settings = json.loads(json.dumps(settings))  # tuples become lists, as they come back from state.json
    settings["processes"] = processes  # another process count draws other batches: not resumable
    return settings
