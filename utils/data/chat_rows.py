"""Rows through a chat template (--chat_template): raw row -> conversation -> ids and spans.

The same columns as the DeepSpeed-Chat path (utils/data/tokenize.py), so collate, packing,
the sampler, evaluation and the summary treat both alike; `loss_spans` here holds every
assistant turn. A row that cannot be a conversation, or that the template cannot split,
is not tokenised: its SKIP column names the reason (one of a fixed set of categories,
counted per source) and SKIP_DETAIL the specifics, and build.py drops it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow.compute as pc
from datasets import Dataset, Features, Value
from transformers import PreTrainedTokenizerBase

from utils.data.chat import ChatTemplate, tokenize_conversation
from utils.data.common import SourceStats
from utils.data.conversation import Message, Skip, from_prompt_response, is_text, to_conversation
from utils.data.formats import Formatter
from utils.data.tokenize import FEATURES, TRUNCATED, map_batches

SKIP, SKIP_DETAIL = "skip", "skip_detail"
CHAT_FEATURES = Features({**FEATURES, SKIP: Value("string"), SKIP_DETAIL: Value("string")})
Reader = Callable[[dict[str, Any]], list[Message] | Skip]


def conversation_reader(catalogue_format: Formatter | None, system_prompt: str | None) -> Reader:
    """How a source's rows become conversations.

    Local files (no catalogue entry) are read by their columns, all turns kept. A catalogue
    data set's formatter gives DeepSpeed-Chat's (" Human: q Assistant:", " a"); its
    scaffolding is taken off again, so the template alone frames the turns.
    """
    if catalogue_format is None:
        return lambda row: to_conversation(row, system_prompt)

    def read(row: dict[str, Any]) -> list[Message] | Skip:
        example = catalogue_format(row)
        if example is None:
            return Skip("missing prompt or response", "the data set's prompt or answer is empty")
        system = row.get("system") if is_text(row.get("system")) else system_prompt
        return from_prompt_response(example.prompt, example.response, system)

    return read


def tokenize_chat_rows(
    rows: Dataset,
    read: Reader,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    max_seq_len: int,
    cache_file: str,
    num_proc: int = 0,
) -> Dataset:
    """Every row rendered through `template`: input_ids, loss_spans, truncated, skip columns."""

    def tokenize_batch(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in CHAT_FEATURES}
        for values in zip(*batch.values(), strict=True):
            found = read(dict(zip(batch, values, strict=True)))
            if not isinstance(found, Skip):
                found = tokenize_conversation(found, tokenizer, template, max_seq_len)
            skipped = isinstance(found, Skip)
            out["input_ids"].append([] if skipped else found.input_ids)
            out["loss_spans"].append([] if skipped else [list(s) for s in found.spans])
            out[TRUNCATED].append(not skipped and found.truncated)
            out[SKIP].append(found.reason if skipped else "")
            out[SKIP_DETAIL].append(found.detail if skipped else "")
        return out

    return map_batches(
        rows, tokenize_batch, CHAT_FEATURES, cache_file, num_proc, "Rendering conversations"
    )


def drop_skipped(rows: Dataset, stat: SourceStats) -> Dataset:
    """The rows that were tokenised; the others counted in `stat` by reason (first detail kept)."""
    reasons = rows.data.column(SKIP)
    skipped = pc.not_equal(reasons, "")
    if pc.any(skipped).as_py():
        table = rows.data.filter(skipped).select([SKIP, SKIP_DETAIL]).to_pylist()
        for reason in dict.fromkeys(r[SKIP] for r in table):
            mine = [r[SKIP_DETAIL] for r in table if r[SKIP] == reason]
            stat.add_skips(reason, len(mine), mine[0])
    kept = pc.indices_nonzero(pc.invert(skipped)).to_pylist()
    return rows.select(kept).remove_columns([SKIP, SKIP_DETAIL])
