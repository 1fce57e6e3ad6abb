"""A causal LM's summed next-token loss on a batch: the one definition training, evaluation,
verification and prompt_eval's perplexity all use, so their numbers agree.

Two paths compute it. The plain one takes the model's `[batch, seq, vocab]` logits; the
chunked one (utils/model/chunked_loss.py) never holds more than a chunk of them. Which one a
run uses is decided once, at start-up (`decide_loss_path`), and carried by the loop.

Sums are always reduced in fp32: an fp16 sum overflows past 65,504 nats (16x512 tokens at
loss 8) and a bf16 sum rounds every addition (biasing loss and perplexity low).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.data.collate import MODEL_INPUTS
from utils.data.common import IGNORE_INDEX
from utils.errors import UserError
from utils.model.chunk_size import accelerator_memory, default_chunk_tokens
from utils.model.chunked_loss import (
    causal_lm,
    chunked_loss_mode,
    chunked_loss_problem,
    forward_chunked_nll,
    loss_positions,
)
from utils.model.kernels import loss_kernel


@dataclass(frozen=True)
class LossPath:
    """How a run computes its loss; decided once (`decide_loss_path`), never per step."""

    chunked: bool
    fp32: bool  # plain path: --compute_fp32_loss (the chunked path's softmax is always fp32)
    reason: str  # why this path: the run summary prints it
    chunk_tokens: int = 0
    mode: str = "fused"
    kernel: str = "torch"

    @property
    def kind(self) -> str:
        """ "plain", or the chunked loss's mode ("fused" or "recompute"): what the memory
        planner sizes."""
        return self.mode if self.chunked else "plain"

    def describe(self) -> str:
        if not self.chunked:
            return f"plain (full logits): {self.reason}"
        kernel = "Liger-Kernel" if self.kernel == "liger" else f"{self.chunk_tokens} tokens a chunk"
        return f"chunked ({self.mode}, {kernel}): {self.reason}"


PLAIN_FP32 = LossPath(chunked=False, fp32=True, reason="the reference loss")
# Why --compile rules the chunked loss out.
COMPILED = (
    "the chunked loss replaces the output layer's forward on every call, which a compiled "
    "graph cannot follow"
)


def decide_loss_path(
    setting: str,
    problem: str | None,
    *,
    zero_stage: int,
    device_type: str,
    fp32: bool,
    compiled: bool,
    vocab: int,
) -> LossPath:
    """The one rule for a run's loss, which validation, the run and the memory planner read:
    the chunked loss wherever it equals the model's own loss (`setting` "auto" or "on"),
    else the plain loss. A UserError where --chunked_loss on cannot hold.

    `problem`: why the chunked loss would differ from this model's plain loss (None: it
    would not); `zero_stage`: the merged DeepSpeed config's; `compiled`: --compile;
    `vocab`: the output layer's rows (used only on the chunked path).

    Measured on a CPU (bench/memory.py --chunked_loss): 4-5x lower peak memory at vocab 50k
    and 128k, and no slower, so "auto" means on wherever it is exact.
    """
    if setting == "off":
        return LossPath(chunked=False, fp32=fp32, reason="--chunked_loss off")
    if compiled:
        if setting == "on":
            raise UserError(
                f"--chunked_loss on and --compile exclude each other ({COMPILED}); drop one "
                "(--chunked_loss auto with --compile uses the plain loss)."
            )
        return LossPath(chunked=False, fp32=fp32, reason=f"--compile: {COMPILED}")
    if problem is not None:
        if setting == "on":
            raise UserError(
                f"--chunked_loss on cannot be used with this model: {problem}. Use "
                "--chunked_loss auto (the plain loss where the chunked one would differ)."
            )
        return LossPath(chunked=False, fp32=fp32, reason=f"fallback: {problem}")
    mode = chunked_loss_mode(zero_stage)
    kernel, no_liger = loss_kernel(device_type, mode)
    why = (
        "gradients computed in the forward pass"
        if mode == "fused"
        else "ZeRO-3: logits recomputed in the backward pass, no unpartitioned weight gradient"
    )
    if no_liger:
        why += f"; {no_liger}"
    return LossPath(
        chunked=True,
        fp32=True,
        reason=f"--chunked_loss {setting}; never holds [batch, seq, vocab] logits ({why})",
        chunk_tokens=default_chunk_tokens(vocab, accelerator_memory(device_type)),
        mode=mode,
        kernel=kernel,
    )


def choose_loss_path(
    model: torch.nn.Module,
    setting: str,
    *,
    zero_stage: int,
    device_type: str,
    fp32: bool,
    compiled: bool,
) -> LossPath:
    """`decide_loss_path` for a model already built, its output layer checked as it is (a
    run decides before its model loads, from the config: utils/cli/resolve.py)."""
    head = causal_lm(model).get_output_embeddings()
    return decide_loss_path(
        setting,
        chunked_loss_problem(model),
        zero_stage=zero_stage,
        device_type=device_type,
        fp32=fp32,
        compiled=compiled,
        vocab=getattr(head, "out_features", 0),  # read only where the head is a plain Linear
    )


def prepare_batch(batch: dict, path: LossPath, device: torch.device) -> dict:
    """The batch on `device`, with what `path` needs computed on the host first: the chunked
    loss's trained positions (an index computed on a GPU would cost a host sync per call).

    A copy to a GPU overlaps with its work only from pinned memory: from pageable memory
    `non_blocking` may block the host. What is not pinned yet (the positions made here; a
    whole batch when the loader does not pin) is pinned first."""
    if path.chunked:
        batch = {**batch, "loss_positions": loss_positions(batch["labels"])}
    pin = device.type == "cuda"
    return {k: _to_device(v, device, pin) for k, v in batch.items()}


def _to_device(value, device: torch.device, pin: bool):
    if not torch.is_tensor(value):  # FlashAttention-2's max lengths are plain ints
        return value
    if pin and not value.is_pinned():
        value = value.pin_memory()
    return value.to(device, non_blocking=True)


def summed_nll(model, batch: dict[str, torch.Tensor], path: LossPath) -> torch.Tensor:
    """Summed next-token NLL (fp32 scalar, left on the device) of `model` on a prepared batch.

    The token count is not computed here: callers take it from the host-side labels
    (`count_trained`), so no call waits for the device.
    """
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if path.chunked:
        nll, _ = forward_chunked_nll(
            model,
            inputs,
            batch["labels"],
            path.chunk_tokens,
            path.mode,
            path.kernel,
            positions=batch.get("loss_positions"),
        )
        return nll
    logits = model(**inputs, use_cache=False).logits
    return plain_nll(logits, batch["labels"], path.fp32)


def count_trained(labels: torch.Tensor) -> int:
    """Tokens that carry a loss (labels are shifted by one inside the loss); host labels."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def plain_nll(logits: torch.Tensor, labels: torch.Tensor, fp32: bool) -> torch.Tensor:
    """Summed next-token NLL (fp32) over non-ignored labels, from the full logits.

    logits: [B, T, V]; labels: [B, T] (IGNORE_INDEX where no loss applies). The labels are
    shifted (position t predicts label t+1; the last position predicts nothing), not the
    logits: slicing `logits[:, :-1]` would make the reshape copy the whole [B, T, V] tensor,
    and its backward another. `fp32` upcasts the logits before the softmax
    (--compute_fp32_loss); the sum is fp32 either way.
    """
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, T]
    if fp32:
        logits = logits.float()
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),  # a view: [B*T, V]
        shifted.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return per_token.float().sum()


def token_nll(logits: torch.Tensor, labels: torch.Tensor, fp32: bool) -> tuple[torch.Tensor, int]:
    """`plain_nll` and the number of tokens it covers (the count reads the labels: where
    they live on a GPU, that is a host sync)."""
    return plain_nll(logits, labels, fp32), count_trained(labels)


def model_nll(model, batch: dict[str, torch.Tensor], fp32: bool) -> tuple[torch.Tensor, int]:
    """Run `model` (a causal LM or the DeepSpeed engine around one) on `batch`; its token_nll
    through the full logits (the reference the chunked loss is tested against)."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    logits = model(**inputs, use_cache=False).logits
    return token_nll(logits, batch["labels"], fp32)
