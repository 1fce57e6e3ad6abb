"""Throughput figures: real tokens only, FLOPs with LoRA and checkpointing factors, MFU peaks."""

from __future__ import annotations

import math

import torch

from utils.data.collate import collate
from utils.demo.tiny import build_opt_model
from utils.observe.throughput import (
    FlopShape,
    ThroughputMeter,
    build_flop_shape,
    format_throughput,
    lookup_peak_tflops,
)


def test_flops_follow_6n_full_4n_lora_8n_checkpointed():
    full = FlopShape(params=1000, trainable=1000, layers=2, hidden=8)
    lora = FlopShape(params=1000, trainable=0, layers=2, hidden=8)
    ckpt = FlopShape(params=1000, trainable=1000, layers=2, hidden=8, checkpointing=True)
    assert full.training_flops(10, 0) == 6 * 1000 * 10
    assert lora.training_flops(10, 0) == 4 * 1000 * 10
    assert ckpt.training_flops(10, 0) == 8 * 1000 * 10
    # Attention: 4*L*d*s per token forward, 3 passes' worth in training (12*L*d*s^2 per row).
    assert full.training_flops(0, 5**2) == 12 * 2 * 8 * 25


def test_flop_shape_counts_tied_head_once_and_skips_frozen(tiny_tokenizer):
    model = build_opt_model(tiny_tokenizer)
    total = sum(p.numel() for p in model.parameters())
    assert build_flop_shape(model, False).params == total  # tied: the head's multiply
    for p in model.model.decoder.layers.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in model.model.decoder.layers.parameters())
    assert build_flop_shape(model, False).trainable == total - frozen


def test_meter_counts_real_and_padded_tokens_across_steps():
    shape = FlopShape(params=100, trainable=100, layers=1, hidden=4)
    meter = ThroughputMeter(shape, peak_tflops=None, device=torch.device("cpu"), world_size=1)
    rows = [{"input_ids": [5] * n, "loss_spans": [[1, n]]} for n in (3, 10)]
    for _ in range(2):
        meter.add_batch(collate(rows, pad_token_id=1, loss_on="all", pad_to=32))
        meter.end_step()
    figures = meter.report()
    seconds = figures["step_s"] * 2
    assert math.isclose(figures["real_tokens_per_s"] * seconds, 26)
    assert math.isclose(figures["padded_tokens_per_s"] * seconds, 128)
    assert math.isclose(figures["samples_per_s"] * seconds, 4)
    assert math.isclose(figures["padding"], 1 - 26 / 128)
    assert figures["mfu"] is None and "MFU" not in format_throughput(figures)
    overall = meter.report(overall=True)  # the run so far: the same counts
    assert math.isclose(overall["padding"], figures["padding"])
    assert math.isclose(overall["samples_per_s"] / overall["real_tokens_per_s"], 4 / 26)


def test_peak_lookup_prefers_specific_names_and_the_override():
    assert lookup_peak_tflops("NVIDIA H100 PCIe", "bf16", None) == 756.0
    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3", "bf16", None) == 989.0
    assert lookup_peak_tflops("NVIDIA A100-SXM4-80GB", "fp16", None) == 312.0
    assert lookup_peak_tflops("NVIDIA A10", "bf16", None) == 125.0
    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3", "fp32", None) is None
    assert lookup_peak_tflops("cpu", "bf16", None) is None
    assert lookup_peak_tflops("cpu", "fp32", 2.1) == 2.1
