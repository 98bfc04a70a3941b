"""Training on Kubernetes (docker/k8s/, tinyplm_assets/k8s.py), checked without a cluster.

Every manifest is validated against the Kubernetes 1.31 schema (kubernetes-validate, strict: an unknown
key fails); so are the run pod that run-launcher.yaml makes (dagster-k8s builds the Job) and the training
pods of a 2-node x 8-GPU stage as dagster-k8s's `build_pod_body` turns them into the API object it posts.
The names that tie the files together (service account, claim, mount path, Service, port) are compared.
What is not tested here: creating anything on a cluster, pods scheduling, the c10d rendezvous across
pods, NCCL. `run_k8s_nodes`' orchestration (threads, rank 0's result, a failing pod) runs against
`FakePipesK8sClient`, a stand-in for `PipesK8sClient.run` defined below (pods of a `FakeCluster`).
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import kubernetes
import kubernetes_validate
import pytest
import yaml
from dagster import MaterializeResult, MetadataValue, asset, materialize
from dagster_k8s.pipes import build_pod_body

from tinyplm_assets.config import DistributedConfig, Stage1Config
from tinyplm_assets.k8s import (
    NODE_LABEL,
    RENDEZVOUS_LABEL,
    KubernetesConfig,
    check_shared_paths,
    node_command,
    pod_metadata,
    pod_spec,
    rendezvous,
    run_k8s_nodes,
)
from tinyplm_assets.train_worker import StageSpec
from tinyplm_lib.errors import ConfigError
from tinyplm_lib.training.stage import RuntimeOptions, StageOptions

from conftest import REPO_ROOT

K8S_DIR = REPO_ROOT / "docker" / "k8s"
RUN_CONFIG = K8S_DIR / "run-config-2x8gpu.yaml"
RUN_LAUNCHER = K8S_DIR / "run-launcher.yaml"
MANIFESTS = sorted(set(K8S_DIR.glob("*.yaml")) - {RUN_CONFIG, RUN_LAUNCHER})
KUBERNETES_VERSION = "1.31"
RUN_ID = "0f1e2d3c-4b5a-6978-8897-a6b5c4d3e2f1"


def _validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def _objects() -> dict[tuple[str, str], dict]:
    """Every object of the manifests, by (kind, name)."""
    return {(doc["kind"], doc["metadata"]["name"]): doc
            for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))}


def _stage_config() -> dict:
    return yaml.safe_load(RUN_CONFIG.read_text(encoding="utf-8"))["ops"]["bert_stage1_cc100"]["config"]


def _launch(**changes) -> DistributedConfig:
    """The example's 2 x 8-GPU distributed settings, with `changes` applied."""
    settings = copy.deepcopy(_stage_config()["distributed"])
    settings.update(changes)
    return DistributedConfig(**settings)


def _spec(mount: Path, **paths) -> StageSpec:
    home = mount / "home" / "artifacts"
    values = {"train_dir": home / "cc100_ja_tokens" / "train", "validation_dir": home / "cc100_ja_tokens" / "val",
              "tokenizer_dir": home / "wordpiece_tokenizer", "out_dir": home / ".staging" / "bert_stage1_cc100-x"}
    options = StageOptions(model_config=REPO_ROOT / "configs/model/bert-tiny-custom.json",
                           training_args=REPO_ROOT / "configs/train/stage1-cc100.json")
    return StageSpec(**{**values, **paths}, options=options, runtime=RuntimeOptions(),
                     checkpoint_prefix="checkpoints/bert_stage1_cc100", storage={"home": str(mount / "home")},
                     launcher_pid=4242)


