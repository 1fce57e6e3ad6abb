"""Rows to a padded batch: the model inputs, labels and the real length of every example.

Rows are {"input_ids", "loss_spans"} (the data layer's contract). Batches are dicts of
tensors: the model inputs (MODEL_INPUTS), `labels` (IGNORE_INDEX where no loss applies)
and `seq_lens` (the real length of every example, for the throughput log).
"""

from __future__ import annotations

import torch

from utils.arithmetic import round_up
from utils.data.common import IGNORE_INDEX
from utils.data.labels import build_labels

# What a batch passes to the model; the last four only under mask-free packing
# (utils/data/packing.py's collate_flat: per-example boundaries for FlashAttention-2).
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
)
PAD_MULTIPLE = 8  # widths a multiple of 8 suit tensor cores and keep kernel shapes few
# On a GPU every new width pays first-use costs (allocator growth, kernel selection, lazy
# kernel loading): the OPT-1.3B run's steps took 0.57 s at first and 0.2 s only after ~80
# steps. Rounding to 64 leaves 8 widths where 8 left 58, for 14% more padded positions
# (HH-RLHF, OPT tokenizer, micro-batch 8, seq 512: bench/pad_widths.py); a CPU, which
# pays for every padded position and little for a new width, keeps 8.
GPU_PAD_MULTIPLE = 64


def pad_multiple(on_gpu: bool) -> int:
    """The multiple batch widths are rounded up to, for the device the batches train on."""
    return GPU_PAD_MULTIPLE if on_gpu else PAD_MULTIPLE


def collate(
    rows: list[dict],
    *,
    pad_token_id: int,
    loss_on: str,
    pad_to: int | None = None,
    multiple: int = PAD_MULTIPLE,
) -> dict[str, torch.Tensor]:
    """Right-pad rows into a batch.

    Pads to `pad_to` when given (DeepSpeed-Chat's fixed length), else to the longest
    row rounded up to `multiple` (the loaders pass `pad_multiple(on_gpu)`). Pad positions
    are masked out of attention and loss.
    """
    longest = max(len(r["input_ids"]) for r in rows)
    width = pad_to or round_up(longest, multiple)
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
        "seq_lens": seq_lens(rows),
    }


def seq_lens(rows: list[dict]) -> torch.Tensor:
    """Real lengths of the batch's examples (filler rows are not examples)."""
    return torch.tensor(
        [len(r["input_ids"]) for r in rows if not r.get("filler")], dtype=torch.long
    )
