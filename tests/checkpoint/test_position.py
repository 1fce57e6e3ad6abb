"""The data position of a resumed run whose batch geometry changed: every row once per epoch.

Drives the training sampler itself, one per rank, through `start_epoch` as the loop does.
"""

from __future__ import annotations

import pytest

from utils.checkpoint.position import DataPosition, start_epoch
from utils.data.sampler import FILLER, LengthGroupedSampler
from utils.errors import UserError

LENGTHS = [(i * 7) % 23 + 1 for i in range(34)]
ROWS = list(range(34))
SEED, EPOCH = 1234, 1
SAVED = (2, 2)  # micro-batch, ranks


def samplers(micro: int, world: int) -> list[LengthGroupedSampler]:
    return [LengthGroupedSampler(LENGTHS, micro, rank, world, SEED) for rank in range(world)]


def train(position: DataPosition, geometry: tuple[int, int], micro_batches: int | None = None):
    """Start (or resume) EPOCH at `position` on every rank of `geometry` and train
    `micro_batches` (all if None): the rows trained and the position a checkpoint records."""
    ranks = samplers(*geometry)
    progress = [start_epoch(sampler, position) for sampler in ranks]
    per_rank = [list(sampler) for sampler in ranks]
    count = len(per_rank[0]) if micro_batches is None else micro_batches
    assert {len(batches) for batches in per_rank} == {len(per_rank[0])}  # ranks step together
    rows = [i for batches in per_rank for batch in batches[:count] for i in batch if i != FILLER]
    positions = {p.advance(count) for p in progress}
    assert len(positions) == 1  # every rank records the same position
    return rows, positions.pop(), per_rank


@pytest.mark.parametrize(
    "current",
    [(2, 1), (4, 1), (3, 3), (8, 2)],
    ids=["2-ranks-to-1", "same-rows-per-micro-step", "2-ranks-to-3", "bigger-micro-batch"],
)
@pytest.mark.parametrize("consumed", [0, 3, 8, 9])
def test_every_row_is_trained_once_in_the_interrupted_epoch(current, consumed):
    before, position, _ = train(DataPosition(EPOCH), SAVED, consumed)
    after, end, per_rank = train(position, current)
    assert sorted(before + after) == ROWS
    assert end.rows_done == len(ROWS)
    micro = current[0]
    assert all(len(batch) <= micro for batches in per_rank for batch in batches)


def test_two_changes_of_shape_in_one_epoch_still_train_every_row_once():
    rows_a, position, _ = train(DataPosition(EPOCH), SAVED, 3)
    rows_b, position, _ = train(position, (2, 1), 5)
    rows_c, _, _ = train(position, (3, 3))
    assert sorted(rows_a + rows_b + rows_c) == ROWS


def test_the_same_rows_per_micro_step_continues_the_loaders_own_order():
    _, position, _ = train(DataPosition(EPOCH), SAVED, 3)
    _, _, resumed = train(position, (4, 1))  # 4 rows per micro-step, as 2 x 2
    _, _, uninterrupted = train(DataPosition(EPOCH), (4, 1))
    assert resumed[0] == uninterrupted[0][3:]


def test_an_unchanged_geometry_is_the_uninterrupted_run():
    _, position, _ = train(DataPosition(EPOCH), SAVED, 4)
    _, _, resumed = train(position, SAVED)
    _, _, uninterrupted = train(DataPosition(EPOCH), SAVED)
    assert resumed == [batches[4:] for batches in uninterrupted]


def test_an_epoch_not_yet_begun_takes_the_new_geometrys_own_order():
    _, end, _ = train(DataPosition(EPOCH), SAVED)  # a whole epoch: the next one has not begun
    _, fresh, per_rank = train(DataPosition(EPOCH + 1, 0, 4), (2, 1))
    own = samplers(2, 1)[0]
    own.set_epoch(EPOCH + 1)
    assert per_rank[0] == list(own)
    assert fresh == DataPosition(EPOCH + 1, len(ROWS), 2)
    assert end == DataPosition(EPOCH, len(ROWS), 4)


def test_a_position_past_the_epochs_rows_is_refused():
    with pytest.raises(UserError, match=r"40 rows into epoch 2, which has only 34 rows"):
        train(DataPosition(EPOCH, 40, 4), SAVED)
