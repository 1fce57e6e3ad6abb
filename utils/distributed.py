"""Process-group set-up and rank-aware helpers.

Works under `deepspeed`, `deepspeed --num_gpus N`, `torchrun` and plain `python`:
the launchers export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; a plain `python main.py`
gets a one-rank group on a free local port.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(local_rank: int = -1) -> DistInfo:
    """Join (or create) the process group and pick this rank's device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # plain `python main.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank if local_rank >= 0 else 0))
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    device = torch.device(accelerator.device_name(local_rank))
    if device.type == "cpu":
        _share_cpu_cores()
    return DistInfo(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        device=device,
    )


def _share_cpu_cores() -> None:
    """Give each CPU rank its share of the cores. torch's default (every core per process)
    oversubscribes the machine as soon as two ranks share it, and its spinning threads
    then run several times slower than one thread each. An explicit OMP_NUM_THREADS wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_main_process() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def print_rank_0(*args, **kwargs) -> None:
    """The one way progress reaches the user: printed by rank 0 only, flushed at once."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def warn_rank_0(message: str) -> None:
    if is_main_process():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (building caches); the others wait, then run it (reading them)."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few host numbers across ranks (float64 so token counts stay exact)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [float(v) for v in values]  # one rank: no device round trip
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(value: int, device: torch.device) -> int:
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())
