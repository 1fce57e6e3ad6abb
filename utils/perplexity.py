"""Perplexity of a causal LM on tokenised SFT rows ({"input_ids", "prompt_len"}).

Token-weighted: the exponential of the mean loss over every response token of
every row (the tokens SFT trains on), so long answers count for what they hold
rather than one row one vote.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from utils.errors import UserError


def load_eval_rows(
    data_path: list[str],
    tokenizer,
    max_seq_len: int,
    eot_token: str,
    cache_dir: str,
    max_rows: int | None,
    seed: int,
) -> list[dict]:
    """The evaluation rows of --eval_data_path, tokenised with `tokenizer` by the data layer.

    With training's --seed and --max_seq_len these are the rows training held out.
    """
    # Imported here so that prompt_eval without --eval_data_path never loads `datasets`.
    from utils.config import DataConfig
    from utils.data import build_sft_data

    cfg = DataConfig(
        data_path=list(data_path),
        data_split="10,0,0",
        data_output_path=cache_dir,
        max_seq_len=max_seq_len,
        eot_token=eot_token,
        seed=seed,
    )
    rows = build_sft_data(cfg, tokenizer).eval
    if max_rows is not None:
        rows = rows.select(range(min(max_rows, len(rows))))
    if len(rows) == 0:
        raise UserError(
            f"--eval_data_path {' '.join(data_path)}: no evaluation rows; "
            "use a data set with an evaluation split"
        )
    return list(rows)


def compute_perplexity(model: PreTrainedModel, rows: Sequence[dict], batch_size: int = 8) -> float:
    """exp(mean next-token loss over the response tokens of `rows`)."""
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        input_ids, labels, attention_mask = _collate(rows[start : start + batch_size])
        with torch.no_grad():
            logits = model(
                input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)
            ).logits
        # Position t predicts token t + 1: drop the last logit and the first label.
        loss = F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1),
            labels[:, 1:].to(model.device).flatten(),
            ignore_index=-100,
            reduction="sum",
        )
        total_loss += loss.item()
        total_tokens += int((labels[:, 1:] != -100).sum())
    if total_tokens == 0:
        raise UserError(
            "the evaluation rows have no response tokens (every prompt fills --max_seq_len); "
            "raise --max_seq_len"
        )
    return math.exp(total_loss / total_tokens)


def _collate(rows: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (batch, longest) ids, labels (-100 on prompt and padding) and mask.

    Padding is found by length, not by id: a tokenizer whose pad id is also its
    end-of-text id must still score the end of each answer.
    """
    longest = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.zeros(len(rows), longest, dtype=torch.long)
    labels = torch.full((len(rows), longest), -100, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        ids = torch.tensor(row["input_ids"], dtype=torch.long)
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
        labels[i, row["prompt_len"] : len(ids)] = ids[row["prompt_len"] :]
    return input_ids, labels, attention_mask
