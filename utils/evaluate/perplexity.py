"""Perplexity of a causal LM on tokenised SFT rows ({"input_ids", "loss_spans"}).

Token-weighted: the exponential of the mean next-token loss over the tokens the loss
covers (--loss_on: every non-pad token, or only the responses), computed by the same
collate and loss as main.py's evaluation, so the two report the same number on the same
rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from utils.data.build import build_sft_data
from utils.data.chat import ChatTemplate
from utils.data.collate import collate
from utils.data.config import DataConfig
from utils.errors import UserError
from utils.model.loss import model_nll


def load_eval_rows(
    cfg: DataConfig, tokenizer, template: ChatTemplate | None, max_rows: int | None
) -> list[dict]:
    """The first `max_rows` (default all) eval rows of `cfg`, tokenised by the data layer
    (through `template`, the chat template as loaded; None: DeepSpeed-Chat's format)."""
    rows = build_sft_data(cfg, tokenizer, template).eval
    if max_rows is not None:
        rows = rows.select(range(min(max_rows, len(rows))))
    return list(rows)


def compute_perplexity(
    model: PreTrainedModel, rows: Sequence[dict], pad_token_id: int, loss_on: str, batch_size: int
) -> float:
    """exp(mean next-token loss over the `loss_on` tokens of `rows`), as main.py's evaluation."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate(
            list(rows[start : start + batch_size]), pad_token_id=pad_token_id, loss_on=loss_on
        )
        with torch.no_grad():
            nll, tokens = model_nll(
                model, {k: v.to(model.device) for k, v in batch.items()}, fp32=True
            )
        total_nll += nll.item()
        total_tokens += tokens
    if total_tokens == 0:
        raise UserError("the evaluation rows hold no tokens to score; check --eval_data_path")
    return math.exp(total_nll / total_tokens)
