"""From tokenised rows to padded batches: collation and data loaders."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utils.data import IGNORE_INDEX


def collate(
    rows: list[dict], pad_token_id: int, pad_to: int | None = None, multiple_of: int = 8
) -> dict[str, torch.Tensor]:
    """Right-pad rows of {"input_ids", "prompt_len"} into a batch.

    Pads to `pad_to` when given (DeepSpeed-Chat's fixed length), else to the longest
    row rounded up to `multiple_of`. Labels are the input ids with padding set to
    IGNORE_INDEX, so pad positions never enter the loss (the model shifts labels itself).
    """
    longest = max(len(r["input_ids"]) for r in rows)
    width = pad_to or -(-longest // multiple_of) * multiple_of
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids = row["input_ids"][:width]
        input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def build_train_loader(
    dataset: Dataset, batch_size: int, pad_token_id: int, seed: int, rank: int, world_size: int
) -> DataLoader:
    """Shuffled, sharded across ranks; call `loader.sampler.set_epoch(e)` for a new order per epoch."""
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=lambda rows: collate(rows, pad_token_id),
    )


def build_eval_loader(
    dataset: Dataset, batch_size: int, pad_token_id: int, rank: int, world_size: int
) -> DataLoader:
    """Every eval row on exactly one rank (rank r takes rows r, r+W, ...): no padded duplicates."""
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(
        shard, batch_size=batch_size, collate_fn=lambda rows: collate(rows, pad_token_id)
    )
