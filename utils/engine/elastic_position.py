"""The data position when a resumed run has another batch geometry (world size, micro-batch).

An epoch's order is a function of (seed, epoch, rows per micro-step = micro-batch x world
size): the sampler shuffles, groups by length and cuts global micro-batches of that many
rows. A run resumed with another number of rows per micro-step would draw a different
permutation, so "N samples in" would train some rows twice and skip others. The rule:

- A position is (epoch, rows of the epoch's order already trained, the rows per
  micro-step that defined that order). Each micro-step trains a contiguous slice of the
  order, so one row count says exactly which rows are done.
- Resuming with the same rows per micro-step at a batch boundary skips whole
  micro-batches: the loader's own order, bit for bit as an uninterrupted run.
- Otherwise the order is replayed, its first `rows_done` rows dropped, and the rest cut
  into the new geometry's global micro-batches and dealt across the new ranks; the
  position keeps counting rows of the same order, so a second change of shape within
  the epoch still trains every row exactly once.
- The next epoch is ordered by the new geometry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from utils.data.sampler import FILLER, LengthGroupedSampler


@dataclass(frozen=True)
class BatchGeometry:
    micro_batch: int  # rows per rank and micro-step (packed rows with --packing)
    world_size: int
    accumulation: int

    @property
    def rows_per_micro_step(self) -> int:
        return self.micro_batch * self.world_size


@dataclass(frozen=True)
class EpochPosition:
    """What a checkpoint records about the data."""

    epoch: int
    rows_done: int  # rows of the epoch's order already trained
    order_rows_per_micro_step: int  # the geometry that ordered this epoch


@dataclass(frozen=True)
class EpochOrder:
    """What, besides the geometry, decides an epoch's order (the sampler's arguments)."""

    lengths: Sequence[int]
    seed: int
    group_by_length: bool = True


@dataclass(frozen=True)
class Resume:
    start: EpochPosition
    batches: list[list[int]]  # the epoch's remaining global micro-batches (all ranks' rows)
    skip: int | None  # the loader's own order continues: skip this many micro-batches


def epoch_batches(order: EpochOrder, epoch: int, rows_per_micro_step: int) -> list[list[int]]:
    """An epoch's global micro-batches, as the sampler cuts them (every row once)."""
    sampler = LengthGroupedSampler(
        order.lengths, rows_per_micro_step, seed=order.seed, group_by_length=order.group_by_length
    )
    sampler.set_epoch(epoch)
    return sampler.global_batches()


def resume_position(saved: EpochPosition, current: BatchGeometry, order: EpochOrder) -> Resume:
    """Where the interrupted epoch continues under `current` (see the rule above)."""
    batches = epoch_batches(order, saved.epoch, saved.order_rows_per_micro_step)
    done, boundary = 0, None
    for index, batch in enumerate(batches):
        if done == saved.rows_done:
            boundary = index
            break
        done += len(batch)
    else:
        boundary = len(batches) if done == saved.rows_done else None
    if boundary is not None and current.rows_per_micro_step == saved.order_rows_per_micro_step:
        return Resume(saved, batches[boundary:], skip=boundary)
    rest = [row for batch in batches for row in batch][saved.rows_done :]
    size = current.rows_per_micro_step
    cut = [rest[start : start + size] for start in range(0, len(rest), size)]
    return Resume(saved, cut, skip=None)


def deal(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's micro-batches: strided like the sampler's, FILLER where it gets no row."""
    return [batch[rank::world_size] or [FILLER] for batch in batches]


def advance(resume: Resume, micro_batches: int) -> EpochPosition:
    """The position after training the first `micro_batches` of `resume.batches` (to save)."""
    rows = sum(len(batch) for batch in resume.batches[:micro_batches])
    return EpochPosition(
        resume.start.epoch,
        resume.start.rows_done + rows,
        resume.start.order_rows_per_micro_step,
    )
