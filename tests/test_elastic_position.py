"""The data position of a resumed run whose batch geometry changed: every row once per epoch."""

from __future__ import annotations

import pytest

from utils.engine.elastic_position import (
    BatchGeometry,
    SavedPosition,
    remaining_batches,
    resume_position,
    rows_trained,
)
from utils.sampler import FILLER, LengthGroupedSampler

LENGTHS = [(i * 7) % 23 + 1 for i in range(34)]  # 34 rows of assorted lengths
SEED = 1234
SAVED = BatchGeometry(micro_batch=2, world_size=2, accumulation=2)


def rank_batches(geometry: BatchGeometry, epoch: int) -> list[list[list[int]]]:
    """Each rank's micro-batches of `epoch` as the training loader yields them."""
    out = []
    for rank in range(geometry.world_size):
        sampler = LengthGroupedSampler(
            LENGTHS, geometry.micro_batch, rank, geometry.world_size, SEED
        )
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def trained_rows(per_rank: list[list[list[int]]]) -> list[int]:
    return [i for batches in per_rank for batch in batches for i in batch if i != FILLER]


@pytest.mark.parametrize(
    "current",
    [
        BatchGeometry(micro_batch=2, world_size=1, accumulation=4),  # 2 ranks -> 1
        BatchGeometry(micro_batch=3, world_size=3, accumulation=1),  # 2 ranks -> 3
        BatchGeometry(micro_batch=8, world_size=2, accumulation=1),  # bigger micro-batch
    ],
)
@pytest.mark.parametrize("consumed", [0, 3, 8])
def test_every_row_is_trained_once_in_the_interrupted_epoch(current, consumed):
    saved_batches = rank_batches(SAVED, epoch=1)
    before = trained_rows([batches[:consumed] for batches in saved_batches])
    position = resume_position(
        SavedPosition(epoch=1, micro_batches=consumed, geometry=SAVED), current
    )
    assert position.skip is None  # another order: the rows are dealt out afresh
    after = [
        remaining_batches(LENGTHS, SEED, True, position, current, rank)
        for rank in range(current.world_size)
    ]
    assert sorted(before + trained_rows(after)) == list(range(len(LENGTHS)))
    assert len({len(batches) for batches in after}) == 1  # every rank runs the same steps
    assert all(len(b) <= current.micro_batch for batches in after for b in batches)
    assert rows_trained(LENGTHS, SEED, True, position) == len(before)


def test_the_same_rows_per_micro_step_keeps_the_order_and_skips():
    current = BatchGeometry(micro_batch=4, world_size=1, accumulation=2)  # 4 rows, as 2 x 2
    position = resume_position(SavedPosition(epoch=1, micro_batches=3, geometry=SAVED), current)
    assert position.skip == 3
    # Skipping is exact here: the one rank gets the same global micro-batches the two had.
    resumed = remaining_batches(LENGTHS, SEED, True, position, current, rank=0)
    (own,) = rank_batches(current, epoch=1)
    assert resumed == own[3:]
