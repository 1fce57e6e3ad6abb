"""The training loss of a micro-batch, weighted so an optimizer step averages what it should.

"token" (default, as TRL, OpenRLHF and torchtune): the step's loss is the mean NLL over
every trained token of all its micro-batches on all ranks, so a long example weighs the
same whether its micro-batch was long or short. "micro_batch" (DeepSpeed-Chat): the mean
of per-micro-batch means. Losses are passed to `engine.backward(..., scale_wrt_gas=False)`:
the division over the accumulation window happens here, not in DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice

import torch

from utils.data.common import IGNORE_INDEX
from utils.distributed import all_reduce_sum


@dataclass
class Window:
    """The micro-batches of one optimizer step on this rank."""

    batches: list[dict[str, torch.Tensor]]
    tokens: int  # trained tokens of the whole step: all micro-batches, all ranks


def trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss (labels are shifted by one inside the loss)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def accumulation_windows(
    loader: Iterable[dict[str, torch.Tensor]],
    accumulation: int,
    device: torch.device,
    carry: list[dict[str, torch.Tensor]],
) -> Iterator[Window]:
    """Group the loader's micro-batches into optimizer steps and count each step's tokens.

    Looks ahead over the window (batches stay on the host) so the token count of the
    whole step, summed over ranks, is known before its first backward. Every rank has the
    same number of micro-batches, so windows line up across ranks. An epoch's last few
    micro-batches (fewer than `accumulation`) wait in `carry` and open the next epoch's
    first window: DeepSpeed counts accumulation across epoch ends, and no step happens
    in between, so training them then gives the same step. After the last epoch they
    are never trained (DeepSpeed would never step them either).
    """
    batches = chain(list(carry), loader)
    carry.clear()
    while window := list(islice(batches, accumulation)):
        if len(window) < accumulation:
            carry.extend(window)
            return
        local = sum(trained_tokens(b) for b in window)
        (total,) = all_reduce_sum([local], device)
        yield Window(window, int(total))


def micro_batch_loss(
    nll_sum: torch.Tensor, count: int, window: Window, averaging: str, world_size: int
) -> torch.Tensor:
    """What to backpropagate for one micro-batch of `window` (summed NLL over `count` tokens)."""
    if averaging == "micro_batch":
        return nll_sum / max(count, 1) / len(window.batches)
    # DeepSpeed averages gradients over ranks; the world_size factor undoes that, so the
    # step's gradient is that of (NLL summed over all micro-batches and ranks) / tokens.
    return nll_sum * world_size / max(window.tokens, 1)
