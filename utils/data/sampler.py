"""Length-grouped, distributed batch sampling: little padding, random order, every row once.

Each epoch: shuffle all rows, sort by length inside large random groups, cut the sorted
list into global batches (one micro-batch per rank), shuffle those batches, and deal each
global batch out across ranks. Rows of a global batch have similar lengths, so a batch
padded to its longest example carries little padding, while the random groups and the
shuffled batch order keep training random. The order depends only on (seed, epoch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from utils.arithmetic import ceil_div

# Rows sorted together: this many global batches. Large enough that most batches hold
# rows of near-equal length, small enough that a batch's rows come from all over the data.
GROUP_BATCHES = 64

# A rank left without a row in the last, short global batch gets this marker: it trains
# a copy of a row with zero loss weight, so every rank joins every collective step.
FILLER = -1


class LengthGroupedSampler:
    """Yields, for one rank, lists of row indices (one list per micro-batch).

    Every rank yields the same number of micro-batches; across ranks every row appears
    exactly once per epoch (FILLER stands for a zero-weight row where one rank runs out).
    With `group_by_length=False` the order is simply random (DeepSpeed-Chat's padding
    to max length gains nothing from grouping).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        group_by_length: bool = True,
    ) -> None:
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0
        self.remaining: list[list[int]] | None = None

    def set_epoch(self, epoch: int, batches: list[list[int]] | None = None) -> None:
        """A new order every epoch (DeepSpeed-Chat never tells its sampler the epoch).

        `batches`: the global micro-batches this epoch still has to train, when a resumed run
        continues it (utils/checkpoint/position.py works them out); default: all of them.
        """
        self.epoch, self.remaining = epoch, batches

    @property
    def num_rows(self) -> int:
        return len(self.lengths)

    def __len__(self) -> int:
        """Micro-batches of a whole epoch, on every rank."""
        return ceil_div(self.num_rows, self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches() if self.remaining is None else self.remaining
        for global_batch in batches:
            # Strided dealing: each rank gets rows from the whole sorted global batch, so
            # all ranks pad to about the same width and finish their steps together.
            mine = global_batch[self.rank :: self.world_size]
            yield mine if mine else [FILLER]

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches (rows of all ranks), the same list on every rank."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_rows, generator=generator)
        global_size = self.batch_size * self.world_size
        if self.group_by_length:
            group = global_size * GROUP_BATCHES
            chunks = [order[i : i + group] for i in range(0, len(order), group)]
            # Stable descending sort: ties keep the random order.
            order = torch.cat(
                [c[torch.argsort(self.lengths[c], descending=True, stable=True)] for c in chunks]
            )
        batches = [order[i : i + global_size].tolist() for i in range(0, len(order), global_size)]
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffle]
