"""The memory of the output layer's logits and the loss, for the planner (--estimate_memory).

The plain loss holds [tokens, vocab] logits; the chunked loss (utils/model/chunked_loss.py)
one chunk of them, which is why it is on by default (`planned_loss_mode` mirrors main.py's
choice from the flags and the model's config).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from utils.config import Config
from utils.model.chunk_size import default_chunk_tokens
from utils.model.chunked_loss import chunked_loss_mode

if TYPE_CHECKING:  # estimate.py imports this module
    from utils.planner.estimate import ModelShape


def estimate_loss_memory(
    shape: ModelShape, tokens: int, dtype: str, loss_mode: str, gpu_memory: int
) -> int:
    """Bytes of the output layer's logits and the loss's buffers on one GPU of `gpu_memory`
    bytes (--gpu_memory_gb: the chunk size follows the GPU's memory).

    Plain: the whole [tokens, vocab] logits at 10 bytes per entry (16-bit logits, fp32
    upcast and log-softmax; 8 in fp32). Chunked (utils/model/chunked_loss.py): one chunk
    of them, plus in "fused" mode the output layer's weight gradient, computed in the
    forward pass and held until the backward.
    """
    per_logit = 8 if dtype == "fp32" else 10
    if loss_mode == "plain":
        return tokens * shape.vocab * per_logit
    chunk = min(tokens, default_chunk_tokens(shape.vocab, gpu_memory))
    held = shape.vocab * shape.hidden * (4 if dtype == "fp32" else 2) if loss_mode == "fused" else 0
    return chunk * shape.vocab * per_logit + held


def planned_loss_mode(shape: ModelShape, cfg: Config, zero_stage: int) -> str:
    """The loss main.py would use: "plain", or the chunked loss's "fused"/"recompute"."""
    model = cfg.model
    if model.chunked_loss == "off" or model.compile or not shape.chunked_loss_exact:
        return "plain"
    return chunked_loss_mode(zero_stage)
