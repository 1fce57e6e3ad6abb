"""Process-group set-up and rank-aware helpers.

Works under `deepspeed`, `deepspeed --num_gpus N`, `torchrun` and plain `python`:
the launchers export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; a plain `python main.py`
gets a one-rank group on a free local port.

No rank waits forever. Collectives give up after --dist_timeout_minutes (a rank that
died or hung takes the others down with it). Work rank 0 does alone while the others
wait (building the data cache, writing and verifying the model) can legitimately take
longer than that, so those waits are not collectives:
the waiting ranks poll the process group's key-value store (`rank_zero_first`). They
stop at once when rank 0 reports a failure (its error is relayed) or when its process
is gone (the store it hosts goes with it), and otherwise after LONG_WAIT.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch

from utils.errors import UserError

# How long a rank waits for rank 0's own work before giving up (it ends sooner when rank
# 0 fails or exits): long enough to tokenise a very large data set or write a 66B model.
LONG_WAIT = timedelta(hours=6)
POLL_SECONDS = 0.5
READERS_WAIT = timedelta(seconds=30)
_settings = {"timeout": timedelta(minutes=10)}
_waits = itertools.count()  # every rank passes the same waits in the same order


class RankZeroFailed(UserError):
    """Rank 0 failed, vanished or never finished while this rank waited for it."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(local_rank: int = -1, timeout_minutes: float = 10) -> DistInfo:
    """Join (or create) the process group and pick this rank's device; its collectives
    give up after `timeout_minutes` (--dist_timeout_minutes). The group comes before
    validation (which needs its size), so a timeout that cannot be one (nan, inf, 0 or
    less) leaves the default here: validation then refuses it, before any collective."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # plain `python main.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank if local_rank >= 0 else 0))
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    if math.isfinite(timeout_minutes) and timeout_minutes > 0:
        _settings["timeout"] = timedelta(minutes=timeout_minutes)
    deepspeed.init_distributed(
        dist_backend=accelerator.communication_backend_name(), timeout=_settings["timeout"]
    )
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
def rank_zero_first(what: str = "finish its part of the set-up") -> Iterator[None]:
    """Rank 0 runs the block first (building caches, writing files); the others wait for
    it, then run it (reading them; a block guarded by `if is_main_process()` does nothing).

    `what` completes "rank 0 failed to ..." in the waiting ranks' error. If rank 0's block
    raises, every waiting rank raises RankZeroFailed with rank 0's error at once. Every
    rank must pass the same rank_zero_first blocks in the same order (like a collective).
    """
    store = _store()
    if store is None:
        yield
        return
    key = f"sft-deepspeed/rank0/{next(_waits)}"
    if not is_main_process():
        wait_for_rank_0(store, key, what)
        yield
        return
    try:
        yield
    except BaseException as err:
        store.set(key, f"failed: {_first_line(err)}")
        _await_readers(store, key)
        raise
    store.set(key, "done")


def wait_for_rank_0(store, key: str, what: str) -> None:
    """Poll `key` until rank 0 sets it; RankZeroFailed when rank 0 failed, exited or took
    longer than LONG_WAIT (or --dist_timeout_minutes, if longer)."""
    limit = max(LONG_WAIT, _settings["timeout"])
    deadline = time.monotonic() + limit.total_seconds()
    rank = os.environ.get("RANK", "?")
    try:
        while not store.check([key]):
            if time.monotonic() > deadline:
                raise RankZeroFailed(
                    f"rank {rank} waited {_duration(limit)} for rank 0 to {what} and stops: look at "
                    "rank 0's log for what it is doing (a hung file system, a stuck process?)."
                )
            time.sleep(POLL_SECONDS)
        outcome = store.get(key).decode()
        store.add(f"{key}/read", 1)
    except (RuntimeError, OSError) as err:  # the store lives in rank 0's process (or its agent)
        raise RankZeroFailed(
            f"rank 0 stopped while rank {rank} waited for it to {what} (lost contact: "
            f"{_first_line(err)}). Rank 0's own error, above or in its node's log, says why."
        ) from None
    if outcome.startswith("failed: "):
        raise RankZeroFailed(
            f"rank 0 failed to {what}, so rank {rank} stops too. Rank 0's error: "
            f"{outcome.removeprefix('failed: ')}"
        )


def _await_readers(store, key: str) -> None:
    """Keep rank 0 (and the store it hosts) alive until the waiting ranks have read its
    failure, so they report it rather than a lost connection; at most READERS_WAIT."""
    deadline = time.monotonic() + READERS_WAIT.total_seconds()
    readers = torch.distributed.get_world_size() - 1
    with contextlib.suppress(RuntimeError, OSError):
        while store.add(f"{key}/read", 0) < readers and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS / 5)


def _store():
    """The process group's key-value store (None with one rank: nobody waits)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() == 1:
        return None
    # The store every launcher already provides for rendezvous: no new connection to set
    # up, and torchrun namespaces it per restart. Private in name, stable since torch 1.x.
    return torch.distributed.distributed_c10d._get_default_store()


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:500]


def _duration(limit: timedelta) -> str:
    seconds = limit.total_seconds()
    for unit, size in (("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} seconds"


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
