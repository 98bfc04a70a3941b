"""Readers of the docker/ deployment files for tests/test_docker_static.py, as their consumers read them.

The Dockerfile's instructions, compose's variable interpolation, the instance config through
Dagster's own schemas and docker-py's argument check, and container command lines through the real
Dagster CLIs' parsers. Nothing here starts a container.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import yaml
from dagster._config import process_config, resolve_to_config_type
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.ref import InstanceRef
from dagster._serdes.config_class import class_from_code_pointer
from docker.models.containers import _create_container_args

from conftest import REPO_ROOT

DOCKER_DIR = REPO_ROOT / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
COMPOSE_FILE = DOCKER_DIR / "docker-compose.yml"
INSTANCE_FILE = DOCKER_DIR / "dagster.yaml"
WORKSPACE_FILE = DOCKER_DIR / "workspace.yaml"
ENV_EXAMPLE = DOCKER_DIR / ".env.example"
# The arguments docker.types.DeviceRequest reads (docker-py 7).
DEVICE_REQUEST_KEYS = {"driver", "count", "device_ids", "capabilities", "options"}
# ${VAR}, ${VAR:?msg}, ${VAR:-default}; `$$` is compose's escape for a literal `$`.
COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[?-])([^}]*))?\}")


def env_example() -> dict[str, str]:
    settings = {}
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert "=" in line, f"{ENV_EXAMPLE}:{number}: not KEY=VALUE: {line!r}"
        key, value = line.split("=", 1)
        assert key not in settings, f"{ENV_EXAMPLE}:{number}: {key} set twice"
        settings[key] = value
    return settings


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    return instructions


def dockerfile_env() -> dict[str, str]:
    env = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def dockerfile_one(keyword: str) -> str:
    found = [args for kw, args in dockerfile_instructions() if kw == keyword]
    assert len(found) == 1, f"{DOCKERFILE}: expected one {keyword}, found {found}"
    return found[0]


def image_cmd() -> list[str]:
    return yaml.safe_load(dockerfile_one("CMD"))  # exec form: a JSON (so YAML) list


def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation of a parsed compose value; fails as compose does on a missing one."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match):
        name, operator, argument = match.groups()
        if name in env and (env[name] or operator not in (":?", ":-")):
            return env[name]
        if operator in (":?", "?"):
            raise ValueError(f"required variable {name} is missing a value: {argument}")
        return argument or ""

    return COMPOSE_VAR.sub(substitute, value.replace("$$", "\0")).replace("\0", "$")


def compose() -> dict:
    return interpolate(compose_raw(), env_example())


def compose_var_uses(value) -> list[re.Match]:
    """Every ${...} in the parsed compose values (compose interpolates values, not comments)."""
    if isinstance(value, dict):
        return [use for item in value.values() for use in compose_var_uses(item)]
    if isinstance(value, list):
        return [use for item in value for use in compose_var_uses(item)]
    if isinstance(value, str):
        return list(COMPOSE_VAR.finditer(value.replace("$$", "")))
    return []


def published(service: dict) -> dict[int, str]:
    """container port -> host address, from "ADDRESS:HOST:CONTAINER" or "HOST:CONTAINER"."""
    ports = {}
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        assert parts[-1] == parts[-2], f"host and container ports differ in {entry!r}"
        ports[int(parts[-1])] = parts[0] if len(parts) == 3 else "0.0.0.0"
    return ports


def mounts(service: dict) -> dict[str, str]:
    """mount target -> source, from the short "SOURCE:TARGET" volume syntax."""
    return {entry.split(":")[1]: entry.split(":")[0] for entry in service.get("volumes", [])}


def instance_config() -> dict:
    return yaml.safe_load(INSTANCE_FILE.read_text())


def validate_instance(config: dict, tmp_path: Path) -> dict:
    """Everything the daemon does with dagster.yaml before it touches Docker or PostgreSQL.

    Dagster's instance schema (via `InstanceRef.from_dir`, as `DagsterInstance.get()` does), then each
    configurable class's own schema, the run launcher built from it, and the launcher's
    container_kwargs through docker-py's `containers.create` argument check, exactly as
    `DockerRunLauncher` passes them. Returns what each part resolved to.
    """
    folder = tmp_path / "instance"
    folder.mkdir(exist_ok=True)
    (folder / "dagster.yaml").write_text(yaml.safe_dump(config))
    ref = InstanceRef.from_dir(str(folder))
    launcher = ref.run_launcher_data.rehydrate()
    coordinator = ref.run_coordinator_data.rehydrate()
    resolved = {"launcher": launcher, "coordinator": coordinator}
    # Storage and compute logs: their schemas only (building them would connect to PostgreSQL).
    for name, data in (("storage", ref.storage_data), ("compute_logs", ref.compute_logs_data)):
        klass = class_from_code_pointer(data.module_name, data.class_name)
        result = process_config(resolve_to_config_type(klass.config_type()), data.config_dict)
        if not result.success:
            raise DagsterInvalidConfigError(f"{data.class_name} config in {INSTANCE_FILE}",
                                            result.errors, data.config_dict)
        resolved[name] = result.value
    # docker-py's DeviceRequest drops keys it does not know: a misspelt one would silently lose the
    # GPU request, so its keys are checked against the ones it reads.
    for request in launcher.container_kwargs.get("device_requests", []):
        unknown = set(request) - DEVICE_REQUEST_KEYS
        if unknown:
            raise TypeError(f"{INSTANCE_FILE}: device_requests entry has unknown keys {sorted(unknown)}")
    resolved["create_args"] = _create_container_args({
        "image": "tinyplm-dagster:latest", "command": ["dagster", "api", "execute_run"], "detach": True,
        "environment": {}, "network": launcher.networks[0] if launcher.networks else None,
        "labels": {}, "version": "1.44", **launcher.container_kwargs,
    })
    return resolved


def parse_cli(command: click.Command, argv: list[str], name: str) -> click.Context:
    """Parse argv with the real click command (unknown options and bad values fail), run nothing."""
    if isinstance(command, click.Group):
        sub = command.get_command(click.Context(command, info_name=name), argv[0])
        assert sub is not None, f"{name} has no subcommand {argv[0]!r}"
        return parse_cli(sub, argv[1:], argv[0])
    return command.make_context(name, list(argv))


def dagster_cli(argv: list[str]) -> click.Context:
    """argv is a container command line; image paths of the deployment files map to docker/."""
    image_files = {f"{dockerfile_env()['DAGSTER_HOME']}/{path.name}": str(path)
                   for path in (INSTANCE_FILE, WORKSPACE_FILE)}
    argv = [image_files.get(arg, arg) for arg in argv]
    if argv[0] == "dagster":
        from dagster._cli import cli
    elif argv[0] == "dagster-webserver":
        from dagster_webserver.cli import cli
    elif argv[0] == "dagster-daemon":
        from dagster._daemon.cli import cli
    else:
        raise AssertionError(f"not a Dagster command: {argv}")
    return parse_cli(cli, argv[1:], argv[0])
