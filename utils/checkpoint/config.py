"""Settings of checkpoints: when to write them, which to keep, which to continue, and what
to trust.

Each field is also the command-line flag of the same name (see utils/flags.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from utils.flags import flag

# Half of how long the other ranks wait for rank 0's save (utils/distributed.py LONG_WAIT,
# 6 hours): the other half is left for writing the model.
MAX_DISK_WAIT_MINUTES = 180


@dataclass(kw_only=True)
class CheckpointConfig:
    save_steps: int = flag(
        0,
        "Write a resumable DeepSpeed checkpoint under --output_dir every N optimizer steps and "
        "at each epoch end (0: only when preempted by SIGTERM/SIGUSR1).",
    )
    save_total_limit: int | None = flag(
        None, "Keep only the newest K checkpoints (default: keep all)."
    )
    resume_from_checkpoint: str | None = flag(
        None,
        "Continue a run exactly: a checkpoint folder, or 'auto' for the newest complete "
        "checkpoint in --output_dir (starts fresh when there is none).",
    )
    disk_full_wait_minutes: int = flag(
        60,
        "When the disk (or quota) is full at the final save, say how much room it needs "
        "and wait up to this many minutes for room, retrying as soon as there is (the "
        "trained weights are still in memory); Ctrl-C stops waiting. 0 (fail at once) to "
        f"{MAX_DISK_WAIT_MINUTES}.",
    )
    trust_checkpoint: bool = flag(
        False,
        "Resume from a checkpoint even if other users can write it (or own it). Resuming "
        "unpickles its files, which runs any code planted in them: pass this only when you "
        "trust everyone who can write there.",
    )
