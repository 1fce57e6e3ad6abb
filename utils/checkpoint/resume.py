"""Continuing a checkpoint: vet it, convert it when the run's shape changed, load it.

The order of a resume (utils/checkpoint/checkpointer.py drives it):
1. before the model loads (checks.py): the folder is the user's own (trust.py),
   run_state.json parses, the model (built on the meta device) and the settings
   (settings.py) match, every file is there and whole;
2. with the model, before the engine: the parameters match; when the world size or ZeRO
   stage changed, rank 0 converts the checkpoint once into DeepSpeed's universal format
   (utils/checkpoint/universal.py) while the other ranks wait, and the engine is built to load it;
3. with the engine: DeepSpeed loads weights, optimizer, schedule and step counters, then
   each rank's random streams and the data position are restored.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable

from utils.checkpoint.checks import (
    RunShape,
    damaged,
    earlier_checkpoint_advice,
    find_damaged_file,
)
from utils.checkpoint.position import DataPosition
from utils.checkpoint.resume_state import replay_cpu_adam_steps, set_rng_state
from utils.checkpoint.universal import (
    convert_to_universal,
    describe_change,
    describe_shape,
    needs_conversion,
    restore_param_groups,
    universal_dir,
)
from utils.distributed import DistInfo, print_rank_0, rank_zero_first
from utils.errors import UserError

# What torch.load raises on a file whose bytes are damaged (DeepSpeed passes it through).
LOAD_ERRORS = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError)


def rank_0_does(work: Callable[[], object], dist: DistInfo, what: str) -> None:
    """Run `work` on rank 0 while the other ranks wait, polling rather than sitting in a
    collective (a conversion may outlast --dist_timeout_minutes); when it fails, every
    waiting rank stops at once naming rank 0's error."""
    with rank_zero_first(what):
        if dist.is_main:
            work()


def prepare_load(path: str, state: dict, current: RunShape, dist: DistInfo) -> str | None:
    """The universal checkpoint to load when the run's shape changed (None: load `path`).

    Raises UserError for what no conversion can do: a move to or from ZeRO stage 0, or a
    bf16 ZeRO-0 checkpoint (DeepSpeed's BF16 optimizer partitions it by rank) on other ranks.
    """
    saved = RunShape(**state["shape"])
    if not needs_conversion(saved, current):
        if saved.world_size != current.world_size:
            partitioned = [f for f in state["files"] if f.startswith("bf16_zero_pp_rank_")]
            if partitioned:
                raise UserError(
                    f"checkpoint {path} was written by {describe_shape(saved)} in bf16, whose "
                    f"optimizer state DeepSpeed splits by rank ({partitioned[0]}, ...); it loads "
                    f"only on {saved.world_size} ranks. Relaunch with {saved.world_size} "
                    "processes, or resume at --zero_stage 0 on them and save again."
                )
            print_rank_0(f"checkpoint {path}: {describe_change(saved, current)}")
        return None
    target = universal_dir(path)
    print_rank_0(
        f"checkpoint {path}: {describe_change(saved, current)}; loading it through DeepSpeed's "
        f"universal checkpoint {target} (converted once, by rank 0)"
    )
    rank_0_does(lambda: convert_to_universal(path, target), dist, "convert the checkpoint")
    return target


def load_checkpoint(engine, path: str, state: dict, universal: str | None) -> DataPosition:
    """Restore the engine, this rank's random streams and the data position."""
    load_dir, tag = os.path.split(os.path.abspath(universal or path))
    try:
        loaded, client_state = engine.load_checkpoint(load_dir, tag=tag)
    except LOAD_ERRORS as err:
        file = find_damaged_file(path, state)
        if file is None:
            raise  # not a damaged file: a real failure, with its traceback
        raise UserError(damaged(path, file, "fails its checksums")) from err
    if loaded is None:
        raise UserError(
            f"DeepSpeed could not load checkpoint {path} (see the log above); "
            f"{earlier_checkpoint_advice(path)}"
        )
    if universal:
        restore_param_groups(engine, universal)
    states = client_state["rng"]
    if engine.global_rank < len(states):  # a rank the saving run lacked keeps its seeded streams
        set_rng_state(states[engine.global_rank])
    replay_cpu_adam_steps(engine)
    return DataPosition(**client_state["position"])
