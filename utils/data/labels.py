"""Which tokens of a row the loss covers (one rule for padded and packed batches)."""

from __future__ import annotations

import pyarrow.compute as pc
from datasets import Dataset

from utils.data.common import IGNORE_INDEX, DataError, SFTData
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


def trained_tokens(rows: Dataset, loss_on: str) -> int:
    """Tokens the loss covers in `rows`: build_labels' labels after the next-token shift
    (the first id of a row is never predicted), so a row of n ids trains n - 1 of them,
    or its loss spans' tokens with loss_on="response" (less one if a span starts at 0)."""
    if len(rows) == 0:
        return 0
    column = "input_ids" if loss_on == "all" else "loss_spans"
    table = rows.select_columns([column]).with_format("arrow")[:]  # honours a .select()
    if loss_on == "all":
        lengths = pc.list_value_length(table.column(column)).to_numpy()
        return int((lengths - 1).clip(min=0).sum())
    bounds = pc.list_flatten(pc.list_flatten(table.column(column))).to_numpy()
    starts, ends = bounds[0::2], bounds[1::2]  # [start, end, start, end, ...]
    return int((ends - starts).sum() - (starts[ends > starts] == 0).sum())


def check_trained_tokens(data: SFTData, loss_on: str, max_seq_len: int) -> None:
    """Refuse data that gives the loss nothing: training would "succeed" on zero tokens
    and evaluation report perplexity 1.0. With --loss_on response this is what happens
    when the prompts alone fill --max_seq_len and every response is cut away."""
    for rows, what in ((data.train, "training"), (data.eval, "eval")):
        if len(rows) and trained_tokens(rows, loss_on) == 0:
            if loss_on == "response":
                why = (
                    f"with --loss_on response only response tokens count, and the prompts "
                    f"alone fill --max_seq_len {max_seq_len}, so every response is cut away. "
                    "Raise --max_seq_len (or use --loss_on all)"
                )
            else:
                why = f"every row is one token long. Raise --max_seq_len {max_seq_len}"
            raise DataError(f"the {len(rows):,} {what} rows give the loss no token: {why}")
