"""Failures that explain themselves, and library noise kept out of the user's way.

Every rank that fails prints one line naming itself and the error on stderr (the
launcher shows every rank's stderr on the terminal), so the first real error is easy
to find among the other ranks' "peer closed the connection" follow-ups. An
out-of-memory error ends with the flags that would fit, judged by the run's effective
settings (a --deepspeed_config may set the ZeRO stage and offload).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator

from utils.config import Config
from utils.run_setup import RunSetup

OOM_EXIT_CODE = 3
LIBRARIES = r"(torch|deepspeed|transformers|datasets|accelerate|peft)(\.|$)"
# Allocation failures that surface as plain RuntimeErrors (cuBLAS/NCCL workspaces, CPU tensors).
OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "can't allocate memory")


def suggest_memory_flags(cfg: Config, setup: RunSetup | None, cpu: bool = False) -> list[str]:
    """Flag changes that lower memory, cheapest in speed first; empty when all are in use.

    `setup`: the resolved run, whose merged DeepSpeed config says the ZeRO stage and offload
    (a --deepspeed_config may set them); None before validation, where the flags are all
    there is. `cpu`: host memory ran out, where --offload makes things worse, not better.
    """
    t, m = cfg.train, cfg.model
    stage, offload = cfg.engine.zero_stage, cfg.engine.offload
    if setup is not None:
        stage, offload = setup.engine.zero_stage, setup.engine.offload
    suggestions = []
    if cpu and offload:
        suggestions.append("no --offload (it keeps optimizer states in CPU memory)")
    if not m.gradient_checkpointing:
        suggestions.append("--gradient_checkpointing (recompute activations: far less memory)")
    if t.per_device_train_batch_size > 1:
        micro = t.per_device_train_batch_size // 2
        accumulation = t.gradient_accumulation_steps * 2
        suggestions.append(
            f"--per_device_train_batch_size {micro} --gradient_accumulation_steps {accumulation} "
            "(same global batch, half the activations)"
        )
    if stage < 3:
        suggestions.append("--zero_stage 3 (shard parameters, gradients and optimizer states)")
    if not offload and not cpu:
        suggestions.append("--offload (optimizer states, and parameters at ZeRO-3, in CPU memory)")
    if not cfg.lora.enabled:
        suggestions.append("--lora_dim 128 --only_optimize_lora (train adapters only)")
    return suggestions


def explain_oom(cfg: Config | None, setup: RunSetup | None, cpu: bool = False) -> str:
    where = "CPU memory" if cpu else "the device's memory"
    lines = [f"out of memory: the model, its training state and activations do not fit in {where}."]
    suggestions = suggest_memory_flags(cfg, setup, cpu) if cfg else []
    if suggestions:
        lines.append("These flags lower memory (try them in this order):")
        lines += [f"    {s}" for s in suggestions]
    else:
        lines.append(
            "Every memory-saving flag is already on: use more GPUs or GPUs with more memory."
        )
    return "\n".join(lines)


@contextlib.contextmanager
def explain_failures(run: Callable[[], tuple[Config | None, RunSetup | None]]) -> Iterator[None]:
    """Let an uncaught error end the run with this rank's name on it (and OOM advice).

    `run` gives the run's settings and, once validation has resolved it, its setup (None
    before); it is called only on out-of-memory, so it reports how far start-up got then.
    """
    import torch

    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as err:
        _report_oom(err, run)
    except RuntimeError as err:
        if not any(m in str(err) for m in OOM_MESSAGES):
            _report(f"error: {type(err).__name__}: {err}")
            raise
        _report_oom(err, run)
    except Exception as err:
        _report(f"error: {type(err).__name__}: {err}")
        raise


def _report_oom(
    err: BaseException, run: Callable[[], tuple[Config | None, RunSetup | None]]
) -> None:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    cpu = isinstance(err, MemoryError) or "CPU" in first_line
    _report(f"error: {first_line}\n{explain_oom(*run(), cpu)}")
    sys.exit(OOM_EXIT_CODE)


def _report(message: str) -> None:
    rank = os.environ.get("RANK", "0")
    host = os.environ.get("HOSTNAME") or os.uname().nodename
    print(f"[rank {rank} on {host}] {message}", file=sys.stderr, flush=True)


def quiet_library_noise(is_main: bool, interactive: bool) -> None:
    """Keep DeepSpeed, transformers and datasets chatter out of the log.

    Other ranks say nothing below errors (they would repeat rank 0 N times); rank 0
    keeps warnings, each Python warning once, and library progress bars only at a
    terminal (in a log file they are walls of carriage returns). Call it after the
    libraries are imported: some install warning filters of their own at import.
    """
    import datasets
    import transformers
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING if is_main else logging.ERROR)
    if is_main:
        warnings.simplefilter("once")
        # Deprecations inside the libraries (DeepSpeed calling an old torch API, ...) are
        # for their maintainers; the user's own code and every UserWarning still show.
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
    else:
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        datasets.logging.set_verbosity_error()
    if not (is_main and interactive):
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()
