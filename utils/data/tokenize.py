"""Tokenise (prompt, response) rows into {"input_ids", "loss_spans"} with batched datasets.map.

This is DeepSpeed-Chat's format (--chat_template dschat); utils/data/chat_rows.py writes
the same columns for rows rendered through a chat template.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

from datasets import Dataset, Features, List, Value
from transformers import PreTrainedTokenizerBase

# Below this many rows, worker start-up and pickling the tokenizer cost more than they save.
PARALLEL_MIN_ROWS = 50_000
# Extra column dropped before the result is returned; it feeds the per-source statistics.
TRUNCATED = "truncated"
FEATURES = Features(
    {
        "input_ids": List(Value("int32")),
        "loss_spans": List(List(Value("int32"))),  # [[start, end], ...]: what trains
        TRUNCATED: Value("bool"),
    }
)


def tokenize_rows(
    rows: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    eot_token: str,
    cache_file: str,
    num_proc: int = 0,
) -> Dataset:
    """input_ids = tokenizer(prompt) + tokenizer(response + eot, no specials), cut at max_seq_len.

    loss_spans holds one span, the response: from the end of the prompt (clipped to the
    row length) to the end of the row; none when truncation left no response token.
    """

    def tokenize_batch(batch: dict[str, list[str]]) -> dict[str, list]:
        prompts = tokenizer(batch["prompt"], return_attention_mask=False)["input_ids"]
        responses = tokenizer(
            [r + eot_token for r in batch["response"]],
            add_special_tokens=False,
            return_attention_mask=False,
        )["input_ids"]
        ids = [p + r for p, r in zip(prompts, responses, strict=True)]
        kept = [x[:max_seq_len] for x in ids]
        return {
            "input_ids": kept,
            "loss_spans": [
                response_span(len(p), len(x)) for p, x in zip(prompts, kept, strict=True)
            ],
            TRUNCATED: [len(x) > max_seq_len for x in ids],
        }

    return map_batches(rows, tokenize_batch, FEATURES, cache_file, num_proc, "Tokenising")


def map_batches(
    rows: Dataset,
    tokenize_batch: Callable[[dict[str, list]], dict[str, list]],
    features: Features,
    cache_file: str,
    num_proc: int,
    desc: str,
) -> Dataset:
    """`rows` replaced by `tokenize_batch`'s columns, written to `cache_file` (never reused:
    the data cache above decides what is rebuilt)."""
    if len(rows) == 0:  # map() on no rows cannot infer the new columns
        return Dataset.from_dict({name: [] for name in features}, features=features)
    return rows.map(
        tokenize_batch,
        batched=True,
        remove_columns=rows.column_names,
        features=features,
        num_proc=pick_num_proc(len(rows), num_proc),
        cache_file_name=cache_file,
        load_from_cache_file=False,
        desc=desc,
    )


def response_span(prompt_len: int, row_len: int) -> list[list[int]]:
    """[[prompt_len, row_len]], or [] when the prompt fills the (truncated) row."""
    return [[prompt_len, row_len]] if prompt_len < row_len else []


def pick_num_proc(rows: int, requested: int) -> int | None:
    """`requested` if set (> 0), else several processes only for data large enough to pay."""
    if requested > 0:
        return requested if requested > 1 else None
    workers = min(os.cpu_count() or 1, 8, rows // PARALLEL_MIN_ROWS)
    return workers if workers > 1 else None


def fingerprint_tokenizer(tokenizer: PreTrainedTokenizerBase) -> str:
    """Identity of everything that decides the ids: vocabulary, merges, special tokens, template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()
