"""Where training stands in its data (`DataPosition`, what a checkpoint records), and where an
epoch continues, even when a resumed run has another batch geometry.

An epoch's order is a function of (seed, epoch, rows per micro-step = micro-batch x world
size): the sampler shuffles, groups by length and cuts global micro-batches of that many
rows. A run resumed with another number of rows per micro-step would draw a different
permutation, so "N micro-batches in" would train some rows twice and skip others. The rule:

- A position (DataPosition) is (epoch, rows of the epoch's order already trained, the rows
  per micro-step that defined that order). Each micro-step trains a contiguous slice of
  the order, so one row count says exactly which rows are done.
- Resuming with the same rows per micro-step at a batch boundary skips whole
  micro-batches: the loader's own order, bit for bit as an uninterrupted run.
- Otherwise the order is replayed, its first `rows_done` rows dropped, and the rest cut
  into the new geometry's global micro-batches and dealt across the new ranks; the
  position keeps counting rows of the same order, so a second change of shape within
  the epoch still trains every row exactly once.
- An epoch not yet begun (and every later epoch) is ordered by the new geometry.

With the global batch (micro x ranks x accumulation) unchanged, as a resume requires
(utils/checkpoint/settings.py), every optimizer step of the replayed epoch trains the rows
the saved run's step would have, and the schedule keeps its length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from utils.data.sampler import LengthGroupedSampler
from utils.errors import UserError


@dataclass(frozen=True)
class DataPosition:
    """Where training stands: the first `rows_done` rows of epoch `epoch`'s order are trained.

    Counted in rows (packed rows under --packing), not micro-batches, so a run resumed with
    another micro-batch or number of ranks knows exactly which rows are left. The epoch's
    order is the sampler's for `order_rows_per_micro_step` rows per micro-step (micro-batch
    x ranks), which decides how it shuffles (`start_epoch` below). Always at a
    window's end: that is where steps, and so checkpoints, happen.
    """

    epoch: int = 0
    rows_done: int = 0
    order_rows_per_micro_step: int = 0  # 0: the epoch has not begun (any order will do)


@dataclass(frozen=True)
class EpochOrder:
    """What, besides the geometry, decides an epoch's order (the sampler's arguments)."""

    lengths: Sequence[int]
    seed: int
    group_by_length: bool = True


@dataclass
class EpochProgress:
    """The epoch under way: its remaining global micro-batches and how far training got."""

    start: DataPosition
    batches: list[list[int]]  # the epoch's remaining global micro-batches (all ranks' rows)
    skip: int | None  # None: replayed; else the loader's own order minus `skip` micro-batches
    trained: int = 0  # micro-batches of `batches` trained so far
    rows: int = 0  # their rows

    def advance(self, micro_batches: int) -> DataPosition:
        """The position after `micro_batches` more micro-batches (what a checkpoint records)."""
        for batch in self.batches[self.trained : self.trained + micro_batches]:
            self.rows += len(batch)
        self.trained += micro_batches
        start = self.start
        return DataPosition(
            start.epoch, start.rows_done + self.rows, start.order_rows_per_micro_step
        )


def epoch_batches(order: EpochOrder, epoch: int, rows_per_micro_step: int) -> list[list[int]]:
    """An epoch's global micro-batches, as the sampler cuts them (every row once)."""
    sampler = LengthGroupedSampler(
        order.lengths, rows_per_micro_step, seed=order.seed, group_by_length=order.group_by_length
    )
    sampler.set_epoch(epoch)
    return sampler.global_batches()


def resume_position(
    saved: DataPosition, rows_per_micro_step: int, order: EpochOrder
) -> EpochProgress:
    """Where `saved`'s epoch continues with `rows_per_micro_step` rows per micro-step."""
    if saved.rows_done == 0:  # nothing of the epoch trained: this geometry's own order
        start = DataPosition(saved.epoch, 0, rows_per_micro_step)
        return EpochProgress(start, epoch_batches(order, saved.epoch, rows_per_micro_step), skip=0)
    if saved.rows_done > len(order.lengths):  # the data check makes this unreachable, unless forced
        raise UserError(
            f"the checkpoint is {saved.rows_done} rows into epoch {saved.epoch + 1}, which has "
            f"only {len(order.lengths)} rows: it was trained on other data. Resume with its data."
        )
    batches = epoch_batches(order, saved.epoch, saved.order_rows_per_micro_step)
    done, boundary = 0, None
    for index, batch in enumerate([*batches, []]):
        if done == saved.rows_done:
            boundary = index
            break
        done += len(batch)
    if boundary is not None and rows_per_micro_step == saved.order_rows_per_micro_step:
        return EpochProgress(saved, batches[boundary:], skip=boundary)
    rest = [row for batch in batches for row in batch][saved.rows_done :]
    size = rows_per_micro_step
    cut = [rest[start : start + size] for start in range(0, len(rest), size)]
    return EpochProgress(saved, cut, skip=None)


def start_epoch(sampler: LengthGroupedSampler, position: DataPosition) -> EpochProgress:
    """Point this rank's sampler at what remains of `position`'s epoch; count from there."""
    order = EpochOrder(sampler.lengths.tolist(), sampler.seed, sampler.group_by_length)
    progress = resume_position(position, sampler.batch_size * sampler.world_size, order)
    sampler.set_epoch(position.epoch, batches=progress.batches)
    return progress