def _pod(launch: DistributedConfig, node: int, spec_path: str = "/mnt/tinyplm/.tinyplm-x/spec.json") -> dict:
    """Node `node`'s pod as PipesK8sClient would post it (its Pipes variables included), as plain data."""
    rdzv = rendezvous(launch.rdzv_endpoint)
    command = node_command(launch.kubernetes, launch, launch.processes_per_node, node, RUN_ID,
                           ["-m", "tinyplm_assets.train_worker", spec_path])
    body = build_pod_body(pod_name=f"dagster-run-node-{node}", image=None, command=None,
                          env_vars={"DAGSTER_PIPES_CONTEXT": "e30=", "DAGSTER_PIPES_MESSAGES": "e30="},
                          base_pod_meta=pod_metadata(RUN_ID, "bert_stage1_cc100", node, rdzv),
                          base_pod_spec=pod_spec(launch.kubernetes, command, node, rdzv))
    # The API server takes kind and version from the endpoint it is posted to; a manifest states them.
    return {"apiVersion": "v1", "kind": "Pod", **kubernetes.client.ApiClient().sanitize_for_serialization(body)}


# --- the manifests ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_every_manifest_validates_against_the_kubernetes_schema(path):
    docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert docs
    for doc in docs:
        _validate(doc)
        assert doc["metadata"].get("namespace", "tinyplm") == "tinyplm" or doc["kind"] == "Namespace"


def test_the_manifests_hold_the_objects_the_training_pods_rely_on():
    kinds = {kind for kind, _ in _objects()}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Service", "PersistentVolumeClaim"} <= kinds


def test_strict_validation_rejects_a_misspelt_key():
    service = copy.deepcopy(_objects()[("Service", "tinyplm-rendezvous")])
    service["spec"]["publishNotReadyAdresses"] = service["spec"].pop("publishNotReadyAddresses")
    with pytest.raises(kubernetes_validate.ValidationError, match="publishNotReadyAdresses"):
        _validate(service)


def test_the_run_pods_role_allows_what_pipes_k8s_client_and_the_cleanup_do():
    objects = _objects()
    rules = {(resource, verb) for rule in objects[("Role", "tinyplm-training-pods")]["rules"]
             for resource in rule["resources"] for verb in rule["verbs"]}
    # create, wait (list/get), stream logs, delete one pod, delete a stage's pods by label
    assert {("pods", "create"), ("pods", "get"), ("pods", "list"), ("pods/log", "get"), ("pods", "delete"),
            ("pods", "deletecollection")} <= rules
    binding = objects[("RoleBinding", "tinyplm-training-pods")]
    assert binding["roleRef"]["name"] == "tinyplm-training-pods"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tinyplm-dagster", "namespace": "tinyplm"}]
    assert ("ServiceAccount", "tinyplm-dagster") in objects


def test_the_run_launcher_config_is_valid_and_its_run_pod_mounts_the_shared_volume():
    from dagster._config import process_config
    from dagster_k8s import K8sRunLauncher
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

    launcher = yaml.safe_load(RUN_LAUNCHER.read_text(encoding="utf-8"))["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    checked = process_config(K8sRunLauncher.config_type(), launcher["config"])
    assert checked.success, checked.errors
    config = launcher["config"]
    job_config = DagsterK8sJobConfig(job_image="registry.example.com/tinyplm-dagster:latest",
                                     **{key: value for key, value in config.items()
                                        if key in DagsterK8sJobConfig._fields})
    job = construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_run", "{}"], "dagster-run-0f1e2d3c",
                                    user_defined_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
                                        config["run_k8s_config"]))
    job = kubernetes.client.ApiClient().sanitize_for_serialization(job)
    _validate(job)

    pod = job["spec"]["template"]["spec"]
    k8s = KubernetesConfig(**_stage_config()["distributed"]["kubernetes"])
    assert pod["serviceAccountName"] == "tinyplm-dagster"
    assert pod["volumes"] == [{"name": "shared", "persistentVolumeClaim": {"claimName": k8s.volume_claim}}]
    assert ("PersistentVolumeClaim", k8s.volume_claim) in _objects()
    (container,) = pod["containers"]
    assert container["volumeMounts"] == [{"name": "shared", "mountPath": k8s.mount_path}]
    env = {item["name"]: item["value"] for item in container["env"]}
    # The storage home, hence every input and output of the step, is on the volume the pods share.
    assert Path(env["TINYPLM_HOME"]).is_relative_to(k8s.mount_path)
    assert pod["securityContext"]["fsGroup"] == 1000


# --- the training pods --------------------------------------------------------------------------

