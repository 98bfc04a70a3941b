"""One torchrun process of a data-parallel training stage: `python -m tinyplm_assets.train_worker SPEC.json`.

Started by `tinyplm_assets.training_launch`; every rank reads the same `StageSpec` and trains with
its place in the process group. Local rank 0 of each node opens that node's Dagster Pipes session;
global rank 0 alone sends its log lines and final metrics through it, the others print to stderr.
In tinyplm_assets because it speaks Pipes. The training stack (torch, transformers) is imported when
a stage runs: the code location imports `StageSpec` and `train` from here and must load without it.
"""

from __future__ import annotations

import json
import sys
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from dagster_pipes import open_dagster_pipes

from tinyplm_lib.training.arguments import RuntimeOptions, StageOptions

if typing.TYPE_CHECKING:
    from tinyplm_lib.training import distributed
    from tinyplm_lib.training.checkpoints import CheckpointSink


@dataclass(frozen=True)
class StageSpec:
    """A training stage as one record: what the asset decided, carried to every rank as JSON."""

    train_dir: Path
    validation_dir: Path
    tokenizer_dir: Path
    out_dir: Path
    options: StageOptions
    runtime: RuntimeOptions
    checkpoint_prefix: str
    storage: dict | None = None  # the storage resource's resolved fields (never credentials)
    launcher_pid: int | None = None  # under torchrun: the ranks exit when this process (the step) dies

    def to_json(self) -> str:
        return json.dumps(_plain(asdict(self)), indent=1)

    @classmethod
    def from_json(cls, text: str) -> StageSpec:
        values = json.loads(text)
        values["options"] = _restore(StageOptions, values["options"])
        values["runtime"] = _restore(RuntimeOptions, values["runtime"])
        return _restore(cls, values)


def _plain(value):
    """JSON-ready: Paths as strings, inside dicts too."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return str(value) if isinstance(value, Path) else value


def _restore(cls: type, values: dict):
    """`cls(**values)` with the strings of its Path fields (`Path` or `Path | None`) as Paths again."""
    hints = typing.get_type_hints(cls)
    paths = {f.name for f in fields(cls) if hints[f.name] is Path or Path in typing.get_args(hints[f.name])}
    return cls(**{key: Path(value) if key in paths and isinstance(value, str) else value
                  for key, value in values.items()})


def train(spec: StageSpec, log: Callable[[str], None], checkpoints: CheckpointSink | None,
          world: distributed.World | None = None) -> dict:
    """The stage a spec describes, in this process (one rank of `world`, or alone)."""
    from tinyplm_lib.training.stage import train_stage

    return train_stage(spec.train_dir, spec.validation_dir, spec.tokenizer_dir, spec.out_dir, spec.options, log,
                       checkpoints=checkpoints, runtime=spec.runtime, world=world)


def pipes_metadata(metrics: dict) -> dict:
    """The metrics rank 0 reports through Pipes: plain values only (the loss history stays in metrics.json)."""
    return {k: v for k, v in metrics.items() if k != "history" and isinstance(v, (int, float, str, bool))}


def _checkpoints(spec: StageSpec) -> CheckpointSink | None:
    if spec.storage is None:
        return None
    # Imported here: the resource module pulls in dagster, which the ranks need only for this
    # (never the definitions: tests/test_layering.py checks this module does not load them).
    from tinyplm_assets.resources import ArtifactStorage
    from tinyplm_lib.training.checkpoints import StoreCheckpointSink

    return StoreCheckpointSink(ArtifactStorage(**spec.storage).store(), spec.checkpoint_prefix)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tinyplm_assets.train_worker SPEC.json (started by torchrun)", file=sys.stderr)
        return 2
    from tinyplm_lib.training import distributed

    spec = StageSpec.from_json(Path(argv[0]).read_text(encoding="utf-8"))
    world = distributed.from_env()
    # Killed with the Dagster step (or torchrun's agent), not left training as orphans.
    distributed.exit_with_parent(*(() if spec.launcher_pid is None else (spec.launcher_pid,)))
    try:
        if world.local_rank == 0:  # each node's agent runs in a Pipes session of its own
            with open_dagster_pipes() as pipes:
                metrics = train(spec, pipes.log.info if world.is_main else _stderr, _checkpoints(spec), world)
                if world.is_main:
                    pipes.report_asset_materialization(metadata=pipes_metadata(metrics))
        else:
            train(spec, _stderr, _checkpoints(spec), world)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
