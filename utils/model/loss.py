"""A causal LM's summed next-token loss on a batch: the one definition training, evaluation,
verification and prompt_eval's perplexity all use, so their numbers agree.

Sums are always reduced in fp32: an fp16 sum overflows past 65,504 nats (16x512 tokens at
loss 8) and a bf16 sum rounds every addition (biasing loss and perplexity low).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.data.collate import MODEL_INPUTS
from utils.data.common import IGNORE_INDEX


def token_nll(logits: torch.Tensor, labels: torch.Tensor, fp32: bool) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over non-ignored labels (fp32), and their count.

    logits: [B, T, V]; labels: [B, T] (IGNORE_INDEX where no loss applies). `fp32` upcasts
    the logits before the softmax (--compute_fp32_loss); the sum is fp32 either way.
    """
    shifted_logits = logits[:, :-1, :]
    shifted_labels = labels[:, 1:]
    if fp32:
        shifted_logits = shifted_logits.float()
    per_token = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return per_token.float().sum(), int((shifted_labels != IGNORE_INDEX).sum())


def model_nll(model, batch: dict[str, torch.Tensor], fp32: bool) -> tuple[torch.Tensor, int]:
    """Run `model` (a causal LM or the DeepSpeed engine around one) on `batch`; its token_nll."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    logits = model(**inputs, use_cache=False).logits
    return token_nll(logits, batch["labels"], fp32)
