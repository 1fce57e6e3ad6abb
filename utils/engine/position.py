"""Where training stands in its data: what a checkpoint records so a resume continues there."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataPosition:
    """Where training stands: the first `rows_done` rows of epoch `epoch`'s order are trained.

    Counted in rows (packed rows under --packing), not micro-batches, so a run resumed with
    another micro-batch or number of ranks knows exactly which rows are left. The epoch's
    order is the sampler's for `order_rows_per_micro_step` rows per micro-step (micro-batch
    x ranks), which decides how it shuffles (utils/engine/elastic_position.py). Always at a
    window's end: that is where steps, and so checkpoints, happen.
    """

    epoch: int = 0
    rows_done: int = 0
    order_rows_per_micro_step: int = 0  # 0: the epoch has not begun (any order will do)
