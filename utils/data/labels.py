"""Which tokens of a row the loss covers (one rule for padded and packed batches)."""

from __future__ import annotations

from utils.data.common import IGNORE_INDEX


def build_labels(row: dict, loss_on: str) -> list[int]:
    """The row's labels: its ids, with the prompt masked for loss_on="response".

    Filler rows (a rank with nothing left to train) carry no loss at all.
    """
    ids = list(row["input_ids"])
    if row.get("filler"):
        return [IGNORE_INDEX] * len(ids)
    if loss_on == "response":
        masked = min(row["prompt_len"], len(ids))
        ids[:masked] = [IGNORE_INDEX] * masked
    return ids