@pytest.mark.parametrize("node", [0, 1])
def test_a_2x8_gpu_stage_makes_valid_pods_with_gpus_c10d_and_the_shared_volume(node):
    launch = _launch()
    pod = _pod(launch, node)
    _validate(pod)

    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert container["resources"]["requests"] == {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"}
    command = container["command"]
    assert command[:3] == ["python", "-m", "torch.distributed.run"]
    for arg in ("--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                "--rdzv-endpoint=tinyplm-rendezvous.tinyplm.svc.cluster.local:29400", f"--rdzv-id={RUN_ID}"):
        assert arg in command
    (conf,) = [arg for arg in command if arg.startswith("--rdzv-conf=")]
    assert f"is_host={int(node == 0)}" in conf and "read_timeout=1800" in conf
    assert command[-3:] == ["-m", "tinyplm_assets.train_worker", "/mnt/tinyplm/.tinyplm-x/spec.json"]
    assert not any(arg.startswith("--master-") for arg in command)

    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts == {"shared": "/mnt/tinyplm", "dshm": "/dev/shm"}
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    assert volumes["shared"]["persistentVolumeClaim"] == {"claimName": "tinyplm-shared"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    env = {item["name"] for item in container["env"]}
    assert {"DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES", "PYTHONUNBUFFERED"} <= env
    assert pod["metadata"]["labels"][NODE_LABEL] == str(node)


def test_the_rendezvous_service_selects_node_0s_pod_alone_on_the_endpoints_port():
    launch = _launch()
    service = _objects()[("Service", "tinyplm-rendezvous")]
    selector = service["spec"]["selector"]
    labels = [_pod(launch, node)["metadata"]["labels"] for node in (0, 1)]
    assert selector.items() <= labels[0].items()
    assert not selector.items() <= labels[1].items() and RENDEZVOUS_LABEL not in labels[1]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True

    host, port = launch.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    (container,) = _pod(launch, 0)["spec"]["containers"]
    assert container["ports"] == [{"name": "rendezvous", "containerPort": int(port), "protocol": "TCP"}]


def test_a_one_node_cpu_pod_trains_with_a_static_rendezvous_and_no_gpu():
    launch = DistributedConfig(launcher="kubernetes", processes_per_node=2,
                               kubernetes=KubernetesConfig(image="tinyplm:1", gpus_per_node=0))
    command = node_command(launch.kubernetes, launch, 2, 0, RUN_ID, ["-m", "tinyplm_assets.train_worker", "/s"])
    assert "--nnodes=1" in command and "--master-addr=127.0.0.1" in command and "--master-port=29500" in command
    spec = pod_spec(launch.kubernetes, command, 0, None)
    assert "limits" not in spec["containers"][0]["resources"]
    assert "ports" not in spec["containers"][0]
    assert RENDEZVOUS_LABEL not in pod_metadata(RUN_ID, "bert_stage1_cc100", 0, None)["labels"]


# --- configuration errors -----------------------------------------------------------------------

def test_a_missing_image_names_the_field(tmp_path):
    with pytest.raises(ConfigError) as info:
        run_k8s_nodes(None, _spec(tmp_path), _launch(kubernetes={"gpus_per_node": 8}), 8)
    assert info.value.setting == "distributed.kubernetes.image"


@pytest.mark.parametrize("field", ["out_dir", "tokenizer_dir", "train_dir"])
def test_step_paths_outside_the_shared_volume_name_the_storage_home(tmp_path, field):
    k8s = KubernetesConfig(image="tinyplm:1", mount_path=str(tmp_path / "mnt"))
    check_shared_paths(_spec(tmp_path / "mnt"), k8s)  # everything under the mount: accepted
    with pytest.raises(ConfigError, match="not under distributed.kubernetes.mount_path") as info:
        check_shared_paths(_spec(tmp_path / "mnt", **{field: tmp_path / "elsewhere"}), k8s)
    assert info.value.setting == "storage.home"
    # `/mnt/tinyplm-other` shares a prefix with `/mnt/tinyplm` but is not under it.
    with pytest.raises(ConfigError):
        check_shared_paths(_spec(tmp_path / "mnt-other"), k8s)


def test_a_config_file_outside_the_volume_and_the_image_names_its_setting(tmp_path):
    spec = _spec(tmp_path / "mnt")
    spec = StageSpec(**{**spec.__dict__, "options": StageOptions(model_config=tmp_path / "bert.json",
                                                                 training_args=spec.options.training_args)})
    with pytest.raises(ConfigError) as info:
        check_shared_paths(spec, KubernetesConfig(image="tinyplm:1", mount_path=str(tmp_path / "mnt")))
    assert info.value.setting == "model_config_path"


@pytest.mark.parametrize(("changes", "setting"), [
    ({"processes_per_node": 9}, "distributed.processes_per_node"),
    ({"rdzv_endpoint": "10.0.0.5:29400"}, "distributed.rdzv_endpoint"),
    ({"rdzv_endpoint": "tinyplm-rendezvous.tinyplm.svc.cluster.local"}, "distributed.rdzv_endpoint"),
])
def test_inconsistent_distributed_settings_name_the_field(tmp_path, changes, setting):
    with pytest.raises(ConfigError) as info:
        run_k8s_nodes(None, _spec(tmp_path), _launch(**changes), changes.get("processes_per_node", 8))
    assert info.value.setting == setting


# --- the example run config ---------------------------------------------------------------------

def test_the_example_run_config_is_valid_for_the_training_job():
    from dagster import validate_run_config
    from dagster._core.errors import DagsterInvalidConfigError

    from tinyplm_assets.definitions import defs

    run_config = yaml.safe_load(RUN_CONFIG.read_text(encoding="utf-8"))
    validate_run_config(defs.resolve_job_def("train_models"), run_config)
    stage = Stage1Config(**run_config["ops"]["bert_stage1_cc100"]["config"])
    stage.distributed.check()
    assert stage.distributed.kubernetes.gpus_per_node == stage.distributed.processes_per_node == 8
    assert run_config["ops"]["bert_stage2_jawiki"]["config"]["distributed"] == _stage_config()["distributed"]
    broken = copy.deepcopy(run_config)
    broken["ops"]["bert_stage1_cc100"]["config"]["distributed"]["kubernetes"]["gpu_per_node"] = 8
    with pytest.raises(DagsterInvalidConfigError, match="gpu_per_node"):
        validate_run_config(defs.resolve_job_def("train_models"), broken)


# --- run_k8s_nodes against a fake client ----------------------------------------------------------

class FakeInvocation:
    """What `PipesK8sClient.run` returns: here, the results one pod's Pipes session received."""

    def __init__(self, results: list) -> None:
        self._results = results

    def get_results(self, *, implicit_materializations: bool = True) -> list:
        assert implicit_materializations is False  # an implicit result would hide which node reported
        return self._results


class FakeCluster:
    """What the pods would do, no cluster: `reporting` nodes report the metrics through Pipes, the
    `failing` node's container exits 1, the others then wait until their pods are deleted (`stop_pods`).
    It records each pod it is asked to start, the spec file the pod would read, and the client used."""

    def __init__(self, nodes: int, reporting: set[int], failing: int | None = None) -> None:
        self.reporting, self.failing = reporting, failing
        self.pods: dict[int, dict] = {}
        self.specs: list[dict] = []
        self.clients: dict[int, FakePipesK8sClient] = {}
        self.deleted: list[tuple[str, str]] = []
        self.all_started, self.stopped, self.lock = threading.Barrier(nodes), threading.Event(), threading.Lock()

    def new_client(self) -> FakePipesK8sClient:
        return FakePipesK8sClient(self)

    def stop_pods(self, namespace: str, selector: str) -> None:
        self.deleted.append((namespace, selector))
        self.stopped.set()


class FakePipesK8sClient:
    """A stand-in for `dagster_k8s.PipesK8sClient` (its `run` method): one pod of a `FakeCluster`."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster

    def run(self, *, context, namespace: str, base_pod_meta: dict, base_pod_spec: dict) -> FakeInvocation:
        cluster, node = self.cluster, int(base_pod_meta["labels"][NODE_LABEL])
        with cluster.lock:
            cluster.pods[node] = {"namespace": namespace, "metadata": base_pod_meta, "spec": base_pod_spec}
            cluster.clients[node] = self
            spec_path = Path(base_pod_spec["containers"][0]["command"][-1])
            cluster.specs.append(json.loads(spec_path.read_text(encoding="utf-8")))
        cluster.all_started.wait(timeout=10)  # all nodes run at once, as the pods of a rendezvous must
        if node == cluster.failing:
            raise RuntimeError(f'Pod dagster-run-{node} terminated: container "trainer" exited with code 1')
        if cluster.failing is not None:
            assert cluster.stopped.wait(timeout=10), "the other pods were not deleted"
            raise RuntimeError(f'Pod "dagster-run-{node}" was unexpectedly killed')
        metadata = {"eval_loss": MetadataValue.float(2.5), "node": MetadataValue.int(node)}  # as Pipes decodes them
        return FakeInvocation([MaterializeResult(metadata=metadata)] if node in cluster.reporting else [])


def _materialize_with(cluster: FakeCluster, spec: StageSpec, launch: DistributedConfig):
    """`run_k8s_nodes` inside a real Dagster step (a real run id and event log)."""
    returned = {}

    @asset
    def bert_stage1_cc100(context) -> MaterializeResult:  # annotations are strings here: Dagster needs none
        returned["metrics"] = run_k8s_nodes(context, spec, launch, 8, new_client=cluster.new_client,
                                           stop_pods=cluster.stop_pods)
        return MaterializeResult(metadata=returned["metrics"])

    return materialize([bert_stage1_cc100], raise_on_error=False), returned


def test_run_k8s_nodes_starts_every_pod_at_once_and_returns_the_reporting_nodes_metrics(tmp_path):
    cluster = FakeCluster(nodes=2, reporting={1})  # global rank 0 may land on any node
    launch = _launch(kubernetes={**_stage_config()["distributed"]["kubernetes"], "mount_path": str(tmp_path)})
    result, returned = _materialize_with(cluster, _spec(tmp_path), launch)
    assert result.success
    assert returned["metrics"] == {"eval_loss": 2.5, "node": 1}
    assert sorted(cluster.pods) == [0, 1] and not cluster.deleted
    assert cluster.clients[0] is not cluster.clients[1]  # a client's log reader serves one Pipes session
    assert {pod["metadata"]["labels"]["tinyplm.io/run-id"] for pod in cluster.pods.values()} == {result.run_id}
    assert all(pod["namespace"] == "tinyplm" for pod in cluster.pods.values())
    # Both pods read one spec, with no launcher pid (the step's pid does not exist in a pod); then it is gone.
    assert cluster.specs[0] == cluster.specs[1] and cluster.specs[0]["launcher_pid"] is None
    assert not list(tmp_path.glob(".tinyplm-*"))


def test_a_failing_pod_fails_the_step_naming_its_node_and_deletes_the_stages_pods(tmp_path):
    cluster = FakeCluster(nodes=2, reporting={0}, failing=1)
    launch = _launch(kubernetes={**_stage_config()["distributed"]["kubernetes"], "mount_path": str(tmp_path)})
    result, returned = _materialize_with(cluster, _spec(tmp_path), launch)
    assert not result.success and "metrics" not in returned
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    message = failure.step_failure_data.error.to_string()
    assert "training node 1 of 2 failed" in message and "exited with code 1" in message
    assert cluster.deleted == [("tinyplm", f"tinyplm.io/run-id={result.run_id},tinyplm.io/stage=bert_stage1_cc100")]


def test_no_node_or_two_nodes_reporting_fails_the_step(tmp_path):
    launch = _launch(kubernetes={**_stage_config()["distributed"]["kubernetes"], "mount_path": str(tmp_path)})
    for reporting in (set(), {0, 1}):
        result, _ = _materialize_with(FakeCluster(nodes=2, reporting=reporting), _spec(tmp_path), launch)
        assert not result.success
        (failure,) = [event for event in result.all_events if event.is_step_failure]
        assert "expected one node (global rank 0) to report" in failure.step_failure_data.error.to_string()
