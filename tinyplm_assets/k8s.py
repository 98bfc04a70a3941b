"""A training stage across Kubernetes pods: one pod per node, each a torchrun c10d agent, through dagster-k8s.

`run_k8s_nodes()` is what the launch calls for `distributed.launcher: kubernetes`; `pod_metadata()` and
`pod_spec()` build each pod as plain data (tests/test_k8s.py validates them against the Kubernetes schema
without a cluster). The objects the pods rely on (the run pod's service account, the rendezvous Service,
the shared volume) are manifests in docker/k8s/.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from dagster import AssetExecutionContext, Config, Failure, MaterializeResult
from pydantic import Field

from tinyplm_assets.environment import PROJECT_ROOT
from tinyplm_assets.train_worker import StageSpec
from tinyplm_lib.errors import ConfigError
from tinyplm_lib.training.torchrun import split_endpoint, torchrun_command

if TYPE_CHECKING:  # dagster-k8s is imported only by a step that starts pods
    from dagster_k8s import PipesK8sClient

APP_LABELS = {"app.kubernetes.io/name": "tinyplm", "app.kubernetes.io/component": "training"}
RUN_LABEL, STAGE_LABEL, NODE_LABEL = "tinyplm.io/run-id", "tinyplm.io/stage", "tinyplm.io/node"
# docker/k8s/rendezvous-service.yaml selects node 0's pod by this label, valued with the Service's name.
RENDEZVOUS_LABEL = "tinyplm.io/rendezvous"
CONTAINER = "trainer"
SHARED_VOLUME, SHM_VOLUME = "shared", "dshm"
IMAGE_UID = 1000  # docker/Dockerfile's USER: fsGroup makes the shared volume writable for it
_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


class KubernetesConfig(Config):
    """The training pods of `distributed.launcher: kubernetes` (one per node); see docker/k8s/."""

    image: str = Field(default="", description="image of the training pods: docker/Dockerfile's build, in a "
                                                "registry the cluster pulls from (required)")
    namespace: str = Field(default="", description="namespace of the pods and the rendezvous Service; '' = the "
                                                   "run pod's own namespace (else 'default')")
    service_account: str = Field(default="", description="service account the training pods run as (e.g. one "
                                                         "with S3 access); '' = the namespace's default")
    gpus_per_node: int = Field(default=1, description="nvidia.com/gpu limit of each pod; 0 = CPU pods (gloo)")
    cpu: str = Field(default="8", description="CPU request of each pod (a Kubernetes quantity)")
    memory: str = Field(default="32Gi", description="memory request of each pod (a Kubernetes quantity)")
    shared_memory: str = Field(default="8Gi", description="size of /dev/shm (RAM) for NCCL and DataLoader workers")
    volume_claim: str = Field(default="tinyplm-shared", description="ReadWriteMany PersistentVolumeClaim shared "
                                                                    "by the Dagster run pod and the training pods")
    mount_path: str = Field(default="/mnt/tinyplm", description="where every pod mounts the claim; the storage "
                                                               "resource's home must lie under it")
    node_selector: dict[str, str] = Field(default_factory=dict, description="pod nodeSelector, as in a manifest")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="pod tolerations, as in a manifest")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of the training containers")
    secret_env: list[str] = Field(default_factory=list, description="Secrets whose keys become environment "
                                                                    "variables (e.g. S3 credentials)")
    rendezvous_timeout_s: int = Field(default=1800, description="how long each node's agent waits for the others "
                                                                "(scheduling and image pulls included)")

    def validate_for(self, nodes: int) -> None:
        """ConfigError naming the field when these pods cannot run a stage of `nodes` nodes."""
        if not self.image:
            raise ConfigError("distributed.kubernetes.image", "required with launcher 'kubernetes': the image "
                                                              "the training pods run (docker/Dockerfile's build)")
        if nodes < 1:
            raise ConfigError("distributed.nodes", f"must be >= 1, got {nodes}")
        if self.gpus_per_node < 0:
            raise ConfigError("distributed.kubernetes.gpus_per_node", f"must be >= 0, got {self.gpus_per_node}")
        if not Path(self.mount_path).is_absolute():
            raise ConfigError("distributed.kubernetes.mount_path", f"must be an absolute path, got {self.mount_path!r}")
        if not self.volume_claim:
            raise ConfigError("distributed.kubernetes.volume_claim", "required: the pods read the step's inputs "
                                                                     "and write its output on that volume")
        if self.rendezvous_timeout_s < 1:
            raise ConfigError("distributed.kubernetes.rendezvous_timeout_s",
                              f"must be >= 1, got {self.rendezvous_timeout_s}")

    def check_processes(self, processes_per_node: int) -> None:
        """A pod runs at most one worker per GPU it requests (any number on CPU pods)."""
        if processes_per_node < 1:
            raise ConfigError("distributed.processes_per_node", f"must be >= 1 with launcher kubernetes, got "
                                                                f"{processes_per_node}")
        if self.gpus_per_node and processes_per_node > self.gpus_per_node:
            raise ConfigError("distributed.processes_per_node", f"{processes_per_node} processes but each pod "
                                                                f"gets {self.gpus_per_node} GPUs (distributed."
                                                                "kubernetes.gpus_per_node): one per GPU at most")


class Layout(Protocol):
    """What the pods need of a stage's `distributed` settings: `tinyplm_assets.config.DistributedConfig`
    (not imported: config.py imports this module for its `kubernetes` field)."""

    nodes: int
    rdzv_endpoint: str
    rdzv_id: str
    master_port: int
    torchrun_args: list[str]
    kubernetes: KubernetesConfig


class Rendezvous(NamedTuple):
    """The c10d endpoint, and the headless Service (its first DNS label) that resolves to node 0's pod."""

    host: str
    port: int
    service: str


