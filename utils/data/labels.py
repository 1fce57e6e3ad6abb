"""Which tokens of a row the loss covers (one rule for padded and packed batches)."""

from __future__ import annotations

from utils.data.common import IGNORE_INDEX
from utils.data.config import LOSS_ON


def build_labels(row: dict, loss_on: str) -> list[int]:
    """The row's labels: its ids for loss_on="all"; for "response", only the ids inside the
    row's `loss_spans` (the response, or every assistant turn of a chat-template row).

    Filler rows (a rank with nothing left to train) carry no loss at all.
    """
    if loss_on not in LOSS_ON:  # the caller decides; a typo must not train the wrong tokens
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    ids = list(row["input_ids"])
    if row.get("filler"):
        return [IGNORE_INDEX] * len(ids)
    if loss_on == "all":
        return ids
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in row["loss_spans"]:
        labels[start:end] = ids[start:end]
    return labels
