"""The memory of the output layer's logits and the loss, for the planner (--estimate_memory).

The plain loss holds [tokens, vocab] logits; the chunked loss (utils/model/chunked_loss.py)
one chunk of them, which is why it is on by default. Which one a run computes is decided
once, at start-up (utils/model/loss.py `decide_loss_path`); the planner sizes that one.
"""

from __future__ import annotations

from utils.model.chunk_size import default_chunk_tokens
from utils.planner.shape import ModelShape


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