def rendezvous(endpoint: str) -> Rendezvous:
    """Parse `distributed.rdzv_endpoint` as `<service>[.<namespace>.svc.cluster.local]:<port>`."""
    host, port = split_endpoint(endpoint)
    service = host.split(".", 1)[0]
    if not _DNS_LABEL.fullmatch(service):
        raise ConfigError("distributed.rdzv_endpoint", f"{endpoint!r}: the host must name the headless Service "
                                                       "that selects node 0's pod, e.g. tinyplm-rendezvous.tinyplm"
                                                       ".svc.cluster.local:29400 (docker/k8s/rendezvous-service"
                                                       ".yaml)")
    return Rendezvous(host, port, service)


def check_shared_paths(spec: StageSpec, k8s: KubernetesConfig) -> None:
    """Every path the pods read or write must be on the shared volume, at the same path as in this pod."""
    mount = Path(os.path.normpath(k8s.mount_path))
    data = {"output (staging) folder": spec.out_dir, "train shards": spec.train_dir,
            "validation shards": spec.validation_dir, "tokenizer": spec.tokenizer_dir,
            "start model": spec.options.init_from}
    for what, path in data.items():
        if path is not None and not Path(os.path.normpath(path)).is_relative_to(mount):
            raise ConfigError("storage.home", f"the {what} {path} is not under distributed.kubernetes.mount_path "
                                              f"{mount}: the training pods see only the shared volume; put the "
                                              "storage resource's home (TINYPLM_HOME) under it")
    # Config files may also ship in the image (the project's configs/), which the pods run too.
    files = {"model_config_path": spec.options.model_config, "training_args_path": spec.options.training_args}
    for setting, path in files.items():
        normal = Path(os.path.normpath(path))
        if not (normal.is_relative_to(mount) or normal.is_relative_to(PROJECT_ROOT)):
            raise ConfigError(setting, f"{path} is neither under distributed.kubernetes.mount_path {mount} nor in "
                                       f"the project ({PROJECT_ROOT}, part of the image): the pods cannot read it")


def pod_metadata(run_id: str, stage: str, node: int, rdzv: Rendezvous | None) -> dict:
    """Labels of one node's pod: the run, stage and node (to find and delete them), and on node 0 the
    rendezvous label the headless Service selects. dagster-k8s names the pod and adds its own labels."""
    labels = {**APP_LABELS, RUN_LABEL: _label_value(run_id), STAGE_LABEL: _label_value(stage), NODE_LABEL: str(node)}
    if node == 0 and rdzv is not None:
        labels[RENDEZVOUS_LABEL] = rdzv.service
    return {"labels": labels}


