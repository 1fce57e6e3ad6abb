"""Honest training speed: samples/s, real and padded tokens/s, step time, TFLOPs and MFU.

Model FLOPs count real (non-pad) tokens only, so padding never inflates them. Per token,
a matrix multiply costs 2 FLOPs per weight in the forward pass; the backward pass costs
2 more for the activation gradients and 2 for the weight gradients of trainable weights
only (LoRA skips most); gradient checkpointing repeats the forward. Attention adds
4·layers·hidden·length FLOPs per token and forward pass (scores and weighted sum).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from utils.distributed import DistInfo, all_reduce_sum

# Dense (no 2:4 sparsity) bf16/fp16 tensor-core peak TFLOP/s per GPU, from the vendors'
# datasheets (half their "with sparsity" figures), keyed by the normalised name that
# torch.cuda.get_device_name() reports. V100 and T4 have no bf16: their fp16 peak.
# Matched exactly, never by substring: "L40" is not "L4", "H100 NVL" is not the SXM part.
# Left out on purpose: the A10G (AWS-only; NVIDIA publishes no datasheet and third-party
# figures disagree) and GeForce cards (their fp32-accumulate rate differs by model).
PEAK_TFLOPS = {
    "b200": 2250.0,  # HGX B200
    "h100 hbm3": 989.4,  # "NVIDIA H100 80GB HBM3": the SXM5 part
    "h100 sxm5": 989.4,
    "h100 pcie": 756.5,
    "h100 nvl": 835.5,
    "h800": 989.4,
    "h200": 989.4,  # SXM
    "h200 nvl": 835.5,
    "gh200": 989.4,  # "NVIDIA GH200 480GB"
    "gh200 hbm3e": 989.4,  # "NVIDIA GH200 144G HBM3e"
    "a100 sxm4": 312.0,  # "NVIDIA A100-SXM4-40GB" / "-80GB"
    "a100 pcie": 312.0,  # "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe"
    "a800 sxm4": 312.0,
    "a800 pcie": 312.0,
    "a30": 165.0,
    "a40": 149.7,
    "a10": 125.0,
    "l40s": 362.05,
    "l40": 181.05,
    "l4": 121.0,
    "rtx 6000 ada generation": 364.2,
    "rtx a6000": 154.8,
    "v100 sxm2": 125.0,  # fp16 ("Tesla V100-SXM2-16GB" / "-32GB")
    "v100 sxm3": 125.0,  # fp16 (DGX-2)
    "v100 pcie": 112.0,  # fp16
    "v100s pcie": 130.0,  # fp16
    "t4": 65.0,  # fp16
}
_VENDOR_PREFIXES = ("nvidia ", "tesla ")
_MEMORY_SIZE = re.compile(r"^\d+gb?$")  # "80gb", "480gb", "144g"


def normalize_device_name(name: str) -> str:
    """'NVIDIA A100-SXM4-80GB' -> 'a100 sxm4': lower case, no vendor prefix, no memory size,
    '-' and '_' read as spaces. Nothing else is dropped, so distinct parts stay distinct."""
    text = name.strip().lower()
    for prefix in _VENDOR_PREFIXES:
        text = text.removeprefix(prefix)
    words = text.replace("-", " ").replace("_", " ").split()
    return " ".join(w for w in words if not _MEMORY_SIZE.match(w))


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
    """Peak TFLOP/s for MFU: --peak_tflops, else the table for 16-bit training on a known GPU
    (None for any other name or precision: better no MFU than one against the wrong peak)."""
    if override is not None:
        return override
    if dtype not in ("bf16", "fp16"):
        return None
    return PEAK_TFLOPS.get(normalize_device_name(device_name))  # unknown: no MFU shown


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
