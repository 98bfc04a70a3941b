"""torchrun launch commands: one node's agent, its rendezvous endpoint and loopback settings.

Torch-free, so the Dagster code location (the run-config checks, the Kubernetes pods) loads without
torch; the ranks' side of a distributed stage is `tinyplm_lib.training.distributed`.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence

from tinyplm_lib.errors import ConfigError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """`distributed.rdzv_endpoint` (`host:port`) as (host, port)."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("distributed.rdzv_endpoint", f"{endpoint!r}: use host:port, e.g. 10.0.0.5:29400")
    return host, int(port)


def torchrun_command(processes: int, target: Sequence[str], *, master_addr: str = "127.0.0.1",
                     master_port: int = 0, extra_args: Sequence[str] = (), nodes: int = 1,
                     rdzv_endpoint: str = "", rdzv_id: str = "", rdzv_host: bool | None = None,
                     python: str = sys.executable) -> list[str]:
    """`python -m torch.distributed.run …`: one node's agent, starting `processes` workers running `target`.

    One node: a static rendezvous on `master_addr:master_port` (a free loopback port by default), so
    nothing listens beyond the machine unless asked. Several: a c10d rendezvous on `rdzv_endpoint`
    under `rdzv_id`; `rdzv_host` says whether this agent hosts its store (None: torchrun decides by
    host name, which on loopback every agent matches). On a loopback endpoint the agent also binds its
    worker store there (`--local-addr`), not the address the host name resolves to. `python` is the
    interpreter (default this one, the same virtualenv); `extra_args` go to torchrun as they are.
    """
    if processes < 1:
        raise ConfigError("distributed.processes_per_node", f"must be >= 1, got {processes}")
    head = [python, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={processes}"]
    if nodes == 1:
        port = master_port or free_port(master_addr)
        return [*head, f"--master-addr={master_addr}", f"--master-port={port}", *extra_args, *target]
    host, _ = split_endpoint(rdzv_endpoint)
    if not rdzv_id:
        raise ConfigError("distributed.rdzv_id", "a multi-node run needs one (the Dagster run id by default)")
    rendezvous = ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    if rdzv_host is not None:
        rendezvous.append(f"--rdzv-conf=is_host={int(rdzv_host)}")
    if is_loopback(host):
        rendezvous.append(f"--local-addr={host}")
    return [*head, *rendezvous, *extra_args, *target]


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost")


def loopback_env(master_addr: str) -> dict[str, str]:
    """Keep gloo/NCCL sockets on the loopback interface for a one-machine run on 127.0.0.1.

    Without it gloo binds the address the host name resolves to, which may be a public one.
    """
    if not is_loopback(master_addr):
        return {}
    return {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
