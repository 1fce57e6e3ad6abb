"""The data position when a resumed run has another batch geometry (world size or micro-batch).

The sampler's epoch order is a function of (seed, epoch, rows per micro-step = micro-batch
x world size). With the same rows per micro-step a resumed run skips the micro-batches
already trained, as it does today. When that number changes, the new geometry's order is
a different permutation, so "N samples in" would train some rows twice and skip others.
Instead the saved run's order is replayed, its global micro-batches already trained are
dropped, and the remaining rows (in that order) are cut into the new geometry's global
micro-batches and dealt out across the new ranks: every row is still trained exactly once
in the interrupted epoch, and the epochs after it use the new geometry's own order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from utils.sampler import FILLER, LengthGroupedSampler


@dataclass(frozen=True)
class BatchGeometry:
    micro_batch: int  # rows per rank and micro-step (packed rows with --packing)
    world_size: int
    accumulation: int

    @property
    def rows_per_micro_step(self) -> int:
        return self.micro_batch * self.world_size


@dataclass(frozen=True)
class SavedPosition:
    """What a checkpoint records: `micro_batches` of epoch `epoch` trained under `geometry`."""

    epoch: int
    micro_batches: int
    geometry: BatchGeometry


@dataclass(frozen=True)
class ResumePosition:
    epoch: int
    consumed: int  # global micro-batches of the saved run's epoch order already trained
    saved_rows_per_micro_step: int
    skip: int | None  # the same order: skip this many of the loader's micro-batches


def resume_position(saved: SavedPosition, current: BatchGeometry) -> ResumePosition:
    """Where the interrupted epoch continues under `current` (see the rule above)."""
    same_order = saved.geometry.rows_per_micro_step == current.rows_per_micro_step
    return ResumePosition(
        epoch=saved.epoch,
        consumed=saved.micro_batches,
        saved_rows_per_micro_step=saved.geometry.rows_per_micro_step,
        skip=saved.micro_batches if same_order else None,
    )


def saved_order(
    lengths: Sequence[int], seed: int, group_by_length: bool, position: ResumePosition
) -> list[list[int]]:
    """The saved run's global micro-batches of the interrupted epoch (every row once)."""
    sampler = LengthGroupedSampler(
        lengths, position.saved_rows_per_micro_step, seed=seed, group_by_length=group_by_length
    )
    sampler.set_epoch(position.epoch)
    return sampler.global_batches()


def remaining_batches(
    lengths: Sequence[int],
    seed: int,
    group_by_length: bool,
    position: ResumePosition,
    current: BatchGeometry,
    rank: int,
) -> list[list[int]]:
    """This rank's micro-batches for the rest of the interrupted epoch (FILLER where a rank
    gets no row of the last, short global micro-batch, as the sampler does)."""
    order = saved_order(lengths, seed, group_by_length, position)[position.consumed :]
    if position.skip is None:  # another geometry: cut the remaining rows afresh
        rest = [i for batch in order for i in batch]
        size = current.rows_per_micro_step
        order = [rest[start : start + size] for start in range(0, len(rest), size)]
    return [batch[rank :: current.world_size] or [FILLER] for batch in order]


def rows_trained(
    lengths: Sequence[int], seed: int, group_by_length: bool, position: ResumePosition
) -> int:
    """Rows of the interrupted epoch trained before the checkpoint (for the resume message)."""
    return sum(
        len(b) for b in saved_order(lengths, seed, group_by_length, position)[: position.consumed]
    )
