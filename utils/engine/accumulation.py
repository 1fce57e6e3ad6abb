"""How micro-batches become optimizer steps, and what each micro-batch's loss weighs.

An epoch's micro-batches are grouped into windows of --gradient_accumulation_steps; each
window is one optimizer step, and the epoch's last window may be shorter (it still steps:
a run never drops its last micro-batches, and an epoch ends on a step, so every
epoch-end checkpoint is clean).

Loss weighting, "token" (default, as TRL, OpenRLHF and torchtune): the step's loss is the
mean NLL over every trained token of all its micro-batches on all ranks, so a long example
weighs the same whether its micro-batch was long or short, and a short window is weighted
by what it holds. "micro_batch" (DeepSpeed-Chat): the mean of per-micro-batch means.
Losses are passed to `engine.backward(..., scale_wrt_gas=False)`: the division over the
window happens here, not in DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import torch

from utils.arithmetic import ceil_div
from utils.checkpoint.preemption import local_stop_request
from utils.distributed import all_reduce_sum
from utils.model.loss import count_trained


@dataclass(frozen=True)
class StepPlan:
    """The run's optimizer steps, from the loader's real micro-batch count (packs, not rows)."""

    micro_batches_per_epoch: int
    accumulation: int
    epochs: int
    max_steps: int | None = None

    @property
    def steps_per_epoch(self) -> int:
        return ceil_div(self.micro_batches_per_epoch, self.accumulation)

    @property
    def uncapped_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return min(self.uncapped_steps, self.max_steps or self.uncapped_steps)


@dataclass
class Window:
    """The micro-batches of one optimizer step on this rank."""

    batches: list[dict[str, torch.Tensor]]
    tokens: int  # trained tokens of the whole step: all micro-batches, all ranks
    counts: list[int]  # trained tokens of each of this rank's micro-batches
    stop: str | None = None  # a stop signal any rank received before this window (by name)


def accumulation_windows(
    loader: Iterable[dict[str, torch.Tensor]], accumulation: int, device: torch.device
) -> Iterator[Window]:
    """Group the loader's micro-batches into optimizer steps and count each step's tokens.

    Looks ahead over the window (batches stay on the host) so the token count of the
    whole step, summed over ranks, is known before its first backward. Every rank has
    the same number of micro-batches, so windows (the last, short one too) line up
    across ranks. Counted from the host-side labels: the loss never has to read a count
    back from the device. The same all-reduce carries the ranks' stop signals
    (utils/checkpoint/preemption.py): one collective per step, where two were.
    """
    batches = iter(loader)
    while window := list(islice(batches, accumulation)):
        counts = [count_trained(b["labels"]) for b in window]
        signal = local_stop_request()
        total, stops = all_reduce_sum([sum(counts), 1 if signal else 0], device)
        stop = signal or ("a signal on another rank" if stops else None)
        yield Window(window, int(total), counts, stop)


def micro_batch_loss(
    nll_sum: torch.Tensor, count: int, window: Window, averaging: str, world_size: int
) -> torch.Tensor:
    """What to backpropagate for one micro-batch of `window` (summed NLL over `count` tokens)."""
    if averaging == "micro_batch":
        return nll_sum / max(count, 1) / len(window.batches)
    # DeepSpeed averages gradients over ranks; the world_size factor undoes that, so the
    # step's gradient is that of (NLL summed over all micro-batches and ranks) / tokens.
    return nll_sum * world_size / max(window.tokens, 1)