def pod_spec(k8s: KubernetesConfig, command: Sequence[str], node: int, rdzv: Rendezvous | None) -> dict:
    """One node's PodSpec (camelCase, as in a manifest): its GPUs, the shared volume, a RAM /dev/shm."""
    requests = {"cpu": k8s.cpu, "memory": k8s.memory}
    limits = {}
    if k8s.gpus_per_node:  # an extended resource: the request must equal the limit
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(k8s.gpus_per_node)
    container = {
        "name": CONTAINER, "image": k8s.image, "command": list(command),
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}]
        + [{"name": name, "value": value} for name, value in sorted(k8s.env.items())],
        "resources": {"requests": requests, **({"limits": limits} if limits else {})},
        "volumeMounts": [{"name": SHARED_VOLUME, "mountPath": k8s.mount_path},
                         # Kubernetes gives /dev/shm 64 MiB; NCCL's shared-memory transport needs more.
                         {"name": SHM_VOLUME, "mountPath": "/dev/shm"}],
    }
    if k8s.secret_env:
        container["envFrom"] = [{"secretRef": {"name": name}} for name in k8s.secret_env]
    if node == 0 and rdzv is not None:
        container["ports"] = [{"name": "rendezvous", "containerPort": rdzv.port, "protocol": "TCP"}]
    spec = {
        "restartPolicy": "Never",  # a failed node fails the step; the re-run resumes from the checkpoint
        "securityContext": {"fsGroup": IMAGE_UID},
        "containers": [container],
        "volumes": [{"name": SHARED_VOLUME, "persistentVolumeClaim": {"claimName": k8s.volume_claim}},
                    {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": k8s.shared_memory}}],
    }
    if k8s.service_account:
        spec["serviceAccountName"] = k8s.service_account
    if k8s.node_selector:
        spec["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        spec["tolerations"] = [dict(toleration) for toleration in k8s.tolerations]
    return spec


def node_command(k8s: KubernetesConfig, launch: Layout, processes: int, node: int, rdzv_id: str,
                 target: Sequence[str]) -> list[str]:
    """torchrun for one pod: c10d across `launch.nodes` pods, node 0 hosting the store; static for one pod."""
    if launch.nodes == 1:  # the port is the pod's own, so no free-port probe on this (the run's) pod
        return torchrun_command(processes, target, master_port=launch.master_port or 29500,
                                extra_args=launch.torchrun_args, python="python")
    # is_host: node 0 (the pod the Service selects) hosts the store, explicitly: torch's own guess
    # compares DNS answers, which lag behind a new pod. read_timeout: the other agents keep trying to
    # reach it while node 0's pod is scheduled and pulls its image (torch's default is 60 s).
    timeout = k8s.rendezvous_timeout_s
    conf = f"--rdzv-conf=is_host={int(node == 0)},join_timeout={timeout},read_timeout={timeout}"
    return torchrun_command(processes, target, nodes=launch.nodes, rdzv_endpoint=launch.rdzv_endpoint,
                            rdzv_id=rdzv_id, extra_args=[conf, *launch.torchrun_args], python="python")


def run_k8s_nodes(context: AssetExecutionContext, spec: StageSpec, launch: Layout, processes_per_node: int,
                  *, new_client: Callable[[], PipesK8sClient] | None = None,
                  stop_pods: Callable[[str, str], None] | None = None) -> dict:
    """Train `spec` on `launch.nodes` pods at once (one Pipes session each); return global rank 0's metrics.

    Each pod runs `processes_per_node` workers (at most its GPUs). A pod that fails fails the step naming
    its node, after this stage's other pods are deleted (they would wait for it until the NCCL timeout).
    `new_client` (default `PipesK8sClient`) and `stop_pods(namespace, label_selector)` are replaceable
    for tests. Each node gets a client of its own: a client's log reader holds the handler of the one
    Pipes session it serves, so a shared one would hand node 0's messages to node 1's session.
    """
    k8s: KubernetesConfig = launch.kubernetes
    k8s.validate_for(launch.nodes)
    k8s.check_processes(processes_per_node)
    rdzv = rendezvous(launch.rdzv_endpoint) if launch.nodes > 1 else None
    spec = replace(spec, launcher_pid=None)  # the step's pid means nothing in a pod: the workers would exit
    check_shared_paths(spec, k8s)
    run_id, stage = context.run.run_id, _stage_name(spec)
    namespace = k8s.namespace or _current_namespace()
    selector = f"{RUN_LABEL}={_label_value(run_id)},{STAGE_LABEL}={_label_value(stage)}"
    if new_client is None:
        from dagster_k8s import PipesK8sClient

        new_client = PipesK8sClient
    spec_dir = _spec_dir(k8s, stage)
    try:
        spec_path = spec_dir / "spec.json"
        spec_path.write_text(spec.to_json(), encoding="utf-8")
        commands = [node_command(k8s, launch, processes_per_node, node, launch.rdzv_id or run_id,
                                 ["-m", "tinyplm_assets.train_worker", str(spec_path)]) for node in range(launch.nodes)]
        pods = [(pod_metadata(run_id, stage, node, rdzv), pod_spec(k8s, command, node, rdzv))
                for node, command in enumerate(commands)]
        context.log.info(f"training on {launch.nodes} pod(s) x {processes_per_node} process(es) in namespace "
                         f"{namespace} (kubectl get pods -l {selector}); node 0: {' '.join(commands[0])}")
        invocations = _run_all(
            [functools.partial(new_client().run, context=context, namespace=namespace, base_pod_meta=meta,
                               base_pod_spec=pod) for meta, pod in pods],
            functools.partial(_stop, context, stop_pods or _delete_pods, namespace, selector), selector)
    finally:
        shutil.rmtree(spec_dir, ignore_errors=True)
    return _rank0_metrics(invocations, selector)


def _run_all(nodes: Sequence[Callable[[], Any]], stop: Callable[[], None], selector: str) -> list:
    """Every node's Pipes session in a thread of its own; on the first failure, delete the others' pods."""
    results: list = [None] * len(nodes)
    with ThreadPoolExecutor(max_workers=len(nodes), thread_name_prefix="tinyplm-k8s-node") as pool:
        futures = {pool.submit(run): node for node, run in enumerate(nodes)}
        try:
            for future in as_completed(futures):
                node, error = futures[future], future.exception()
                if error is not None:
                    raise Failure(description=f"training node {node} of {len(nodes)} failed (pod -l {selector},"
                                              f"{NODE_LABEL}={node}): {error}") from error
                results[node] = future.result()
        except BaseException:  # a failed node, or the step interrupted: no pod keeps its GPUs busy
            stop()
            raise
    return results


def _stop(context: AssetExecutionContext, stop_pods: Callable[[str, str], None], namespace: str,
          selector: str) -> None:
    try:
        stop_pods(namespace, selector)
    except Exception as error:  # noqa: BLE001 - logged; the node's own error is what the step reports
        context.log.warning(f"could not delete the pods -l {selector} in {namespace}: {error}; "
                            f"delete them with `kubectl delete pods -n {namespace} -l {selector}`")


def _rank0_metrics(invocations: Sequence, selector: str) -> dict:
    """The metadata of the one session that reported the materialization (global rank 0's node)."""
    reported = {node: [result for result in invocation.get_results(implicit_materializations=False)
                       if isinstance(result, MaterializeResult)]
                for node, invocation in enumerate(invocations)}
    reporters = [node for node, results in reported.items() if results]
    if len(reporters) != 1:
        raise Failure(description=f"expected one node (global rank 0) to report the model through Pipes, got "
                                  f"nodes {reporters} (pods -l {selector}); see the pods' logs in the run")
    (result,) = reported[reporters[0]]
    return {key: value.value for key, value in (result.metadata or {}).items()}


def _spec_dir(k8s: KubernetesConfig, stage: str) -> Path:
    mount = Path(k8s.mount_path)
    if not mount.is_dir():
        raise ConfigError("distributed.kubernetes.mount_path", f"{mount} is not a folder in this (the Dagster "
                                                               f"run's) pod: mount the claim {k8s.volume_claim} "
                                                               "there too (docker/k8s/run-launcher.yaml)")
    return Path(tempfile.mkdtemp(prefix=f".tinyplm-{stage}-", dir=mount))


def _stage_name(spec: StageSpec) -> str:
    """The asset being trained: the last part of its checkpoint prefix (`checkpoints/<asset>`)."""
    return spec.checkpoint_prefix.rstrip("/").rsplit("/", 1)[-1]


def _label_value(value: str) -> str:
    """A valid label value (≤ 63 of `[A-Za-z0-9_.-]`, alphanumeric at both ends) from a run id or asset name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:63].strip("-_.")


def _current_namespace() -> str:
    from dagster_k8s.utils import detect_current_namespace

    return detect_current_namespace(None) or "default"


def _delete_pods(namespace: str, selector: str) -> None:
    """Delete this stage's pods (the kube config is loaded: `PipesK8sClient.run` did it)."""
    from dagster_k8s.client import DagsterKubernetesClient

    DagsterKubernetesClient.production_client().core_api.delete_collection_namespaced_pod(
        namespace, label_selector=selector)
