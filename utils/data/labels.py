"""Which tokens of a row the loss covers (one rule for padded and packed batches)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

from utils.data.common import IGNORE_INDEX, DataError, SFTData


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


def trained_tokens(rows: Dataset, loss_on: str) -> int:
    """Tokens the loss covers in `rows`: build_labels' labels after the next-token shift
    (the first id of a row is never predicted), so a row of n ids trains n - 1 of them,
    or n - prompt_len with loss_on="response"."""
    if len(rows) == 0:
        return 0
    table = rows.select_columns(["input_ids", "prompt_len"]).with_format("arrow")[:]
    first = pa.scalar(1, pa.int32())
    if loss_on == "response":
        first = pc.max_element_wise(table.column("prompt_len"), first)
    per_row = pc.subtract(pc.list_value_length(table.column("input_ids")), first)
    return int(pc.sum(pc.max_element_wise(per_row, pa.scalar(0, pa.int32()))).as_py() or 0)


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
