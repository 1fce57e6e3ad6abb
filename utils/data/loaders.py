"""The data loaders: this rank's training micro-batches and its share of the eval rows.

Training batches are length-grouped and padded to their longest example (default), padded
to --max_seq_len (--pad_to_max_len, DeepSpeed-Chat's way) or packed (--packing). The
sampler yields whole index lists, each fetched in one Arrow read and collated.

Who collates is decided once (`choose_loader_workers`): the training process itself, or
worker processes started by spawn (a fresh interpreter: never a fork of a process that
already runs CUDA, NCCL or tokenizer threads). Workers live for one pass over the loader
(`open_batches`), which stops them when it ends, however it ends.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


# Measured with bench/loader_workers.py (HH-RLHF lengths, micro-batch 8, a shared 2-core
# CPU): reading and collating padded batches costs the training process ~1.2 ms a
# micro-batch, far below a GPU step (30-200 ms), and receiving them from workers more
# (2.6x); packed rows with their [8, 1, seq, seq] attention masks cost ~8 ms at seq 512 and
# ~31 ms at 1024 (the square of --max_seq_len), workers 0.57x and 0.40x of that. Workers
# pay off only for the latter, and only beside a GPU: on a CPU they would compete with
# training for the cores.
AUTO_WORKERS = 2
START_METHOD = "spawn"  # not forkserver: its server dies of the SIGTERM a scheduler sends


@dataclass(frozen=True)
class LoaderWorkers:
    """Who collates the training micro-batches; decided once, by `choose_loader_workers`."""

    count: int = 0  # worker processes; 0: the training process collates
    pin_memory: bool = False  # page-locked batches, so their copy to the GPU is asynchronous
    reason: str = ""

    def describe(self) -> str:
        who = "collated in the training process"
        if self.count:
            who = f"{self.count} worker process{'es' if self.count > 1 else ''} ({START_METHOD})"
        pinned = ", pinned memory" if self.pin_memory else ""
        return f"{who}{pinned} ({self.reason})" if self.reason else f"{who}{pinned}"


NO_WORKERS = LoaderWorkers()


def choose_loader_workers(
    requested: int | None, *, on_cuda: bool, masked_packs: bool
) -> LoaderWorkers:
    """--dataloader_num_workers, or by default workers only where collation is expensive:
    packed rows with per-example attention masks, on a GPU. Pinned memory on CUDA."""
    if requested is not None:
        count, reason = requested, "--dataloader_num_workers"
    elif on_cuda and masked_packs:
        count, reason = AUTO_WORKERS, "auto: packed rows' attention masks are costly to build"
    else:
        count, reason = 0, "auto: a micro-batch takes about a millisecond to collate"
    return LoaderWorkers(count=count, pin_memory=on_cuda, reason=reason)


# Schedulers send SIGTERM or SIGUSR1 to every process of a job, and Ctrl-C sends SIGINT to
# the terminal's whole process group.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _leave_stop_signals_to_training(worker_id: int) -> None:
    """The training process answers the stop signals (it finishes its step and checkpoints,
    utils/checkpoint/preemption.py, or stops) and then stops its workers itself (`open_batches`).
    A worker killed by the same signal would crash it first, so workers ignore them (one
    whose training process dies anyway sees it within seconds and exits: torch's watchdog)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextmanager
def open_batches(loader: DataLoader) -> Iterator[Iterator[dict]]:
    """One pass over `loader`, whose worker processes are stopped when the block ends:
    at the end of the data, at --max_steps, on preemption, an error or Ctrl-C.

    Not left to garbage collection: anything that keeps the iterator alive until the
    interpreter exits (a traceback, a reference cycle) would leave multiprocessing's exit
    handler waiting for workers that ignore its SIGTERM, forever.
    """
    # The stop signals are blocked while the workers start: they inherit the mask through
    # exec, so a signal that comes while a worker's interpreter starts up (seconds) waits
    # instead of killing it before it ignores them; this process gets it once unblocked.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    batches = None
    try:
        batches = iter(loader)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        yield batches
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if batches is not None:
            stop_workers(batches)


def stop_workers(batches: Iterator) -> None:
    """Stop the worker processes of a loader's iterator now (none: nothing to do)."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:  # the training process collates: no workers
        return
    # torch has no public call for this; `_shutdown_workers` is what the iterator's own end
    # of data and its __del__ call. Its last resort for a worker that does not stop is
    # SIGTERM, which ours ignore, so a straggler is killed.
    shutdown()
    for worker in batches._workers:
        if worker.is_alive():
            worker.kill()
            worker.join()


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
    pack_layout: str = "mask",
    workers: LoaderWorkers = NO_WORKERS,
    on_gpu: bool,
) -> DataLoader:
    """Micro-batches for this rank; `loader.sampler.set_epoch(e)` gives a new order per epoch.

    Default: length-grouped batches padded to their longest example. `pad_to_max_len`:
    random batches padded to max_seq_len. `packing`: rows of several examples, packed once
    (best fit), in a new random order every epoch, laid out as `pack_layout` says
    (utils/data/packing.py): "mask", additive attention masks in `mask_dtype`, the model's
    compute dtype; "positions", restarting position ids and no mask; "flat", a micro-batch's
    packs in one row with per-example boundaries. `len(loader.sampler)` is the number of
    micro-batches an epoch trains (packs, not rows, under packing). `workers`: who collates,
    into pinned memory or not (`choose_loader_workers`); iterate with `open_batches`, which
    stops the workers. `on_gpu`: widths round up to a GPU's `pad_multiple`.
    """
    multiple = pad_multiple(on_gpu)
    lengths = row_lengths(dataset)
    packs = None
    if batch.packing:
        packs = pack_rows(lengths, max_seq_len)
        lengths = [sum(lengths[i] for i in pack) for pack in packs]
        if pack_layout == "flat":
            collate_fn = partial(collate_flat, loss_on=batch.loss_on)
        else:
            collate_fn = partial(
                collate_packed,
                pad_token_id=pad_token_id,
                loss_on=batch.loss_on,
                mask_dtype=mask_dtype if pack_layout == "mask" else None,
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
    processes = {}
    if workers.count:  # the dataset and collate_fn go to them pickled
        processes = {
            "num_workers": workers.count,
            "multiprocessing_context": START_METHOD,
            "worker_init_fn": _leave_stop_signals_to_training,
        }
    return DataLoader(
        _Rows(dataset, packs),
        sampler=sampler,
        batch_size=None,
        collate_fn=collate_fn,
        pin_memory=workers.pin_memory,
        **processes,
    )


def build_eval_loader(
    dataset,
    batch: BatchConfig,
    *,
    micro_batch: int,
    pad_token_id: int,
    rank: int,
    world_size: int,
    on_gpu: bool,
) -> DataLoader:
    """Every eval row on exactly one rank (rank r takes rows r, r+W, ...): no padded duplicates.

    Rows go in length order (order does not change an evaluation), so batches carry little
    padding. The loss covers the tokens training's loss covers (`batch.loss_on`). `on_gpu`:
    widths rounded to a GPU's `pad_multiple`, as training's, and batches in pinned memory.
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
        pin_memory=on_gpu,
    )
