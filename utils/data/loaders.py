"""From tokenised rows to batches: labels, padding, packing and the data loaders.

Rows are {"input_ids", "prompt_len"} (the data layer's contract). Batches are dicts of
tensors: the model inputs (MODEL_INPUTS), `labels` (IGNORE_INDEX where no loss applies)
and `seq_lens` (the real length of every example in the batch, for the throughput log).
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.data import DataLoader

from utils.config import BatchConfig
from utils.data.common import IGNORE_INDEX
from utils.data.labels import build_labels
from utils.data.packing import collate_packed, pack_rows
from utils.data.sampler import FILLER, LengthGroupedSampler

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# Packed rows' attention masks are additive, in the dtype the model computes in.
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def collate(
    rows: list[dict],
    pad_token_id: int,
    pad_to: int | None = None,
    multiple_of: int = 8,
    loss_on: str = "all",
) -> dict[str, torch.Tensor]:
    """Right-pad rows into a batch.

    Pads to `pad_to` when given (DeepSpeed-Chat's fixed length), else to the longest
    row rounded up to `multiple_of`. Pad positions are masked out of attention and loss.
    """
    longest = max(len(r["input_ids"]) for r in rows)
    width = pad_to or -(-longest // multiple_of) * multiple_of
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        ids = row["input_ids"][:width]
        input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.as_tensor(build_labels(row, loss_on)[:width])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "seq_lens": _seq_lens(rows),
    }


def _seq_lens(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([len(r["input_ids"]) for r in rows if not r.get("filler")])


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
            {"input_ids": ids, "prompt_len": p}
            for ids, p in zip(columns["input_ids"], columns["prompt_len"], strict=True)
        ]


def row_lengths(dataset) -> list[int]:
    return [len(ids) for ids in dataset["input_ids"]]


def build_train_loader(
    dataset,
    batch_cfg: BatchConfig,
    batch_size: int,
    max_seq_len: int,
    pad_token_id: int,
    seed: int,
    rank: int,
    world_size: int,
    compute_dtype: str = "fp32",
) -> DataLoader:
    """Micro-batches for this rank; `loader.sampler.set_epoch(e)` gives a new order per epoch.

    Default: length-grouped batches padded to their longest example. `pad_to_max_len`:
    random batches padded to max_seq_len. `packing`: rows of several examples, packed once
    (best fit), in a new random order every epoch. `len(loader.sampler.lengths)` is the
    number of items (rows or packs) an epoch trains.
    """
    lengths = row_lengths(dataset)
    packs = None
    if batch_cfg.packing:
        packs = pack_rows(lengths, max_seq_len)
        lengths = [sum(lengths[i] for i in pack) for pack in packs]
        collate_fn = partial(
            collate_packed,
            pad_token_id=pad_token_id,
            loss_on=batch_cfg.loss_on,
            mask_dtype=TORCH_DTYPES[compute_dtype],
        )
    else:
        pad_to = max_seq_len if batch_cfg.pad_to_max_len else None
        collate_fn = partial(
            collate, pad_token_id=pad_token_id, pad_to=pad_to, loss_on=batch_cfg.loss_on
        )
    sampler = LengthGroupedSampler(
        lengths,
        batch_size,
        rank,
        world_size,
        seed,
        group_by_length=not batch_cfg.pad_to_max_len,
    )
    # batch_size=None: the sampler yields whole index lists, fetched in one read each.
    return DataLoader(
        _Rows(dataset, packs), sampler=sampler, batch_size=None, collate_fn=collate_fn
    )


def build_eval_loader(
    dataset, batch_size: int, pad_token_id: int, rank: int, world_size: int, loss_on: str = "all"
) -> DataLoader:
    """Every eval row on exactly one rank (rank r takes rows r, r+W, ...): no padded duplicates.

    Rows go in length order (order does not change an evaluation), so batches carry little padding.
    """
    shard = list(range(rank, len(dataset), world_size))
    lengths = row_lengths(dataset)
    shard.sort(key=lambda i: lengths[i])
    batches = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
    return DataLoader(
        _Rows(dataset),
        sampler=batches,
        batch_size=None,
        collate_fn=partial(collate, pad_token_id=pad_token_id, loss_on=loss_on),
    )
