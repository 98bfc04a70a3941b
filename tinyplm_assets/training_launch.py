"""Run a training stage for an asset: in-process, or under torchrun through Dagster Pipes.

One process (one GPU, or a CPU) trains inside the step; more (`distributed.processes`) run
`-m tinyplm_assets.train_worker SPEC` under torchrun via `PipesSubprocessClient`, rank 0 reporting
logs and metrics. Either way the model lands in the step's staging folder, checkpoints in the store.
"""

import os
import tempfile
from dataclasses import replace
from pathlib import Path

from dagster import AssetExecutionContext, PipesSubprocessClient

from tinyplm_assets.config import DistributedConfig, TrainingStageConfig
from tinyplm_assets.resources import ArtifactStorage
from tinyplm_assets.train_worker import StageSpec, train
from tinyplm_lib.layout import TRAIN_DIR, VALIDATION_DIR
from tinyplm_lib.store.artifacts import artifact_key
from tinyplm_lib.training.checkpoints import StoreCheckpointSink
from tinyplm_lib.training.distributed import loopback_env, torchrun_command


def run_stage(context: AssetExecutionContext, config: TrainingStageConfig, storage: ArtifactStorage,
              asset_name: str, *, tokens: Path, tokenizer: Path, init_from: Path | None = None) -> tuple[dict, Path]:
    """Train on a token-shard folder into a fresh staging directory; return (metrics, that directory)."""
    options, runtime = config.to_options(init_from), config.runtime.to_options()
    processes = config.distributed.resolve()
    spec = StageSpec(train_dir=tokens / TRAIN_DIR, validation_dir=tokens / VALIDATION_DIR, tokenizer_dir=tokenizer,
                     out_dir=storage.staging_dir(asset_name), options=options, runtime=runtime,
                     checkpoint_prefix=artifact_key(["checkpoints", asset_name]))
    if processes <= 1:
        metrics = train(spec, context.log.info, StoreCheckpointSink(storage.store(), spec.checkpoint_prefix))
    else:
        settings = {name: getattr(storage, name) for name in type(storage).model_fields}
        spec = replace(spec, storage=settings, launcher_pid=os.getpid())
        metrics = _torchrun(context, spec, config.distributed, processes)
    return metrics, spec.out_dir


def _torchrun(context: AssetExecutionContext, spec: StageSpec, launch: DistributedConfig, processes: int) -> dict:
    """Every rank reads `spec`; rank 0's Pipes-reported metadata are the stage's metrics."""
    with tempfile.TemporaryDirectory(prefix="tinyplm-torchrun-") as scratch:
        spec_path = Path(scratch) / "spec.json"
        spec_path.write_text(spec.to_json(), encoding="utf-8")
        command = torchrun_command(processes, ["-m", "tinyplm_assets.train_worker", str(spec_path)],
                                   master_addr=launch.master_addr, master_port=launch.master_port,
                                   extra_args=launch.torchrun_args)
        context.log.info(f"training with {processes} processes: {' '.join(command)}")
        reported = PipesSubprocessClient().run(
            command=command, context=context, env={**loopback_env(launch.master_addr), "PYTHONUNBUFFERED": "1"},
        ).get_materialize_result()
    return {key: value.value for key, value in (reported.metadata or {}).items()}
