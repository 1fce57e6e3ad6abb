"""Clean preemption: SIGTERM or SIGUSR1 asks the run to checkpoint and stop.

Schedulers (Slurm, Kubernetes, spot-instance reclaimers) send SIGTERM, or SIGUSR1 ahead
of a time limit, then SIGKILL after a grace period. The handler only records the request;
the training loop finishes its current optimizer step, every rank agrees to stop at the
same step (the signal may reach ranks at different moments: each step's token-count
all-reduce carries the ranks' requests, utils/engine/accumulation.py), a checkpoint is written and
the process exits with PREEMPTED_EXIT so a wrapper script can tell "resume me" from a
crash and rerun the same command with --resume_from_checkpoint auto.
"""

from __future__ import annotations

import signal

import torch

from utils.distributed import all_reduce_max

# EX_TEMPFAIL from sysexits.h: "temporary failure; the user is invited to retry".
PREEMPTED_EXIT = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_requested: list[str] = []


def _request_stop(signum: int, _frame) -> None:
    _requested.append(signal.Signals(signum).name)


def install_preemption_handlers() -> None:
    """From now on SIGTERM/SIGUSR1 request a checkpoint-and-exit instead of killing the run."""
    for sig in SIGNALS:
        signal.signal(sig, _request_stop)


def local_stop_request() -> str | None:
    """The signal this rank received, if any (no collective: the caller agrees with the
    others, as `accumulation_windows` does in the all-reduce every step already makes)."""
    return _requested[0] if _requested else None


def stop_requested(device: torch.device) -> str | None:
    """The signal's name if any rank has been asked to stop (a collective: every rank calls it)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return local_stop_request()  # no device round trip
    if not all_reduce_max(1 if _requested else 0, device):
        return None
    return _requested[0] if _requested else "a signal on another rank"
