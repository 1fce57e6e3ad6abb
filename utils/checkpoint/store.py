"""Checkpoints on disk: where they are, how one is written and published, and how one is
deleted, so that a run killed at any moment leaves only complete checkpoints.

Layout under --output_dir (DeepSpeed's, so its tools such as zero_to_fp32.py work):

    checkpoint-<step>/      engine.save_checkpoint files + run_state.json
    latest                  the tag of the newest published checkpoint

A checkpoint is written under the temporary name `.tmp-checkpoint-<step>`; when every
rank has finished writing, rank 0 adds run_state.json, renames the folder and then
rewrites `latest` (both atomic renames). A checkpoint is deleted (pruned, or replaced by
a new timeline) the other way round: renamed to `.tmp-checkpoint-<step>.removing` first,
then deleted. A run killed at any moment therefore leaves complete checkpoints and `.tmp-`
folders, which resuming ignores and rank 0 deletes when the next run starts.

Test hook (the only one): SFT_TEST_SLOW_SAVE_STEP=N makes rank 0 sleep 60 s while the
checkpoint of step N is still unpublished, so a test can SIGKILL the run mid-save.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from typing import Any

from utils.checkpoint.checks import PREFIX, RUN_STATE, published_checkpoints
from utils.checkpoint.config import CheckpointConfig
from utils.checkpoint.position import DataPosition
from utils.checkpoint.resume_state import gather_rng_states
from utils.checkpoint.universal import MARKER
from utils.distributed import DistInfo, barrier, print_rank_0, rank_zero_first, warn_rank_0
from utils.errors import UserError
from utils.files import fsync_tree, write_atomically

TEMP_PREFIX = ".tmp-"
LATEST = "latest"
SLOW_SAVE_ENV = "SFT_TEST_SLOW_SAVE_STEP"


def find_checkpoint(cfg: CheckpointConfig, output_dir: str) -> str | None:
    """The checkpoint folder to resume from, or None to start fresh."""
    path = cfg.resume_from_checkpoint
    if not path:
        if published_checkpoints(output_dir):
            warn_rank_0(
                f"{output_dir} holds checkpoints of an earlier run; this run starts fresh and "
                "replaces them as it saves (add --resume_from_checkpoint auto to continue it)."
            )
        return None
    if path == "auto":
        found = published_checkpoints(output_dir)
        if not found:
            print_rank_0(f"no complete checkpoint in {output_dir}; starting from the beginning")
        return found[-1][1] if found else None
    if os.path.isfile(os.path.join(path, RUN_STATE)):
        return path
    if os.path.isfile(os.path.join(path, MARKER)):  # our universal conversion of a checkpoint
        return os.path.dirname(os.path.abspath(path))
    found = published_checkpoints(path)
    if found:
        return found[-1][1]
    if os.path.isdir(os.path.join(path, "zero")):  # made by DeepSpeed's ds_to_universal
        raise UserError(
            f"--resume_from_checkpoint {path!r} is a universal checkpoint made outside this "
            "tool, without the run's state; pass the checkpoint-<step> folder it came from "
            "(a checkpoint of another shape is converted automatically)."
        )
    raise UserError(
        f"--resume_from_checkpoint {path!r} is neither a complete checkpoint (no {RUN_STATE}; "
        f"an interrupted save leaves a {TEMP_PREFIX}{PREFIX}<step> folder) nor a folder holding "
        f"{PREFIX}<step> checkpoints. Pass one of the checkpoints it lists, or 'auto'."
    )


def save_checkpoint(
    engine, output_dir: str, position: DataPosition, record: dict[str, Any], dist: DistInfo
) -> str:
    """Write a checkpoint of the current step on every rank; publish it when all are done.

    `record`: what run_state.json says about the run besides its position (shape, settings).
    """
    step = engine.global_steps
    tag = f"{PREFIX}{step}"
    temp = os.path.join(output_dir, TEMP_PREFIX + tag)
    with rank_zero_first("clear stale checkpoint folders"):
        if dist.is_main:
            sweep_stale(output_dir)
    client_state = {"position": asdict(position), "rng": gather_rng_states()}
    engine.save_checkpoint(
        output_dir, tag=TEMP_PREFIX + tag, client_state=client_state, save_latest=False
    )
    barrier()  # every rank's files are written
    final = os.path.join(output_dir, tag)
    # Flushing a large checkpoint can outlast --dist_timeout_minutes: the others poll.
    with rank_zero_first(f"publish checkpoint {final}"):
        if dist.is_main:
            if os.environ.get(SLOW_SAVE_ENV) == str(step):
                time.sleep(60)
            state = {"step": step, "position": asdict(position), **record}
            state["files"] = sorted(os.listdir(temp))
            write_atomically(os.path.join(temp, RUN_STATE), json.dumps(state))
            fsync_tree(temp)
            _publish(temp, final, step, output_dir)
    return final


def _publish(temp: str, final: str, step: int, output_dir: str) -> None:
    # Checkpoints at or after this step belong to an abandoned timeline (an earlier run
    # resumed from an older checkpoint, or a fresh start); `auto` must never pick them.
    for other_step, other in published_checkpoints(output_dir):
        if other_step >= step:
            unpublish(other)
    os.replace(temp, final)
    write_atomically(os.path.join(output_dir, LATEST), os.path.basename(final))


def prune_checkpoints(output_dir: str, keep: int | None) -> None:
    """Delete all but the newest `keep` checkpoints (rank 0)."""
    if keep is None:
        return
    for _, path in published_checkpoints(output_dir)[:-keep]:
        unpublish(path)


def unpublish(path: str) -> None:
    """Delete a checkpoint so that a kill at any moment leaves it whole or a `.tmp-` folder:
    one atomic rename takes it out of view (auto never sees half of it), then the delete."""
    parent, name = os.path.split(path)
    doomed = os.path.join(parent, f"{TEMP_PREFIX}{name}.removing")
    shutil.rmtree(doomed, ignore_errors=True)  # an earlier kill's leftover of the same name
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def sweep_stale(output_dir: str | None) -> None:
    """Remove what killed saves and deletes left (no run owns them any more; rank 0)."""
    names = os.listdir(output_dir) if output_dir and os.path.isdir(output_dir) else []
    for name in names:
        path = os.path.join(output_dir, name)
        if name.startswith(TEMP_PREFIX + PREFIX):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(f".{LATEST}.") and name.endswith(".tmp"):  # write_atomically's
            os.remove(path)
