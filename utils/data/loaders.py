"""The data loaders: this rank's training micro-batches and its share of the eval rows.

Training batches are length-grouped and padded to their longest example (default), padded
to --max_seq_len (--pad_to_max_len, DeepSpeed-Chat's way) or packed (--packing). The
sampler yields whole index lists, each fetched in one Arrow read and collated.
"""

from __future__ import annotations

import signal
from functools import partial

import torch
from torch.utils.data import DataLoader

from utils.data.collate import collate, pad_multiple
from utils.data.config import BatchConfig
from utils.data.packing import collate_flat, collate_packed, pack_rows
from utils.data.sampler import FILLER, LengthGroupedSampler


class _Rows:
    """Fetches a micro-batch's rows by index list; an item may be a pack of several rows."""

    def __init__(self, dataset, packs: list[list[int]] | None = None) -> None:
        self.dataset = dataset
        self.packs = packs

    def __getitem__(self, indices: list[int]) -> list:
        if indices == [FILLER]:
            row = {**self._rows([0])[0], "filler": True}
            return [row] if self.packs is None else [[row]]
        if self.packs is None:
            return self._rows(indices)
        return [self._rows(self.packs[i]) for i in indices]

    def _rows(self, indices: list[int]) -> list[dict]:
        columns = self.dataset[indices]  # one batched read (Arrow), then back to rows
        return [
            {"input_ids": ids, "loss_spans": spans}
            for ids, spans in zip(columns["input_ids"], columns["loss_spans"], strict=True)
        ]


def _leave_stop_signals_to_training(worker_id: int) -> None:
    """Schedulers signal every process of a job; the training process then finishes its step
    and checkpoints (utils/engine/preemption.py). A worker killed by the same signal would
    crash it first, so workers ignore it (they exit when the training process does)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def row_lengths(dataset) -> list[int]:
    return [len(ids) for ids in dataset["input_ids"]]


def build_train_loader(
    dataset,
    batch: BatchConfig,
    *,
    micro_batch: int,
    max_seq_len: int,
    pad_token_id: int,
    seed: int,
    rank: int,
    world_size: int,
    mask_dtype: torch.dtype,
    flat_packs: bool = False,
    on_gpu: bool = False,
) -> DataLoader:
    """Micro-batches for this rank; `loader.sampler.set_epoch(e)` gives a new order per epoch.

    Default: length-grouped batches padded to their longest example. `pad_to_max_len`:
    random batches padded to max_seq_len. `packing`: rows of several examples, packed once
    (best fit), in a new random order every epoch; their additive attention masks are in
    `mask_dtype`, the model's compute dtype; `flat_packs`: a micro-batch's packs in one row
    without mask or padding, for attention that takes per-example boundaries
    (`collate_flat`). `len(loader.sampler)` is the number of micro-batches an epoch trains
    (packs, not rows, under packing). `on_gpu`: collate in worker processes into pinned
    memory, so batches are ready and copy asynchronously (on a CPU, workers would only
    compete with training for the cores), and round widths to a GPU's `pad_multiple`.
    """
    multiple = pad_multiple(on_gpu)
    lengths = row_lengths(dataset)
    packs = None
    if batch.packing:
        packs = pack_rows(lengths, max_seq_len)
        lengths = [sum(lengths[i] for i in pack) for pack in packs]
        if flat_packs:
            collate_fn = partial(collate_flat, loss_on=batch.loss_on)
        else:
            collate_fn = partial(
                collate_packed,
                pad_token_id=pad_token_id,
                loss_on=batch.loss_on,
                mask_dtype=mask_dtype,
                multiple=multiple,
            )
    else:
        pad_to = max_seq_len if batch.pad_to_max_len else None
        collate_fn = partial(
            collate,
            pad_token_id=pad_token_id,
            loss_on=batch.loss_on,
            pad_to=pad_to,
            multiple=multiple,
        )
    sampler = LengthGroupedSampler(
        lengths, micro_batch, rank, world_size, seed, group_by_length=not batch.pad_to_max_len
    )
    workers = {}
    if on_gpu:
        workers = {"num_workers": 2, "pin_memory": True, "persistent_workers": True}
        workers["worker_init_fn"] = _leave_stop_signals_to_training
    return DataLoader(
        _Rows(dataset, packs), sampler=sampler, batch_size=None, collate_fn=collate_fn, **workers
    )


def build_eval_loader(
    dataset,
    batch: BatchConfig,
    *,
    micro_batch: int,
    pad_token_id: int,
    rank: int,
    world_size: int,
    on_gpu: bool = False,
) -> DataLoader:
    """Every eval row on exactly one rank (rank r takes rows r, r+W, ...): no padded duplicates.

    Rows go in length order (order does not change an evaluation), so batches carry little
    padding. The loss covers the tokens training's loss covers (`batch.loss_on`). `on_gpu`:
    widths rounded to a GPU's `pad_multiple`, as training's.
    """
    shard = list(range(rank, len(dataset), world_size))
    lengths = row_lengths(dataset)
    shard.sort(key=lambda i: lengths[i])
    batches = [shard[i : i + micro_batch] for i in range(0, len(shard), micro_batch)]
    return DataLoader(
        _Rows(dataset),
        sampler=batches,
        batch_size=None,
        collate_fn=partial(
            collate, pad_token_id=pad_token_id, loss_on=batch.loss_on, multiple=pad_multiple(on_gpu)
        ),
    )
