"""Honest training speed: samples/s, real and padded tokens/s, step time, TFLOPs and MFU.

Model FLOPs count real (non-pad) tokens only, so padding never inflates them. Per token,
a matrix multiply costs 2 FLOPs per weight in the forward pass; the backward pass costs
2 more for the activation gradients and 2 for the weight gradients of trainable weights
only (LoRA skips most); gradient checkpointing repeats the forward. Attention adds
4·layers·hidden·length FLOPs per token and forward pass (scores and weighted sum).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from utils.distributed import DistInfo, all_reduce_sum

# Dense bf16/fp16 tensor-core peak TFLOP/s per GPU. First name fragment found in the
# device name wins, so the more specific names come first.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "GH200": 989.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "V100": 125.0,
}


@dataclass(frozen=True)
class FlopShape:
    """What the FLOP count of a training step depends on, besides its tokens."""

    params: int  # weights used in matrix multiplies (input embeddings excluded)
    trainable: int  # of those, the ones that get weight gradients
    layers: int
    hidden: int
    checkpointing: bool = False

    def training_flops(self, tokens: int, sum_sq_lengths: int) -> float:
        forwards = 2 if self.checkpointing else 1
        dense = (2 * forwards + 2) * self.params * tokens + 2 * self.trainable * tokens
        # Attention has no weights: its backward costs twice its forward.
        attention = (forwards + 2) * 4 * self.layers * self.hidden * sum_sq_lengths
        return float(dense + attention)


def build_flop_shape(model: torch.nn.Module, checkpointing: bool) -> FlopShape:
    """The FlopShape of a transformers causal LM (ZeRO-3 shards counted at full size)."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    params = trainable = 0
    for p in model.parameters():
        if p is embedding and not tied:  # a lookup, not a multiply
            continue
        n = getattr(p, "ds_numel", p.numel())
        params += n
        trainable += n if p.requires_grad else 0
    config = model.config
    return FlopShape(
        params=params,
        trainable=trainable,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        checkpointing=checkpointing,
    )


def lookup_peak_tflops(device_name: str, dtype: str, override: float | None) -> float | None:
    """Peak TFLOP/s for MFU: --peak_tflops, else the table for 16-bit training on a known GPU."""
    if override is not None:
        return override
    if dtype not in ("bf16", "fp16"):
        return None
    return next((peak for name, peak in PEAK_TFLOPS.items() if name in device_name), None)


class ThroughputMeter:
    """Counts the micro-batches a rank trains; `report()` sums all ranks (a collective)."""

    def __init__(
        self, shape: FlopShape, peak_tflops: float | None, device: torch.device, world_size: int
    ) -> None:
        self.shape, self.peak, self.device, self.world_size = shape, peak_tflops, device, world_size
        self.interval = self._zero()
        self.total = self._zero()
        self.started = time.perf_counter()
        self.paused_for = 0.0

    @staticmethod
    def _zero() -> dict[str, float]:
        return dict.fromkeys(("samples", "real", "padded", "sum_sq", "steps", "seconds"), 0.0)

    def add_batch(self, batch: dict[str, torch.Tensor]) -> None:
        lengths = batch["seq_lens"].to(torch.float64)
        for counts in (self.interval, self.total):
            counts["samples"] += len(lengths)
            counts["real"] += float(lengths.sum())
            counts["padded"] += batch["input_ids"].numel()
            counts["sum_sq"] += float((lengths**2).sum())

    def end_step(self) -> None:
        self.interval["steps"] += 1
        self.total["steps"] += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, saving) is not training time."""
        _synchronize(self.device)
        began = time.perf_counter()
        try:
            yield
        finally:
            self.paused_for += time.perf_counter() - began

    def report(self, overall: bool = False) -> dict[str, float | None]:
        """Figures since the last report (or since the start when `overall`), all ranks summed."""
        _synchronize(self.device)
        now = time.perf_counter()
        seconds = now - self.started - self.paused_for
        self.interval["seconds"] += seconds
        self.total["seconds"] += seconds
        self.started, self.paused_for = now, 0.0
        counts = self.total if overall else self.interval
        keys = ("samples", "real", "padded", "sum_sq")
        samples, real, padded, sum_sq = all_reduce_sum([counts[k] for k in keys], self.device)
        elapsed, steps = max(counts["seconds"], 1e-9), max(counts["steps"], 1.0)
        tflops = self.shape.training_flops(real, sum_sq) / elapsed / self.world_size / 1e12
        if not overall:
            self.interval = self._zero()
        return {
            "samples_per_s": samples / elapsed,
            "real_tokens_per_s": real / elapsed,
            "padded_tokens_per_s": padded / elapsed,
            "padding": 1 - real / max(padded, 1),
            "step_s": elapsed / steps,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak if self.peak else None,  # None: peak unknown
        }


def format_throughput(figures: dict[str, float | None]) -> str:
    line = (
        f"{figures['samples_per_s']:.2f} samples/s, {figures['real_tokens_per_s']:.0f} real "
        f"tokens/s, {figures['padded_tokens_per_s']:.0f} padded tokens/s "
        f"({figures['padding']:.0%} padding), step {figures['step_s']:.3f} s, "
        f"{figures['tflops_per_device']:.3g} TFLOPs/device"
    )
    mfu = figures["mfu"]
    return line if mfu is None else f"{line}, MFU {mfu:.1%}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_meter(
    engine, checkpointing: bool, peak_override: float | None, dist: DistInfo
) -> ThroughputMeter:
    """The meter for the engine's model, at the precision the engine really trains in."""
    dtype = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    device = dist.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak = lookup_peak_tflops(name, dtype, peak_override)
    shape = build_flop_shape(engine.module, checkpointing)
    return ThroughputMeter(shape, peak, device, dist.world_size)
