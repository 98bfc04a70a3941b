"""One torchrun process of a data-parallel training stage (`python -m tinyplm_assets.train_worker SPEC`).

Launched by `tinyplm_assets.training_launch` through Dagster Pipes. Every rank reads the same
JSON spec (paths, stage options, speed settings, where checkpoints go) and calls `train_stage`
with its place in the process group. Rank 0 alone opens the Pipes session: its log lines appear
in the Dagster run, and its final metrics come back as the materialisation's metadata. The other
ranks print to stderr, which torchrun prefixes with their rank.

This lives in `tinyplm_assets` and not in the library because it speaks Dagster Pipes.
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path

from dagster_pipes import open_dagster_pipes

from tinyplm_lib.training import distributed
from tinyplm_lib.training.stage import RuntimeOptions, StageOptions, train_stage


def stage_spec(train_dir: Path, validation_dir: Path, tokenizer_dir: Path, out_dir: Path,
               options: StageOptions, runtime: RuntimeOptions, storage: dict | None,
               checkpoint_prefix: str | None, launcher_pid: int) -> dict:
    """Everything a rank needs, as JSON (the storage resource's resolved fields, never credentials)."""
    return {
        "train_dir": str(train_dir), "validation_dir": str(validation_dir),
        "tokenizer_dir": str(tokenizer_dir), "out_dir": str(out_dir),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "runtime": asdict(runtime), "storage": storage, "checkpoint_prefix": checkpoint_prefix,
        "launcher_pid": launcher_pid,
    }


def reported_metadata(metrics: dict) -> dict:
    """The metrics Dagster shows, as plain JSON values (the loss history stays in metrics.json)."""
    return {k: v for k, v in metrics.items()
            if k != "history" and (isinstance(v, (int, float, str, bool)) or v is None) and v is not None}


def _train(spec: dict, world: distributed.World, log) -> dict:
    options = StageOptions(**{**spec["options"], **{
        k: Path(v) for k, v in spec["options"].items() if k in ("model_config", "training_args", "init_from")
        and v is not None}})
    checkpoints = None
    if spec["storage"] is not None:
        # Imported here: the resource module pulls in dagster, which the ranks need only for this.
        from tinyplm_assets.resources import ArtifactStorage
        from tinyplm_lib.training.checkpoints import StoreCheckpointSink

        checkpoints = StoreCheckpointSink(ArtifactStorage(**spec["storage"]).store(), spec["checkpoint_prefix"])
    return train_stage(Path(spec["train_dir"]), Path(spec["validation_dir"]), Path(spec["tokenizer_dir"]),
                       Path(spec["out_dir"]), options, log, checkpoints=checkpoints,
                       runtime=RuntimeOptions(**spec["runtime"]), world=world)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tinyplm_assets.train_worker SPEC.json (started by torchrun)", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    world = distributed.from_env()
    # Killed with the Dagster step (or torchrun's agent), not left training as orphans.
    distributed.exit_with_parent(spec["launcher_pid"])
    try:
        if world.is_main:
            with open_dagster_pipes() as pipes:
                metrics = _train(spec, world, pipes.log.info)
                pipes.report_asset_materialization(metadata=reported_metadata(metrics))
        else:
            _train(spec, world, lambda message: print(message, file=sys.stderr))
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
