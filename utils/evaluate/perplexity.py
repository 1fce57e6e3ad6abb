"""Perplexity of a causal LM on tokenised SFT rows ({"input_ids", "prompt_len"}).

Token-weighted: the exponential of the mean next-token loss over every non-pad
token of every row (prompt and response, as main.py's evaluation scores them), so
a long row counts for what it holds rather than one row one vote.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from utils.config import DataConfig
from utils.data.build import build_sft_data
from utils.data.loaders import collate
from utils.engine.loop import token_nll
from utils.errors import UserError


def load_eval_rows(cfg: DataConfig, tokenizer, max_rows: int | None) -> list[dict]:
    """The first `max_rows` (default all) eval rows of `cfg`, tokenised by the data layer."""
    rows = build_sft_data(cfg, tokenizer).eval
    if max_rows is not None:
        rows = rows.select(range(min(max_rows, len(rows))))
    return list(rows)


def compute_perplexity(
    model: PreTrainedModel, rows: Sequence[dict], pad_token_id: int, batch_size: int = 8
) -> float:
    """exp(mean next-token loss over every non-pad token of `rows`), as main.py's evaluation.

    The batches and the loss are main.py's own (collate, token_nll), so the number
    matches the perplexity training reports on the same rows.
    """
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate(list(rows[start : start + batch_size]), pad_token_id)
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"].to(model.device),
                attention_mask=batch["attention_mask"].to(model.device),
                use_cache=False,
            ).logits
        nll, tokens = token_nll(logits, batch["labels"].to(model.device), fp32=True)
        total_nll += nll.item()
        total_tokens += tokens
    if total_tokens == 0:
        raise UserError("the evaluation rows hold no tokens to score; check --eval_data_path")
    return math.exp(total_nll / total_tokens)
