"""Data-parallel training across processes: the rank's place in the world and its device.

A stage runs as one process (`single()`) or as one of `torchrun`'s processes (`from_env()`: reads
RANK / WORLD_SIZE / LOCAL_RANK and joins the process group, NCCL on GPUs, gloo on CPUs). The launch
side (`torchrun_command()` and its helpers) lives in the torch-free `tinyplm_lib.training.torchrun`
and is re-exported here. The contract below the imports.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from tinyplm_lib.errors import ConfigError
from tinyplm_lib.training.torchrun import free_port, is_loopback, loopback_env, split_endpoint, torchrun_command

# The launch side comes from its torch-free module (the Dagster code location imports that one):
# callers may import it from here too.
__all__ = ["World", "default_processes", "exit_with_parent", "free_port", "from_env", "is_loopback", "loopback_env",
           "pick_device", "shutdown", "single", "split_endpoint", "torchrun_command"]

# The contract a multi-process run keeps: `per_device_train_batch_size` is per process, as in Hugging
# Face, so an optimizer step sees `batch × processes × gradient_accumulation_steps` sequences. Every
# process draws the same *global* micro-batch (the one a single process with the larger batch would
# draw, masked the same way) and trains on its own slice of it, with the loss normalised by the
# global number of masked tokens; so, dropout aside, N processes compute the same updates as one
# process with an N-times larger batch. Rank 0 alone evaluates, saves checkpoints and writes the
# model folder.


@dataclass(frozen=True)
class World:
    """This process's rank among `size` processes, and the device it trains on."""

    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch_dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place across processes; a no-op for one process."""
        if self.distributed:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's decision, for all ranks (they must stop at the same step)."""
        if not self.distributed:
            return flag
        value = torch.tensor([1 if flag else 0], device=self.device)
        torch_dist.broadcast(value, src=0)
        return bool(value.item())


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def single() -> World:
    """The world of a plain one-process run."""
    return World(rank=0, size=1, local_rank=0, device=pick_device())


def from_env() -> World:
    """Join the process group torchrun set up (a one-process world when not under torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return single()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError("distributed.processes_per_node", f"local rank {local_rank} but only "
                              f"{torch.cuda.device_count()} visible GPUs: use at most one process per GPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return World(rank=rank, size=size, local_rank=local_rank, device=device)


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def exit_with_parent(*watched: int, interval: float = 0.5) -> None:
    """Exit this process as soon as its parent, or any process in `watched`, is gone.

    torchrun starts its workers in sessions of their own, so killing the launching process (a
    preempted or cancelled Dagster step) would leave them training on, orphaned, next to the re-run
    that resumes from the same checkpoints. A daemon thread checks twice a second.
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent or not all(_alive(pid) for pid in watched):
                os._exit(70)  # EX_SOFTWARE; nothing to flush: rank 0 writes output only when done
            time.sleep(interval)

    threading.Thread(target=watch, name="tinyplm-exit-with-parent", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def default_processes() -> int:
    """One process per visible GPU when there are several; otherwise one (train in-process)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 1
