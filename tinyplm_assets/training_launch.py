"""Run a training stage for an asset: in-process, or under torchrun through Dagster Pipes.

With one process (one GPU, or a CPU) the stage trains inside the step, as any asset does. With
more (`distributed.processes`, by default one per visible GPU when there are several) the step
launches `python -m torch.distributed.run … -m tinyplm_assets.train_worker SPEC` with Dagster's
`PipesSubprocessClient`: rank 0's log lines stream into the run and its final metrics come back
as Pipes-reported metadata, which become the materialisation's metadata. Either way the model
folder lands in the step's staging directory and is published by the IO manager, and checkpoints
go to the same store, so a killed multi-process stage resumes like a single-process one.
"""

import json
import os
import tempfile
from pathlib import Path

from dagster import AssetExecutionContext, PipesSubprocessClient

from tinyplm_assets.config import TrainingStageConfig
from tinyplm_assets.resources import ArtifactStorage
from tinyplm_assets.train_worker import stage_spec
from tinyplm_lib.store.artifacts import artifact_key
from tinyplm_lib.training.checkpoints import StoreCheckpointSink
from tinyplm_lib.training.distributed import loopback_env, torchrun_command
from tinyplm_lib.training.stage import StageOptions, train_stage


def run_stage(context: AssetExecutionContext, config: TrainingStageConfig, storage: ArtifactStorage,
              asset_name: str, *, train_dir: Path, validation_dir: Path, tokenizer_dir: Path,
              options: StageOptions) -> tuple[dict, Path]:
    """Train into a fresh staging directory; return (metrics, that directory)."""
    out_dir = storage.staging_dir(asset_name)
    prefix = artifact_key(["checkpoints", asset_name])
    runtime = config.runtime.to_options()
    processes = config.distributed.resolve()
    if processes <= 1:
        metrics = train_stage(train_dir, validation_dir, tokenizer_dir, out_dir, options, log=context.log.info,
                              checkpoints=StoreCheckpointSink(storage.store(), prefix), runtime=runtime)
        return metrics, out_dir

    settings = {name: getattr(storage, name) for name in type(storage).model_fields}
    spec = stage_spec(train_dir, validation_dir, tokenizer_dir, out_dir, options, runtime, settings, prefix,
                      launcher_pid=os.getpid())
    launch = config.distributed
    with tempfile.TemporaryDirectory(prefix="tinyplm-torchrun-") as scratch:
        spec_path = Path(scratch) / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
        command = torchrun_command(processes, ["-m", "tinyplm_assets.train_worker", str(spec_path)],
                                   master_addr=launch.master_addr, master_port=launch.master_port,
                                   extra_args=launch.torchrun_args)
        context.log.info(f"training with {processes} processes: {' '.join(command)}")
        reported = PipesSubprocessClient().run(
            command=command, context=context, env={**loopback_env(launch.master_addr), "PYTHONUNBUFFERED": "1"},
        ).get_materialize_result()
    metrics = {key: value.value for key, value in (reported.metadata or {}).items()}
    return metrics, out_dir
