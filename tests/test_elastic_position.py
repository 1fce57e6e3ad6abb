"""The data position of a resumed run whose batch geometry changed: every row once per epoch."""

from __future__ import annotations

import pytest

from utils.data.sampler import FILLER, LengthGroupedSampler
from utils.engine.elastic_position import (
    BatchGeometry,
    EpochOrder,
    EpochPosition,
    advance,
    deal,
    epoch_batches,
    resume_position,
)

ORDER = EpochOrder(lengths=[(i * 7) % 23 + 1 for i in range(34)], seed=1234)
ROWS = list(range(34))
SAVED = BatchGeometry(micro_batch=2, world_size=2, accumulation=2)
EPOCH = 1


def loader_batches(geometry: BatchGeometry, rank: int) -> list[list[int]]:
    """One rank's micro-batches of EPOCH as the training loader yields them."""
    sampler = LengthGroupedSampler(
        ORDER.lengths, geometry.micro_batch, rank, geometry.world_size, ORDER.seed
    )
    sampler.set_epoch(EPOCH)
    return list(sampler)


def rows_of(per_rank: list[list[list[int]]]) -> list[int]:
    return [i for batches in per_rank for batch in batches for i in batch if i != FILLER]


def start_of_epoch(geometry: BatchGeometry) -> EpochPosition:
    return EpochPosition(EPOCH, rows_done=0, order_rows_per_micro_step=geometry.rows_per_micro_step)


def train(position: EpochPosition, geometry: BatchGeometry, micro_batches: int | None = None):
    """Resume at `position` under `geometry`, train `micro_batches` (all if None): the rows
    every rank trained and the position a checkpoint would then record."""
    resume = resume_position(position, geometry, ORDER)
    count = len(resume.batches) if micro_batches is None else micro_batches
    per_rank = [
        deal(resume.batches, rank, geometry.world_size)[:count]
        for rank in range(geometry.world_size)
    ]
    return rows_of(per_rank), advance(resume, count), resume


@pytest.mark.parametrize(
    "current",
    [
        BatchGeometry(micro_batch=2, world_size=1, accumulation=4),  # 2 ranks -> 1
        BatchGeometry(micro_batch=3, world_size=3, accumulation=1),  # 2 ranks -> 3
        BatchGeometry(micro_batch=8, world_size=2, accumulation=1),  # bigger micro-batch
    ],
)
@pytest.mark.parametrize("consumed", [0, 3, 8, 9])
def test_every_row_is_trained_once_in_the_interrupted_epoch(current, consumed):
    before, position, _ = train(start_of_epoch(SAVED), SAVED, consumed)
    after, end, resume = train(position, current)
    assert sorted(before + after) == ROWS
    assert end.rows_done == len(ROWS)
    assert all(len(batch) <= current.rows_per_micro_step for batch in resume.batches)


def test_two_changes_of_shape_in_one_epoch_still_train_every_row_once():
    first = BatchGeometry(micro_batch=2, world_size=1, accumulation=4)
    second = BatchGeometry(micro_batch=3, world_size=3, accumulation=1)
    rows_a, position, _ = train(start_of_epoch(SAVED), SAVED, 3)
    rows_b, position, _ = train(position, first, 5)
    rows_c, _, _ = train(position, second)
    assert sorted(rows_a + rows_b + rows_c) == ROWS


def test_the_same_rows_per_micro_step_continues_the_loaders_own_order():
    current = BatchGeometry(micro_batch=4, world_size=1, accumulation=2)  # 4 rows, as 2 x 2
    _, position, _ = train(start_of_epoch(SAVED), SAVED, 3)
    resume = resume_position(position, current, ORDER)
    assert resume.skip == 3
    assert deal(resume.batches, 0, 1) == loader_batches(current, rank=0)[3:]


def test_an_unchanged_geometry_is_the_uninterrupted_run():
    _, position, _ = train(start_of_epoch(SAVED), SAVED, 4)
    resume = resume_position(position, SAVED, ORDER)
    assert resume.skip == 4
    for rank in range(2):
        assert deal(resume.batches, rank, 2) == loader_batches(SAVED, rank)[4:]
    assert resume.batches == epoch_batches(ORDER, EPOCH, 4)[4:]
