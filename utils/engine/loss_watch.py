"""A NaN or inf training loss stops the run, naming the step, without a host sync per step.

In fp32 and bf16 nothing else stops it: there is no loss scale, so DeepSpeed does not scan the
gradients for inf/NaN (bf16's check is off: utils/engine/ds_config.py), and one non-finite
loss turns every weight into NaN; the run would then train nothing for hours and save a
broken model. fp16 keeps DeepSpeed's loss scaler, which skips such a step instead (the
monitor reports skipped steps), so the watch leaves fp16 runs alone.

`see` runs after every step: two tiny device operations that remember the first bad step.
`check` reads that on the host, so it runs only where the loop already waits: on logged
steps, before a checkpoint is written and at the end of an epoch.
"""

from __future__ import annotations

import torch

from utils.distributed import all_reduce_max
from utils.errors import UserError

NONE = -(2**62)  # no step seen: the all-reduce's identity for "earliest step" (negated)


class NonFiniteLoss(UserError):
    """The training loss became NaN or inf: the weights are no longer usable."""


class LossWatch:
    """Remembers, on the device, the first step whose loss was NaN or inf."""

    def __init__(self) -> None:
        self.first_bad: torch.Tensor | None = None  # int64 scalar; -1 until a bad step

    def see(self, step: int, step_nll: torch.Tensor) -> None:
        """Note step `step`'s loss (a device scalar); no host sync."""
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.int64, device=step_nll.device)
        bad = ~torch.isfinite(step_nll) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, step, self.first_bad)

    def check(self, device: torch.device) -> None:
        """Raise NonFiniteLoss if any rank saw a bad step (a collective: all ranks call it)."""
        first = -1 if self.first_bad is None else int(self.first_bad)
        earliest = -all_reduce_max(-first if first >= 0 else NONE, device)
        if earliest == -NONE:
            return
        raise NonFiniteLoss(
            f"the training loss became NaN or inf at optimizer step {earliest}, so the weights "
            "are no longer usable and the run stops (nothing after that step is saved). Try a "
            "lower --learning_rate or more --num_warmup_steps, and look for broken rows in the "
            "data; --print_loss shows the loss of every step."
        )
