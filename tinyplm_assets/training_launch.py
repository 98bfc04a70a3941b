"""Run a training stage for an asset: in-process, or under torchrun through Dagster Pipes.

One process (one GPU, or a CPU) trains inside the step. More on one node (`distributed.processes_per_node`)
run `-m tinyplm_assets.train_worker SPEC` under torchrun via `PipesSubprocessClient`, rank 0 reporting
logs and metrics. Several nodes (`distributed.nodes`) join a c10d rendezvous: launcher "local" starts
every node's agent here, each in a Pipes session of its own (the local rank 0 of each node opens one;
the global rank 0, on whichever node, reports); launcher "kubernetes" starts one pod per node
(`tinyplm_assets.k8s`). Either way the model lands in the step's staging folder, checkpoints in the store.
torch is imported by the functions that use it: the code location imports this module.
"""

import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from signal import Signals

from dagster import (
    AssetExecutionContext,
    Failure,
    MaterializeResult,
    PipesSubprocessClient,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    open_pipes_session,
)

from tinyplm_assets.config import DistributedConfig, TrainingStageConfig
from tinyplm_assets.resources import ArtifactStorage
from tinyplm_assets.train_worker import StageSpec, train
from tinyplm_lib.errors import ConfigError
from tinyplm_lib.layout import TRAIN_DIR, VALIDATION_DIR
from tinyplm_lib.store.artifacts import artifact_key
from tinyplm_lib.training.torchrun import free_port, loopback_env, split_endpoint, torchrun_command

WORKER = ["-m", "tinyplm_assets.train_worker"]
STOP_GRACE_S = 15  # torchrun forwards SIGTERM to its workers; SIGKILL after this


def run_stage(context: AssetExecutionContext, config: TrainingStageConfig, storage: ArtifactStorage,
              asset_name: str, *, tokens: Path, tokenizer: Path, init_from: Path | None = None) -> tuple[dict, Path]:
    """Train on a token-shard folder into a fresh staging directory; return (metrics, that directory)."""
    options, runtime, launch = config.to_options(init_from), config.runtime.to_options(), config.distributed
    processes = launch.resolve()
    spec = StageSpec(train_dir=tokens / TRAIN_DIR, validation_dir=tokens / VALIDATION_DIR, tokenizer_dir=tokenizer,
                     out_dir=storage.staging_dir(asset_name), options=options, runtime=runtime,
                     checkpoint_prefix=artifact_key(["checkpoints", asset_name]))
    if launch.launcher == "local" and launch.nodes == 1 and processes <= 1:
        from tinyplm_lib.training.checkpoints import StoreCheckpointSink

        metrics = train(spec, context.log.info, StoreCheckpointSink(storage.store(), spec.checkpoint_prefix))
        return metrics, spec.out_dir
    spec = replace(spec, storage={name: getattr(storage, name) for name in type(storage).model_fields})
    if launch.launcher == "kubernetes":
        # Imported here: only a step that starts pods needs dagster-k8s. No launcher_pid: the
        # step's process id means nothing inside a pod.
        from tinyplm_assets.k8s import run_k8s_nodes

        metrics = run_k8s_nodes(context, spec, launch, processes)
    elif launch.nodes == 1:
        metrics = _torchrun(context, replace(spec, launcher_pid=os.getpid()), launch, processes)
    else:
        metrics = _local_nodes(context, replace(spec, launcher_pid=os.getpid()), launch, processes)
    return metrics, spec.out_dir


def _torchrun(context: AssetExecutionContext, spec: StageSpec, launch: DistributedConfig, processes: int) -> dict:
    """Every rank reads `spec`; rank 0's Pipes-reported metadata are the stage's metrics."""
    with tempfile.TemporaryDirectory(prefix="tinyplm-torchrun-") as scratch:
        spec_path = Path(scratch) / "spec.json"
        spec_path.write_text(spec.to_json(), encoding="utf-8")
        command = torchrun_command(processes, [*WORKER, str(spec_path)], master_addr=launch.master_addr,
                                   master_port=launch.master_port, extra_args=launch.torchrun_args)
        context.log.info(f"training with {processes} processes: {' '.join(command)}")
        reported = PipesSubprocessClient().run(
            command=command, context=context, env={**loopback_env(launch.master_addr), "PYTHONUNBUFFERED": "1"},
        ).get_materialize_result()
    return {key: value.value for key, value in (reported.metadata or {}).items()}


@dataclass
class _Node:
    """One node's torchrun agent, run by a thread of its own inside its own Pipes session."""

    index: int
    command: list[str]
    env: dict[str, str]
    changed: threading.Event  # shared by the nodes: one started or ended
    process: subprocess.Popen | None = None
    ended: float | None = None  # time.monotonic() when the agent exited
    results: Sequence = ()
    error: BaseException | None = None
    started: threading.Event = field(default_factory=threading.Event)


