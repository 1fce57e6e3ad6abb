"""Settings of what a run shows: printed losses, TensorBoard, the MFU's peak.

Each field is also the command-line flag of the same name (see utils/flags.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from utils.flags import flag


@dataclass(kw_only=True)
class ObserveConfig:
    print_loss: bool = flag(False, "Print the loss of every step.")
    enable_tensorboard: bool = flag(False, "Write TensorBoard scalars.")
    tensorboard_path: str = flag("step1_tensorboard", "Where TensorBoard scalars go.")
    peak_tflops: float | None = flag(
        None,
        "Peak TFLOP/s of one accelerator, for the MFU in the throughput log "
        "(default: looked up for known GPUs).",
    )