def _local_nodes(context: AssetExecutionContext, spec: StageSpec, launch: DistributedConfig, processes: int) -> dict:
    """`launch.nodes` agents on this machine in one c10d rendezvous; the metrics global rank 0 reported.

    Node 0 hosts the rendezvous store. Which node's worker becomes global rank 0 is torch's choice
    (it sorts the agents by address and process id), so every session may report and the one that
    did is taken. The first node to fail fails the step; the others are stopped.
    """
    endpoint = launch.rdzv_endpoint or f"127.0.0.1:{free_port()}"
    rdzv_id = launch.rdzv_id or context.run_id
    host, _ = split_endpoint(endpoint)
    with tempfile.TemporaryDirectory(prefix="tinyplm-torchrun-") as scratch:
        spec_path = Path(scratch) / "spec.json"
        spec_path.write_text(spec.to_json(), encoding="utf-8")
        changed = threading.Event()
        nodes = [_Node(index, torchrun_command(processes, [*WORKER, str(spec_path)], nodes=launch.nodes,
                                               rdzv_endpoint=endpoint, rdzv_id=rdzv_id, rdzv_host=index == 0,
                                               extra_args=launch.torchrun_args),
                       {**_threads(launch.nodes * processes), **os.environ, **loopback_env(host),
                        **_node_gpus(index, launch.nodes, processes), "PYTHONUNBUFFERED": "1"}, changed)
                 for index in range(launch.nodes)]
        context.log.info(f"training on {launch.nodes} local nodes x {processes} processes, c10d rendezvous "
                         f"{endpoint} id {rdzv_id}")
        threads = [threading.Thread(target=_run_node, args=(context, node), name=f"tinyplm-node-{node.index}",
                                    daemon=True) for node in nodes]
        for node, thread in zip(nodes, threads, strict=True):
            context.log.info(f"node {node.index}: {' '.join(node.command)}")
            thread.start()
        try:
            _supervise(nodes, changed)
        finally:
            _stop(nodes)
            for thread in threads:  # the sessions close in parallel (each waits for its last messages)
                thread.join()
    return _rank0_metrics(context, nodes)


def _threads(workers: int) -> dict[str, str]:
    """OMP_NUM_THREADS (unless set): this machine's cores shared by all its nodes' workers. Each agent
    knows only its own workers (torchrun's default is 1 thread for several, all cores for one), and
    workers spin-waiting for each other's cores slow every step."""
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}


def _node_gpus(index: int, nodes: int, processes: int) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for one of several nodes on this machine: GPUs of its own (nothing on a CPU)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(gpu) for gpu in range(torch.cuda.device_count())]
    if nodes * processes > len(devices):
        raise ConfigError("distributed.processes_per_node", f"{nodes} local nodes x {processes} processes need "
                                                            f"{nodes * processes} GPUs, {len(devices)} visible")
    return {"CUDA_VISIBLE_DEVICES": ",".join(devices[index * processes:(index + 1) * processes])}


def _run_node(context: AssetExecutionContext, node: _Node) -> None:
    """Start `node`'s agent in a Pipes session, wait for it, keep what the session received."""
    try:
        with open_pipes_session(context=context, context_injector=PipesTempFileContextInjector(),
                                message_reader=PipesTempFileMessageReader()) as session:
            node.process = subprocess.Popen(node.command, env={**node.env, **session.get_bootstrap_env_vars()})
            node.started.set()
            node.process.wait()
            node.ended = time.monotonic()
            node.changed.set()
        node.results = session.get_reported_results()
    except BaseException as error:  # noqa: BLE001 - handed to the step's thread, which raises it
        node.error = error
    finally:
        node.started.set()
        node.changed.set()


def _supervise(nodes: list[_Node], changed: threading.Event) -> None:
    """Return once every agent exited 0; raise as soon as one failed (or could not start).

    The failures are named in the order the agents exited: the first is the cause, the others
    (workers that lost their peers) its consequence.
    """
    for node in nodes:
        node.started.wait()
        if node.process is None:
            raise Failure(f"node {node.index} could not start: {node.error!r}") from node.error
    while True:
        changed.clear()
        ended = sorted((node for node in nodes if node.ended is not None), key=lambda node: node.ended)
        failed = [node for node in ended if node.process.returncode != 0]
        if failed:
            running = [str(node.index) for node in nodes if node.ended is None]
            raise Failure("; ".join(f"node {node.index} of {len(nodes)} failed: its torchrun agent exited with "
                                    f"{_describe(node.process.returncode)}" for node in failed)
                          + (f"; stopping the other nodes ({', '.join(running)})" if running else ""))
        if len(ended) == len(nodes):
            return
        changed.wait(timeout=1.0)


def _describe(code: int) -> str:
    return f"code {code} ({Signals(-code).name})" if code < 0 else f"code {code}"


def _stop(nodes: list[_Node]) -> None:
    """Terminate the agents still running (torchrun takes its workers down with it), SIGKILL stragglers."""
    for node in nodes:  # a node whose thread is still starting its agent would be missed
        node.started.wait()
    running = [node.process for node in nodes if node.process is not None and node.process.poll() is None]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _rank0_metrics(context: AssetExecutionContext, nodes: list[_Node]) -> dict:
    """The metadata of the one materialisation reported (by global rank 0's node)."""
    for node in nodes:
        if node.error is not None:
            raise Failure(f"node {node.index}: {node.error!r}") from node.error
    reports = [(node.index, result) for node in nodes for result in node.results
               if isinstance(result, MaterializeResult)]
    if len(reports) != 1:
        raise Failure(f"expected one report, from global rank 0; got {len(reports)} "
                      f"(nodes {[index for index, _ in reports]})")
    index, reported = reports[0]
    context.log.info(f"global rank 0 ran on node {index}")
    return {key: value.value for key, value in (reported.metadata or {}).items()}
